"""Records per second of a test set through the batched loop: rows prefilled together against one at a time.

    .venv/bin/python bench/prefill.py --threads 1 [--models tiny,cpu512] [--records 256] [--batch 16]
                                      [--tokens 16] [--prefill-rows 8] [--rounds 5] [--json OUT]

Issue 26, item 5. When rows finish, their slots are refilled with the next records; the rows
that enter at one refill are prefilled in one forward call (``decode_batch(...,
prefill_rows=N)``, right-padded) instead of one call each (``prefill_rows=1``, the loop before).
Both sides decode the same ``--records`` records (the harness's prompt plus 0-12 filler words,
so prompts differ in length as a test set's do), ``reempathy`` + ``attention-reweight``,
greedily, each exactly ``--tokens`` tokens (stop tokens banned; short answers, so that the
prefills are a visible share of the work), batches of ``--batch`` rows. A round runs both sides
back to back in a rotating order; the script prints each side's median records/s over rounds and
the median of the rounds' ratios. The greedy answers of the two sides are checked equal first
(the batched prefill is exact).

:func:`records_per_s` is also what ``bench/gpu.sh``'s ``prefill`` section runs on the GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def records_per_s(
    bb: Any,
    make_requests: Callable[[], list[Any]],
    tokens: int,
    batch: int,
    prefill_rows: int,
    cache: str = "dynamic",
    compile: bool = False,
    sync: Callable[[], None] = lambda: None,
) -> tuple[float, dict[Any, list[int]]]:
    """Records per second of one ``decode_batch`` call over ``make_requests()`` (built outside the timed region), and each record's ids."""
    from reempathy.decoding.batch import decode_batch
    from reempathy.decoding.loop import LoopOptions

    requests = make_requests()
    options = LoopOptions(max_new_tokens=tokens, greedy=True, strategy_name="prefill-bench", cache=cache, compile=compile)
    answers: dict[Any, list[int]] = {}
    sync()
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for key, result in decode_batch(bb, requests, options, batch, prefill_rows=prefill_rows):
            if result.counts.generated != tokens:
                raise RuntimeError(f"record {key} stopped after {result.counts.generated} tokens ({result.stop_reason})")
            answers[key] = result.ids
        sync()
        seconds = time.perf_counter() - start
    finally:
        gc.enable()
    return len(requests) / seconds, answers


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import harness

    bb = harness.backbone(name)

    def make() -> list[Any]:
        return harness.batch_requests(bb, harness.BATCH_VARIANT, args.records)

    sides = {"one at a time": 1, f"{args.prefill_rows} together": args.prefill_rows}
    _, one = records_per_s(bb, make, args.tokens, args.batch, 1)
    _, together = records_per_s(bb, make, args.tokens, args.batch, args.prefill_rows)
    if one != together:
        differ = sorted(k for k in one if one[k] != together.get(k))
        raise SystemExit(f"bench/prefill.py: greedy answers differ between the sides (records {differ[:5]}); not timing")
    rates: dict[str, list[float]] = {side: [] for side in sides}
    names = list(sides)
    for rnd in range(args.rounds):
        k = rnd % len(names)
        for side in names[k:] + names[:k]:
            rates[side].append(records_per_s(bb, make, args.tokens, args.batch, sides[side])[0])
    ratios = [t / o for t, o in zip(rates[names[1]], rates[names[0]])]
    return {
        "records_per_s": {side: statistics.median(v) for side, v in rates.items()},
        "rounds": rates,
        "together/one": statistics.median(ratios),
        "together/one rounds": ratios,
    }


def main(argv: list[str] | None = None) -> int:
    from reempathy.bench import environment

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,cpu512")
    p.add_argument("--records", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--prefill-rows", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"))
    load_before = os.getloadavg()
    results = {m.strip(): measure(m.strip(), args) for m in args.models.split(",") if m.strip()}
    load_after = os.getloadavg()
    print(
        f"machine: {env['cpu']}, {env['cores']} cores, torch {env['torch']} ({env['torch_threads']} threads); load average "
        f"{' '.join(f'{x:.2f}' for x in load_before)} before, {' '.join(f'{x:.2f}' for x in load_after)} after"
    )
    print(
        f"{args.records} records, batch {args.batch}, {args.tokens} tokens each (reempathy+reweight, greedy), "
        f"{args.rounds} rounds; greedy answers equal on both sides"
    )
    for m, r in results.items():
        rates = ", ".join(f"{side} {rate:.1f}" for side, rate in r["records_per_s"].items())
        q = statistics.quantiles(r["together/one rounds"], n=4) if len(r["together/one rounds"]) > 1 else [r["together/one"]] * 3
        print(f"[{m}] records/s (median): {rates};  together / one at a time {r['together/one']:.3f} (IQR {q[0]:.3f}-{q[2]:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

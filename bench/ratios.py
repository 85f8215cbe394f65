"""Print the performance targets as ratios measured side by side in one run.

    .venv/bin/python bench/ratios.py [--models tiny,cpu512,qwen-tiny] [--rounds 15] [--tokens 64]

Per model shape and round, the runs are interleaved (generate(), sft, reempathy+reweight, in an
order that rotates every round, ``--reps`` times over) so that drift in machine load hits every
side alike; a round keeps each side's fastest run (a burst from another process slows one run,
rarely all of them) and gives one ratio; the median over rounds is reported:

1. ``sft`` per-token latency / transformers ``generate()`` per-token latency  (target ≤ 1.00;
   on ``qwen-tiny``: our decode of the Qwen2.5-Omni thinker / the thinker's own ``generate()``)
2. ``reempathy`` + ``attention-reweight`` / ``sft``                             (target ≤ 1.05)
3. hook dispatch per token (the loop's two per-token hook calls, 5 no-op plugins registered)
   / one tiny-model decode step (median inter-token latency of the round's tiny sft run)
                                                                                 (target ≤ 2 %)
4. a batch of one through the batched loop / the single-row loop, ``reempathy`` +
   ``attention-reweight`` per token (an interleaved fourth side of 1–2)         (target ≤ 1.05)
5. batched throughput, ``--batch-models`` (default cpu512): tokens/s of batches of 4 and 16 over
   a batch of 1, ``reempathy`` + ``attention-reweight`` on rows of different prompt lengths
   (``--batch-rounds`` rounds, the three batch sizes interleaved; reported, no target)

Per-token latency is the whole call (prefill included) divided by the new tokens; every run
decodes exactly ``--tokens`` tokens greedily (stop tokens banned on both sides; see harness.py).
Garbage collection is paused inside each timed call (as ``timeit`` does), on every side alike.
Next to each median ratio the script prints the ratio of the two sides' fastest rounds, a
second estimate that other tenants of a shared machine disturb less.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from reempathy.bench import Clock, environment  # noqa: E402

TARGETS = {
    "sft/generate": 1.00,
    "reempathy+reweight/sft": 1.05,
    "dispatch/tiny step": 0.02,
    "batched-1/single": 1.05,
}


def quiet(fn):
    """``fn()`` with garbage collection paused (collected just before)."""
    gc.collect()
    gc.disable()
    try:
        return fn()
    finally:
        gc.enable()


def dispatch_seconds(pm, session, logits, reps: int) -> float:
    """Seconds per token of the loop's two per-token hook calls."""
    start = time.perf_counter()
    for _ in range(reps):
        harness.dispatch_once(pm, session, logits)
    return (time.perf_counter() - start) / reps


def measure_model(name: str, args: argparse.Namespace) -> dict:
    bb = harness.backbone(name, args.device)
    clock = Clock(bb.model.device)
    n = args.tokens
    inputs = harness.generate_inputs(bb)
    loop = {"cache": args.cache, "compile": args.compile}

    def run_generate() -> float:
        return quiet(lambda: clock.time(lambda: harness.run_generate(bb, inputs, n, args.cache, args.compile)))[1] / n

    def run_ours(variant: str) -> tuple[float, list[float]]:
        a = harness.decode_args(bb, variant, n, **loop)
        result, seconds = quiet(lambda: clock.time(lambda: harness.run_decode(a)))
        return seconds / n, result.timings.token_latencies_s

    def run_batched_one() -> float:
        variant = harness.BATCH_VARIANT
        requests = harness.batch_requests(bb, variant, 1)
        return quiet(lambda: clock.time(lambda: harness.run_batch(bb, requests, n, 1, variant)))[1] / n

    sides = ["generate", "sft", "reempathy+reweight"]
    if not args.compile and args.cache == "dynamic":  # the batched loop runs eagerly on a dynamic cache
        sides.append("batched-1")
    for _ in range(args.warmup):
        run_generate()
        run_ours("sft")
        run_ours("reempathy+reweight")
        if "batched-1" in sides:
            run_batched_one()
    per_token: dict[str, list[float]] = {s: [] for s in sides}
    steps: list[float] = []
    r_sft, r_rw, r_b1 = [], [], []
    for rnd in range(args.rounds if name == "tiny" else args.large_rounds):
        got: dict[str, float] = {side: math.inf for side in sides}
        for _ in range(args.reps):
            k = rnd % len(sides)
            for side in sides[k:] + sides[:k]:
                if side == "generate":
                    got[side] = min(got[side], run_generate())
                elif side == "batched-1":
                    got[side] = min(got[side], run_batched_one())
                else:
                    seconds, latencies = run_ours(side)
                    got[side] = min(got[side], seconds)
                    if side == "sft":
                        steps.append(statistics.median(latencies[1:]))
        for side in sides:
            per_token[side].append(got[side])
        r_sft.append(got["sft"] / got["generate"])
        r_rw.append(got["reempathy+reweight"] / got["sft"])
        if "batched-1" in got:
            r_b1.append(got["batched-1"] / got["reempathy+reweight"])
    out = {
        "per_token_ms": {s: statistics.median(v) * 1e3 for s, v in per_token.items()},
        "sft/generate": statistics.median(r_sft),
        "reempathy+reweight/sft": statistics.median(r_rw),
        "sft/generate fastest": min(per_token["sft"]) / min(per_token["generate"]),
        "reempathy+reweight/sft fastest": min(per_token["reempathy+reweight"]) / min(per_token["sft"]),
        "sft/generate rounds": r_sft,
        "reempathy+reweight/sft rounds": r_rw,
        "step_s": steps,
    }
    if r_b1:
        out["batched-1/single"] = statistics.median(r_b1)
        out["batched-1/single fastest"] = min(per_token["batched-1"]) / min(per_token["reempathy+reweight"])
        out["batched-1/single rounds"] = r_b1
    return out


def measure_batches(name: str, args: argparse.Namespace) -> dict:
    """Tokens/s of each batch size over batch size 1 (interleaved rounds, fastest of ``--reps`` per round)."""
    bb = harness.backbone(name, args.device)
    clock = Clock(bb.model.device)
    n, variant = args.tokens, harness.BATCH_VARIANT
    sizes = list(harness.BATCH_SIZES)

    def tokens_per_s(size: int) -> float:
        rows = 4 if size == 1 else 2 * size  # a rate: batch 1 needs no more rows to be measured
        requests = harness.batch_requests(bb, variant, rows)
        total, seconds = quiet(lambda: clock.time(lambda: harness.run_batch(bb, requests, n, size, variant)))
        return total / seconds

    for size in sizes:
        tokens_per_s(size)  # warm-up
    rates: dict[int, list[float]] = {size: [] for size in sizes}
    for rnd in range(args.batch_rounds):
        k = rnd % len(sizes)
        for size in sizes[k:] + sizes[:k]:
            rates[size].append(max(tokens_per_s(size) for _ in range(args.reps)))
    return {
        "tokens_per_s": {size: statistics.median(v) for size, v in rates.items()},
        "over_batch_1": {
            size: statistics.median(r / b for r, b in zip(rates[size], rates[1])) for size in sizes if size != 1
        },
    }


def measure_dispatch(args: argparse.Namespace, tiny_steps: list[float]) -> dict:
    bb = harness.backbone("tiny", args.device)
    managers = {k: harness.dispatch_pm(bb, k) for k in (0, 1, 5)}
    for k, (pm, session, logits) in managers.items():
        dispatch_seconds(pm, session, logits, 2000)  # warm-up
    per_k: dict[int, list[float]] = {k: [] for k in managers}
    for _ in range(len(tiny_steps)):
        for k, (pm, session, logits) in managers.items():
            per_k[k].append(quiet(lambda: dispatch_seconds(pm, session, logits, args.dispatch_reps)))
    ratios = [d / step for d, step in zip(per_k[5], tiny_steps)]
    return {
        "dispatch_us": {k: statistics.median(v) * 1e6 for k, v in per_k.items()},
        "tiny_step_ms": statistics.median(tiny_steps) * 1e3,
        "dispatch/tiny step": statistics.median(ratios),
    }


def verdict(value: float, target: float) -> str:
    return "ok" if value <= target else "MISSED"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,cpu512,qwen-tiny", help=f"model shapes, from {', '.join(harness.MODELS)}")
    p.add_argument("--rounds", type=int, default=41, help="rounds on the tiny model")
    p.add_argument("--large-rounds", type=int, default=11, help="rounds on the other shapes (cpu512, qwen-tiny)")
    p.add_argument("--warmup", type=int, default=2, help="unrecorded rounds first")
    p.add_argument("--reps", type=int, default=3, help="runs per side in a round; the round keeps each side's fastest")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per run")
    p.add_argument("--dispatch-reps", type=int, default=2000, help="hook calls per dispatch measurement")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", default="dynamic", choices=["dynamic", "static"])
    p.add_argument("--compile", action="store_true", help="torch.compile our decode steps (needs --cache static)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--batch-models", default="cpu512", help="model shapes for batched throughput ('' to skip)")
    p.add_argument("--batch-rounds", type=int, default=5, help="rounds of batched throughput")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    batch_models = [m.strip() for m in args.batch_models.split(",") if m.strip()]
    unknown = [m for m in models + batch_models if m not in harness.MODELS]
    if unknown:
        p.error(f"unknown model {unknown[0]!r}; choose from {', '.join(harness.MODELS)}")

    load_before = os.getloadavg()
    env = environment(torch.device(args.device))
    results = {m: measure_model(m, args) for m in models}
    tiny_steps = results["tiny"]["step_s"] if "tiny" in results else measure_model("tiny", args)["step_s"]
    dispatch = measure_dispatch(args, tiny_steps)
    batches = {m: measure_batches(m, args) for m in batch_models} if not args.compile and args.cache == "dynamic" else {}
    load_after = os.getloadavg()

    print(
        f"machine: {env['gpu'] or env['cpu']}, {env['cores']} cores, torch {env['torch']} ({env['torch_threads']} threads), "
        f"transformers {env['transformers']}, device {args.device}, cache {args.cache}"
        f"{', compiled' if args.compile else ''}"
    )
    print(
        f"load average (1/5/15 min): {' '.join(f'{x:.2f}' for x in load_before)} before, "
        f"{' '.join(f'{x:.2f}' for x in load_after)} after; {args.rounds} rounds (tiny), "
        f"{args.large_rounds} (larger), each the fastest of {args.reps} runs per side, × {args.tokens} tokens"
    )
    for m, r in results.items():
        pt = r["per_token_ms"]
        print(f"\n[{m}] per-token ms (median): " + ", ".join(f"{k} {v:.3f}" for k, v in pt.items()))
        for key in ("sft/generate", "reempathy+reweight/sft", "batched-1/single"):
            if key not in r:
                continue
            q1, _, q3 = statistics.quantiles(r[key + " rounds"], n=4)
            print(
                f"  {key:<24}{r[key]:8.3f}   target ≤ {TARGETS[key]:.2f}   {verdict(r[key], TARGETS[key]):<6}"
                f"  (rounds' IQR {q1:.3f}–{q3:.3f}; fastest rounds: {r[key + ' fastest']:.3f})"
            )
    d = dispatch
    print(
        "\n[hook dispatch] per token: "
        + ", ".join(f"{k} no-op plugins {v:.2f} µs" for k, v in d["dispatch_us"].items())
        + f"; tiny decode step {d['tiny_step_ms']:.3f} ms"
    )
    key = "dispatch/tiny step"
    print(f"  {key:<24}{d[key] * 100:7.2f} %   target ≤ {TARGETS[key] * 100:.0f} %    {verdict(d[key], TARGETS[key])}")
    for m, b in batches.items():
        print(
            f"\n[{m} batched {harness.BATCH_VARIANT}] tokens/s (median): "
            + ", ".join(f"batch {size} {rate:.1f}" for size, rate in b["tokens_per_s"].items())
        )
        for size, ratio in b["over_batch_1"].items():
            print(f"  {f'batch {size} / batch 1':<24}{ratio:8.2f}x  tokens/s")
    if args.json:
        doc = {
            "environment": env,
            "load_before": load_before,
            "load_after": load_after,
            "args": vars(args),
            "models": {m: {k: v for k, v in r.items() if k != "step_s"} for m, r in results.items()},
            "dispatch": dispatch,
            "batches": batches,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load test of `reempathy serve`: N concurrent realtime clients on loopback, and the check that nothing is lost.

    .venv/bin/python bench/serve_load.py [--model tiny|cpu512] [--sessions 1,4,16] [--tokens 64]
                                         [--strategy reempathy] [--rounds-sessions 16] [--timeout 600]
                                         [--device cpu] [--json OUT.json]

For each N: a server on a loopback port in this process (the batched loop with N rows, the tiny
random speech tokenizer and decoder, so that audio goes out), then rounds of N clients at once,
each asking one text question (the harness prompt plus 0-12 words, so prompts differ in length)
and reading its answer to ``response.done``. Every answer runs its whole budget (stop tokens
banned) greedily. Rounds: ``--rounds-sessions // N`` (at least 1), so each N gives about as many
samples.

Reported per N: aggregate tokens/s (all tokens of a round / the round's wall time, median over
rounds), time to first audio (``response.create`` sent → first ``response.output_audio.delta``
received) p50 and p99 over every session, per-session tokens/s (its tokens / its
``response.create`` → ``response.done``), p50. Checked: every session ends ``incomplete`` (the
budget) with exactly ``--tokens`` tokens, and its transcript equals `reempathy decode`'s for the
same prompt and seed (greedy; decoded here on a second copy of the backbone).

Bounded: at most 64 sessions, and ``--timeout`` seconds per N (a round that has not finished is
an error, not a hang).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pydantic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import FILLER, MODELS, PROMPT  # noqa: E402

from reempathy.config import load_config  # noqa: E402
from reempathy.registry import discover  # noqa: E402
from reempathy.hooks import hookimpl  # noqa: E402
from reempathy.runner import load_backbone, run_decode  # noqa: E402
from reempathy.serve.loopback import receive_until, running_server, send, session  # noqa: E402

MAX_SESSIONS = 64
STRATEGIES = {
    "sft": '[strategy]\nname = "sft"\n',
    "reempathy": (
        '[strategy]\nname = "reempathy"\ntext_tokens = 5\naudio_tokens = 10\nreflect = true\nmax_reflection_tokens = 8\n\n'
        '[[processors]]\nname = "attention-reweight"\nfactor = 1.15\n'
    ),
}


class _NoStopOptions(pydantic.BaseModel):
    pass


class _NoStop:
    """Bans the stop tokens: every answer runs its whole budget (equal work per session)."""

    def __init__(self, options: _NoStopOptions, backbone: Any) -> None:
        self.ids = list(backbone.layout.stop_ids)

    @hookimpl
    def reempathy_logits(self, session: Any, logits: Any) -> None:
        logits[self.ids] = float("-inf")


class _Plugins:
    @hookimpl
    def reempathy_register_processors(self, register: Any) -> None:
        register("bench-no-stop", _NoStop, _NoStopOptions)


def write_config(folder: Path, model: str, strategy: str, tokens: int, sessions: int, device: str) -> Path:
    """A serve config with one model: the shape, the strategy, greedy, stop tokens banned."""
    shape = "".join(f"{k} = {v}\n" for k, v in MODELS[model].items())
    (folder / "model.toml").write_text(
        f'[backbone]\nname = "tiny"\nseed = 0\ndevice = "{device}"\n{shape}\n{STRATEGIES[strategy]}\n'
        '[[processors]]\nname = "bench-no-stop"\n\n'
        f"[sampling]\ngreedy = true\nseed = 0\n\n[decode]\nmax_new_tokens = {tokens}\n"
    )
    (folder / "serve.toml").write_text(
        f"[serve]\nmax_sessions = {sessions}\nmax_output_tokens = {tokens}\nprefill_tokens_per_step = 1024\n"
        'speech_tokenizer = "tiny"\nspeech_decoder = "tiny"\n\n[[serve.models]]\nname = "bench"\nconfig = "model.toml"\n'
    )
    return folder / "serve.toml"


def prompt(n: int) -> str:
    return " ".join([PROMPT, *FILLER[: n % 13]])


async def one_session(url: str, text: str, tokens: int) -> dict[str, Any]:
    async with await session(url, "bench", max_output_tokens=tokens) as ws:
        await send(ws, type="conversation.item.create",
                   item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})
        await receive_until(ws, "conversation.item.done")
        t0 = time.perf_counter()
        await send(ws, type="response.create")
        first_audio = None
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == "response.output_audio.delta" and first_audio is None:
                first_audio = time.perf_counter() - t0
            elif event["type"] == "response.done":
                total = time.perf_counter() - t0
                response = event["response"]
                return {
                    "prompt": text, "status": response["status"], "tokens": response["usage"]["output_tokens"],
                    "transcript": response["output"][0]["content"][0].get("transcript", ""),
                    "ttfa_s": first_audio, "total_s": total,
                }


async def one_round(url: str, n: int, offset: int, tokens: int) -> tuple[float, list[dict[str, Any]]]:
    t0 = time.perf_counter()
    sessions = await asyncio.gather(*(one_session(url, prompt(offset + i), tokens) for i in range(n)))
    return time.perf_counter() - t0, sessions


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cpu512", choices=[m for m in MODELS if m != "qwen-tiny"])
    p.add_argument("--strategy", default="reempathy", choices=list(STRATEGIES))
    p.add_argument("--sessions", default="1,4,16", help="comma-separated session counts")
    p.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    p.add_argument("--rounds-sessions", type=int, default=16, help="about this many sessions per N (rounds = this // N)")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per N")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.sessions.split(",")]
    if any(not 1 <= n <= MAX_SESSIONS for n in counts) or not 1 <= args.tokens <= 4096:
        p.error(f"sessions must be 1-{MAX_SESSIONS} and tokens 1-4096")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    registry = discover([("bench", _Plugins())], installed=False).registry
    rows: list[dict[str, Any]] = []
    reference_backbone = None
    expected: dict[str, Any] = {}
    lost = 0
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            folder = Path(tmp) / f"n{n}"
            folder.mkdir()
            config = write_config(folder, args.model, args.strategy, args.tokens, n, args.device)
            rounds = max(1, args.rounds_sessions // n)
            with running_server(config, registry) as served:
                walls, sessions = [], []

                async def rounds_of() -> None:
                    for r in range(rounds):
                        wall, got = await one_round(served.ws, n, r * n, args.tokens)
                        walls.append(wall)
                        sessions.extend(got)

                async def bounded() -> None:
                    async with asyncio.timeout(args.timeout):
                        await rounds_of()

                asyncio.run(bounded())
                steps = served.server.scheduler.steps
            if reference_backbone is None:
                cfg = load_config(folder / "model.toml", [], None, registry)
                reference_backbone = load_backbone(cfg, registry)
            cfg = load_config(folder / "model.toml", [], None, registry)
            for s in sessions:
                if s["prompt"] not in expected:
                    expected[s["prompt"]] = run_decode(cfg, registry, prompt=s["prompt"], backbone=reference_backbone)
                want = expected[s["prompt"]]
                ok = s["transcript"] == want.spoken_text and s["tokens"] == want.counts.generated == args.tokens
                s["matches_offline"] = ok
                lost += not ok
            ttfa = [s["ttfa_s"] for s in sessions if s["ttfa_s"] is not None]
            row = {
                "sessions": n, "rounds": rounds, "answers": len(sessions), "batch_steps": steps,
                "aggregate_tokens_per_s": statistics.median(n * args.tokens / w for w in walls),
                "ttfa_p50_ms": 1000 * percentile(ttfa, 0.5) if ttfa else None,
                "ttfa_p99_ms": 1000 * percentile(ttfa, 0.99) if ttfa else None,
                "session_tokens_per_s_p50": statistics.median(s["tokens"] / s["total_s"] for s in sessions),
                "all_match_offline": all(s["matches_offline"] for s in sessions),
            }
            rows.append(row)
            print(
                f"{args.model} {args.strategy} N={n:>2}: {row['aggregate_tokens_per_s']:7.1f} tok/s aggregate, "
                f"TTFA p50 {row['ttfa_p50_ms'] or float('nan'):6.0f} ms p99 {row['ttfa_p99_ms'] or float('nan'):6.0f} ms, "
                f"{row['session_tokens_per_s_p50']:6.1f} tok/s per session, {len(sessions)} answers, "
                f"all equal to offline: {row['all_match_offline']}",
                flush=True,
            )
    if args.json:
        meta = {"model": args.model, "strategy": args.strategy, "tokens": args.tokens, "device": args.device,
                "date": time.strftime("%Y-%m-%d"), "rows": rows}
        Path(args.json).write_text(json.dumps(meta, indent=2) + "\n")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())

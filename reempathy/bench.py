"""``reempathy bench``: decode latency per strategy, as a listener would feel it.

For each strategy (the config's, or each of ``--strategies``) on one loaded backbone: a warm-up
run, then ``--runs`` timed runs through the same path as ``reempathy decode``. Reported per
strategy (medians over the runs unless said otherwise):

* ``time_to_first_token_s``: decode start (prefill included) to the first sampled token;
* ``time_to_first_audio_s``: decode start to the first spoken audio unit (null if none);
* ``inter_token_latency_s``: p50/p90/p99 over every decode step of every run (the first token
  is left out: its forward pass is the prefill);
* ``tokens_per_s``: sampled tokens (spoken and hidden) per second of decoding;
* ``hidden_per_spoken``: hidden content tokens (reflections, thoughts) per spoken token
  (text + audio);
* ``realtime_margin``: audio units produced per second of decoding ÷ the backbone's audio rate
  (12.5 Hz for GLM-4-Voice): above 1 the answer is produced faster than it plays. None for a
  text-only spoken stream (Qwen2.5-Omni): its speech is the talker's, which this does not run.

"Seconds of decoding" are the loop's own ``timings.total_s`` (prefill plus every step). Each
step ends when the sampled token reaches the host, which synchronises a GPU, so per-token
times are real on CUDA too; the whole call is also timed with CUDA events there
(``wall_s``), with ``perf_counter`` elsewhere. The JSON schema (``reempathy.bench/1``) is
documented in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from reempathy.errors import ConfigError
from reempathy.hooks import hookimpl
from reempathy.options import count_arg
from reempathy.safe_write import check_output_file, write_text, write_with

BENCH_SCHEMA = "reempathy.bench/1"
TRACE_PROCESSOR = "bench-phase-trace"
NO_STOP_PROCESSOR = "bench-ignore-stop"


# --- timing ---------------------------------------------------------------------------------


class Clock:
    """Times a call: CUDA events on a CUDA device (the GPU's own timeline), ``perf_counter`` elsewhere."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.name = "cuda-events" if self.cuda else "perf_counter"

    def time(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """``(fn(), seconds)``."""
        if not self.cuda:
            start = time.perf_counter()
            out = fn()
            return out, time.perf_counter() - start
        import torch

        torch.cuda.synchronize(self.device)
        start_ev = torch.cuda.Event(enable_timing=True)
        end_ev = torch.cuda.Event(enable_timing=True)
        start_ev.record()
        out = fn()
        end_ev.record()
        end_ev.synchronize()
        return out, start_ev.elapsed_time(end_ev) / 1e3


# --- bench-only plugins -----------------------------------------------------------------------


class PhaseTrace:
    """Observer for the warm-up run: the phase and position of every decode step.

    The logits hook runs once per sampled token, so step ``i`` here is latency index ``i`` in
    ``timings.token_latencies_s`` (a final stop token's step is dropped by the loop, and here).
    """

    def __init__(self, options: Any = None, backbone: Any = None) -> None:
        self.steps: list[tuple[int, str | None, bool, int]] = []

    @hookimpl
    def reempathy_logits(self, session: Any, logits: Any) -> None:
        seg = session.segment
        self.steps.append((len(session.ids), session.phase, session.hidden, seg.index if seg is not None else 0))


class IgnoreStop:
    """Bans the backbone's stop tokens, so every answer runs the whole budget (``--ignore-stop``)."""

    def __init__(self, options: Any, backbone: Any) -> None:
        self.ids = list(backbone.layout.stop_ids)

    @hookimpl
    def reempathy_logits(self, session: Any, logits: Any) -> None:
        logits[self.ids] = float("-inf")


def _bench_registry(base: Any, trace: PhaseTrace) -> Any:
    """A copy of the registry with the bench-only processors added (the process-wide one is left alone)."""
    from pydantic import BaseModel, ConfigDict

    from reempathy.registry import Registration, Registry

    class NoOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")

    registry = Registry()
    registry.items = {kind: dict(table) for kind, table in base.items.items()}
    registry.add(Registration("processor", TRACE_PROCESSOR, lambda o, b: trace, NoOptions, "bench", "reempathy.bench"))
    registry.add(Registration("processor", NO_STOP_PROCESSOR, IgnoreStop, NoOptions, "bench", "reempathy.bench"))
    return registry


# --- measurements ---------------------------------------------------------------------------


@dataclass
class RunStats:
    """One timed run."""

    time_to_first_token_s: float | None
    time_to_first_audio_s: float | None
    decode_s: float
    wall_s: float
    generated_tokens: int
    forced_tokens: int
    spoken_tokens: int
    hidden_tokens: int
    audio_units: int
    stop_reason: str
    token_latencies_s: list[float]

    @property
    def tokens_per_s(self) -> float | None:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else None

    def realtime_margin(self, audio_rate_hz: float | None) -> float | None:
        if audio_rate_hz is None or self.decode_s <= 0:
            return None
        return self.audio_units / self.decode_s / audio_rate_hz

    @property
    def hidden_per_spoken(self) -> float | None:
        return self.hidden_tokens / self.spoken_tokens if self.spoken_tokens else None


def run_stats(result: Any, wall_s: float) -> RunStats:
    """The numbers of one :class:`~reempathy.decoding.result.DecodeResult`."""
    t = result.timings
    return RunStats(
        time_to_first_token_s=t.time_to_first_token_s,
        time_to_first_audio_s=t.time_to_first_audio_s,
        decode_s=t.total_s,
        wall_s=wall_s,
        generated_tokens=result.counts.generated,
        forced_tokens=result.counts.forced,
        spoken_tokens=len(result.spoken_text_ids) + len(result.audio_units),
        hidden_tokens=sum(len(h.ids) for h in result.hidden),
        audio_units=len(result.audio_units),
        stop_reason=result.stop_reason,
        token_latencies_s=list(t.token_latencies_s),
    )


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile ``q`` (0–100) of ``values``; None when empty."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def hidden_steps(trace: list[tuple[int, str | None, bool, int]], n_steps: int) -> list[dict[str, Any]]:
    """Maximal runs of decode steps spent in one hidden segment: ``{"kind", "index", "start", "end"}`` (step indices, end exclusive)."""
    runs: list[dict[str, Any]] = []
    for i, (_, phase, hidden, index) in enumerate(trace[:n_steps]):
        if not hidden:
            continue
        last = runs[-1] if runs else None
        if last and last["end"] == i and last["kind"] == phase and last["index"] == index:
            last["end"] = i + 1
        else:
            runs.append({"kind": phase, "index": index, "start": i, "end": i + 1})
    return runs


@dataclass
class StrategyBench:
    """Every run of one strategy, plus what the warm-up traced."""

    strategy: str
    processors: list[str]
    audio_rate_hz: float | None  # None: a text-only spoken stream has no audio units to time
    runs: list[RunStats] = field(default_factory=list)
    hidden_steps: list[dict[str, Any]] = field(default_factory=list)
    trace_matches: bool = True

    def summary(self) -> dict[str, Any]:
        """The reported fields (see the module docstring and bench/README.md)."""
        itl = [x for r in self.runs for x in r.token_latencies_s[1:]]
        return {
            "strategy": self.strategy,
            "processors": self.processors,
            "time_to_first_token_s": _median([r.time_to_first_token_s for r in self.runs]),
            "time_to_first_audio_s": _median([r.time_to_first_audio_s for r in self.runs]),
            "inter_token_latency_s": {
                "p50": percentile(itl, 50),
                "p90": percentile(itl, 90),
                "p99": percentile(itl, 99),
            },
            "tokens_per_s": _median([r.tokens_per_s for r in self.runs]),
            "hidden_per_spoken": _median([r.hidden_per_spoken for r in self.runs]),
            "realtime_margin": _median([r.realtime_margin(self.audio_rate_hz) for r in self.runs]),
            "generated_tokens": _median([r.generated_tokens for r in self.runs]),
            "spoken_tokens": _median([r.spoken_tokens for r in self.runs]),
            "hidden_tokens": _median([r.hidden_tokens for r in self.runs]),
            "audio_units": _median([r.audio_units for r in self.runs]),
            "decode_s": _median([r.decode_s for r in self.runs]),
            "wall_s": _median([r.wall_s for r in self.runs]),
            "hidden_steps": self.hidden_steps,
            "trace_matches": self.trace_matches,
            "runs": [
                {
                    "time_to_first_token_s": r.time_to_first_token_s,
                    "time_to_first_audio_s": r.time_to_first_audio_s,
                    "decode_s": r.decode_s,
                    "wall_s": r.wall_s,
                    "generated_tokens": r.generated_tokens,
                    "forced_tokens": r.forced_tokens,
                    "spoken_tokens": r.spoken_tokens,
                    "hidden_tokens": r.hidden_tokens,
                    "audio_units": r.audio_units,
                    "stop_reason": r.stop_reason,
                    "token_latencies_s": r.token_latencies_s,
                }
                for r in self.runs
            ],
        }


def environment(device: Any) -> dict[str, Any]:
    """Where the numbers came from: versions, CPU, cores, GPU, load average."""
    import torch
    import transformers

    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if getattr(device, "type", None) == "cuda":
        gpu = torch.cuda.get_device_name(device)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# --- the command ----------------------------------------------------------------------------


def _strategy_names(spec: str | None) -> list[str] | None:
    if spec is None:
        return None
    names = list(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    if not names:
        raise ConfigError("--strategies: give at least one strategy name, e.g. --strategies sft,reempathy")
    return names


def _check_writable(path: str | None, flag: str) -> None:
    """Fail before measuring, not after, when an output cannot be written."""
    if path is not None:
        check_output_file(path, flag)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every strategy and return the ``reempathy.bench/1`` document."""
    from reempathy.config import load_config
    from reempathy.registry import default_discovery
    from reempathy.runner import load_backbone, run_decode, sampling_chain

    if args.runs < 1:
        raise ConfigError(f"--runs must be at least 1, got {args.runs}")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    overrides = list(args.overrides)
    if args.max_new_tokens is not None:
        overrides.append(f"decode.max_new_tokens={args.max_new_tokens}")
    if args.cache is not None:
        overrides.append(f'decode.cache="{args.cache}"')
    if args.compile:
        overrides.append("decode.compile=true")
    _check_writable(args.json, "--json")
    _check_writable(args.plot, "--plot")

    base = default_discovery().registry
    names = _strategy_names(args.strategies)
    first = load_config(args.config, overrides, names[0] if names else None, base)
    names = names or [first.strategy.name]
    # Validate every strategy before the backbone is loaded: a typo should cost nothing.
    configs = {name: load_config(args.config, overrides, name, base) for name in names}
    backbone = load_backbone(first, base)
    clock = Clock(backbone.model.device)
    rate = None if backbone.stream.text_only else float(backbone.stream.audio_rate_hz)

    benches: list[StrategyBench] = []
    for name, cfg in configs.items():
        trace = PhaseTrace()
        registry = _bench_registry(base, trace)
        extra = [{"name": NO_STOP_PROCESSOR}] if args.ignore_stop else []
        timed = cfg.model_copy(update={"processors": [*cfg.processors, *map(_component, extra)]})
        warm = timed.model_copy(update={"processors": [*timed.processors, _component({"name": TRACE_PROCESSOR})]})
        processors = [p.name for p in timed.processors] + [n for n, _ in sampling_chain(timed, backbone)]
        bench = StrategyBench(name, processors, rate)
        warm_result = run_decode(warm, registry, backbone=backbone)
        bench.hidden_steps = hidden_steps(trace.steps, len(warm_result.timings.token_latencies_s))
        for _ in range(args.runs):
            result, wall = clock.time(lambda: run_decode(timed, registry, backbone=backbone))
            bench.runs.append(run_stats(result, wall))
            bench.trace_matches &= result.ids == warm_result.ids
        benches.append(bench)

    return {
        "schema": BENCH_SCHEMA,
        "config": args.config,
        "backbone": backbone.name,
        "device": str(backbone.model.device),
        "timer": clock.name,
        "cache": first.decode.cache,
        "compile": first.decode.compile,
        "ignore_stop": bool(args.ignore_stop),
        "runs": args.runs,
        "max_new_tokens": first.decode.max_new_tokens,
        "audio_rate_hz": rate,
        "environment": environment(backbone.model.device),
        "strategies": {b.strategy: b.summary() for b in benches},
    }


def _component(data: dict[str, Any]) -> Any:
    from reempathy.config import ComponentConfig

    return ComponentConfig.model_validate(data)


def _ms(value: float | None) -> str:
    return f"{value * 1e3:.2f}" if value is not None else "-"


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return f"{value:{fmt}}{suffix}" if value is not None else "-"


def align(rows: list[list[str]], left: int = 1, gap: int = 2) -> list[str]:
    """Lay out ``rows`` (the first is the header) in columns as wide as their widest cell.

    The first ``left`` columns are left-aligned (names), the rest right-aligned (numbers), so a
    long strategy name or a large figure widens its column instead of pushing the others.
    """
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        (" " * gap).join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    ]


def format_table(doc: dict[str, Any]) -> str:
    """The human table printed on stdout."""
    env = doc["environment"]
    where = env["gpu"] or env["cpu"] or "?"
    rows = [["strategy", "TTFT", "TTFA", "ITL p50", "p90", "p99", "tok/s", "hidden/spoken", "RT margin", "tokens"]]
    for s in doc["strategies"].values():
        itl = s["inter_token_latency_s"]
        rows.append(
            [
                s["strategy"],
                _ms(s["time_to_first_token_s"]),
                _ms(s["time_to_first_audio_s"]),
                _ms(itl["p50"]),
                _ms(itl["p90"]),
                _ms(itl["p99"]),
                _num(s["tokens_per_s"], ".1f"),
                _num(s["hidden_per_spoken"], ".2f"),
                _num(s["realtime_margin"], ".2f", "x"),
                f"{s['generated_tokens']:.0f}",
            ]
        )
    lines = [
        f"backbone {doc['backbone']} on {doc['device']} ({where}), cache {doc['cache']}"
        f"{', compiled' if doc['compile'] else ''}, timer {doc['timer']}",
        f"{doc['runs']} timed run(s) per strategy after a warm-up, max_new_tokens {doc['max_new_tokens']}"
        f"{', stop tokens banned' if doc['ignore_stop'] else ''}; times in ms",
        "",
        *align(rows),
        "",
        (
            "RT margin: - (a text-only spoken stream: its speech is made by the talker, not timed here)"
            if doc["audio_rate_hz"] is None
            else f"RT margin: audio units per second of decoding / {doc['audio_rate_hz']:g} Hz (above 1: faster than playback)"
        ),
    ]
    return "\n".join(lines)


def write_plot(doc: dict[str, Any], path: str) -> None:
    """PNG of per-token latency along each answer, hidden segments shaded (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    strategies = list(doc["strategies"].values())
    fig, axes = plt.subplots(len(strategies), 1, figsize=(10, 2.6 * len(strategies)), squeeze=False)
    colors = {"reflection": "tab:orange", "thought": "tab:purple"}
    for ax, s in zip(axes[:, 0], strategies):
        runs = [r["token_latencies_s"] for r in s["runs"]]
        length = min(len(r) for r in runs) if runs else 0
        # Per step, the median over the runs: one run's scheduler hiccups do not dominate.
        ys = [statistics.median(r[i] for r in runs) * 1e3 for i in range(length)]
        ax.plot(range(length), ys, lw=1.0, color="tab:blue", label="latency")
        seen: set[str] = set()
        if s["trace_matches"]:
            for seg in s["hidden_steps"]:
                kind = seg["kind"] or "hidden"
                ax.axvspan(
                    seg["start"] - 0.5,
                    seg["end"] - 0.5,
                    color=colors.get(kind, "tab:gray"),
                    alpha=0.25,
                    lw=0,
                    label=kind if kind not in seen else None,
                )
                seen.add(kind)
        ttft = s["time_to_first_token_s"]
        ax.set_title(
            f"{s['strategy']}  (TTFT {ttft * 1e3:.1f} ms, {length} tokens)" if ttft else s["strategy"], fontsize=10
        )
        ax.set_ylabel("ms / token")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.5, max(length, 1) - 0.5)
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("sampled token of the answer (spoken and hidden)")
    fig.suptitle(f"per-token decode latency, backbone {doc['backbone']} on {doc['device']}", fontsize=11)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)


def cmd_bench(args: argparse.Namespace) -> int:
    """``reempathy bench``: measure, print the table, write ``--json`` and ``--plot``."""
    doc = run_bench(args)
    print(format_table(doc))
    if args.json:
        text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
        write_text(args.json, text, "--json")
        print(f"wrote {args.json}")
    if args.plot:
        write_with(args.plot, lambda tmp: write_plot(doc, str(tmp)), "--plot")
        print(f"wrote {args.plot}")
    return 0


def _threads_arg(text: str) -> int:
    value = count_arg(text)
    if value > 1024:
        raise argparse.ArgumentTypeError(f"{text} threads is more than any machine has; give 1 to 1024")
    return value


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to the CLI's subparsers; it runs :func:`cmd_bench`."""
    p = subparsers.add_parser("bench", help="decode latency per strategy: TTFT, inter-token latency, real-time margin")
    p.add_argument("--config", "-c", help="TOML config file (default: built-in tiny backbone, sft)")
    p.add_argument("--strategies", help="comma-separated strategies to compare (default: the config's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set sampling.greedy=true (repeatable)")
    p.add_argument("--runs", type=count_arg, default=3, help="timed runs per strategy after one warm-up (default 3)")
    p.add_argument("--max-new-tokens", type=count_arg, help="token budget of each answer")
    p.add_argument("--cache", choices=["dynamic", "static"], help="KV cache kind (static: preallocated, for --compile)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode steps (needs --cache static)")
    p.add_argument("--threads", type=_threads_arg, help="torch CPU threads (default: torch's choice; 1 is steadier on a shared machine)")
    p.add_argument("--ignore-stop", action="store_true",
                   help="ban the stop tokens so every answer runs the whole budget")
    p.add_argument("--json", metavar="OUT", help="write every figure of every run (schema reempathy.bench/1)")
    p.add_argument("--plot", metavar="OUT.png", help="write a PNG of per-token latency, hidden segments shaded")
    p.set_defaults(func=cmd_bench)
    return p


__all__ = ["BENCH_SCHEMA", "Clock", "add_bench_parser", "cmd_bench", "format_table", "run_bench", "write_plot"]

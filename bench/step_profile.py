"""One decode step under ``torch.profiler``: where its time goes, as a table of top kernels and ops and the host gaps.

Used by ``bench/gpu.sh --profile`` (each side of the GPU bench) and usable on its own:

    with step_profiler(device, steps=1) as (prof, marker):
        run a decode whose per-step hook calls marker()   # our loop: StepMarker plugin; generate(): its logits processor
    summary = summarise(prof, device)

A step is the interval between two consecutive calls of the marker, which both sides make once
per sampled token from their logits stage: the forward of that step's tokens, the logits work,
sampling and every hook in between. The profiler's schedule lets :data:`WAIT` steps go by (the
prefill is step 0; the compiled sides' first replays settle) and records ``steps``.

What the summary holds, per recorded step:

* ``wall_us``: the step's host-side duration (its ``ProfilerStep`` range);
* on CUDA, ``device_busy_us`` (the union of kernel intervals), ``host_gaps_us`` = wall - busy
  (the device waiting for the host: launch overhead, Python, synchronisation), the longest gap,
  and kernels per step; on CPU, ``in_ops_us`` (the union of top-level aten op intervals) and
  ``host_gaps_us`` = wall - that (time outside any op: Python, hooks, dispatch);
* ``top_kernels`` (CUDA: kernels by device time) and ``top_ops`` (aten ops by self host time),
  each with calls per step.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Iterator

from reempathy.hooks import hookimpl

WAIT = 3
"""Decode steps let go by before the recorded ones (step 0 holds the prefill)."""
TOP = 12
"""Rows of each table."""


class StepMarker:
    """Ends a profiler step once per sampled token: a reempathy plugin (``reempathy_logits``) and a transformers logits processor."""

    def __init__(self, prof: Any) -> None:
        self.prof = prof

    @hookimpl
    def reempathy_logits(self, session: Any, logits: Any) -> None:
        self.prof.step()

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.prof.step()
        return scores


def tokens_needed(steps: int) -> int:
    """Tokens a profiled decode must produce to reach ``steps`` recorded steps (and close the last one)."""
    return WAIT + 1 + steps + 2


@contextlib.contextmanager
def step_profiler(device: str, steps: int) -> Iterator[tuple[Any, StepMarker]]:
    """A started profiler recording ``steps`` steps after :data:`WAIT` (and one warm-up), and the marker that ends each step."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    prof = profile(activities=activities, schedule=schedule(wait=WAIT, warmup=1, active=steps, repeat=1))
    with prof:
        yield prof, StepMarker(prof)


def _union(intervals: list[tuple[float, float]]) -> tuple[float, float, int]:
    """Covered length, the longest uncovered stretch between intervals, and the interval count, of ``intervals`` (µs)."""
    if not intervals:
        return 0.0, 0.0, 0
    intervals.sort()
    covered, longest_gap = 0.0, 0.0
    start, end = intervals[0]
    for s, e in intervals[1:]:
        if s > end:
            covered += end - start
            longest_gap = max(longest_gap, s - end)
            start, end = s, e
        else:
            end = max(end, e)
    covered += end - start
    return covered, longest_gap, len(intervals)


def summarise(prof: Any, device: str) -> dict[str, Any]:
    """The recorded steps of ``prof`` as per-step figures and top-kernel / top-op tables (see the module docstring)."""
    from torch.autograd import DeviceType

    events = list(prof.events())
    windows = [(e.time_range.start, e.time_range.end) for e in events if e.name.startswith("ProfilerStep")]
    if not windows:
        raise RuntimeError("the profile recorded no step: the decode made fewer steps than the schedule waits for")
    n = len(windows)
    wall = sum(end - start for start, end in windows)

    def inside(e: Any) -> bool:
        return any(start <= e.time_range.start and e.time_range.end <= end for start, end in windows)

    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    host = [e for e in events if e.device_type == DeviceType.CPU and not e.name.startswith("ProfilerStep") and inside(e)]
    ops = [e for e in host if e.name.startswith("aten::")]
    summary: dict[str, Any] = {"steps": n, "wall_us": wall / n}
    if device == "cuda":
        # Kernels run after their launch: those launched in a step window belong to it, whenever they ran.
        busy, longest, count = _union([(e.time_range.start, e.time_range.end) for e in kernels])
        summary.update(
            device_busy_us=busy / n,
            host_gaps_us=max(wall - busy, 0.0) / n,
            longest_gap_us=longest,
            kernels_per_step=count / n,
        )
        by_kernel: dict[str, list[float]] = defaultdict(list)
        for e in kernels:
            by_kernel[e.name].append(e.time_range.end - e.time_range.start)
        summary["top_kernels"] = [
            {"name": name, "calls_per_step": len(t) / n, "device_us_per_step": sum(t) / n}
            for name, t in sorted(by_kernel.items(), key=lambda kv: -sum(kv[1]))[:TOP]
        ]
    else:
        top_level = [e for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
        in_ops, longest, count = _union([(e.time_range.start, e.time_range.end) for e in top_level])
        summary.update(
            in_ops_us=in_ops / n,
            host_gaps_us=max(wall - in_ops, 0.0) / n,
            longest_gap_us=longest,
            top_level_ops_per_step=count / n,
        )
    by_op: dict[str, list[float]] = defaultdict(list)
    for e in ops:
        by_op[e.name].append(e.self_cpu_time_total)
    summary["aten_ops_per_step"] = len(ops) / n
    summary["top_ops"] = [
        {"name": name, "calls_per_step": len(t) / n, "self_host_us_per_step": sum(t) / n}
        for name, t in sorted(by_op.items(), key=lambda kv: -sum(kv[1]))[:TOP]
    ]
    return summary


def markdown(sides: dict[str, dict[str, Any]], device: str, title: str) -> str:
    """The profile of every side: one line of per-step figures each, then its top tables."""
    cuda = device == "cuda"
    lines = [f"# {title}", ""]
    if cuda:
        lines += ["| side | wall µs/step | device busy µs | host gaps µs | longest gap µs | kernels/step | aten ops/step |",
                  "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    else:
        lines += ["| side | wall µs/step | in aten ops µs | host gaps µs (outside any op) | top-level ops/step | aten ops/step |",
                  "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, s in sides.items():
        if "error" in s:
            lines.append(f"| {name} | {s['error']} |" + " |" * (5 if cuda else 4))
        elif cuda:
            lines.append(
                f"| {name} | {s['wall_us']:.0f} | {s['device_busy_us']:.0f} | {s['host_gaps_us']:.0f} | "
                f"{s['longest_gap_us']:.0f} | {s['kernels_per_step']:.0f} | {s['aten_ops_per_step']:.0f} |"
            )
        else:
            lines.append(
                f"| {name} | {s['wall_us']:.0f} | {s['in_ops_us']:.0f} | {s['host_gaps_us']:.0f} | "
                f"{s['top_level_ops_per_step']:.0f} | {s['aten_ops_per_step']:.0f} |"
            )
    for name, s in sides.items():
        if "error" in s:
            continue
        lines += ["", f"## {name}", ""]
        if cuda:
            lines += ["| kernel | calls/step | device µs/step |", "|---|---:|---:|"]
            lines += [f"| `{k['name'][:90]}` | {k['calls_per_step']:.1f} | {k['device_us_per_step']:.1f} |" for k in s["top_kernels"]]
            lines.append("")
        lines += ["| aten op | calls/step | self host µs/step |", "|---|---:|---:|"]
        lines += [f"| `{o['name']}` | {o['calls_per_step']:.1f} | {o['self_host_us_per_step']:.1f} |" for o in s["top_ops"]]
    return "\n".join(lines) + "\n"


__all__ = ["StepMarker", "WAIT", "markdown", "step_profiler", "summarise", "tokens_needed"]

"""The numbers of one run: token counts, stop reasons, latency percentiles, real-time margin, score intervals.

Definitions follow ``reempathy bench`` (:mod:`reempathy.bench`) so the two agree:

- ``spoken_tokens``: spoken text + audio tokens per record (mean);
- ``audio_s``: seconds of spoken audio per record (audio units ÷ the backbone's audio rate; mean),
  None for a backbone whose spoken stream is text only;
- ``hidden_per_spoken``: hidden content tokens (reflections, thoughts) per spoken token, over the run;
- ``budget_hit_share``: the share of answers a token budget ended (:data:`BUDGET_STOPS`) rather
  than the model or the strategy; a comparison whose answers were cut says so (the report flags
  a share above :data:`BUDGET_FLAG`);
- ``ttft``/``first_audio``: per record, decode start to the first sampled token / audio unit (p50, p90 over records);
- ``itl``: inter-token latency over every step of every record, the first token left out (its
  forward pass is the prefill);
- ``realtime_margin``: per record, audio units per second of decoding ÷ the backbone's audio rate,
  median over records (above 1: produced faster than it plays).

Score means carry a 95 % percentile-bootstrap interval (numpy, seeded, so a report is
reproducible): resample the records' scores with replacement, take the 2.5th and 97.5th
percentiles of the resampled means. An evaluator that gives the four empathy dimensions also
gets ``average``: each record's mean of the four (the paper's headline number), then its mean
and interval over the records.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from reempathy.bench import percentile
from reempathy.data.schema import SCORE_NAMES

BUDGET_STOPS = frozenset({"max_spoken_tokens", "max_hidden_tokens", "max_new_tokens", "max_context"})
"""Stop reasons that mean a budget, not the model or the strategy, ended the answer."""
BUDGET_FLAG = 0.10  # the report flags runs with a larger share of budget-cut answers
AVERAGE = "average"
"""The score name of the four empathy dimensions' per-record mean."""
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
LEVEL = 0.95


@dataclass
class RunMetrics:
    """Counts and latencies of one run's results (times in seconds)."""

    records: int
    spoken_tokens: float | None
    hidden_per_spoken: float | None
    stop_reasons: dict[str, int]
    audio_s: float | None = None
    budget_hit_share: float | None = None
    spoken_by_record: dict[str, int] = field(default_factory=dict)
    ttft_p50: float | None = None
    ttft_p90: float | None = None
    first_audio_p50: float | None = None
    first_audio_p90: float | None = None
    itl_p50: float | None = None
    itl_p90: float | None = None
    realtime_margin: float | None = None


@dataclass
class ScoreStat:
    """One score of one evaluator over a run: mean, 95 % bootstrap interval, how many records."""

    mean: float
    lo: float
    hi: float
    n: int


@dataclass
class EvaluatorScores:
    """Every score of one evaluator over a run, and how many records it failed on."""

    evaluator: str
    scores: dict[str, ScoreStat] = field(default_factory=dict)
    failures: int = 0
    scored: int = 0
    by_record: dict[str, dict[str, float]] = field(default_factory=dict)  # record id -> score -> value (for pairing)


def run_metrics(docs: Iterable[dict[str, Any]], audio_rate_hz: float) -> RunMetrics:
    """The metrics of a run from its results lines (``reempathy.run-record/1``)."""
    spoken: list[int] = []
    by_record: dict[str, int] = {}
    seconds: list[float] = []
    hidden = 0
    stops: Counter = Counter()
    ttft: list[float] = []
    first_audio: list[float] = []
    itl: list[float] = []
    margins: list[float] = []
    n = 0
    for doc in docs:
        n += 1
        r = doc["result"]
        units = len(r["spoken"]["audio_units"])
        spoken.append(len(r["spoken"]["text_ids"]) + units)
        by_record[str(doc.get("id", n))] = spoken[-1]
        if units and audio_rate_hz > 0:
            seconds.append(units / audio_rate_hz)
        hidden += sum(len(h["ids"]) for h in r.get("hidden", []))
        stops[r["stop_reason"]] += 1
        t = r["timings"]
        if t.get("time_to_first_token_s") is not None:
            ttft.append(t["time_to_first_token_s"])
        if t.get("time_to_first_audio_s") is not None:
            first_audio.append(t["time_to_first_audio_s"])
        itl.extend(t.get("token_latencies_s", [])[1:])
        if t.get("total_s") and audio_rate_hz > 0:
            margins.append(units / t["total_s"] / audio_rate_hz)
    total_spoken = sum(spoken)
    return RunMetrics(
        records=n,
        spoken_tokens=statistics.fmean(spoken) if spoken else None,
        hidden_per_spoken=hidden / total_spoken if total_spoken else None,
        stop_reasons=dict(sorted(stops.items())),
        audio_s=statistics.fmean(seconds) if seconds else None,
        budget_hit_share=sum(v for k, v in stops.items() if k in BUDGET_STOPS) / n if n else None,
        spoken_by_record=by_record,
        ttft_p50=percentile(ttft, 50),
        ttft_p90=percentile(ttft, 90),
        first_audio_p50=percentile(first_audio, 50),
        first_audio_p90=percentile(first_audio, 90),
        itl_p50=percentile(itl, 50),
        itl_p90=percentile(itl, 90),
        realtime_margin=statistics.median(margins) if margins else None,
    )


def bootstrap_ci(
    values: Iterable[float], level: float = LEVEL, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean and its percentile-bootstrap interval at ``level``."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return mean, float(lo), float(hi)


def evaluator_scores(evaluator: str, lines: Iterable[dict[str, Any]], ids: set[str]) -> EvaluatorScores:
    """Summarise ``scores/<evaluator>.jsonl`` lines (``reempathy.score/1``) for the records in ``ids``.

    A record scored twice counts once, by its first line (as ``reempathy eval`` reads its own file
    when it resumes). A line with an ``error`` or no scores is a failure and enters no mean.
    """
    first: dict[str, dict[str, Any]] = {}
    for line in lines:
        rid = str(line.get("id"))
        if rid in ids:
            first.setdefault(rid, line)
    out = EvaluatorScores(evaluator)
    values: dict[str, list[float]] = {}
    for rid, line in first.items():
        scores = line.get("scores") or {}
        if line.get("error") or not scores:
            out.failures += 1
            continue
        out.scored += 1
        numbers = {
            name: float(value)
            for name, value in scores.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if all(name in numbers for name in SCORE_NAMES) and AVERAGE not in numbers:
            numbers[AVERAGE] = statistics.fmean(numbers[name] for name in SCORE_NAMES)
        out.by_record[rid] = numbers
        for name, value in numbers.items():
            values.setdefault(name, []).append(value)
    for name, vals in values.items():
        mean, lo, hi = bootstrap_ci(vals)
        out.scores[name] = ScoreStat(mean, lo, hi, len(vals))
    return out


__all__ = ["RunMetrics", "ScoreStat", "EvaluatorScores", "run_metrics", "bootstrap_ci", "evaluator_scores",
           "BUDGET_STOPS", "BUDGET_FLAG", "AVERAGE"]

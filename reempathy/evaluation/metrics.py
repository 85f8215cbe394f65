"""Agreement and uncertainty: LCC (Pearson), SRCC (Spearman, average ranks for ties), MSE, bootstrap CIs.

Plain numpy, checked against scipy in the tests. Where decisions are made: a constant series
has no correlation, so LCC/SRCC are NaN there (as in scipy) rather than 0; bootstrap intervals
are percentile intervals over a seeded resampling, so a summary is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from reempathy.errors import InputError


def _pair(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise InputError(f"metrics need two series of the same length, got {a.shape} and {b.shape}")
    return a, b


def lcc(x: Sequence[float], y: Sequence[float]) -> float:
    """Linear (Pearson) correlation coefficient; NaN for fewer than two points or a constant series."""
    a, b = _pair(x, y)
    if a.size < 2:
        return math.nan
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(da @ da) * float(db @ db))
    if denom == 0.0:
        return math.nan
    return float(np.clip((da @ db) / denom, -1.0, 1.0))


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties given the average of the ranks they span."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(a.size, dtype=np.float64)
    sorted_a = a[order]
    i = 0
    while i < a.size:
        j = i
        while j + 1 < a.size and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def srcc(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of the (average) ranks."""
    a, b = _pair(x, y)
    return lcc(rankdata(a), rankdata(b))


def mse(x: Sequence[float], y: Sequence[float]) -> float:
    """Mean squared error; NaN for empty series."""
    a, b = _pair(x, y)
    return float(np.mean((a - b) ** 2)) if a.size else math.nan


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values`` (NaN, NaN when empty)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(resamples, a.size))
    stats = np.apply_along_axis(statistic, 1, a[idx]) if statistic is not np.mean else a[idx].mean(axis=1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


@dataclass
class Agreement:
    """How well predictions match human scores on one dimension (or all pooled): LCC, SRCC, MSE, n."""

    lcc: float
    srcc: float
    mse: float
    n: int

    def to_json(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def agreement(pred: Sequence[float], human: Sequence[float]) -> Agreement:
    """LCC, SRCC and MSE of ``pred`` against ``human``."""
    return Agreement(lcc(pred, human), srcc(pred, human), mse(pred, human), len(pred))


def agreement_table(
    pred: Sequence[Mapping[str, float]], human: Sequence[Mapping[str, float]], names: Sequence[str]
) -> dict[str, Agreement]:
    """Per dimension and ``overall`` (all dimensions pooled), over the items scored on that dimension."""
    table: dict[str, Agreement] = {}
    all_p: list[float] = []
    all_h: list[float] = []
    for name in names:
        pairs = [(p[name], h[name]) for p, h in zip(pred, human) if name in p and name in h]
        ps, hs = [p for p, _ in pairs], [h for _, h in pairs]
        table[name] = agreement(ps, hs)
        all_p += ps
        all_h += hs
    table["overall"] = agreement(all_p, all_h)
    return table


def format_agreement(table: Mapping[str, Agreement]) -> str:
    """LCC / SRCC / MSE per dimension as an aligned table (NaN where a series is constant)."""
    width = max([len("dimension"), *(len(k) for k in table)])
    rows = [f"  {'dimension'.ljust(width)}     LCC    SRCC     MSE      n"]
    for name, a in table.items():
        rows.append(f"  {name.ljust(width)}  {a.lcc:6.3f}  {a.srcc:6.3f}  {a.mse:6.3f}  {a.n:5d}")
    return "\n".join(rows)


def summarize_scores(rows: Sequence[Mapping[str, float]], names: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Per score: mean, 95 % bootstrap interval of the mean, and n (rows that have the score)."""
    out: dict[str, Any] = {}
    for name in names:
        values = [float(r[name]) for r in rows if name in r]
        lo, hi = bootstrap_ci(values, seed=seed)
        out[name] = {
            "mean": float(np.mean(values)) if values else None,
            "ci95": [lo, hi] if values else None,
            "n": len(values),
        }
    return out


__all__ = ["lcc", "srcc", "mse", "rankdata", "bootstrap_ci", "Agreement", "agreement", "agreement_table", "format_agreement", "summarize_scores"]

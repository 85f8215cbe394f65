"""Paired comparisons of two runs over the same records: is a difference real?

Every run of a comparison decodes the same records with the same per-record seeds, so a record's
score in run A and in the baseline B form a pair, and the question is asked of the per-record
differences ``d_i = A_i - B_i`` (records scored in both runs only):

- ``diff``: the mean difference, with a 95 % **paired** percentile-bootstrap interval (resample
  records, not the two runs separately: the pairing removes the between-record variance that
  dominates empathy scores);
- ``wins / ties / losses``: records where A scored above, equal to (within 1e-9), or below B;
- ``p``: the two-sided Wilcoxon signed-rank test of the differences (scipy; zero differences
  dropped, as Wilcoxon's own procedure does; the exact distribution for small samples without
  tied ranks, the normal approximation otherwise); every difference zero gives ``p = 1``.

Where it decides: :func:`paired` (the statistics), :data:`TIE` (what counts as equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from reempathy.experiments.metrics import bootstrap_ci

TIE = 1e-9  # differences within this are ties: scores are written with a few decimals at most


@dataclass(frozen=True)
class Paired:
    """A run against the baseline on one quantity: ``n`` pairs, the mean difference and its interval, the counts, ``p``."""

    n: int
    diff: float
    lo: float
    hi: float
    wins: int
    ties: int
    losses: int
    p: float


def paired(values: Sequence[float], baseline: Sequence[float]) -> Paired:
    """Compare ``values`` with ``baseline`` pair by pair (the same records, in the same order)."""
    if len(values) != len(baseline):
        raise ValueError(f"paired needs pairs: {len(values)} values against {len(baseline)}")
    if not values:
        raise ValueError("paired needs at least one pair")
    d = np.asarray(values, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    mean, lo, hi = bootstrap_ci(d.tolist())
    wins = int((d > TIE).sum())
    losses = int((d < -TIE).sum())
    ties = len(d) - wins - losses
    return Paired(len(d), mean, lo, hi, wins, ties, losses, signed_rank_p(d))


def signed_rank_p(d: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of differences ``d`` (zeros dropped); 1.0 when every one is zero."""
    from scipy.stats import wilcoxon

    nonzero = d[np.abs(d) > TIE]
    if nonzero.size == 0:
        return 1.0
    return float(wilcoxon(nonzero, zero_method="wilcox", alternative="two-sided").pvalue)


__all__ = ["Paired", "paired", "signed_rank_p", "TIE"]

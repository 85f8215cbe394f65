"""LCC, SRCC and MSE equal scipy's on known data; bootstrap intervals are seeded and sensible."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reempathy.evaluation.metrics import agreement_table, bootstrap_ci, lcc, mse, srcc

scipy_stats = pytest.importorskip("scipy.stats")

PRED = [3.2, 4.1, 2.0, 4.8, 3.0, 3.0, 1.5, 2.5]
HUMAN = [3, 4, 2, 5, 3, 4, 1, 2]  # ties on purpose


def test_lcc_equals_scipy_pearson():
    assert lcc(PRED, HUMAN) == pytest.approx(scipy_stats.pearsonr(PRED, HUMAN).statistic, abs=1e-12)


def test_srcc_equals_scipy_spearman_with_ties():
    assert srcc(PRED, HUMAN) == pytest.approx(scipy_stats.spearmanr(PRED, HUMAN).statistic, abs=1e-12)


def test_mse_equals_the_mean_squared_difference():
    assert mse(PRED, HUMAN) == pytest.approx(float(np.mean((np.array(PRED) - np.array(HUMAN)) ** 2)), abs=1e-12)


def test_a_constant_series_has_no_correlation():
    assert math.isnan(lcc([3, 3, 3], [1, 2, 3])) and math.isnan(srcc([3, 3, 3], [1, 2, 3]))


def test_agreement_table_pools_all_dimensions_for_overall():
    pred = [{"a": p, "b": p + 0.5} for p in PRED]
    human = [{"a": h, "b": h} for h in HUMAN]
    table = agreement_table(pred, human, ["a", "b"])
    assert table["a"].lcc == pytest.approx(scipy_stats.pearsonr(PRED, HUMAN).statistic)
    pooled_p, pooled_h = PRED + [p + 0.5 for p in PRED], HUMAN + HUMAN
    assert table["overall"].srcc == pytest.approx(scipy_stats.spearmanr(pooled_p, pooled_h).statistic)
    assert table["overall"].n == 16


def test_bootstrap_interval_is_reproducible_and_holds_the_mean():
    values = [1, 2, 2, 3, 4, 5, 5, 5, 3, 2]
    lo, hi = bootstrap_ci(values, seed=3)
    assert (lo, hi) == bootstrap_ci(values, seed=3)
    assert lo < np.mean(values) < hi and 1 <= lo and hi <= 5

"""The report tests differences (issue 20 §3): averages, answer lengths, budget hits, and runs paired record by record.

The statistics are checked against a hand computation: six records, the four empathy dimensions
equal within a record so that its average is known, differences chosen with distinct sizes so
that the Wilcoxon signed-rank distribution can be enumerated by hand.
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from reempathy.cli import main
from reempathy.experiments.metrics import bootstrap_ci
from reempathy.experiments.paired import paired
from reempathy.experiments.report import build_report

DIMS = ("need_support", "wording_appropriateness", "emotion_understanding", "emotional_support")
IDS = ["r1", "r2", "r3", "r4", "r5", "r6"]
BASE = [3.0] * 6
DIFFS = [0.5, 0.25, -0.75, 0.0, 1.0, 1.25]


def make_run(path: Path, stops: list[str], units: list[int], scores: list[float] | None, *, hidden: int = 0) -> Path:
    """A run directory as `reempathy run` and `reempathy eval` write it (only the fields the report reads)."""
    path.mkdir(parents=True)
    manifest = {"schema": "reempathy.run/1", "config": {"strategy": {"name": "sft"}}, "settings": {},
                "data": {"records": len(IDS), "sha256": "0" * 64}, "backbone": {"audio_rate_hz": 12.5}}  # fmt: skip
    (path / "manifest.json").write_text(json.dumps(manifest))
    with (path / "results.jsonl").open("w") as fh:
        for line, (rid, stop, n) in enumerate(zip(IDS, stops, units), start=1):
            result = {"spoken": {"text_ids": [1, 2], "audio_units": list(range(n))},
                      "hidden": [{"ids": list(range(hidden))}] if hidden else [], "stop_reason": stop,
                      "timings": {"total_s": 1.0, "token_latencies_s": [0.1]}}  # fmt: skip
            fh.write(json.dumps({"id": rid, "line": line, "result": result}) + "\n")
    if scores is not None:
        (path / "scores").mkdir()
        with (path / "scores" / "judge.jsonl").open("w") as fh:
            for rid, value in zip(IDS, scores):
                fh.write(json.dumps({"id": rid, "evaluator": "judge", "scores": dict.fromkeys(DIMS, value)}) + "\n")
    return path


@pytest.fixture()
def runs(tmp_path):
    base = make_run(tmp_path / "base", ["stop_token"] * 6, [25] * 6, BASE)
    better = make_run(tmp_path / "better", ["stop_token"] * 4 + ["max_spoken_tokens"] * 2, [25] * 6,
                      [b + d for b, d in zip(BASE, DIFFS)], hidden=3)  # fmt: skip
    return base, better


def exact_signed_rank_p(d: list[float]) -> float:
    """Two-sided exact Wilcoxon p by enumerating every sign pattern (no ties among |d|, zeros dropped)."""
    nonzero = [x for x in d if x != 0]
    ranks = {abs(x): r for r, x in enumerate(sorted(nonzero, key=abs), start=1)}
    w = sum(ranks[abs(x)] for x in nonzero if x > 0)
    all_w = [sum(r for r, s in zip(range(1, len(nonzero) + 1), signs) if s) for signs in itertools.product([0, 1], repeat=len(nonzero))]
    mean = len(nonzero) * (len(nonzero) + 1) / 4
    return sum(abs(v - mean) >= abs(w - mean) for v in all_w) / len(all_w)


def test_paired_statistics_equal_a_hand_computation():
    stat = paired([b + d for b, d in zip(BASE, DIFFS)], BASE)
    assert stat.n == 6
    assert stat.diff == pytest.approx(sum(DIFFS) / 6)
    assert (stat.wins, stat.ties, stat.losses) == (4, 1, 1)
    # Ranks of |d| for the five non-zero differences: .25->1, .5->2, .75->3, 1->4, 1.25->5; W+ = 12 of 15.
    # Sign patterns with W+ >= 12 (or, by symmetry, <= 3): 5 each of 32, so p = 10/32.
    assert exact_signed_rank_p(DIFFS) == pytest.approx(10 / 32)
    assert stat.p == pytest.approx(10 / 32)
    # The interval resamples records (pairs), not the two runs apart: the bootstrap of the differences.
    assert (stat.lo, stat.hi) == pytest.approx(bootstrap_ci(DIFFS)[1:])
    assert stat.lo < stat.diff < stat.hi


def test_identical_runs_tie_everywhere_with_p_one():
    stat = paired([3.0, 4.0, 2.0], [3.0, 4.0, 2.0])
    assert (stat.diff, stat.wins, stat.ties, stat.losses, stat.p) == (0.0, 0, 3, 0, 1.0)


def test_the_report_shows_the_average_of_the_four_dimensions_with_its_interval(runs):
    base, better = runs
    report = build_report([base, better])
    values = report.values(report.rows[1])
    expected = [b + d for b, d in zip(BASE, DIFFS)]
    assert values["judge.average"] == pytest.approx(np.mean(expected))
    assert (values["judge.average.lo"], values["judge.average.hi"]) == pytest.approx(bootstrap_ci(expected)[1:])


def test_the_report_shows_answer_lengths_and_hidden_per_spoken_and_budget_hits(runs):
    _, better = runs
    (row,) = build_report([better]).rows
    m = row.metrics
    assert m.spoken_tokens == 27 and m.audio_s == pytest.approx(25 / 12.5)
    assert m.hidden_per_spoken == pytest.approx(3 / 27)
    assert m.budget_hit_share == pytest.approx(2 / 6)


def test_report_with_a_baseline_prints_paired_rows_and_flags_budget_hits(runs, tmp_path, capsys):
    base, better = runs
    table = tmp_path / "table.csv"
    assert main(["report", str(base), str(better), "--baseline", "base", "--csv", str(table)]) == 0
    out = capsys.readouterr().out
    assert "0.33 (!)" in out and "ended by a token budget in: better" in out
    assert "against baseline 'base'" in out
    row = next(line for line in out.splitlines() if line.startswith("| better ") and "| judge.average " in line)
    assert "+0.38 [" in row and "| 4/1/1 " in row and "| 0.312 " in row
    length = next(line for line in out.splitlines() if line.startswith("| better ") and "| spoken_tokens " in line)
    assert "+0.00 [+0.00, +0.00]" in length and "0/6/0" in length and "| 1.000 " in length
    rows = {r["run"]: r for r in csv.DictReader(table.open())}
    assert rows["better"]["baseline"] == "base"
    assert float(rows["better"]["judge.average.vs_baseline"]) == pytest.approx(sum(DIFFS) / 6)
    assert (rows["better"]["judge.average.wins"], rows["better"]["judge.average.ties"], rows["better"]["judge.average.losses"]) == ("4", "1", "1")
    assert float(rows["better"]["judge.average.p"]) == pytest.approx(10 / 32)
    assert {"judge.average.vs_baseline.lo", "judge.average.vs_baseline.hi", "judge.need_support.p"} <= set(rows["better"])
    assert rows["base"]["judge.average.vs_baseline"] == ""  # the baseline is not compared with itself


def test_a_plot_can_show_the_paired_difference_with_its_interval(runs, tmp_path):
    from reempathy.experiments.report import plot_series

    base, better = runs
    report = build_report([base, better], baseline="base")
    ((_, points),) = plot_series(report, "strategy.name", "judge.average.vs_baseline")
    (x, y, lo, hi), = points
    assert x == "sft" and y == pytest.approx(sum(DIFFS) / 6) and lo < y < hi


def test_a_baseline_that_is_not_a_run_is_a_one_line_error(runs, capsys):
    base, better = runs
    assert main(["report", str(base), str(better), "--baseline", "sfft"]) == 2
    err = capsys.readouterr().err
    assert "--baseline 'sfft' is not a run of this report; its runs: base, better" in err and err.count("\n") == 1

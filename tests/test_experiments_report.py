"""``reempathy report``: one row per run with counts, latency and every evaluator's scores (issue 10 §5)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from reempathy.cli import main
from reempathy.experiments.metrics import bootstrap_ci, evaluator_scores, run_metrics
from reempathy.experiments.report import build_report, plot_series

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "empathy_dialogues.jsonl"
CONFIG = ROOT / "configs" / "reempathy.toml"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A real 2-point sweep of 3 records, with scores files written in the evaluators' format."""
    tmp = tmp_path_factory.mktemp("report")
    data = tmp / "test.jsonl"
    data.write_text("\n".join(EXAMPLES.read_text(encoding="utf-8").splitlines()[:3]) + "\n", encoding="utf-8")
    out = tmp / "sweep"
    assert main(["sweep", "--config", str(CONFIG), "--data", str(data), "--out", str(out),
                 "--set", "decode.max_new_tokens=24", "--grid", "processors.0.factor=1.0,1.5"]) == 0  # fmt: skip
    scores = {"1": (4, 3), "2": (2, 5), "3": None}  # record 3: the evaluator failed
    for name in ("processors.0.factor=1.0", "processors.0.factor=1.5"):
        (out / name / "scores").mkdir()
        with (out / name / "scores" / "judge.jsonl").open("w") as fh:
            for rid, pair in scores.items():
                line = {"schema": "reempathy.score/1", "id": rid, "evaluator": "judge",
                        "scores": {"need_support": pair[0], "emotional_support": pair[1]} if pair else {},
                        "text": None, "error": None if pair else "no JSON in the reply", "raw": "…"}  # fmt: skip
                fh.write(json.dumps(line) + "\n")
            fh.write(json.dumps({"schema": "reempathy.score/1", "id": "stale", "evaluator": "judge",
                                 "scores": {"need_support": 1}, "text": None, "error": None, "raw": None}) + "\n")
    return out


def test_a_sweep_directory_expands_to_one_row_per_run(sweep):
    report = build_report([sweep])
    assert [row.name for row in report.rows] == ["processors.0.factor=1.0", "processors.0.factor=1.5"]
    assert report.setting_keys == ["processors.0.factor"]
    assert [report.values(r)["processors.0.factor"] for r in report.rows] == [1.0, 1.5]


def test_counts_and_latencies_come_from_the_results(sweep):
    report = build_report([sweep / "processors.0.factor=1.0"])
    (row,) = report.rows
    docs = [json.loads(line) for line in (row.path / "results.jsonl").read_text().splitlines()]
    v = report.values(row)
    assert (v["records"], v["records_total"]) == (3, 3)
    spoken = [len(d["result"]["spoken"]["text_ids"]) + len(d["result"]["spoken"]["audio_units"]) for d in docs]
    hidden = sum(len(h["ids"]) for d in docs for h in d["result"]["hidden"])
    assert v["spoken_tokens"] == pytest.approx(np.mean(spoken))
    assert v["hidden_per_spoken"] == pytest.approx(hidden / sum(spoken))
    assert v["stop_reasons"] == ", ".join(f"{k} {n}" for k, n in sorted(
        {r: sum(d["result"]["stop_reason"] == r for d in docs) for r in {d["result"]["stop_reason"] for d in docs}}.items()))
    steps = [x for d in docs for x in d["result"]["timings"]["token_latencies_s"][1:]]
    assert v["itl_p50_ms"] == pytest.approx(np.percentile(steps, 50) * 1e3)
    assert v["ttft_p90_ms"] == pytest.approx(
        np.percentile([d["result"]["timings"]["time_to_first_token_s"] for d in docs], 90) * 1e3)
    margins = [len(d["result"]["spoken"]["audio_units"]) / d["result"]["timings"]["total_s"] / 12.5 for d in docs]
    assert v["realtime_margin"] == pytest.approx(np.median(margins))


def test_scores_are_means_with_a_bootstrap_interval_over_the_records_scored(sweep):
    (row, _) = build_report([sweep]).rows
    (judge,) = row.evaluators
    assert (judge.evaluator, judge.scored, judge.failures) == ("judge", 2, 1)  # the stale id is not this run's
    stat = judge.scores["need_support"]
    assert (stat.mean, stat.n) == (3.0, 2)
    assert (stat.mean, stat.lo, stat.hi) == bootstrap_ci([4, 2])
    assert 2.0 <= stat.lo <= stat.mean <= stat.hi <= 4.0


def test_the_bootstrap_interval_is_seeded_and_narrows_with_more_records():
    rng = np.random.default_rng(1)
    few, many = rng.integers(1, 6, size=10), rng.integers(1, 6, size=1000)
    assert bootstrap_ci(few) == bootstrap_ci(few)
    mean, lo, hi = bootstrap_ci(many)
    assert lo < mean < hi and mean == pytest.approx(many.mean())
    assert hi - lo < np.subtract(*bootstrap_ci(few)[2:0:-1])
    assert bootstrap_ci([3.0]) == (3.0, 3.0, 3.0)


def test_a_record_scored_twice_counts_once():
    lines = [{"id": "1", "scores": {"s": 1}}, {"id": "1", "scores": {"s": 5}}, {"id": "2", "scores": {"s": 3}}]
    assert evaluator_scores("e", lines, {"1", "2"}).scores["s"].mean == 2.0  # the first line of "1" stands


def test_the_first_token_is_not_an_inter_token_latency():
    doc = {"result": {"spoken": {"text_ids": [1], "audio_units": [1, 2]}, "hidden": [{"ids": [7, 8, 9]}],
                      "stop_reason": "stop_token",
                      "timings": {"time_to_first_token_s": 0.5, "time_to_first_audio_s": 0.6, "total_s": 1.0,
                                  "token_latencies_s": [0.5, 0.1, 0.1, 0.1]}}}  # fmt: skip
    m = run_metrics([doc], 12.5)
    assert (m.itl_p50, m.hidden_per_spoken, m.stop_reasons) == (0.1, 1.0, {"stop_token": 1})
    assert m.realtime_margin == pytest.approx(2 / 1.0 / 12.5)


def test_report_prints_markdown_and_writes_csv_and_a_plot(sweep, tmp_path, capsys):
    csv_path, png = tmp_path / "table.csv", tmp_path / "alpha.png"
    assert main(["report", str(sweep), "--csv", str(csv_path), "--plot", str(png),
                 "--x", "processors.0.factor", "--y", "judge.need_support"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| run ") and "judge.need_support" in lines[0] and set(lines[1]) <= {"|", "-"}
    assert "3.00 [" in lines[2]
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 2 and float(rows[0]["judge.need_support"]) == 3.0 and rows[0]["judge.failures"] == "1"
    assert {"judge.need_support.lo", "judge.need_support.hi", "itl_p50_ms"} <= set(rows[0])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ((label, points),) = plot_series(build_report([sweep]), "processors.0.factor", "judge.need_support")
    assert [p[0] for p in points] == [1.0, 1.5]


@pytest.mark.parametrize("kind, message", [("directory", "is a directory"), ("fifo", "is a named pipe")])
def test_a_plot_path_that_is_not_a_file_is_refused_before_the_csv_is_written(sweep, tmp_path, capsys, kind, message):
    import os

    csv_path, png = tmp_path / "table.csv", tmp_path / "alpha.png"
    png.mkdir() if kind == "directory" else os.mkfifo(png)
    assert main(["report", str(sweep), "--csv", str(csv_path), "--plot", str(png),
                 "--x", "processors.0.factor", "--y", "judge.need_support"]) == 2  # fmt: skip
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "--plot" in err and message in err
    assert out == "" and sorted(os.listdir(tmp_path)) == ["alpha.png"]  # no table printed, no CSV


def test_a_directory_that_is_not_a_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a run or sweep directory" in err


def test_plotting_against_a_key_no_run_has_is_a_one_line_error(sweep, tmp_path, capsys):
    assert main(["report", str(sweep), "--plot", str(tmp_path / "p.png"), "--x", "nope", "--y", "itl_p50_ms"]) == 2
    assert "--x 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_axes_without_a_plot_are_a_one_line_error(sweep, capsys):
    assert main(["report", str(sweep), "--x", "processors.0.factor"]) == 2
    assert "give --plot too" in capsys.readouterr().err


def test_run_then_eval_then_report_shows_the_judges_scores(tmp_path, capsys):
    from evaluation_helpers import ChatServer

    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(EXAMPLES.read_text(encoding="utf-8").splitlines()[:3]) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    assert main(["run", "--config", str(CONFIG), "--data", str(data), "--out", str(run),
                 "--set", "decode.max_new_tokens=8"]) == 0  # fmt: skip
    replies = iter([2, 4, 5])  # need_support of the three records; the other scores are 3

    def reply(body):
        s = next(replies)
        return 200, json.dumps({"need_support": s, "wording_appropriateness": 3, "emotion_understanding": 3,
                                "emotional_support": 3, "rationale": "ok"})  # fmt: skip

    with ChatServer(reply) as server:
        assert main(["eval", str(run), "--evaluator", "llm-judge", "--set", f"endpoint={json.dumps(server.url)}",
                     "--set", "model=judge", "--set", "retries=0", "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    header, _, row = capsys.readouterr().out.splitlines()[:3]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    lines = [json.loads(line) for line in (run / "scores" / "llm-judge.jsonl").read_text().splitlines()]
    values = [line["scores"]["need_support"] for line in lines]
    assert sorted(values) == [2, 4, 5]
    mean, lo, hi = bootstrap_ci(values)  # over the records in the file's order, as the report reads them
    assert cells["llm-judge.need_support"] == f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"
    assert cells["llm-judge.emotional_support"].startswith("3.00 [3.00, 3.00]")
    assert (cells["llm-judge.n"], cells["llm-judge.failures"]) == ("3", "0")

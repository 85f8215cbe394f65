"""``reempathy eval | ab | eval-check`` on run directories of real tiny decodes, and the evaluator discovery hook."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, ConfigDict

from evaluation_helpers import SCORES_JSON, ChatServer, user_text, write_run_dir
from reempathy.cli import main
from reempathy import registry as registry_module
from reempathy.evaluation.base import Evaluation
from reempathy.hooks import hookimpl


class LengthOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fail_on: str | None = None
    crash_after: int | None = None


class LengthEvaluator:
    """Scores an answer by the length of its text; can fail one record or crash after some calls."""

    score_names = ("length",)
    calls: list[list[str]] = []

    def __init__(self, options):
        self.options = options

    def evaluate(self, items):
        LengthEvaluator.calls.append([i.id for i in items])
        if self.options.crash_after is not None and len(LengthEvaluator.calls) > self.options.crash_after:
            raise RuntimeError("evaluator crashed")
        return [
            Evaluation(i.id, {}, None, "could not score", "raw words") if i.id == self.options.fail_on
            else Evaluation(i.id, {"length": float(len(i.answer_text))}, f"{len(i.answer_units)} units")
            for i in items
        ]


class LengthPlugin:
    @hookimpl
    def reempathy_register_evaluators(self, register):
        register("length", LengthEvaluator, LengthOptions, "answer length (tests)")


@pytest.fixture()
def with_length_evaluator(monkeypatch, fresh_discovery):
    disc = registry_module.discover(extra_plugins=[("length-plugin", LengthPlugin())])
    monkeypatch.setattr(registry_module, "default_discovery", lambda: disc)
    LengthEvaluator.calls = []
    return disc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny):
    prompts = ["I lost my keys.", "My exam is tomorrow.", "I got the job!", "My dog is sick."]
    return write_run_dir(tmp_path_factory.mktemp("run") / "run", tiny, prompts)


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_reempathy_register_evaluators_makes_an_evaluator_available(with_length_evaluator):
    assert "length" in with_length_evaluator.registry.names("evaluator")
    row = next(p for p in with_length_evaluator.plugins if p.name == "length-plugin")
    assert row.provides == ["evaluator:length"] and "reempathy_register_evaluators" in row.hooks


def test_plugins_lists_the_built_in_evaluators(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "evaluator empathyeval" in out and "evaluator llm-judge" in out


def test_eval_writes_one_score_line_per_record_and_a_summary(with_length_evaluator, run_dir, tmp_path, capsys):
    import shutil

    d = shutil.copytree(run_dir, tmp_path / "run")
    assert main(["eval", str(d), "--evaluator", "length", "--quiet", "--batch-size", "3"]) == 0
    rows = lines(d / "scores" / "length.jsonl")
    results = lines(d / "results.jsonl")
    assert [r["id"] for r in rows] == ["rec1", "rec2", "rec3", "rec4"]
    assert all(r["schema"] == "reempathy.score/1" and r["evaluator"] == "length" for r in rows)
    assert rows[0]["scores"]["length"] == len(results[0]["result"]["spoken"]["text"])
    assert rows[0]["text"] == f"{len(results[0]['result']['spoken']['audio_units'])} units"
    summary = json.loads((d / "scores" / "length.summary.json").read_text())
    assert summary["scored"] == 4 and summary["failures"] == 0 and summary["scores"]["length"]["n"] == 4
    lo, hi = summary["scores"]["length"]["ci95"]
    assert lo <= summary["scores"]["length"]["mean"] <= hi
    assert "4 of 4 records scored" in capsys.readouterr().out


def test_eval_records_a_failure_with_its_raw_text_and_never_a_score(with_length_evaluator, run_dir, tmp_path):
    import shutil

    d = shutil.copytree(run_dir, tmp_path / "run")
    assert main(["eval", str(d), "--evaluator", "length", "--set", "fail_on=rec2", "--quiet"]) == 0
    row = lines(d / "scores" / "length.jsonl")[1]
    assert row == {"schema": "reempathy.score/1", "id": "rec2", "evaluator": "length", "scores": {},
                   "text": None, "error": "could not score", "raw": "raw words"}
    assert json.loads((d / "scores" / "length.summary.json").read_text())["failed_ids"] == ["rec2"]


def test_eval_resumes_after_an_interruption_without_duplicates(with_length_evaluator, run_dir, tmp_path):
    import shutil

    d = shutil.copytree(run_dir, tmp_path / "run")
    # The first attempt crashes on its second batch; the process is also killed mid-line.
    assert main(["eval", str(d), "--evaluator", "length", "--set", "crash_after=1", "--batch-size", "2", "--quiet"]) != 0
    scores = d / "scores" / "length.jsonl"
    assert [r["id"] for r in lines(scores)] == ["rec1", "rec2"]
    with scores.open("a") as fh:
        fh.write('{"schema": "reempathy.score/1", "id": "rec3", "sco')
    LengthEvaluator.calls = []
    assert main(["eval", str(d), "--evaluator", "length", "--set", "crash_after=1", "--batch-size", "2", "--quiet"]) == 0
    assert LengthEvaluator.calls == [["rec3", "rec4"]]
    assert [r["id"] for r in lines(scores)] == ["rec1", "rec2", "rec3", "rec4"]


def test_eval_retry_failed_scores_only_the_failed_records_again(with_length_evaluator, run_dir, tmp_path):
    import shutil

    d = shutil.copytree(run_dir, tmp_path / "run")
    main(["eval", str(d), "--evaluator", "length", "--set", "fail_on=rec2", "--quiet"])
    LengthEvaluator.calls = []
    assert main(["eval", str(d), "--evaluator", "length", "--set", "fail_on=rec2", "--retry-failed", "--quiet"]) == 0
    assert LengthEvaluator.calls == [["rec2"]]
    assert sorted(r["id"] for r in lines(d / "scores" / "length.jsonl")) == ["rec1", "rec2", "rec3", "rec4"]


def test_eval_refuses_to_resume_with_other_options(with_length_evaluator, run_dir, tmp_path, capsys):
    import shutil

    d = shutil.copytree(run_dir, tmp_path / "run")
    main(["eval", str(d), "--evaluator", "length", "--quiet"])
    assert main(["eval", str(d), "--evaluator", "length", "--set", "fail_on=rec1", "--quiet"]) == 2
    assert "with other options" in capsys.readouterr().err


def _occupy(path, kind):
    """Put a directory or a named pipe where a file is to be written."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir() if kind == "directory" else os.mkfifo(path)


@pytest.mark.parametrize("kind, message", [("directory", "is a directory"), ("fifo", "is a named pipe")])
@pytest.mark.parametrize("name", ["length.jsonl", "length.summary.json", "length.options.json"])
def test_eval_refuses_a_score_path_that_is_not_a_file_before_scoring(
    with_length_evaluator, run_dir, tmp_path, capsys, name, kind, message
):
    import shutil

    d = shutil.copytree(run_dir, tmp_path / "run")
    _occupy(d / "scores" / name, kind)
    assert main(["eval", str(d), "--evaluator", "length", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and name in err
    assert LengthEvaluator.calls == []  # refused before the evaluator ran
    assert sorted(p.name for p in (d / "scores").iterdir()) == [name]  # nothing written beside it


def test_eval_refuses_a_scores_folder_that_is_a_file(with_length_evaluator, run_dir, tmp_path, capsys):
    import shutil

    d = shutil.copytree(run_dir, tmp_path / "run")
    (d / "scores").write_text("not a folder")
    assert main(["eval", str(d), "--evaluator", "length", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "score directory" in err
    assert (d / "scores").read_text() == "not a folder" and LengthEvaluator.calls == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--evaluator", "no-such"], "unknown evaluator 'no-such'"),
        (["--evaluator", "llm-judge", "--set", "endpoint=http://x/v1", "--set", "model=m", "--set", "colour=red"], "unknown option 'colour'"),
    ],
)
def test_eval_bad_evaluator_or_option_is_a_one_line_error(run_dir, argv, message, capsys):
    assert main(["eval", str(run_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_eval_of_a_directory_without_results_is_a_one_line_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--evaluator", "llm-judge"]) == 2
    err = capsys.readouterr().err
    assert "has no results.jsonl" in err and err.count("\n") == 1


def test_eval_with_the_endpoint_judge_loses_no_result_when_the_server_fails(run_dir, tmp_path):
    import shutil

    d = shutil.copytree(run_dir, tmp_path / "run")
    texts = [r["result"]["spoken"]["text"] for r in lines(d / "results.jsonl")]

    def reply(body):
        return (500, "overloaded") if "My exam is tomorrow." in user_text(body) else (200, SCORES_JSON)

    with ChatServer(reply) as server:
        rc = main(["eval", str(d), "--evaluator", "llm-judge", "--set", f"endpoint={json.dumps(server.url)}",
                   "--set", "model=judge", "--set", "retries=0", "--quiet"])
    assert rc == 0 and len(texts) == 4
    rows = lines(d / "scores" / "llm-judge.jsonl")
    assert [r["id"] for r in rows] == ["rec1", "rec2", "rec3", "rec4"]
    assert [bool(r["error"]) for r in rows] == [False, True, False, False]
    assert "HTTP 500" in rows[1]["error"] and rows[1]["scores"] == {}


def test_ab_compares_two_runs_in_both_orders_and_reports_win_tie_loss(run_dir, tmp_path, capsys):
    import shutil

    a = shutil.copytree(run_dir, tmp_path / "a")
    b = shutil.copytree(run_dir, tmp_path / "b")
    recs = lines(b / "results.jsonl")
    for r in recs:
        r["result"]["spoken"]["text"] = "WORSE ANSWER"
    (b / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))

    def reply(body):  # prefers whichever answer is not the worse one, wherever it is shown
        shown_first = user_text(body).split("Answer A:\n")[1].split("\n")[0]
        return 200, '{"winner": "B"}' if shown_first == "WORSE ANSWER" else '{"winner": "A"}'

    with ChatServer(reply) as server:
        rc = main(["ab", str(a), str(b), "--judge", "llm-judge", "--set", f"endpoint={json.dumps(server.url)}",
                   "--set", "model=judge", "--json", "--out", str(tmp_path / "ab.jsonl"), "--quiet"])
    assert rc == 0 and len(server.requests) == 8
    report = json.loads(capsys.readouterr().out)
    assert (report["win"], report["tie"], report["loss"], report["failures"]) == (4, 0, 0, 0)
    assert report["preference"] == 1.0 and report["position_consistent"] == 4
    assert [r["orders"] for r in lines(tmp_path / "ab.jsonl")] == [{"ab": "first", "ba": "second"}] * 4


def test_eval_check_reports_lcc_srcc_mse_against_human_scores(with_length_evaluator, tmp_path, capsys):
    from reempathy.evaluation.metrics import lcc, mse, srcc

    answers = ["ok", "fine then", "I hear you", "that sounds hard", "I am so sorry to hear that"]
    human = [1.0, 3.0, 2.0, 4.0, 5.0]
    data = tmp_path / "human.jsonl"
    data.write_text("".join(json.dumps({"id": f"h{i}", "messages": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": a}],
                                        "scores": {"length": h}}) + "\n" for i, (a, h) in enumerate(zip(answers, human))))
    assert main(["eval-check", "--evaluator", "length", "--data", str(data), "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    pred = [float(len(a)) for a in answers]
    assert out["agreement"]["length"]["lcc"] == pytest.approx(lcc(pred, human))
    assert out["agreement"]["length"]["srcc"] == pytest.approx(srcc(pred, human))
    assert out["agreement"]["overall"]["mse"] == pytest.approx(mse(pred, human))


def test_the_ab_paragraph_prints_counts_preference_and_its_interval():
    from reempathy.evaluation.commands import format_ab

    text = format_ab({"a": "runs/a", "b": "runs/b", "judge": "llm-judge", "pairs": 4, "win": 2, "tie": 1, "loss": 1,
                      "preference": 0.625, "preference_ci95": [0.25, 1.0], "position_consistent": 3,
                      "failures": 1, "unmatched": 0})  # fmt: skip
    assert "A win 2 (50%)  tie 1 (25%)  loss 1 (25%)" in text
    assert "0.625  95% CI [0.250, 1.000]" in text and "3 of 4" in text and "failures: 1 pair(s)" in text

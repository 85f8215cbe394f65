"""Sweeps that train, and ``reempathy study``: one file from training to the table (issue 20 §5, §7).

Everything is the tiny backbone with a few training steps; the study's evaluator is a plugin of
the tests' (a single ``*.py`` in a plugins directory), so the subprocess kill tests find it too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reempathy.checkpoints import read_manifest
from reempathy.cli import main

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
EXAMPLES = ROOT / "examples" / "empathy_dialogues.jsonl"

EVALUATOR = '''
from pydantic import BaseModel, ConfigDict
from reempathy.hooks import hookimpl
from reempathy.evaluation.base import EMPATHY_SCORES, Evaluation


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpokenLength:
    """Scores the four dimensions from the number of spoken words (tests only)."""

    score_names = EMPATHY_SCORES

    def __init__(self, options):
        pass

    def evaluate(self, items):
        out = []
        for item in items:
            score = 1.0 + min(4.0, len(item.answer_text.split()) / 5.0 + len(item.answer_units) / 50.0)
            out.append(Evaluation(item.id, dict.fromkeys(EMPATHY_SCORES, round(score, 2))))
        return out


@hookimpl
def reempathy_register_evaluators(register):
    register("spoken-length", SpokenLength, Options, "answer length as a score (tests)")
'''

SWEEP = """
[decode]
max_spoken_tokens = 12
max_new_tokens = 64

[sampling]
greedy = true

[sweep.train]
"3+6" = {{ config = "{train}", set = {{ "strategy.text_tokens" = 3, "strategy.audio_tokens" = 6, "train.max_steps" = 2 }} }}
"5+10" = {{ config = "{train}", set = {{ "strategy.text_tokens" = 5, "strategy.audio_tokens" = 10, "train.max_steps" = 2 }} }}

[[sweep.runs]]
name = "untuned"
strategy = {{ name = "sft" }}

[[sweep.runs]]
name = "3+6"
checkpoint = "3+6"
strategy = {{ text_tokens = 3, audio_tokens = 6 }}

[[sweep.runs]]
name = "3+6-reflect-off"
checkpoint = "3+6"
strategy = {{ text_tokens = 3, audio_tokens = 6, reflect = false }}

[[sweep.runs]]
name = "5+10"
checkpoint = "5+10"
strategy = {{ text_tokens = 5, audio_tokens = 10 }}
"""


def _data(tmp: Path, n: int = 3) -> Path:
    data = tmp / "test.jsonl"
    data.write_text("\n".join(EXAMPLES.read_text(encoding="utf-8").splitlines()[:n]) + "\n", encoding="utf-8")
    return data


def _train_config(tmp: Path) -> Path:
    text = (ROOT / "configs" / "train-reempathy.toml").read_text(encoding="utf-8")
    path = tmp / "train-reempathy.toml"
    path.write_text(text.replace('path = "examples/empathy_dialogues.jsonl"', f"path = {json.dumps(str(EXAMPLES))}"))
    return path


def _sweep_file(tmp: Path, small: bool = False) -> Path:
    text = SWEEP.format(train=_train_config(tmp))
    if small:  # two runs, one checkpoint: what the kill tests repeat
        text = text[: text.index('[[sweep.runs]]\nname = "3+6-reflect-off"')].replace("\n\"5+10\" = {", "\n# \"5+10\" = {")
    path = tmp / "sweep.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_sweep_trains_each_missing_checkpoint_once_then_decodes_with_it(tmp_path, capsys):
    sweep, data, out = _sweep_file(tmp_path), _data(tmp_path), tmp_path / "sweep"
    assert main(["sweep", "--config", str(sweep), "--data", str(data), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert said.count("training checkpoint") == 2  # "3+6" serves two runs, trained once
    for key, layout in (("3+6", {"text_tokens": 3, "audio_tokens": 6}), ("5+10", {"text_tokens": 5, "audio_tokens": 10})):
        manifest = read_manifest(out / "checkpoints" / key)
        assert manifest.chunk_layout.model_dump() == layout
    run = json.loads((out / "3+6" / "manifest.json").read_text())
    assert run["checkpoint"]["path"] == str((out / "checkpoints" / "3+6").resolve())
    untuned = json.loads((out / "untuned" / "manifest.json").read_text())
    assert untuned["checkpoint"] is None and untuned["config"]["strategy"]["name"] == "sft"
    # A rerun trains nothing and decodes nothing.
    assert main(["sweep", "--config", str(sweep), "--data", str(data), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "training checkpoint" not in said and said.count("0 records decoded (3 done before)") == 4


def test_every_run_of_a_budgeted_sweep_speaks_the_same_budget_when_it_hits_it(tmp_path):
    sweep, data, out = _sweep_file(tmp_path), _data(tmp_path), tmp_path / "sweep"
    assert main(["sweep", "--config", str(sweep), "--data", str(data), "--out", str(out)]) == 0
    for run in ("untuned", "3+6", "3+6-reflect-off", "5+10"):
        for line in (out / run / "results.jsonl").read_text().splitlines():
            result = json.loads(line)["result"]
            assert result["stop_reason"] != "max_new_tokens", run  # never the guard
            if result["stop_reason"] == "max_spoken_tokens":
                assert result["counts"]["spoken"] == 12


def test_a_training_config_that_fails_is_named_by_its_key_and_nothing_is_decoded(tmp_path, capsys):
    sweep = _sweep_file(tmp_path)
    sweep.write_text(sweep.read_text().replace('"train.max_steps" = 2 } }\n"5+10"', '"train.max_steps" = 2, "train.lora_rank" = 0 } }\n"5+10"'))
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(sweep), "--data", str(_data(tmp_path)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sweep.train.3+6" in err and "lora_rank" in err and err.count("\n") == 1
    assert not out.exists()


def _study_file(tmp: Path, small: bool = False, **study) -> Path:
    sweep = _sweep_file(tmp, small)
    settings = {"sweep": sweep.name, "data": str(_data(tmp)), "baseline": "untuned", "base": "tiny-demo",
                "base_steps": 2, "evaluators": [{"name": "spoken-length"}], **study}  # fmt: skip
    lines = ["[study]"]
    for key, value in settings.items():
        if key == "evaluators":
            value = "[" + ", ".join("{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in e.items()) + " }" for e in value) + "]"
        else:
            value = json.dumps(value)
        lines.append(f"{key} = {value}")
    path = tmp / "study.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def plugin_dir(tmp_path, monkeypatch, fresh_discovery):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "spoken_length.py").write_text(EVALUATOR, encoding="utf-8")
    monkeypatch.setenv("REEMPATHY_PLUGINS_DIR", str(folder))
    return folder


def _answers(out: Path) -> dict:
    """Every run's answers and scores, timings aside."""
    docs = {}
    for run in sorted(p.name for p in (out / "runs").iterdir() if (p / "results.jsonl").is_file()):
        lines = [json.loads(x) for x in (out / "runs" / run / "results.jsonl").read_text().splitlines()]
        scores = (out / "runs" / run / "scores" / "spoken-length.jsonl").read_text().splitlines()
        docs[run] = ([(d["id"], d["result"]["ids"]) for d in lines], sorted(json.loads(s)["scores"]["need_support"] for s in scores))
    return docs


def test_a_study_runs_every_stage_and_a_rerun_only_rewrites_the_report(tmp_path, plugin_dir, capsys):
    study, out = _study_file(tmp_path), tmp_path / "study"
    assert main(["study", str(study), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "[1/5] base: 2 steps" in said and said.count("training checkpoint") == 2
    assert (out / "base" / "config.json").is_file()
    report = (out / "report.md").read_text()
    assert "against baseline 'untuned'" in report and "spoken-length.average" in report
    assert {"run", "spoken-length.average.vs_baseline", "spoken-length.average.p"} <= set(
        (out / "report.csv").read_text().splitlines()[0].split(","))
    # Every trained run learned on the base the untuned row decodes.
    ckpt = read_manifest(out / "checkpoints" / "3+6")
    assert ckpt.backbone.options["path"] == str((out / "base").resolve())
    untuned = json.loads((out / "runs" / "untuned" / "manifest.json").read_text())
    assert untuned["config"]["backbone"]["path"] == str((out / "base").resolve())
    before = _answers(out)
    assert main(["study", str(study), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "base: trained before" in said and "every checkpoint is trained" in said
    assert said.count("0 records decoded (3 done before)") == 4
    assert _answers(out) == before


def test_a_study_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path, plugin_dir):
    import random

    from crash_points import SEED

    study = _study_file(tmp_path, small=True)
    env = {**os.environ, "REEMPATHY_PLUGINS_DIR": str(plugin_dir), "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    # The uninterrupted study, counting its kill points as it goes (kill point 0: none).
    count = subprocess.run([sys.executable, str(HERE / "crash_points.py"), "0", "study", str(study), "--out",
                            str(tmp_path / "clean")], env=env, capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert count.returncode == 0, count.stderr[-2000:]
    points = int(count.stderr.rsplit("points: ", 1)[1])
    expected = _answers(tmp_path / "clean")
    assert set(expected) == {"untuned", "3+6"}
    for k in sorted(random.Random(SEED).sample(range(1, points + 1), 2)):
        out = tmp_path / f"killed-{k}"
        killed = subprocess.run([sys.executable, str(HERE / "crash_points.py"), str(k), "study", str(study), "--out",
                                 str(out)], env=env, capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        assert killed.returncode == -9, f"point {k} of {points}: {killed.stderr[-2000:]}"
        assert main(["study", str(study), "--out", str(out)]) == 0, f"point {k} of {points}"
        assert _answers(out) == expected, f"point {k} of {points}"


@pytest.mark.parametrize("change, message", [
    ({"baseline": "sftt"}, "study.baseline 'sftt' is not a run of the study; its runs: untuned, 3+6"),
    ({"base": "glm"}, "study.base = 'glm'; the only base a study trains is \"tiny-demo\""),
    ({"evaluators": [{"name": "nope"}]}, "unknown evaluator 'nope'"),
    ({"limit": 0}, "study.limit"),
])
def test_bad_study_settings_are_one_line_errors_before_anything_is_written(tmp_path, plugin_dir, capsys, change, message):
    study, out = _study_file(tmp_path, **change), tmp_path / "study"
    assert main(["study", str(study), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (out / "base").exists() and not (out / "runs").exists()


def test_a_file_without_a_study_table_says_what_a_study_file_is(tmp_path, capsys):
    assert main(["study", str(_sweep_file(tmp_path)), "--out", str(tmp_path / "x")]) == 2
    assert "no [study] table; a study file is a sweep file with a [study] table" in capsys.readouterr().err

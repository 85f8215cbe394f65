"""EmpathyEval in the paper's three stages (ser → caption → empathy) on a tiny Qwen2.5-Omni in the published layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reempathy.cli import main
from reempathy.evaluation.base import EMPATHY_SCORES, EvalItem
from reempathy.evaluation.empathyeval.options import EmpathyEvalOptions

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def dialogues(n: int) -> list[dict]:
    good = {k: 4.5 for k in EMPATHY_SCORES}
    poor = {k: 1.5 for k in EMPATHY_SCORES}
    return [{"id": f"d{i}", "messages": [{"role": "user", "text": "My dog is sick and the vet is closed."},
                                         {"role": "assistant", "text": "That sounds hard. I am here." if i % 2 else "Deal with it."}],
             "assessment": {"text": "Warm." if i % 2 else "Cold.", "scores": good if i % 2 else poor}} for i in range(n)]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from reempathy.evaluation.empathyeval.tiny import make_tiny_omni_dir
    from reempathy.speech.tiny import make_tiny_decoder_dir

    root = tmp_path_factory.mktemp("stages")
    data = root / "empathy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in dialogues(6)))
    ser, captions = clip_files(root)
    return {"root": root, "model": make_tiny_omni_dir(root / "qwen25", "qwen2.5-omni"),
            "decoder": make_tiny_decoder_dir(root / "decoder"), "empathy": data, "ser": ser, "captions": captions}


def clip_files(root: Path) -> tuple[Path, Path]:
    """The shipped examples' labels and captions, each clip a short WAV (a tone per label) instead of synthetic units,
    so that the tests do not spend minutes in the speech decoder."""
    from reempathy.speech.audio import write_wav

    (root / "clips").mkdir()
    pitch = {"neutral": 220.0, "happy": 440.0, "sad": 165.0, "angry": 330.0}
    ser_lines, caption_lines = [], []
    for n, line in enumerate((EXAMPLES / "ser.jsonl").read_text().splitlines()):
        doc = json.loads(line)
        t = np.arange(int(0.4 * 16000)) / 16000
        write_wav(root / "clips" / f"s{n}.wav", 0.3 * np.sin(2 * np.pi * pitch[doc["label"]] * t), 16000)
        ser_lines.append(json.dumps({"id": doc["id"], "audio": f"clips/s{n}.wav", "label": doc["label"]}))
    for n, line in enumerate((EXAMPLES / "captions.jsonl").read_text().splitlines()):
        doc = json.loads(line)
        t = np.arange(int(0.4 * 16000)) / 16000
        write_wav(root / "clips" / f"c{n}.wav", 0.3 * np.sin(2 * np.pi * (200.0 + 40 * n) * t), 16000)
        caption_lines.append(json.dumps({"id": doc["id"], "audio": f"clips/c{n}.wav", "caption": doc["caption"]}))
    (root / "ser.jsonl").write_text("\n".join(ser_lines) + "\n")
    (root / "captions.jsonl").write_text("\n".join(caption_lines) + "\n")
    return root / "ser.jsonl", root / "captions.jsonl"


STAGES = """
[[stages]]
kind = "ser"
data = "{ser}"
validation_fraction = 0.25
labels = ["neutral", "happy", "sad", "angry"]
max_steps = 3
heads_learning_rate = 1e-2

[[stages]]
kind = "caption"
data = "{captions}"
validation_fraction = 0.34
max_steps = 2

[[stages]]
kind = "empathy"
data = "{empathy}"
validation_fraction = 0.34
max_steps = 3
"""


def write_config(path: Path, parts: dict, out: Path, stages: str = STAGES, **more: str) -> Path:
    body = stages.format(ser=parts["ser"], captions=parts["captions"], empathy=parts["empathy"], **more)
    path.write_text(f"""
[evaluator]
name = "empathyeval"
model = "{parts['model']}"
speech_decoder = "{parts['decoder']}"
{body}
[train]
output_dir = "{out}"
max_steps = 3
batch_size = 2
learning_rate = 2e-3
save_steps = 100
""")
    return path


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def chain(parts):
    """One uninterrupted three-stage run through `reempathy train`."""
    out = parts["root"] / "chain"
    cfg = write_config(parts["root"] / "chain.toml", parts, out)
    from io import StringIO
    from contextlib import redirect_stdout

    printed = StringIO()
    with redirect_stdout(printed):
        assert main(["train", "--config", str(cfg), "--quiet"]) == 0
    return {"out": out, "config": cfg, "printed": printed.getvalue(), "manifest": read(out / "evaluator.json")}


def test_three_stages_train_in_order_each_from_the_adapter_before(chain):
    out = chain["out"]
    ser, caption = read(out / "stages" / "1-ser" / "final" / "stage.json"), read(out / "stages" / "2-caption" / "final" / "stage.json")
    assert (ser["kind"], ser["steps"], ser["records"], ser["validation_records"]) == ("ser", 3, 6, 2)
    assert (caption["kind"], caption["steps"], caption["records"], caption["validation_records"]) == ("caption", 2, 4, 2)
    for stage in ("1-ser", "2-caption"):
        assert (out / "stages" / stage / "final" / "adapter_model.safetensors").is_file()
    assert (out / "stages" / "1-ser" / "final" / "head.safetensors").is_file()


def test_each_stage_reports_its_own_validation_metric(chain):
    printed = chain["printed"]
    assert "stage 1 ser: 3 steps on 6 records; validation accuracy" in printed
    assert "stage 2 caption: 2 steps on 4 records; validation caption loss" in printed
    assert "stage 3 empathy: trained 'empathyeval' for 3 steps on 4 records" in printed
    ser = read(chain["out"] / "stages" / "1-ser" / "final" / "stage.json")["validation"]
    assert 0.0 <= ser["accuracy"] <= 1.0 and ser["records"] == 2
    caption = read(chain["out"] / "stages" / "2-caption" / "final" / "stage.json")["validation"]
    assert caption["lm_loss"] > 0 and caption["tokens"] > 0


def test_the_final_manifest_records_the_chain(chain):
    stages = chain["manifest"]["training"]["stages"]
    assert [s["kind"] for s in stages] == ["ser", "caption", "empathy"] and [s["stage"] for s in stages] == [1, 2, 3]
    assert set(stages[0]["validation"]) >= {"accuracy"} and set(stages[1]["validation"]) >= {"lm_loss", "perplexity"}
    assert stages[2]["validation"] == chain["manifest"]["validation"] and "overall" in stages[2]["validation"]
    assert stages[0]["directory"] == "stages/1-ser/final" and stages[2]["directory"] == "."
    assert chain["manifest"]["steps"] == 3


def test_the_chains_checkpoint_scores_like_any_empathyeval_checkpoint(chain):
    from reempathy.evaluation.empathyeval.evaluator import EmpathyEval

    [ev] = EmpathyEval(EmpathyEvalOptions(checkpoint=str(chain["out"]), generate=False)).evaluate(
        [EvalItem("x", [{"role": "user", "text": "Hi."}], "Hello there.")])
    assert ev.ok and set(ev.scores) == set(EMPATHY_SCORES)


def test_a_later_stage_starts_from_the_adapter_the_stage_before_wrote(chain, parts, tmp_path, monkeypatch):
    """Stage 2 begins with exactly stage 1's saved LoRA weights (read back from its final folder)."""
    from safetensors.torch import load_file

    from reempathy.evaluation.empathyeval import train as train_module

    loaded = []
    real = train_module.load_adapter
    monkeypatch.setattr(train_module, "load_adapter", lambda thinker, d: loaded.append(Path(d)) or real(thinker, d))
    out = tmp_path / "again"
    cfg = write_config(tmp_path / "c.toml", parts, out)
    assert main(["train", "--config", str(cfg), "--quiet"]) == 0
    assert loaded == [out / "stages" / "1-ser" / "final", out / "stages" / "2-caption" / "final"]
    assert load_file(str(out / "stages" / "1-ser" / "final" / "adapter_model.safetensors")).keys() == \
        load_file(str(out / "adapter_model.safetensors")).keys()


KILL_AT_STAGE_2 = """
import os, signal, sys
from reempathy.evaluation.empathyeval import train
real = train._train_clip_stage
def kill_before_stage_2(*args, **kwargs):
    if args[7] == 2:  # the stage index: stage 1 is finished and written
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
train._train_clip_stage = kill_before_stage_2
from reempathy.cli import main
sys.exit(main(["train", "--config", sys.argv[1], "--quiet"]))
"""


def test_a_run_killed_between_stages_resumes_with_the_next_stage(chain, parts, tmp_path, capsys):
    out = tmp_path / "killed"
    cfg = write_config(tmp_path / "k.toml", parts, out)
    script = tmp_path / "kill.py"
    script.write_text(KILL_AT_STAGE_2)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script), str(cfg)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    first = out / "stages" / "1-ser" / "final" / "stage.json"
    before = first.read_bytes()
    assert not (out / "stages" / "2-caption" / "final").exists() and not (out / "evaluator.json").exists()

    assert main(["train", "--config", str(cfg), "--quiet"]) == 2  # without --resume: refused, nothing touched
    assert "holds the stages of an earlier run" in capsys.readouterr().err and first.read_bytes() == before

    assert main(["train", "--config", str(cfg), "--quiet", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "stage 1 ser: done before, not trained again" in printed and "stage 2 caption: 2 steps" in printed
    assert first.read_bytes() == before  # stage 1 was not trained again
    manifest = read(out / "evaluator.json")
    assert [s["kind"] for s in manifest["training"]["stages"]] == ["ser", "caption", "empathy"]
    # the same chain as the uninterrupted run: each stage's metric alike
    resumed, straight = manifest["training"]["stages"], chain["manifest"]["training"]["stages"]
    assert resumed[0]["validation"]["accuracy"] == straight[0]["validation"]["accuracy"]
    assert resumed[1]["validation"]["lm_loss"] == pytest.approx(straight[1]["validation"]["lm_loss"], rel=1e-3)
    assert resumed[2]["validation"]["overall"]["mse"] == pytest.approx(straight[2]["validation"]["overall"]["mse"], rel=1e-3)


# --- bad stage lists and labels: one line, exit 2, before any model is loaded -------------------------------


def _bad(parts, tmp_path, capsys, stages: str) -> str:
    cfg = write_config(tmp_path / "bad.toml", parts, tmp_path / "out", stages=stages)
    assert main(["train", "--config", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
    return err


def test_stages_in_the_wrong_order_are_refused(parts, tmp_path, capsys):
    stages = '[[stages]]\nkind = "caption"\ndata = "{captions}"\n[[stages]]\nkind = "ser"\ndata = "{ser}"\nlabels = ["a", "b"]\n' \
             '[[stages]]\nkind = "empathy"\ndata = "{empathy}"\n'
    assert "stage 2 (ser) comes after stage 1 (caption); stages go ser -> caption -> empathy" in _bad(parts, tmp_path, capsys, stages)


def test_an_unknown_stage_kind_is_refused(parts, tmp_path, capsys):
    stages = '[[stages]]\nkind = "asr"\ndata = "{ser}"\n[[stages]]\nkind = "empathy"\ndata = "{empathy}"\n'
    assert "stage 1: unknown kind 'asr'; the kinds are ser, caption, empathy" in _bad(parts, tmp_path, capsys, stages)


def test_a_chain_that_does_not_end_with_empathy_is_refused(parts, tmp_path, capsys):
    stages = '[[stages]]\nkind = "caption"\ndata = "{captions}"\n'
    assert "must end with the empathy stage" in _bad(parts, tmp_path, capsys, stages)


def test_a_label_outside_the_label_set_is_refused_with_its_line(parts, tmp_path, capsys):
    stages = STAGES.replace('labels = ["neutral", "happy", "sad", "angry"]', 'labels = ["happy", "sad", "angry"]')
    err = _bad(parts, tmp_path, capsys, stages)
    assert "ser.jsonl line 4: label 'neutral' is not in the ser stage's labels (happy, sad, angry)" in err


def test_a_ser_stage_without_labels_is_refused(parts, tmp_path, capsys):
    stages = STAGES.replace('labels = ["neutral", "happy", "sad", "angry"]\n', "")
    assert "stage 1 (ser): a ser stage needs labels" in _bad(parts, tmp_path, capsys, stages)


def test_data_and_stages_together_are_refused(parts, tmp_path, capsys):
    stages = STAGES + '\n[data]\npath = "{empathy}"\n'
    assert "give [data] (one empathy stage) or [[stages]]" in _bad(parts, tmp_path, capsys, stages)


def test_the_shipped_examples_of_each_stage_read_with_the_shipped_labels():
    from reempathy.config import read_toml
    from reempathy.evaluation.empathyeval.stages import read_clips

    raw = read_toml(ROOT / "configs" / "train-empathyeval-stages.toml")
    labels = raw["stages"][0]["labels"]
    ser = read_clips(EXAMPLES / "ser.jsonl", "ser", labels, False).clips
    captions = read_clips(EXAMPLES / "captions.jsonl", "caption", None, False).clips
    assert len(ser) == 8 and {c.target for c in ser} == set(labels) and all(c.units for c in ser)
    assert len(captions) == 6 and all(c.units and c.target for c in captions)


def test_the_shipped_stage_config_reads():
    from reempathy.config import read_toml
    from reempathy.evaluation.empathyeval.train import parse_config, stage_chain

    raw = read_toml(ROOT / "configs" / "train-empathyeval-stages.toml")
    assert [s.kind for s in stage_chain(parse_config(raw, "x"), "x")] == ["ser", "caption", "empathy"]

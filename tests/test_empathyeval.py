"""EmpathyEval on tiny random Qwen2.5-Omni / Qwen3-Omni-MoE directories in the published layout (no download)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from evaluation_helpers import write_run_dir
from reempathy.cli import main
from reempathy.errors import CheckpointError, ConfigError
from reempathy.evaluation.base import EMPATHY_SCORES, EvalItem
from reempathy.evaluation.empathyeval.options import EmpathyEvalOptions

GOOD = ["I am so sorry you are going through this. That sounds really hard.", "That sounds hard. I am here with you."]
BAD = ["Whatever. Just deal with it yourself.", "It is not a big problem, change the subject."]


def dialogues(n: int, offset: int = 0) -> list[dict]:
    """Good answers score 4.5, cold ones 1.5: the scores are learnable from the answer."""
    out = []
    for i in range(offset, offset + n):
        good = i % 2 == 0
        answer = {"role": "assistant", "text": (GOOD if good else BAD)[(i // 2) % 2]}
        out.append({
            "id": f"d{i}",
            "messages": [{"role": "user", "text": "My dog is sick and the vet is closed."}, answer],
            "assessment": {"text": "The answer names the feeling." if good else "The reply ignores the sadness.",
                           "scores": {k: 4.5 if good else 1.5 for k in EMPATHY_SCORES}},
        })
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_config(path, model, decoder, data, val, out, steps, save_steps=20):
    path.write_text(f"""
[evaluator]
name = "empathyeval"
model = "{model}"
speech_decoder = "{decoder}"
[data]
path = "{data}"
{f'validation = "{val}"' if val else ''}
[train]
output_dir = "{out}"
max_steps = {steps}
batch_size = 4
learning_rate = 2e-3
heads_learning_rate = 3e-2
save_steps = {save_steps}
""")
    return path


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from reempathy.evaluation.empathyeval.tiny import make_tiny_omni_dir
    from reempathy.speech.tiny import make_tiny_decoder_dir

    root = tmp_path_factory.mktemp("empathyeval")
    return {
        "root": root,
        "qwen2.5-omni": make_tiny_omni_dir(root / "qwen25", "qwen2.5-omni"),
        "qwen3-omni-moe": make_tiny_omni_dir(root / "qwen3", "qwen3-omni-moe"),
        "decoder": make_tiny_decoder_dir(root / "decoder"),
    }


@pytest.fixture(scope="module")
def trained(parts):
    """One EmpathyEval training run through `reempathy train` (Qwen2.5-Omni thinker)."""
    root = parts["root"]
    data = write_jsonl(root / "train.jsonl", dialogues(12))
    val = write_jsonl(root / "val.jsonl", dialogues(6, offset=100))
    out = root / "ckpt"
    cfg = train_config(root / "train.toml", parts["qwen2.5-omni"], parts["decoder"], data, val, out, 40)
    assert main(["train", "--config", str(cfg), "--quiet"]) == 0
    return {"checkpoint": out, "val": val, "manifest": json.loads((out / "evaluator.json").read_text())}


def evaluator(checkpoint, **kw):
    from reempathy.evaluation.empathyeval.evaluator import EmpathyEval

    return EmpathyEval(EmpathyEvalOptions(checkpoint=str(checkpoint), **kw))


@pytest.mark.parametrize("family", ["qwen2.5-omni", "qwen3-omni-moe"])
def test_thinker_loads_from_the_published_layout_with_its_saved_weights(parts, family):
    from safetensors.torch import load_file

    from reempathy.evaluation.empathyeval.omni import load_omni

    omni = load_omni(parts[family])
    saved = load_file(str(parts[family] / "model.safetensors"))
    assert all(k.startswith("thinker.") for k in saved)
    assert torch.equal(omni.thinker.lm_head.weight, saved["thinker.lm_head.weight"])
    embed = next(v for k, v in saved.items() if k.endswith("embed_tokens.weight"))
    assert torch.equal(omni.thinker.get_input_embeddings().weight, embed)
    assert omni.family.name == family and omni.sampling_rate == 16000


@pytest.mark.parametrize("family", ["qwen2.5-omni", "qwen3-omni-moe"])
def test_a_heard_turn_fills_exactly_its_audio_placeholders(parts, family, tmp_path):
    from reempathy.evaluation.empathyeval.audio import AudioSource
    from reempathy.evaluation.empathyeval.evaluator import make_example
    from reempathy.evaluation.empathyeval.omni import load_omni
    from reempathy.evaluation.empathyeval.prompt import collate
    from reempathy.speech.audio import write_wav

    omni = load_omni(parts[family])
    wav = write_wav(tmp_path / "user.wav", 0.3 * np.sin(np.linspace(0, 800, 22050 * 2)), 22050)  # 2 s at 22.05 kHz
    item = EvalItem("x", [{"role": "user", "audio": str(wav)}], "I hear you.")
    batch = collate(omni, [make_example(omni, item, AudioSource(omni.sampling_rate))], with_targets=False)
    assert batch["feature_attention_mask"].sum() == 200  # resampled to 16 kHz: 2 s of 10 ms frames
    out = omni.thinker(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       input_features=batch["input_features"], feature_attention_mask=batch["feature_attention_mask"])
    assert out.logits.shape[1] == batch["input_ids"].shape[1]
    assert (batch["input_ids"] == omni.audio_pad_id).sum() == omni.audio_tokens(torch.tensor([200]))[0]


def test_training_brings_the_score_mse_well_below_predicting_the_mean(trained):
    validation = trained["manifest"]["validation"]
    # the held-out scores are 4.5 and 1.5 half and half: always answering their mean 3 gives MSE 2.25
    assert validation["overall"]["mse"] < 0.75
    assert validation["overall"]["lcc"] > 0.8
    assert trained["manifest"]["lora"]["rank"] == 8 and trained["manifest"]["lora"]["alpha"] == 32


def test_the_trained_checkpoint_reloads_to_the_same_scores(trained):
    from reempathy.evaluation.data import load_labelled
    from reempathy.evaluation.metrics import mse

    records = load_labelled(trained["val"]).records
    items = [r.item for r in records]
    first = evaluator(trained["checkpoint"], generate=False).evaluate(items)
    second = evaluator(trained["checkpoint"], generate=False).evaluate(items)
    assert [e.scores for e in first] == [e.scores for e in second]
    pred = [e.scores[n] for e in first for n in EMPATHY_SCORES]
    human = [r.scores[n] for r in records for n in EMPATHY_SCORES]
    assert mse(pred, human) == pytest.approx(trained["manifest"]["validation"]["overall"]["mse"], abs=1e-4)


def test_generated_assessments_come_back_as_text(trained):
    [ev] = evaluator(trained["checkpoint"], max_new_tokens=8).evaluate([EvalItem("x", [{"role": "user", "text": "My exam is tomorrow."}], GOOD[0])])
    assert ev.ok and isinstance(ev.text, str) and ev.text.strip()
    assert set(ev.scores) == set(EMPATHY_SCORES) and all(1 <= v <= 5 for v in ev.scores.values())


def test_units_are_heard_through_the_speech_decoder_at_the_feature_rate(parts):
    from reempathy.evaluation.empathyeval.audio import AudioSource

    wave = AudioSource(16000, str(parts["decoder"])).from_units(list(range(1, 14)))
    assert wave.dtype == np.float32 and abs(len(wave) - 16640) < 1600  # 13 units at 12.5 Hz = 1.04 s at 16 kHz


def test_units_without_a_speech_decoder_are_a_config_error():
    from reempathy.evaluation.empathyeval.audio import AudioSource

    with pytest.raises(ConfigError, match="speech_decoder"):
        AudioSource(16000).waveform(None, [1, 2, 3])


def test_eval_scores_a_run_hearing_its_answer_units_through_the_runs_speech_decoder(trained, parts, tiny, tmp_path, capsys):
    manifest = {"schema": "reempathy.run/1", "config": {"backbone": {"name": "tiny", "decoder_path": str(parts["decoder"])}}}
    run = write_run_dir(tmp_path / "run", tiny, ["I lost my keys.", "My dog is sick."], max_new_tokens=20, manifest=manifest)
    assert any(json.loads(x)["result"]["spoken"]["audio_units"] for x in (run / "results.jsonl").read_text().splitlines())
    rc = main(["eval", str(run), "--evaluator", "empathyeval", "--set", f"checkpoint={json.dumps(str(trained['checkpoint']))}",
               "--set", "max_new_tokens=4", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (run / "scores" / "empathyeval.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["rec1", "rec2"] and all(r["error"] is None for r in rows)
    assert all(set(r["scores"]) == set(EMPATHY_SCORES) and isinstance(r["text"], str) for r in rows)
    options = json.loads((run / "scores" / "empathyeval.options.json").read_text())["options"]
    assert options["speech_decoder"] == str(parts["decoder"])


def test_a_checkpoint_missing_its_heads_is_a_one_line_error(trained, tiny, tmp_path, capsys):
    broken = shutil.copytree(trained["checkpoint"], tmp_path / "broken", ignore=shutil.ignore_patterns("checkpoint-*"))
    (broken / "heads.safetensors").unlink()
    run = write_run_dir(tmp_path / "run", tiny, ["Hello."], max_new_tokens=4)
    assert main(["eval", str(run), "--evaluator", "empathyeval", "--set", f"checkpoint={json.dumps(str(broken))}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "has no score heads" in err and err.count("\n") == 1
    with pytest.raises(CheckpointError):
        evaluator(broken)


def test_empathyeval_without_a_checkpoint_refuses_to_score():
    with pytest.raises(ConfigError, match="needs checkpoint"):
        evaluator("")


def test_qwen3_omni_moe_thinker_trains_and_its_checkpoint_scores(parts):
    root = parts["root"]
    data = write_jsonl(root / "train3.jsonl", dialogues(4))
    out = root / "ckpt3"
    cfg = train_config(root / "train3.toml", parts["qwen3-omni-moe"], parts["decoder"], data, None, out, 2)
    assert main(["train", "--config", str(cfg), "--quiet"]) == 0
    manifest = json.loads((out / "evaluator.json").read_text())
    assert manifest["family"] == "qwen3-omni-moe" and manifest["steps"] == 2
    [ev] = evaluator(out, generate=False).evaluate([EvalItem("x", [{"role": "user", "text": "Hi."}], "Hello there.")])
    assert ev.ok and set(ev.scores) == set(EMPATHY_SCORES)


def test_training_resumes_from_its_last_saved_step(parts, capsys):
    root = parts["root"]
    data = write_jsonl(root / "train4.jsonl", dialogues(4))
    out = root / "ckpt4"
    cfg = train_config(root / "train4.toml", parts["qwen2.5-omni"], parts["decoder"], data, None, out, 4, save_steps=2)
    assert main(["train", "--config", str(cfg), "--quiet"]) == 0
    assert (out / "checkpoint-2").is_dir()
    assert main(["train", "--config", str(cfg), "--quiet", "--resume", "--max-steps", "6"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((out / "evaluator.json").read_text())["steps"] == 6


def test_training_hears_wav_user_turns_and_unit_answers(parts, tmp_path, monkeypatch):
    """Spoken dialogues train as heard: the user's WAV and the answer's units (through the speech decoder) are clips."""
    from reempathy.evaluation.empathyeval import train as train_module
    from reempathy.speech.audio import write_wav

    (tmp_path / "clips").mkdir()
    write_wav(tmp_path / "clips" / "user.wav", 0.3 * np.sin(np.linspace(0, 800, 22050)), 22050)  # 1 s
    rows = []
    for row in dialogues(4):
        row["messages"] = [{"role": "user", "audio": "clips/user.wav"},
                           {"role": "assistant", "units": list(range(3, 16))}]  # fmt: skip
        rows.append(row)
    data = write_jsonl(tmp_path / "spoken.jsonl", rows)
    built = []
    real = train_module.make_example
    monkeypatch.setattr(train_module, "make_example", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    out = tmp_path / "ckpt"
    cfg = train_config(tmp_path / "train.toml", parts["qwen2.5-omni"], parts["decoder"], data, None, out, 2)
    assert main(["train", "--config", str(cfg), "--quiet"]) == 0
    assert json.loads((out / "evaluator.json").read_text())["steps"] == 2
    assert len(built) == 4
    for example in built:
        user_clip, answer_clip = example.waves  # both turns heard, in order
        assert abs(len(user_clip) - 16000) < 400  # the 22.05 kHz WAV resampled to 16 kHz
        assert abs(len(answer_clip) - 16640) < 1600  # 13 units at 12.5 Hz through the speech decoder
        assert example.scores is not None and example.target_ids

"""Checkpoints are never lost or mistaken: refused runs touch nothing, resume is exact, damage is named (issue 16)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from reempathy.checkpoints import read_manifest
from reempathy.cli import main
from reempathy.errors import CheckpointError, ConfigError
from reempathy.jobs.trainrun import MANIFEST, TRAINER_STATE
from reempathy.training.config import load_train_config
from reempathy.training.train import train

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "empathy_dialogues.jsonl"
FILES = (MANIFEST, "adapter_model.safetensors", "adapter_config.json")


def data_file(path: Path, n: int = 4) -> Path:
    lines = [line for line in EXAMPLES.read_text(encoding="utf-8").splitlines() if line.strip()][:n]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_config(out: Path, data: Path, **train_settings):
    settings = {"output_dir": str(out), "max_steps": 2, "save_steps": 1, "batch_size": 2, "learning_rate": 1e-2,
                "save_total_limit": 3}
    settings.update(train_settings)
    return load_train_config(None, data={"strategy": {"name": "sft"}, "data": {"path": str(data)}, "train": settings})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-step sft run with checkpoint-1 and checkpoint-2 (do not modify: copy it)."""
    base = tmp_path_factory.mktemp("finished")
    data = data_file(base / "d.jsonl")
    train(train_config(base / "run", data), progress=False)
    return base / "run", data


@pytest.fixture()
def run_copy(finished, tmp_path):
    src, data = finished
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst, data


def snapshot(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in FILES}


def test_a_refused_train_keeps_the_finished_checkpoint(run_copy):
    out, data = run_copy
    before = snapshot(out)
    with pytest.raises(ConfigError, match="--resume"):
        train(train_config(out, data), progress=False)
    assert snapshot(out) == before
    read_manifest(out)


def test_a_resume_refused_for_a_changed_setting_keeps_the_finished_checkpoint(run_copy):
    out, data = run_copy
    before = snapshot(out)
    with pytest.raises(ConfigError, match="seed changed"):
        train(train_config(out, data, resume=True, seed=1), progress=False)
    assert snapshot(out) == before


def test_the_reported_reproducer_exits_2_and_the_copy_still_decodes(run_copy, tmp_path, capsys):
    out, data = run_copy
    cfg = tmp_path / "train.toml"
    cfg.write_text(f'[strategy]\nname = "sft"\n[data]\npath = {json.dumps(str(data))}\n[train]\noutput_dir = "unused"\n')
    code = main(["train", "--config", str(cfg), "--max-steps", "2", "--quiet", "--set", f"train.output_dir={json.dumps(str(out))}"])
    assert code == 2 and "--resume" in capsys.readouterr().err
    assert main(["decode", "--checkpoint", str(out), "--max-new-tokens", "2", "--prompt", "hi"]) == 0


def test_resume_on_a_finished_run_trains_no_step_past_max_steps(run_copy):
    out, data = run_copy
    before = snapshot(out)
    result = train(train_config(out, data, resume=True), progress=False)
    assert result.steps == 2 and any("nothing to do" in n for n in result.notes)
    assert snapshot(out) == before
    assert not (out / "checkpoint-3").exists()


def test_resume_after_a_kill_between_the_last_save_and_the_manifest_installs_that_adapter(run_copy):
    out, data = run_copy
    (out / MANIFEST).unlink()
    (out / "adapter_model.safetensors").unlink()
    result = train(train_config(out, data, resume=True), progress=False)
    assert result.steps == 2 and read_manifest(out).steps == 2
    assert (out / "adapter_model.safetensors").read_bytes() == (out / "checkpoint-2/adapter_model.safetensors").read_bytes()
    assert not (out / "checkpoint-3").exists()


def test_resume_after_a_kill_while_writing_the_final_adapter_leaves_no_leftovers(run_copy):
    """Killed inside write_checkpoint (its staging folder half written, a copy half done): --resume cleans up."""
    out, data = run_copy
    (out / MANIFEST).unlink()
    (out / ".adapter.partial").mkdir()
    (out / ".adapter.partial" / "adapter_model.safetensors").write_bytes(b"half")
    (out / ".adapter_model.safetensors.copy").write_bytes(b"half")
    result = train(train_config(out, data, resume=True), progress=False)
    assert result.steps == 2 and read_manifest(out).steps == 2
    assert not (out / ".adapter.partial").exists() and not (out / ".adapter_model.safetensors.copy").exists()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_resume_skips_an_incomplete_last_checkpoint_and_says_so(run_copy, damage):
    out, data = run_copy
    (out / MANIFEST).unlink()
    state = out / "checkpoint-2" / TRAINER_STATE
    if damage == "missing":
        state.unlink()
    else:
        state.write_text(state.read_text()[:40])
    notes = []
    result = train(train_config(out, data, resume=True), progress=False, on_note=notes.append)
    assert any("checkpoint-2" in n and "incomplete" in n for n in notes)
    assert Path(result.resumed_from).name == "checkpoint-1"
    assert result.steps == 2 and read_manifest(out).steps == 2


def test_resume_past_a_lowered_max_steps_is_refused(run_copy):
    out, data = run_copy
    (out / MANIFEST).unlink()
    with pytest.raises(ConfigError, match="past max_steps = 1"):
        train(train_config(out, data, resume=True, max_steps=1), progress=False)


@pytest.mark.parametrize(
    "override, key",
    [("backbone.seed=5", "seed"), ("backbone.audio_units=512", "audio_units"), ("backbone.hidden_size=32", "hidden_size")],
)
def test_a_checkpoint_refuses_a_backbone_it_was_not_trained_on(finished, capsys, override, key):
    out, _ = finished
    code = main(["decode", "--checkpoint", str(out), "--set", override, "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and f"was trained on backbone 'tiny' with {key} = " in err and len(err.strip().splitlines()) == 1


def test_a_checkpoint_decodes_with_another_device_or_dtype_setting(finished, capsys):
    out, _ = finished
    code = main(["decode", "--checkpoint", str(out), "--set", 'backbone.device="cpu"', "--max-new-tokens", "2",
                 "--prompt", "hi"])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    "content, needle",
    [(b"", "not a readable safetensors file"), (b"\x00" * 7, "not a readable safetensors file"),
     (None, "not a readable safetensors file"), (b"random bytes " * 100, "not a readable safetensors file")],
)
def test_a_damaged_adapter_file_is_named(run_copy, capsys, content, needle):
    out, _ = run_copy
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(content if content is not None else weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=needle):
        read_manifest(out)
    assert main(["decode", "--checkpoint", str(out), "--prompt", "hi"]) == 2


def test_a_garbage_adapter_config_says_damaged_not_a_misfit(run_copy):
    out, _ = run_copy
    (out / "adapter_config.json").write_text("{garbage")
    with pytest.raises(CheckpointError, match="adapter_config.json: not valid JSON"):
        read_manifest(out)


def test_an_adapter_config_that_is_not_peft_says_so(run_copy, capsys):
    out, _ = run_copy
    (out / "adapter_config.json").write_text(json.dumps({"hello": 1}))
    code = main(["decode", "--checkpoint", str(out), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "not a peft adapter config" in err and "does not fit" not in err


def test_a_manifest_whose_chunk_layout_contradicts_its_strategy_is_damaged(run_copy):
    out, _ = run_copy
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["chunk_layout"] = {"text_tokens": 5, "audio_tokens": 10}
    manifest["strategy"] = {"name": "reempathy", "options": {"text_tokens": 7, "audio_tokens": 10}}
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="chunk_layout.text_tokens is 5 but strategy.options.text_tokens is 7"):
        read_manifest(out)


def test_a_checkpoint_path_longer_than_the_file_system_allows_is_one_line(capsys):
    code = main(["decode", "--checkpoint", "x" * 300, "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "over the file system's 255-byte limit" in err and len(err.strip().splitlines()) == 1


def test_a_checkpoint_that_is_a_file_says_so(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        read_manifest(tmp_path / "f")


def test_a_strategy_option_left_to_its_default_does_not_contradict_the_recorded_layout(run_copy):
    out, _ = run_copy
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["chunk_layout"] = {"text_tokens": 5, "audio_tokens": 0}  # a text-only stream's resolved default
    manifest["strategy"] = {"name": "reempathy", "options": {"text_tokens": 5, "audio_tokens": None}}
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert read_manifest(out).chunk_layout.audio_tokens == 0

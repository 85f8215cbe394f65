"""Writing EmpathyEval checkpoints: checked first, saved beside, the manifest last; a crash never leaves one that reads complete."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model

from reempathy.errors import CheckpointError
from reempathy.evaluation.empathyeval import checkpoint as ckpt
from reempathy.evaluation.empathyeval import train as eval_train
from reempathy.evaluation.empathyeval.checkpoint import (
    HEADS,
    MANIFEST,
    EvaluatorManifest,
    read_evaluator_checkpoint,
    write_evaluator_checkpoint,
)


def adapter(seed: int):
    """A real peft LoRA model on a two-layer MLP (what peft saves is the same files as on the thinker)."""
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False))


def heads(value: float) -> dict[str, torch.Tensor]:
    return {"need_support.weight": torch.full((1, 8), value)}


def manifest(steps: int) -> EvaluatorManifest:
    return EvaluatorManifest(evaluator="empathyeval", model="/base", family="qwen2_5_omni", score_names=["need_support"],
                             lora={"rank": 2}, steps=steps, created="2026-01-01T00:00:00Z")  # fmt: skip


def files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_written_checkpoint_reads_back_complete_with_nothing_left_beside(tmp_path):
    out = write_evaluator_checkpoint(adapter(0), heads(1.0), tmp_path / "ev", manifest(3))
    assert read_evaluator_checkpoint(out).steps == 3
    assert sorted(os.listdir(out)) == sorted(["README.md", "adapter_config.json", "adapter_model.safetensors", HEADS, MANIFEST])


def test_a_crash_while_saving_leaves_the_previous_checkpoint_as_it_was(tmp_path, monkeypatch):
    out = write_evaluator_checkpoint(adapter(0), heads(1.0), tmp_path / "ev", manifest(3))
    before = files(out)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full while saving the heads")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        write_evaluator_checkpoint(adapter(1), heads(2.0), out, manifest(6))
    assert files(out) == before  # no hidden save folder left, the old files untouched
    assert read_evaluator_checkpoint(out).steps == 3


def test_a_crash_while_moving_files_into_place_leaves_a_checkpoint_that_reads_incomplete(tmp_path, monkeypatch):
    out = write_evaluator_checkpoint(adapter(0), heads(1.0), tmp_path / "ev", manifest(3))
    real_replace, moved = os.replace, []

    def replace_then_crash(src, dst):
        if moved:
            raise OSError("killed between two renames")
        moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace_then_crash)
    with pytest.raises(OSError, match="killed"):
        write_evaluator_checkpoint(adapter(1), heads(2.0), out, manifest(6))
    assert len(moved) == 1  # one new file in place beside the old ones: a mixture
    with pytest.raises(CheckpointError, match=f"{MANIFEST}: missing"):
        read_evaluator_checkpoint(out)
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_a_crash_while_writing_the_manifest_leaves_no_manifest(tmp_path, monkeypatch):
    def crash(path, *args, **kwargs):
        raise OSError("killed while writing the manifest")

    monkeypatch.setattr(ckpt, "write_json", crash)
    with pytest.raises(OSError, match="killed"):
        write_evaluator_checkpoint(adapter(0), heads(1.0), tmp_path / "ev", manifest(3))
    assert (tmp_path / "ev" / HEADS).is_file() and not (tmp_path / "ev" / MANIFEST).exists()
    with pytest.raises(CheckpointError, match="not a complete evaluator checkpoint"):
        read_evaluator_checkpoint(tmp_path / "ev")


@pytest.mark.parametrize("kind, message", [("directory", "is a directory"), ("fifo", "is a named pipe")])
def test_a_checkpoint_file_path_that_is_not_a_file_is_refused_before_saving(tmp_path, kind, message):
    out = tmp_path / "ev"
    out.mkdir()
    (out / HEADS).mkdir() if kind == "directory" else os.mkfifo(out / HEADS)
    with pytest.raises(CheckpointError, match=message):
        write_evaluator_checkpoint(adapter(0), heads(1.0), out, manifest(3))
    assert os.listdir(out) == [HEADS]


def test_training_refuses_an_output_dir_it_cannot_write_before_loading_the_base_model(tmp_path):
    from reempathy.evaluation.empathyeval.options import EmpathyEvalOptions

    out = tmp_path / "ev"
    out.mkdir()
    (out / MANIFEST).mkdir()  # where the manifest goes
    raw = {"evaluator": {"name": "empathyeval", "model": str(tmp_path / "no-such-model")},
           "data": {"path": str(tmp_path / "no-such-data.jsonl")}, "train": {"output_dir": str(out), "max_steps": 1}}
    with pytest.raises(CheckpointError, match=f"output_dir file {str(out / MANIFEST)!r} is a directory"):
        eval_train.train_empathyeval(raw, EmpathyEvalOptions(model=str(tmp_path / "no-such-model")), progress=False)
    assert os.listdir(out) == [MANIFEST]


def _resumable(tmp_path, seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.AdamW(model.parameters())


def test_a_resumable_checkpoint_killed_while_saving_keeps_the_earlier_one_of_that_step(tmp_path, monkeypatch):
    model, optimizer = _resumable(tmp_path, 0)
    eval_train._save_resumable(model, optimizer, tmp_path, 2, None)
    before = files(tmp_path / "checkpoint-2")

    def crash(*args, **kwargs):
        raise RuntimeError("killed while saving the optimizer")

    monkeypatch.setattr(eval_train.torch, "save", crash)
    with pytest.raises(RuntimeError, match="killed"):
        eval_train._save_resumable(*_resumable(tmp_path, 1), tmp_path, 2, None)
    assert files(tmp_path / "checkpoint-2") == before
    assert json.loads(before["state.json"]) == {"step": 2}
    assert os.listdir(tmp_path) == ["checkpoint-2"]  # no partial folder beside it


def test_a_resumable_checkpoint_replaces_one_of_the_same_step_whole(tmp_path):
    eval_train._save_resumable(*_resumable(tmp_path, 0), tmp_path, 2, None)
    first = files(tmp_path / "checkpoint-2")
    eval_train._save_resumable(*_resumable(tmp_path, 1), tmp_path, 2, None)
    second = files(tmp_path / "checkpoint-2")
    assert second["trainable.safetensors"] != first["trainable.safetensors"]
    assert sorted(second) == ["optimizer.pt", "state.json", "trainable.safetensors"]
    assert os.listdir(tmp_path) == ["checkpoint-2"]

"""Training on the tiny backbone: loss goes down, checkpoints round-trip into decoding, runs resume."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from reempathy.backbones.base import DELIMITER_TOKENS, REFLECTION_CLOSE, REFLECTION_OPEN, Turn
from reempathy.backbones.tiny import TinyOptions, load_tiny
from reempathy.config import ComponentConfig, DecodeConfig, DecodeSettings, SamplingConfig
from reempathy.registry import default_discovery
from reempathy.errors import CheckpointError, ConfigError, InputError
from reempathy.runner import run_decode
from reempathy.jobs.trainrun import MANIFEST, apply_checkpoint, begin_run, plan_run, read_manifest
from reempathy.training.cli import add_train_parser
from reempathy.training.config import load_train_config
from reempathy.checkpoints import CapWarning, checkpoint_config_overrides
from reempathy.training.train import train

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "empathy_dialogues.jsonl"


def small_dataset(path: Path, n: int, with_rejected: bool = False) -> Path:
    """The first ``n`` example records (those with a rejected answer, for DPO)."""
    lines = [line for line in EXAMPLES.read_text(encoding="utf-8").splitlines() if line.strip()]
    if with_rejected:
        lines = [line for line in lines if json.loads(line).get("rejected")]
    path.write_text("\n".join(lines[:n]) + "\n", encoding="utf-8")
    return path


def config(tmp_path: Path, strategy: str, data: Path | None = None, options: dict | None = None, **train_settings):
    settings = {"output_dir": str(tmp_path / "out"), "max_steps": 4, "learning_rate": 1e-2, "batch_size": 4,
                "save_steps": 2, "logging_steps": 1}
    settings.update(train_settings)
    return load_train_config(None, data={
        "backbone": {"name": "tiny"},
        "strategy": {"name": strategy, **(options or {})},
        "data": {"path": str(data or small_dataset(tmp_path / "data.jsonl", 4, strategy == "dpo"))},
        "train": settings,
    })


class Interrupt(RuntimeError):
    pass


class StopAt(TrainerCallback):
    """Raises at the end of step ``n``, like a killed run."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.n:
            raise Interrupt(f"stopped at step {self.n}")


@pytest.mark.parametrize("strategy", ["sft", "cotbs", "reempathy", "dpo"])
def test_loss_goes_down(tmp_path, strategy):
    steps = 6 if strategy != "dpo" else 4
    extra = {"batch_size": 2, "learning_rate": 5e-3} if strategy == "dpo" else {}
    n = 2 if strategy == "dpo" else 4
    cfg = config(tmp_path, strategy, small_dataset(tmp_path / "d.jsonl", n, strategy == "dpo"),
                 max_steps=steps, save_steps=100, **extra)
    result = train(cfg, progress=False)
    assert result.steps == steps
    assert len(result.losses) >= 2
    assert result.losses[-1] < result.losses[0]


@pytest.fixture(scope="module")
def reempathy_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    result = train(config(tmp, "reempathy", options={"text_tokens": 5, "audio_tokens": 10}), progress=False)
    return result


def test_manifest_records_strategy_layout_delimiters_and_steps(reempathy_checkpoint):
    manifest = read_manifest(reempathy_checkpoint.output_dir)
    data = json.loads((reempathy_checkpoint.output_dir / MANIFEST).read_text())
    assert data["schema"] == "reempathy.checkpoint/1"
    assert data["strategy"] == {
        "name": "reempathy",
        "options": {"text_tokens": 5, "audio_tokens": 10, "reflect": True, "reflection_tokens": None},
    }
    assert data["chunk_layout"] == {"text_tokens": 5, "audio_tokens": 10}
    assert data["reflection"] == {"mode": "free", "tokens": None}
    assert data["backbone"]["name"] == "tiny"
    assert manifest.steps == 4
    tiny = load_tiny(TinyOptions())
    assert data["delimiters"] == {name: tiny.layout.special[name] for name in DELIMITER_TOKENS}
    assert (reempathy_checkpoint.output_dir / "adapter_model.safetensors").is_file()


def test_only_the_delimiter_rows_of_the_embedding_are_trained(reempathy_checkpoint):
    base = load_tiny(TinyOptions())
    before = base.model.get_input_embeddings().weight.detach().clone()
    tuned = apply_checkpoint(load_tiny(TinyOptions()), reempathy_checkpoint.output_dir)
    after = tuned.model.get_input_embeddings().weight.detach()
    changed = set(torch.nonzero((after != before).any(dim=1)).flatten().tolist())
    assert changed == {base.layout.special[REFLECTION_OPEN], base.layout.special[REFLECTION_CLOSE]}


def test_merged_and_unmerged_adapters_give_the_same_logits(reempathy_checkpoint):
    merged = apply_checkpoint(load_tiny(TinyOptions()), reempathy_checkpoint.output_dir, merge=True)
    plain = apply_checkpoint(load_tiny(TinyOptions()), reempathy_checkpoint.output_dir, merge=False)
    base = load_tiny(TinyOptions())
    ids = base.build_prompt([Turn("user", text="I failed my exam.")])
    ids = torch.tensor([ids + [base.layout.special[REFLECTION_OPEN], 5, base.layout.special[REFLECTION_CLOSE]]])
    with torch.no_grad():
        a, b, c = merged.model(input_ids=ids).logits, plain.model(input_ids=ids).logits, base.model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-4)


def test_saved_checkpoint_decodes_with_the_manifests_strategy(reempathy_checkpoint):
    registry = default_discovery().registry
    manifest = read_manifest(reempathy_checkpoint.output_dir)
    name, options = checkpoint_config_overrides(manifest, None, {})
    assert (name, options["text_tokens"], options["audio_tokens"]) == ("reempathy", 5, 10)
    cfg = DecodeConfig(
        backbone=ComponentConfig(name=manifest.backbone.name, **manifest.backbone.options),
        strategy=ComponentConfig(name=name, **options),
        sampling=SamplingConfig(greedy=True),
        decode=DecodeSettings(max_new_tokens=40, prompt="I lost my job today."),
    )
    backbone = apply_checkpoint(load_tiny(TinyOptions()), reempathy_checkpoint.output_dir)
    result = run_decode(cfg, registry, backbone=backbone)
    assert result.strategy == "reempathy"
    assert result.counts.generated >= 1
    assert result.extra.get("chunk_layout") == {"text_tokens": 5, "audio_tokens": 10}


def test_a_contradicting_strategy_is_refused(reempathy_checkpoint):
    manifest = read_manifest(reempathy_checkpoint.output_dir)
    with pytest.raises(ConfigError, match="trained for strategy 'reempathy', not 'sft'"):
        checkpoint_config_overrides(manifest, "sft", {})


def test_a_contradicting_chunk_layout_is_refused(reempathy_checkpoint):
    manifest = read_manifest(reempathy_checkpoint.output_dir)
    with pytest.raises(ConfigError, match=r"chunks of 5\+10 .* text_tokens = 7"):
        checkpoint_config_overrides(manifest, "reempathy", {"text_tokens": 7})


def test_decode_only_options_are_laid_over_the_manifests(reempathy_checkpoint):
    manifest = read_manifest(reempathy_checkpoint.output_dir)
    with pytest.warns(CapWarning):  # 8 is shorter than the longest reflection trained
        name, options = checkpoint_config_overrides(manifest, "reempathy", {"max_reflection_tokens": 8, "text_tokens": 5})
    assert name == "reempathy"
    assert options == {"text_tokens": 5, "audio_tokens": 10, "reflect": True, "reflection_tokens": None,
                       "max_reflection_tokens": 8}


def test_checkpoint_with_other_delimiter_ids_is_refused(reempathy_checkpoint, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(reempathy_checkpoint.output_dir, copy)
    data = json.loads((copy / MANIFEST).read_text())
    data["delimiters"][REFLECTION_OPEN] += 1
    (copy / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"{MANIFEST}: delimiter .* differ"):
        apply_checkpoint(load_tiny(TinyOptions()), copy)


def test_directory_without_manifest_is_reported_incomplete(reempathy_checkpoint, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(reempathy_checkpoint.output_dir, copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=rf"{MANIFEST}: missing, so checkpoint .* is incomplete"):
        read_manifest(copy)


def test_damaged_manifest_names_the_file(tmp_path):
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{tmp_path / MANIFEST}: not valid JSON"):
        read_manifest(tmp_path)


def test_interrupted_run_resumes_to_the_same_total_steps(tmp_path):
    data = small_dataset(tmp_path / "d.jsonl", 6)
    full = train(config(tmp_path / "a", "sft", data, max_steps=4, save_steps=1, batch_size=2), progress=False)

    cfg = config(tmp_path / "b", "sft", data, max_steps=4, save_steps=1, batch_size=2)
    with pytest.raises(Interrupt):
        train(cfg, callbacks=[StopAt(3)], progress=False)
    with pytest.raises(CheckpointError, match="incomplete"):
        read_manifest(cfg.train.output_dir)

    resumed = train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"resume": True})}), progress=False)
    assert resumed.resumed_from is not None and Path(resumed.resumed_from).name == "checkpoint-2"
    assert resumed.steps == full.steps == 4
    assert read_manifest(cfg.train.output_dir).steps == 4
    assert resumed.losses[-1] == pytest.approx(full.losses[-1], rel=1e-4)


def test_an_interrupted_overwrite_leaves_the_previous_checkpoint_complete_and_unchanged(tmp_path, reempathy_checkpoint):
    out = tmp_path / "ckpt"
    shutil.copytree(reempathy_checkpoint.output_dir, out)
    before = {name: (out / name).read_bytes() for name in (MANIFEST, "adapter_model.safetensors", "adapter_config.json")}
    cfg = config(tmp_path, "reempathy", output_dir=str(out), overwrite=True)
    with pytest.raises(Interrupt):
        train(cfg, callbacks=[StopAt(1)], progress=False)
    assert read_manifest(out).steps == reempathy_checkpoint.steps  # the new adapter never replaced the old one
    assert {name: (out / name).read_bytes() for name in before} == before


def test_bad_data_stops_the_run_before_anything_is_written(tmp_path):
    data = small_dataset(tmp_path / "d.jsonl", 3)
    data.write_text(data.read_text() + '{"messages": [{"role": "user", "units": [4096]}]}\n')
    cfg = config(tmp_path, "sft", data)
    with pytest.raises(InputError, match=rf"{data}:4: messages.0.units: audio unit 4096 is outside"):
        train(cfg, progress=False)
    assert not (Path(cfg.train.output_dir) / MANIFEST).exists()


def test_earlier_checkpoints_without_resume_are_refused(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(ConfigError, match="checkpoint-3.*--resume"):
        plan_run(tmp_path, {}, resume=False, overwrite=False, max_steps=4)


def test_resuming_with_a_changed_strategy_is_refused(tmp_path):
    begin_run(plan_run(tmp_path, {"strategy": "sft"}, resume=False, overwrite=False, max_steps=4), {"strategy": "sft"})
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(ConfigError, match="cannot resume, the run's strategy changed"):
        plan_run(tmp_path, {"strategy": "cotbs"}, resume=True, overwrite=False, max_steps=4)


@pytest.mark.parametrize(
    "section, key, needle",
    [("train", "learning_rte", "unknown key 'train.learning_rte'; valid keys in [train]"),
     ("data", "paht", "unknown key 'data.paht'"),
     ("strategy", "text_tokenz", "unknown option 'text_tokenz'")],
)
def test_unknown_config_keys_are_named(tmp_path, section, key, needle):
    raw = {"strategy": {"name": "reempathy"}, "data": {"path": "x.jsonl"}, "train": {"output_dir": "o"}}
    raw[section][key] = 1
    with pytest.raises(ConfigError) as info:
        load_train_config(None, data=raw)
    assert needle in str(info.value)


def test_unknown_training_strategy_lists_the_available_ones():
    with pytest.raises(ConfigError, match="available: cotbs, dpo, reempathy, sft"):
        load_train_config(None, data={"strategy": {"name": "rlhf"}, "data": {"path": "x"}, "train": {"output_dir": "o"}})


def test_train_subcommand_trains_from_a_toml_config(tmp_path, capsys):
    data = small_dataset(tmp_path / "d.jsonl", 2)
    path = tmp_path / "train.toml"
    path.write_text(
        f'[strategy]\nname = "cotbs"\n[data]\npath = "{data}"\n[train]\noutput_dir = "{tmp_path / "out"}"\n'
        "max_steps = 50\nbatch_size = 2\nsave_steps = 1\n",
        encoding="utf-8",
    )
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--config", str(path), "--max-steps", "2", "--quiet"])
    assert args.func(args) == 0
    assert "trained 'cotbs' for 2 steps on 2 records" in capsys.readouterr().out
    assert read_manifest(tmp_path / "out").strategy.name == "cotbs"
    args = parser.parse_args(["train", "--config", str(path), "--max-steps", "3", "--resume", "--quiet"])
    assert args.func(args) == 0
    assert "resumed from" in capsys.readouterr().out
    assert read_manifest(tmp_path / "out").steps == 3


def test_shipped_training_configs_are_valid():
    for name in ("sft", "cotbs", "reempathy", "dpo"):
        cfg = load_train_config(ROOT / "configs" / f"train-{name}.toml")
        assert cfg.strategy.name == name and cfg.train.lora_rank == 8 and cfg.train.lora_alpha == 32


def test_adapter_for_another_model_shape_is_refused(reempathy_checkpoint):
    with pytest.raises(CheckpointError, match="does not fit backbone 'tiny' \\(its weight shapes differ\\)"):
        apply_checkpoint(load_tiny(TinyOptions(hidden_size=32)), reempathy_checkpoint.output_dir)

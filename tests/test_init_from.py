"""``[train] init_from``: a run continues a checkpoint's adapter (iterated DPO, SFT then GRPO); its reference is that policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reempathy.errors import ConfigError
from reempathy.training.config import load_train_config
from reempathy.training.train import train

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "empathy_dialogues.jsonl"


def config(tmp_path: Path, name: str, strategy: str = "reempathy", **train_settings):
    settings = {"output_dir": str(tmp_path / name), "max_steps": 2, "learning_rate": 1e-2, "batch_size": 2, "save_steps": 100}
    settings.update(train_settings)
    data = tmp_path / "data.jsonl"
    if not data.exists():
        lines = [line for line in EXAMPLES.read_text(encoding="utf-8").splitlines() if json.loads(line).get("rejected")]
        data.write_text("\n".join(lines[:4]) + "\n", encoding="utf-8")
    return load_train_config(None, data={"backbone": {"name": "tiny"}, "strategy": {"name": strategy},
                                         "data": {"path": str(data)}, "train": settings})


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A two-step reempathy checkpoint to continue."""
    tmp = tmp_path_factory.mktemp("start")
    return tmp, train(config(tmp, "first"), progress=False).output_dir


def adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def test_a_run_from_a_checkpoint_begins_with_its_adapter(start, tmp_path):
    _, first = start
    # a learning rate too small to move anything: the saved adapter is the one the run started from
    result = train(config(tmp_path, "again", learning_rate=1e-12, max_steps=1, init_from=str(first)), progress=False)
    before, after = adapter(first), adapter(result.output_dir)
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    fresh = train(config(tmp_path, "fresh", learning_rate=1e-12, max_steps=1), progress=False)
    assert not all(torch.allclose(before[k], adapter(fresh.output_dir)[k], atol=1e-6) for k in before)
    assert result.manifest.training["init_from"]["path"] == str(first)


def test_the_reference_of_a_continued_dpo_run_is_the_starting_policy(start, tmp_path):
    from reempathy.backbones.tiny import TinyOptions, load_tiny
    from reempathy.data.records import load_records
    from reempathy.registry import default_discovery
    from reempathy.training.builders import build_all
    from reempathy.training.start import start_from
    from reempathy.training.train import lora_config, make_dpo_trainer

    _, first = start
    cfg = config(tmp_path, "dpo", strategy="dpo", init_from=str(first))
    backbone = load_tiny(TinyOptions())
    options = cfg.strategy_options()
    items = build_all(load_records(cfg.data.path, backbone.layout.audio_count), backbone, cfg.spec, options).items
    begun = start_from(str(first), backbone, "tiny", {}, cfg.train, [], default_discovery().registry)
    trainer = make_dpo_trainer(cfg, backbone, lora_config(cfg, cfg.spec.delimiters(options), False, backbone), options, items, (),
                               False, begun)
    params = dict(trainer.model.named_parameters())
    twins = [(n, n.replace(".default", ".ref")) for n in params if n.endswith(".default") or ".default." in n]
    assert any(n.endswith("trainable_tokens_delta.default") for n, _ in twins)  # the rows TRL's own copy misses
    for mine, ref in twins:
        assert torch.equal(params[mine], params[ref]), mine


@pytest.mark.parametrize("change, message", [
    ({"lora_rank": 4}, "its adapter has lora_rank = 8, but [train] sets lora_rank = 4"),
    ({}, "its adapter does not train the rows of <|begin_of_thought|>, <|end_of_thought|>"),
])
def test_a_checkpoint_that_cannot_be_continued_is_refused_before_training(start, tmp_path, change, message):
    _, first = start
    strategy = "reempathy" if change else "cotbs"
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("|", r"\|")):
        train(config(tmp_path, "next", strategy=strategy, init_from=str(first), **change), progress=False)
    assert not (tmp_path / "next").exists()


def test_a_checkpoint_of_another_backbone_shape_is_refused(start, tmp_path):
    _, first = start
    cfg = config(tmp_path, "next", init_from=str(first))
    cfg.backbone = cfg.backbone.model_validate({"name": "tiny", "seed": 3})
    with pytest.raises(ConfigError, match="seed"):
        train(cfg, progress=False)


def test_a_resumed_run_must_start_from_the_same_checkpoint(start, tmp_path):
    _, first = start
    train(config(tmp_path, "run", init_from=str(first), max_steps=1, save_steps=1), progress=False)
    other = train(config(tmp_path, "other"), progress=False).output_dir
    with pytest.raises(ConfigError, match="cannot resume, the run's init_from changed"):
        train(config(tmp_path, "run", init_from=str(other), max_steps=2, save_steps=1, resume=True), progress=False)

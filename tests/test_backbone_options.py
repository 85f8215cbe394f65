"""Backbone options are checked against each other and against this machine before a model is built (issue 16 item 9)."""

from __future__ import annotations

import json

import pytest
import torch

from reempathy.backbones.glm4voice import Glm4VoiceOptions
from reempathy.backbones.tiny import TinyOptions, load_tiny
from reempathy.config import load_config
from reempathy.registry import default_discovery
from reempathy.devices import resolve_device
from reempathy.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def registry():
    return default_discovery().registry


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"num_heads": 3}, "not a multiple of num_heads 3"),
        ({"hidden_size": 8, "num_heads": 16}, "not a multiple of num_heads 16"),
        ({"num_heads": 4, "num_kv_heads": 3}, "not a multiple of num_kv_heads 3"),
        ({"hidden_size": 2**63 - 1}, "hidden_size"),
        ({"num_layers": 2**63 - 1}, "num_layers"),
        ({"max_context": 2**63 - 1}, "max_context"),
        ({"device": "banana"}, "'banana' is not a device name"),
        ({"path": ""}, "path"),
    ],
)
def test_tiny_options_that_cannot_build_a_model_are_refused_naming_the_option(registry, options, needle):
    with pytest.raises(ConfigError, match=needle):
        registry.validate("backbone", "tiny", options)


def test_glm4voice_device_name_is_checked_when_the_config_is_read(registry):
    with pytest.raises(ConfigError, match="device"):
        registry.validate("backbone", "glm-4-voice", {"path": "/m", "device": "banana"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_on_a_machine_without_a_gpu_is_one_clear_error():
    with pytest.raises(ConfigError, match="asks for CUDA, which this machine does not have"):
        load_tiny(TinyOptions(device="cuda"))
    with pytest.raises(ConfigError, match="asks for CUDA"):
        resolve_device("cuda:1")


def test_speech_parts_and_backbones_share_one_device_helper():
    import reempathy.backbones.glm4voice.loader as loader
    import reempathy.speech.decoder as decoder
    import reempathy.speech.tokenizer as tokenizer

    assert loader.resolve_device is decoder.resolve_device is tokenizer.resolve_device is resolve_device


def test_a_tiny_path_whose_config_is_garbage_is_a_checkpoint_error(tmp_path):
    (tmp_path / "config.json").write_text("{garbage")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_tiny(TinyOptions(path=str(tmp_path)))


def test_a_tiny_path_that_is_a_file_is_named(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="a file"):
        load_tiny(TinyOptions(path=str(tmp_path / "f")))


def test_a_tiny_path_whose_config_is_another_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not the config of a tiny"):
        load_tiny(TinyOptions(path=str(tmp_path)))


def test_glm4voice_options_are_strict():
    with pytest.raises(ValueError):
        Glm4VoiceOptions.model_validate({"path": "/m", "system_prompt": 5})


def test_a_manifest_with_a_device_the_machine_lacks_does_not_leak_into_decoding(registry, tmp_path, monkeypatch):
    # The training machine's device is a runtime option: decoding uses its own (here the default, cpu).
    from reempathy import checkpoints

    manifest = checkpoints.Manifest(
        backbone=checkpoints.Component(name="tiny", options={"seed": 0, "device": "banana"}),
        strategy=checkpoints.Component(name="sft"),
        delimiters={},
        steps=1,
        created="now",
    )
    manifest.directory = str(tmp_path)
    options = checkpoints.check_backbone_options(manifest, None, {}, registry)
    assert "device" not in options
    monkeypatch.setattr(checkpoints, "read_manifest", lambda d: manifest)
    cfg = load_config(None, [f"decode.checkpoint={json.dumps(str(tmp_path))}"], None, registry)
    assert cfg.backbone.options.get("device", "cpu") == "cpu"


def test_every_backbone_pins_the_system_prompt_its_checkpoints_were_trained_with():
    """Training writes the system prompt into every sequence: decoding a checkpoint under another one is refused."""
    from reempathy.backbones.glm4voice.loader import Glm4VoiceOptions
    from reempathy.backbones.interleaved import InterleavedOptions
    from reempathy.backbones.qwen25omni.loader import Qwen25OmniOptions
    from reempathy.checkpoints import runtime_options

    for model in (Glm4VoiceOptions, Qwen25OmniOptions, InterleavedOptions):
        assert "path" in runtime_options(model) and "system_prompt" not in runtime_options(model), model.__name__

"""Load a published glm-4-voice-tokenizer directory into ``VQEncoder`` and a ``WhisperFeatureExtractor``.

The published ``model.safetensors`` holds a whole ``WhisperVQForConditionalGeneration`` (keys
``model.encoder.*`` and ``model.decoder.*``). Only the encoder tensors up to the quantizer are
read; the decoder, the layers past ``quantize_position`` and the final layer norm are skipped,
as the published ``load_quantize_encoder`` does. Keys without the ``model.encoder.`` prefix
(an encoder saved on its own) are accepted too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import WhisperFeatureExtractor

from reempathy.errors import CheckpointError
from reempathy.speech.tokenizer.config import (
    FeatureConfig,
    VQEncoderConfig,
    read_encoder_config,
    read_feature_config,
)
from reempathy.speech.tokenizer.model import VQEncoder

_PREFIXES = ("model.encoder.", "encoder.", "")


def check_directory(directory: Path) -> None:
    if not directory.exists():
        raise CheckpointError(f"{directory} does not exist; pass the local glm-4-voice-tokenizer directory")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file; pass the glm-4-voice-tokenizer directory that holds config.json")


def weight_files(directory: Path) -> list[Path]:
    """The ``model*.safetensors`` files (the published loader's pattern)."""
    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} has no model*.safetensors; re-download the glm-4-voice-tokenizer")
    return files


def load_encoder(directory: Path, cfg: VQEncoderConfig, device: torch.device) -> VQEncoder:
    """A ``VQEncoder`` with the published weights, in eval mode on ``device`` (float32)."""
    with torch.device("meta"):
        model = VQEncoder(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    found: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    local = _local_name(key)
                    if local in expected and local not in found:
                        found[local] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} cannot be read as safetensors ({e}); re-download the tokenizer") from None
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(
            f"{directory}: the weights lack {missing[:3]} ({len(missing)} tensors) that config.json implies; "
            "the weights and config.json do not belong together"
        )
    for key, tensor in found.items():
        if tensor.shape != expected[key]:
            raise CheckpointError(
                f"{directory}: tensor {key} has shape {tuple(tensor.shape)}, config.json implies "
                f"{tuple(expected[key])}; the weights and config.json do not belong together"
            )
    model.load_state_dict({k: v.to(device=device, dtype=torch.float32) for k, v in found.items()}, assign=True)
    return model.eval()


def _local_name(key: str) -> str | None:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return None


def feature_extractor(cfg: FeatureConfig) -> WhisperFeatureExtractor:
    """The log-mel front end the published code builds with ``WhisperFeatureExtractor.from_pretrained``."""
    return WhisperFeatureExtractor(
        feature_size=cfg.feature_size,
        sampling_rate=cfg.sampling_rate,
        hop_length=cfg.hop_length,
        chunk_length=cfg.chunk_length,
        n_fft=cfg.n_fft,
        padding_value=cfg.padding_value,
        return_attention_mask=True,
    )


def read_directory(directory: Path) -> tuple[VQEncoderConfig, FeatureConfig]:
    """Both configs of a tokenizer directory, checked; reads no weights."""
    check_directory(directory)
    enc = read_encoder_config(directory)
    feat = read_feature_config(directory)
    if feat.feature_size != enc.num_mel_bins:
        raise CheckpointError(
            f"{directory}: preprocessor_config.json gives {feat.feature_size} mel bins, config.json "
            f"{enc.num_mel_bins}; the two files do not belong together"
        )
    return enc, feat

"""The published glm-4-voice-tokenizer ``config.json`` / ``preprocessor_config.json``, read and checked.

The config is a Whisper config plus the VQ keys of the published ``WhisperVQConfig``; the
keys below are those that change which unit ids come out. Defaults are ``WhisperVQConfig``'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reempathy.errors import CheckpointError

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
SAMPLE_RATE = 16000  # the published extract_speech_token resamples every input to 16 kHz


@dataclass(frozen=True)
class VQEncoderConfig:
    """The encoder up to the quantizer: Whisper dimensions plus pooling and quantization."""

    d_model: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    num_mel_bins: int
    max_source_positions: int
    quantize_vocab_size: int
    quantize_position: int
    activation_function: str = "gelu"
    pooling_kernel_size: int | None = None
    pooling_type: str = "max"
    pooling_position: int = 0
    quantize_causal_block_size: int | None = None
    quantize_causal_encoder: bool = False
    encoder_causal_attention: bool = False
    encoder_causal_convolution: bool = False
    encoder_layers: int | None = None

    def layer_is_causal(self, index: int) -> bool:
        """Whether layer ``index`` uses plain causal attention (the published code then ignores the padding mask)."""
        return self.encoder_causal_attention or (self.quantize_causal_encoder and index < self.quantize_position)

    @property
    def pool(self) -> int:
        return self.pooling_kernel_size or 1


@dataclass(frozen=True)
class FeatureConfig:
    """The log-mel front end (``WhisperFeatureExtractor`` arguments)."""

    feature_size: int
    sampling_rate: int
    hop_length: int
    chunk_length: int
    n_fft: int
    padding_value: float = 0.0


_REQUIRED = (
    "d_model",
    "encoder_attention_heads",
    "encoder_ffn_dim",
    "num_mel_bins",
    "max_source_positions",
    "quantize_vocab_size",
    "quantize_position",
)
_OPTIONAL = (
    "activation_function",
    "pooling_kernel_size",
    "pooling_type",
    "pooling_position",
    "quantize_causal_block_size",
    "quantize_causal_encoder",
    "encoder_causal_attention",
    "encoder_causal_convolution",
    "encoder_layers",
)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or ``CheckpointError`` naming the file."""
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing; pass the glm-4-voice-tokenizer directory (config.json, model.safetensors, "
            "preprocessor_config.json)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON ({e}); re-download the tokenizer") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; re-download the tokenizer")
    return raw


def read_encoder_config(directory: Path) -> VQEncoderConfig:
    """``VQEncoderConfig`` from ``directory/config.json``; refuses configs that give no unit ids."""
    path = directory / CONFIG_FILE
    raw = read_json(path)
    missing = [k for k in _REQUIRED if raw.get(k) is None]
    if missing:
        raise CheckpointError(
            f"{path} lacks {', '.join(repr(k) for k in missing)}; it is not a GLM-4-Voice speech tokenizer config"
        )
    kwargs = {k: raw[k] for k in _REQUIRED}
    kwargs.update({k: raw[k] for k in _OPTIONAL if k in raw and raw[k] is not None})
    try:
        cfg = VQEncoderConfig(**kwargs)
    except TypeError as e:
        raise CheckpointError(f"{path}: {e}") from None
    _check(cfg, path)
    return cfg


def _check(cfg: VQEncoderConfig, path: Path) -> None:
    if cfg.d_model % cfg.encoder_attention_heads:
        raise CheckpointError(f"{path}: d_model {cfg.d_model} is not divisible by encoder_attention_heads")
    if cfg.encoder_layers is not None and cfg.quantize_position > cfg.encoder_layers:
        raise CheckpointError(f"{path}: quantize_position {cfg.quantize_position} is past encoder_layers")
    if cfg.quantize_position < 1:
        raise CheckpointError(f"{path}: quantize_position must be at least 1")
    if cfg.pooling_kernel_size is not None:
        if cfg.pooling_type not in ("max", "avg"):
            raise CheckpointError(f"{path}: pooling_type {cfg.pooling_type!r} is neither 'max' nor 'avg'")
        if not 1 <= cfg.pooling_position <= cfg.quantize_position:
            raise CheckpointError(
                f"{path}: pooling_position {cfg.pooling_position} must lie in 1..quantize_position "
                f"({cfg.quantize_position}) for the unit ids to be pooled"
            )
    if cfg.quantize_causal_block_size is not None and cfg.quantize_causal_block_size < cfg.pool:
        raise CheckpointError(f"{path}: quantize_causal_block_size is smaller than pooling_kernel_size")


def read_feature_config(directory: Path) -> FeatureConfig:
    """``FeatureConfig`` from ``directory/preprocessor_config.json``; the sampling rate must be 16 kHz."""
    path = directory / PREPROCESSOR_FILE
    raw = read_json(path)
    keys = ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft")
    missing = [k for k in keys if raw.get(k) is None]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(repr(k) for k in missing)}; re-download the tokenizer")
    cfg = FeatureConfig(**{k: raw[k] for k in keys}, padding_value=float(raw.get("padding_value", 0.0)))
    if cfg.sampling_rate != SAMPLE_RATE:
        raise CheckpointError(f"{path}: sampling_rate is {cfg.sampling_rate}; the GLM-4-Voice tokenizer works at 16000")
    return cfg

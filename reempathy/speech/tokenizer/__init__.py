"""GLM-4-Voice speech tokenizer: waveform → discrete units at 12.5 per second.

- ``load_speech_tokenizer(path)`` → ``GlmSpeechTokenizer`` (the ``SpeechTokenizer`` of a ``Backbone``)
- ``GlmSpeechTokenizer.tokenize(path)`` reads a WAV file; ``units(wave, rate)`` takes samples
"""

from __future__ import annotations

from pathlib import Path

import torch

from reempathy.speech.audio import MAX_SECONDS, load_speech
from reempathy.devices import resolve_device
from reempathy.speech.tokenizer.config import FeatureConfig, VQEncoderConfig
from reempathy.speech.tokenizer.extract import UnitExtractor
from reempathy.speech.tokenizer.load import feature_extractor, load_encoder, read_directory
from reempathy.speech.tokenizer.model import VQEncoder


class GlmSpeechTokenizer:
    """Waveform → unit ids with the published glm-4-voice-tokenizer weights."""

    def __init__(
        self,
        encoder: VQEncoder,
        features: FeatureConfig,
        device: torch.device,
        path: str = "",
        max_seconds: float | None = MAX_SECONDS,
    ):
        self.encoder = encoder
        self.extractor = UnitExtractor(encoder, feature_extractor(features), device)
        self.device = device
        self.path = path
        self.max_seconds = max_seconds

    @property
    def vocab_size(self) -> int:
        return self.encoder.cfg.quantize_vocab_size

    @property
    def units_per_second(self) -> float:
        return self.extractor.units_per_second

    def tokenize(self, path: str) -> list[int]:
        """Unit ids of a WAV file (first channel, resampled to 16 kHz); ``InputError`` for unusable audio."""
        audio = load_speech(path, self.max_seconds)
        return self.units(torch.from_numpy(audio.samples[0]), audio.sample_rate)

    def units(self, wave: torch.Tensor, sample_rate: int) -> list[int]:
        """Unit ids of a mono waveform (1-D floats in [-1, 1]) at ``sample_rate`` Hz."""
        return self.extractor.units(wave, sample_rate)


def load_speech_tokenizer(
    path: str | Path, device: str | torch.device = "auto", max_seconds: float | None = MAX_SECONDS
) -> GlmSpeechTokenizer:
    """Load a glm-4-voice-tokenizer directory (config.json, model*.safetensors, preprocessor_config.json)."""

    directory = Path(path).expanduser()
    enc_cfg, feat_cfg = read_directory(directory)
    dev = resolve_device(device)
    encoder = load_encoder(directory, enc_cfg, dev)
    return GlmSpeechTokenizer(encoder, feat_cfg, dev, path=str(directory), max_seconds=max_seconds)


__all__ = ["GlmSpeechTokenizer", "VQEncoder", "VQEncoderConfig", "load_speech_tokenizer"]

"""Waveform → unit ids, step for step as the published ``extract_speech_token`` for one file.

1. First channel; resampled to 16 kHz with torchaudio's ``Resample`` transform at its defaults
   (windowed-sinc, Hann window, width 6, rolloff 0.99; kernel built in float64, cached as float32).
   torchaudio sizes its polyphase kernel by the reduced ratio ``rate/gcd : 16000/gcd``; every
   common rate reduces to terms of at most a few hundred (44100 → 441:160) and is resampled
   exactly as published. An odd rate (44101 Hz reduces to 44101:16000, a kernel of gigabytes)
   is resampled at the nearest ratio whose terms are at most ``MAX_RATIO_TERM``
   (:func:`reempathy.speech.audio.resample_ratio`, shared with every reader that resamples):
   44101 → 441:160, a rate error of 2·10⁻⁵, far below what 80 ms units can tell, and a kernel
   of kilobytes.
2. Cut into 30-second segments (the last one shorter).
3. Segments go through ``WhisperFeatureExtractor`` in batches of 128, padded to the longest
   segment of the batch rounded up to a multiple of the unit stride (1280 samples = 80 ms:
   hop 160 × conv strides 2 × pooling 4), with the sample-level attention mask.
4. The encoder gives one id per stride; the mask, subsampled the same way, keeps the ids of
   real audio: ``ceil(samples / 1280)`` per segment, 12.5 per second.
"""

from __future__ import annotations

import numpy as np
import torch
import torchaudio
from transformers import WhisperFeatureExtractor

from reempathy.speech.audio import resample_ratio
from reempathy.speech.tokenizer.config import SAMPLE_RATE
from reempathy.speech.tokenizer.model import VQEncoder

SEGMENT_SECONDS = 30
BATCH_SEGMENTS = 128


class UnitExtractor:
    """The published extraction loop around a loaded encoder and feature extractor."""

    def __init__(self, encoder: VQEncoder, features: WhisperFeatureExtractor, device: torch.device):
        self.encoder = encoder
        self.features = features
        self.device = device
        self._resamplers: dict[tuple[int, int], torchaudio.transforms.Resample] = {}

    @property
    def stride(self) -> int:
        """Samples (at 16 kHz) per unit id."""
        return self.encoder.frame_stride * self.encoder.cfg.pool * self.features.hop_length

    @property
    def units_per_second(self) -> float:
        return SAMPLE_RATE / self.stride

    def resample(self, wave: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """``wave`` (1-D float32) at 16 kHz."""
        if sample_rate == SAMPLE_RATE:
            return wave
        ratio = resample_ratio(sample_rate, SAMPLE_RATE)
        if ratio not in self._resamplers:
            self._resamplers[ratio] = torchaudio.transforms.Resample(*ratio).to(self.device)
        return self._resamplers[ratio](wave)

    def segments(self, wave: np.ndarray) -> list[np.ndarray]:
        """30-second pieces of a 16 kHz waveform."""
        step = SEGMENT_SECONDS * SAMPLE_RATE
        return [wave[start : start + step] for start in range(0, wave.shape[0], step)]

    @torch.inference_mode()
    def units(self, wave: torch.Tensor, sample_rate: int) -> list[int]:
        """Unit ids of a mono waveform (1-D float tensor in [-1, 1]) at ``sample_rate``."""
        wave = self.resample(wave.to(self.device, torch.float32), sample_rate)
        pieces = self.segments(wave.cpu().numpy())
        ids: list[int] = []
        for start in range(0, len(pieces), BATCH_SEGMENTS):
            batch = self.features(
                pieces[start : start + BATCH_SEGMENTS],
                sampling_rate=SAMPLE_RATE,
                return_attention_mask=True,
                return_tensors="pt",
                device=str(self.device),
                padding="longest",
                pad_to_multiple_of=self.stride,
            )
            codes, keep = self.encoder(batch["input_features"].to(self.device), batch["attention_mask"].to(self.device))
            for row, mask in zip(codes, keep, strict=False):
                ids.extend(row[mask].tolist())
        return ids

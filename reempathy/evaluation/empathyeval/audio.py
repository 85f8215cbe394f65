"""The turns EmpathyEval hears, as mono waveforms at the feature extractor's rate.

Where it decides (``AudioSource.waveform``): a turn with a WAV is read from it; a turn with audio
units and no WAV goes through the speech decoder (the backbone's, e.g. glm-4-voice-decoder, seeded);
a turn with neither is read as text by the caller. Everything is resampled to the feature
extractor's sampling rate (16 kHz for the Qwen models) with torchaudio, at a bounded ratio
(:func:`reempathy.speech.audio.resample`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from reempathy.errors import ConfigError


class AudioSource:
    """Waveforms from WAV paths or units; the speech decoder is loaded on first use."""

    def __init__(self, target_rate: int, speech_decoder: str | None = None, seed: int = 42, device: str = "cpu") -> None:
        self.target_rate = target_rate
        self.decoder_path = speech_decoder
        self.seed = seed
        self.device = device
        self._decoder: Any = None

    def decoder(self) -> Any:
        if self._decoder is None:
            if not self.decoder_path:
                raise ConfigError(
                    "empathyeval: a turn has audio units but no WAV, so it must be synthesised; set "
                    "speech_decoder = the glm-4-voice-decoder directory (reempathy eval takes the run's "
                    "backbone decoder_path when the run has one), or give the records WAV files"
                )
            from reempathy.speech.decoder import load_speech_decoder

            self._decoder = load_speech_decoder(self.decoder_path, device=self.device)
        return self._decoder

    def resample(self, wave: torch.Tensor, rate: int) -> np.ndarray:
        """Mono float32 at ``target_rate``."""
        from reempathy.speech.audio import resample

        wave = resample(wave, rate, self.target_rate)  # an odd rate at the nearest small ratio
        return wave.detach().float().cpu().numpy().reshape(-1)

    def from_wav(self, path: str) -> np.ndarray:
        from reempathy.speech.audio import read_wav

        audio = read_wav(path)
        mono = torch.from_numpy(audio.samples).mean(dim=0)
        return self.resample(mono, audio.sample_rate)

    def from_units(self, units: Sequence[int]) -> np.ndarray:
        dec = self.decoder()
        wave = dec.synthesize(list(units), seed=self.seed)
        return self.resample(wave, dec.sample_rate)

    def waveform(self, wav: str | None, units: Sequence[int] | None) -> np.ndarray | None:
        """The turn's audio, or None when it has neither a WAV nor units (it is read as text)."""
        if wav:
            return self.from_wav(wav)
        if units:
            return self.from_units(units)
        return None


__all__ = ["AudioSource"]

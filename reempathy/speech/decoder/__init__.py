"""GLM-4-Voice speech decoder: unit ids → 22.05 kHz waveform (flow matching to mel, then the HiFT vocoder).

- ``load_speech_decoder(path)`` → ``GlmSpeechDecoder`` (the ``SpeechDecoder`` of a ``Backbone``)
- ``GlmSpeechDecoder.synthesize(units)`` → waveform; ``synthesize_full`` also returns the mel
- ``convert_decoder_weights(path)`` writes safetensors copies of ``flow.pt`` / ``hift.pt`` once

Randomness comes from the decoder's own generators, seeded per call (default 42, the published
seed) and drawn in the published order: the flow's starting noise, then the vocoder's harmonic
phases and source noise. The caller's global RNG is never touched.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from reempathy.errors import CheckpointError, InputError
from reempathy.speech.decoder.config import DecoderConfig, read_decoder_config
from reempathy.speech.decoder.flow import Flow
from reempathy.speech.decoder.hift import HiFT
from reempathy.speech.decoder.weights import convert_decoder_weights, load_into
from reempathy.devices import resolve_device

DEFAULT_SEED = 42  # the published flow calls torch.manual_seed(42) before drawing its noise


@dataclass
class Synthesis:
    """One synthesised utterance: waveform ``(samples,)`` and mel ``(mels, frames)``, float32 on the CPU."""

    waveform: torch.Tensor
    mel: torch.Tensor
    sample_rate: int


class Generators:
    """The decoder's random streams: phases are drawn on the CPU (as published), the rest on the device."""

    def __init__(self, device: torch.device):
        self.cpu = torch.Generator()
        self.device = self.cpu if device.type == "cpu" else torch.Generator(device=device)

    def seed(self, seed: int) -> None:
        self.cpu.manual_seed(seed)
        if self.device is not self.cpu:
            self.device.manual_seed(seed)


class GlmSpeechDecoder:
    """Unit ids → waveform with the published glm-4-voice-decoder weights."""

    def __init__(self, config: DecoderConfig, flow: Flow, hift: HiFT, device: torch.device, path: str = ""):
        self.config = config
        self.flow = flow
        self.hift = hift
        self.device = device
        self.path = path
        self.generators = Generators(device)

    @property
    def sample_rate(self) -> int:
        return self.config.hift.sampling_rate

    @property
    def samples_per_frame(self) -> int:
        return self.config.hift.samples_per_frame

    @property
    def vocab_size(self) -> int:
        return self.config.flow.vocab_size

    def check_units(self, units: Sequence[int]) -> torch.Tensor:
        """``(1, T)`` long tensor of ``units`` on the device; ``InputError`` if empty or out of range."""
        units = list(units)
        if not units:
            raise InputError("no speech units to synthesise; the answer holds no audio units")
        bad = [u for u in units if not _is_unit(u) or not 0 <= int(u) < self.vocab_size]
        if bad:
            raise InputError(
                f"unit {bad[0]!r} is outside the decoder's range 0..{self.vocab_size - 1} "
                f"({len(bad)} of {len(units)} units are); "
                "check the units come from the GLM-4-Voice tokenizer or model"
            )
        return torch.tensor([[int(u) for u in units]], dtype=torch.long, device=self.device)

    def mel(
        self,
        units: torch.Tensor,
        seed: int,
        prompt_units: torch.Tensor | None = None,
        prompt_mel: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mel ``(1, mels, frames)`` of ``units``; reseeds the generators first, as the published flow does."""
        self.generators.seed(seed)
        return self.flow.inference(units, self.generators.device, prompt_units, prompt_mel)

    def vocode(self, mel: torch.Tensor, cache_source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveform ``(1, samples)`` and excitation of ``mel``; draws from the generators where ``mel`` left them."""
        return self.hift(mel, self.generators.cpu, self.generators.device, cache_source)

    def synthesize_full(self, units: Sequence[int], seed: int = DEFAULT_SEED) -> Synthesis:
        """The whole utterance at once (the published offline path): waveform and mel."""
        ids = self.check_units(units)
        mel = self.mel(ids, seed)
        wave, _ = self.vocode(mel)
        return Synthesis(wave[0].float().cpu(), mel[0].float().cpu(), self.sample_rate)

    def synthesize(self, units: Sequence[int], seed: int = DEFAULT_SEED) -> torch.Tensor:
        """Waveform ``(samples,)`` of ``units`` at ``sample_rate`` Hz (float32, CPU)."""
        return self.synthesize_full(units, seed).waveform


def _is_unit(u: object) -> bool:
    return isinstance(u, numbers.Integral) and not isinstance(u, bool)


def load_speech_decoder(path: str | Path, device: str | torch.device = "auto") -> GlmSpeechDecoder:
    """Load a glm-4-voice-decoder directory: config.yaml plus flow/hift weights (.safetensors or .pt)."""
    directory = Path(path).expanduser()
    if not directory.exists():
        raise CheckpointError(f"{directory} does not exist; pass the local glm-4-voice-decoder directory")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file; pass the glm-4-voice-decoder directory that holds config.yaml")
    cfg = read_decoder_config(directory)
    dev = resolve_device(device)
    with torch.device("meta"):
        flow, hift = Flow(cfg.flow), HiFT(cfg.hift)
    load_into(flow, directory, "flow", dev)
    load_into(hift, directory, "hift", dev)
    return GlmSpeechDecoder(cfg, flow, hift, dev, str(directory))


__all__ = ["DEFAULT_SEED", "GlmSpeechDecoder", "Synthesis", "convert_decoder_weights", "load_speech_decoder"]

"""Chunked synthesis while units arrive, as the published web demo does it.

Blocks: the first chunk is synthesised once 25 units are there, then 50, 100, 150 and 200 at a
time (the last size repeats); whatever is left when the answer ends is the final chunk.

Each chunk (the published ``AudioDecoder.token2wav``):

1. The flow reruns on every unit so far: earlier units and the mel already produced are its
   prompt, and only the new frames come back (the noise is reseeded for every chunk).
2. The first ``overlap`` frames (5 units ≈ 34 frames) are cross-faded with the frames held back
   from the previous chunk (a Hamming window: rising half on the new, falling half on the old).
3. The last mel frame of the previous chunk and its 256 excitation samples are put in front,
   so the vocoder continues its source signal without a glitch.
4. A chunk that is not the last holds back its final ``overlap`` frames (to be cross-faded by the
   next chunk) and its final 256 samples (re-made by the next chunk from the cached frame).

The mel handed to the next chunk as prompt includes the cached frame, so the prompt runs one
frame per chunk ahead of the units — kept as published. One change: when a full block was
synthesised as not-last and the answer then ends with no new unit (a text token came in
between), the published demo never vocodes the held-back frames (about 0.4 s of audio is
lost); ``finish`` vocodes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from reempathy.errors import ConfigError
from reempathy.speech.decoder import DEFAULT_SEED, GlmSpeechDecoder

BLOCK_SIZES = (25, 50, 100, 150, 200)  # the published web demo's block_size_list
OVERLAP_UNITS = 5  # the published token_overlap_len


def hamming(n: int) -> torch.Tensor:
    """numpy's symmetric Hamming window of ``n`` points, in float64."""
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    k = torch.arange(n, dtype=torch.float64)
    return 0.54 - 0.46 * torch.cos(2 * torch.pi * k / (n - 1))


def cross_fade(new: torch.Tensor, old: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """``new`` with its first ``len(window)/2`` frames faded in over the last frames of ``old`` (float64 blend)."""
    n = window.shape[0] // 2
    out = new.clone()
    blend = new[..., :n].double() * window[:n].to(new.device) + old[..., -n:].double() * window[n:].to(new.device)
    out[..., :n] = blend.to(new.dtype)
    return out


@dataclass
class _Carry:
    """What one chunk leaves for the next."""

    overlap_mel: torch.Tensor | None = None
    cache_mel: torch.Tensor | None = None
    cache_source: torch.Tensor | None = None
    prompt_units: list[int] = field(default_factory=list)
    prompt_mels: list[torch.Tensor] = field(default_factory=list)


class StreamingSynthesizer:
    """Feed tokens with ``tick``/``add`` (or units with ``push``); collect waveform pieces; end with ``finish``.

    Pieces are ``(samples,)`` float32 tensors on the CPU, to be played one after another.
    """

    def __init__(
        self,
        decoder: GlmSpeechDecoder,
        seed: int = DEFAULT_SEED,
        block_sizes: Sequence[int] = BLOCK_SIZES,
        overlap_units: int = OVERLAP_UNITS,
    ):
        self.decoder = decoder
        self.seed = seed
        self.block_sizes = tuple(block_sizes)
        rate = decoder.config.flow.input_frame_rate
        self.overlap_frames = int(overlap_units / rate * 22050 / 256)
        self.window = hamming(2 * self.overlap_frames)
        self.cache_frames = 1
        self.cache_samples = self.cache_frames * decoder.samples_per_frame
        small = [b for b in self.block_sizes if int(b / rate * 22050 / 256) <= self.overlap_frames + 1]
        if not self.block_sizes or small:
            raise ConfigError(
                f"streaming block sizes must each give more mel frames than the {overlap_units}-unit overlap; "
                f"{small[0] if small else 'an empty list'} is too small (use {overlap_units + 1} or more units)"
            )
        self.pending: list[int] = []
        self.chunk_sizes: list[int] = []
        self._carry = _Carry()
        self._finished = False

    @property
    def block_size(self) -> int:
        """Units the next chunk waits for."""
        return self.block_sizes[min(len(self.chunk_sizes), len(self.block_sizes) - 1)]

    def tick(self) -> list[torch.Tensor]:
        """A token arrived (text or audio): synthesise the pending block if it is full.

        The published demo checks before it stores the arriving token, so a full block waits
        for one more token; if that token ends the answer, the block is the final chunk.
        """
        if self._finished:
            raise RuntimeError("this StreamingSynthesizer has finished; start a new one")
        out = []
        while len(self.pending) >= self.block_size:
            size = self.block_size
            block, self.pending = self.pending[:size], self.pending[size:]
            out.append(self._chunk(block, final=False))
        return out

    def add(self, unit: int) -> None:
        """Store one arriving unit (after ``tick`` for the same token)."""
        self.pending.append(unit)

    def push(self, units: Sequence[int]) -> list[torch.Tensor]:
        """Units arriving one token each: ``tick`` then ``add`` per unit; returns the pieces made."""
        out = []
        for unit in units:
            out += self.tick()
            self.add(unit)
        return out

    def finish(self) -> torch.Tensor | None:
        """The last piece: the remaining units as the final chunk, or the held-back frames; None if nothing is left."""
        self._finished = True
        if self.pending:
            block, self.pending = self.pending, []
            return self._chunk(block, final=True)
        carry = self._carry
        if carry.overlap_mel is None:
            return None
        mel = torch.cat([carry.cache_mel, carry.overlap_mel], dim=2)
        wave, _ = self.decoder.vocode(mel, carry.cache_source)
        self._carry = _Carry()
        return wave[0].float().cpu()

    def _chunk(self, block: list[int], final: bool) -> torch.Tensor:
        dec, carry = self.decoder, self._carry
        units = dec.check_units(block)
        prompt_units = dec.check_units(carry.prompt_units) if carry.prompt_units else None
        prompt_mel = torch.cat(carry.prompt_mels, dim=2).transpose(1, 2) if carry.prompt_mels else None
        mel = dec.mel(units, self.seed, prompt_units, prompt_mel)
        if carry.overlap_mel is not None:
            mel = cross_fade(mel, carry.overlap_mel, self.window)
        cache_source = None
        if carry.cache_mel is not None:
            mel = torch.cat([carry.cache_mel, mel], dim=2)
            cache_source = carry.cache_source
        if final:
            wave, _ = dec.vocode(mel, cache_source)
            self._carry = _Carry()
            self.chunk_sizes.append(len(block))
            return wave[0].float().cpu()
        overlap = mel[:, :, -self.overlap_frames :]
        mel = mel[:, :, : -self.overlap_frames]
        wave, source = dec.vocode(mel, cache_source)
        self._carry = _Carry(
            overlap_mel=overlap,
            cache_mel=mel[:, :, -self.cache_frames :],
            cache_source=source[:, :, -self.cache_samples :],
            prompt_units=carry.prompt_units + block,
            prompt_mels=carry.prompt_mels + [mel],
        )
        self.chunk_sizes.append(len(block))
        return wave[0, : -self.cache_samples].float().cpu()

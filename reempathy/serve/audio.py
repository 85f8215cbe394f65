"""Audio on the wire: base64 PCM16 in and out, and the resampling between the wire's rate and the model's.

The OpenAI Realtime API's audio is ``audio/pcm``: 16-bit little-endian mono at 24 kHz, base64
in JSON. Speech in is kept as PCM16 until a turn is committed, then handed to the speech
tokenizer as floats at 24 kHz (the tokenizer resamples to its own 16 kHz). Speech out comes from
the speech decoder at its rate (22.05 kHz for GLM-4-Voice) piece by piece; :class:`StreamResampler`
turns the pieces into 24 kHz with the same samples a one-shot resampling of the whole answer would
give (away from its two ends), so that piece boundaries cannot click.

Where it decides: :class:`StreamResampler` keeps every block boundary at a whole period of the
rate ratio (``src / gcd`` input samples, an exact number of output samples), resamples each new
block together with one period of context on each side, and holds back the last period until the
next piece (or :meth:`StreamResampler.finish`) supplies its right context.
"""

from __future__ import annotations

import base64
import binascii
import math

import numpy as np
import torch

from reempathy.errors import InputError
from reempathy.speech.audio import resample, resample_ratio

WIRE_RATE = 24_000  # the Realtime API's PCM rate


def decode_base64(data: object, what: str) -> bytes:
    """Bytes of a base64 string; ``InputError`` naming ``what`` for anything else."""
    if not isinstance(data, str):
        raise InputError(f"{what} must be a base64 string, got {type(data).__name__}")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what} is not valid base64") from None


def pcm16_to_float(pcm: bytes) -> torch.Tensor:
    """Mono PCM16 little-endian bytes as float32 samples in [-1, 1)."""
    if len(pcm) % 2:
        raise InputError(f"PCM16 audio must have an even number of bytes, got {len(pcm)}")
    return torch.from_numpy(np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0)


def float_to_pcm16(samples: torch.Tensor) -> bytes:
    """Float samples (clipped to [-1, 1]) as mono PCM16 little-endian bytes."""
    x = samples.detach().to("cpu", torch.float32).clamp(-1.0, 1.0).numpy()
    return np.round(x * 32767.0).astype("<i2").tobytes()


def encode_pcm16(samples: torch.Tensor) -> str:
    """Float samples as base64 PCM16, the Realtime API's ``delta``."""
    return base64.b64encode(float_to_pcm16(samples)).decode("ascii")


class StreamResampler:
    """Resample a waveform that arrives in pieces, as one resampling of the whole would (see the module)."""

    def __init__(self, src: int, dst: int) -> None:
        self.src, self.dst = src, dst
        self.ratio = resample_ratio(src, dst) if src != dst else (1, 1)
        self.period = self.ratio[0]  # input samples per period; self.ratio[1] output samples per period
        self._buf = torch.zeros(0)
        self._start = 0  # index (in _buf) of the first sample not yet resampled

    def push(self, piece: torch.Tensor) -> torch.Tensor:
        """The output samples that ``piece`` completes (the last period waits for its right context)."""
        piece = piece.detach().to("cpu", torch.float32).reshape(-1)
        if self.src == self.dst:
            return piece
        self._buf = torch.cat([self._buf, piece])
        p = self.period
        ready = ((self._buf.shape[0] - p) // p) * p  # whole periods with a period of right context after them
        if ready <= self._start:
            return torch.zeros(0)
        return self._emit(ready, right=p)

    def finish(self) -> torch.Tensor:
        """Whatever is held back, resampled with silence after it."""
        if self.src == self.dst or self._buf.shape[0] <= self._start:
            return torch.zeros(0)
        return self._emit(self._buf.shape[0], right=0)

    def _emit(self, end: int, right: int) -> torch.Tensor:
        p, q = self.ratio
        left = min(self._start, p)
        block = self._buf[self._start - left : end + right]
        out = resample(block.unsqueeze(0), self.src, self.dst)[0]
        first = left // p * q
        count = math.ceil((end - self._start) * q / p)
        result = out[first : first + count]
        # keep one period of left context; drop what is no longer needed
        keep_from = max(0, end - p)
        self._buf = self._buf[keep_from:]
        self._start = end - keep_from
        return result


__all__ = ["WIRE_RATE", "StreamResampler", "decode_base64", "encode_pcm16", "float_to_pcm16", "pcm16_to_float"]

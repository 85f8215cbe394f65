"""WAV in and out: read with every user error turned into a one-line ``InputError``; write by the safe-write discipline.

Reading accepts RIFF/WAVE files with integer PCM (8, 16, 24, 32 bit) or IEEE float (32, 64 bit)
samples, plain or WAVE_FORMAT_EXTENSIBLE, sample rates from 4 kHz to 192 kHz and up to 64
channels. Samples are scaled to [-1, 1) the way torchaudio/ffmpeg scale them (int16 / 32768, …),
so that the speech tokenizer sees what the published ``torchaudio.load`` gave it. Other
containers (FLAC, MP3, Ogg, MP4) are recognised and refused with a message that says how to
convert them.

Where it decides what is refused: :func:`read_wav` reads at most ``MAX_WAV_BYTES`` (a device
such as ``/dev/zero`` is refused, a pipe is read up to the cap), checks the header's rate and
channels against the bounds above, refuses a data chunk that declares more bytes than the file
holds (a file cut short), and checks the length against ``max_seconds`` before any sample is
converted, so no input can make it allocate more than a bounded amount.

Resampling (:func:`resample`) goes through torchaudio's windowed-sinc resampler, whose polyphase
kernel is sized by the reduced ratio ``rate/gcd : target/gcd``. Every common rate reduces to terms
of at most a few hundred (44100 → 16000 is 441:160) and is resampled exactly; an odd rate (44101 Hz
reduces to 44101:16000, a kernel of gigabytes) is resampled at the nearest ratio whose terms are at
most ``MAX_RATIO_TERM`` (:func:`resample_ratio`): 44101 → 441:160, a rate error of 2·10⁻⁵, and a
kernel of kilobytes. Every reader that resamples (the speech tokenizer, Qwen2.5-Omni's audio
prompts, EmpathyEval) uses it.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from reempathy.errors import InputError
from reempathy.paths import check_name, describe_kind, resolved_kind
from reempathy.safe_write import write_bytes

PCM = 1
IEEE_FLOAT = 3
EXTENSIBLE = 0xFFFE
MAX_SECONDS = 600.0  # GLM-4-Voice's 8192-token context holds about 650 s of 12.5 Hz units
MIN_RATE = 4_000  # below telephone speech (8 kHz): a damaged header, not a recording
MAX_RATE = 192_000  # the highest rate recorders write; 600 s of it is already 115 M frames
MAX_CHANNELS = 64
MAX_WAV_BYTES = 512 * 2**20  # 600 s of 48 kHz stereo 32-bit float is 230 MB
MAX_RATIO_TERM = 1000  # bound of both terms of the resampling ratio, so of torchaudio's kernel

_OTHER_FORMATS = {
    b"fLaC": "FLAC",
    b"OggS": "Ogg",
    b"ID3": "MP3",
    b"\xff\xfb": "MP3",
    b"\xff\xf3": "MP3",
    b"\xff\xf2": "MP3",
    b"FORM": "AIFF",
}


@dataclass
class Audio:
    """Samples as float32 ``(channels, frames)`` in [-1, 1], with their rate and source path."""

    samples: np.ndarray
    sample_rate: int
    path: str

    @property
    def seconds(self) -> float:
        return self.samples.shape[1] / self.sample_rate


def read_wav(path: str | Path, max_seconds: float | None = None) -> Audio:
    """Read a WAV file; raise ``InputError`` naming the file for anything that is not usable audio.

    With ``max_seconds`` a longer file is refused from its header, before its samples are converted.
    """
    p = check_name(path, "audio file")
    name = str(p)
    kind = resolved_kind(p, "audio file")
    if kind == "missing":
        raise InputError(f"audio file {name!r} not found")
    if kind == "dir":
        raise InputError(f"audio file {name!r} is a directory; pass a WAV file")
    if kind not in ("file", "fifo"):
        raise InputError(f"audio file {name!r} is {describe_kind(kind)}; pass a WAV file")
    return parse_wav(_read_capped(p, name), name, max_seconds)


def parse_wav(data: bytes, name: str, max_seconds: float | None = None) -> Audio:
    """The samples of a WAV file's bytes (``name`` is what the errors call it), checked as :func:`read_wav` checks them."""
    if not data:
        raise InputError(f"audio file {name!r} is empty (0 bytes); pass a WAV file with speech")
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        kind_name = _sniff(data)
        if kind_name:
            raise InputError(
                f"audio file {name!r} is {kind_name} audio; only WAV is read: convert it, e.g. "
                f"`ffmpeg -i {Path(name).name} {Path(name).stem}.wav`"
            )
        raise InputError(f"audio file {name!r} is not a WAV file (no RIFF/WAVE header); pass a WAV recording")
    fmt, payload = _chunks(data, name)
    tag, channels, rate, width = fmt
    if not 1 <= channels <= MAX_CHANNELS:
        raise InputError(f"audio file {name!r} declares {channels} channels (1 to {MAX_CHANNELS} are read); the file is damaged")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InputError(
            f"audio file {name!r} declares a sample rate of {rate} Hz; rates from {MIN_RATE} to {MAX_RATE} Hz are read: "
            "the header is damaged, or resample it, e.g. `ffmpeg -i IN.wav -ar 16000 OUT.wav`"
        )
    frame = channels * width
    frames = len(payload) // frame
    if frames == 0:
        raise InputError(f"audio file {name!r} holds no audio samples; pass a recording with speech")
    seconds = frames / rate
    if max_seconds is not None and seconds > max_seconds:
        raise InputError(
            f"audio file {name!r} is {seconds:.1f} s long; the limit is {max_seconds:.0f} s "
            "(about what GLM-4-Voice's context holds): cut it into shorter files"
        )
    samples = _decode(payload[: frames * frame], tag, width, name).reshape(frames, channels).T
    if not np.isfinite(samples).all():
        raise InputError(f"audio file {name!r} contains NaN or infinite samples; re-export it")
    return Audio(np.ascontiguousarray(samples, dtype=np.float32), rate, name)


def _read_capped(p: Path, name: str) -> bytes:
    """The file's bytes, refusing one larger than MAX_WAV_BYTES without reading more than that."""
    try:
        if p.is_file() and p.stat().st_size > MAX_WAV_BYTES:
            raise InputError(
                f"audio file {name!r} is {p.stat().st_size / 2**20:.0f} MiB; at most {MAX_WAV_BYTES // 2**20} MiB are "
                "read: cut it or convert it to 16 kHz mono 16-bit"
            )
        with p.open("rb") as fh:
            data = fh.read(MAX_WAV_BYTES + 1)
    except OSError as e:
        raise InputError(f"audio file {name!r} cannot be read ({e.strerror or e}); check its permissions") from None
    if len(data) > MAX_WAV_BYTES:
        raise InputError(
            f"audio file {name!r} holds more than {MAX_WAV_BYTES // 2**20} MiB; cut it or convert it to 16 kHz mono 16-bit"
        )
    return data


def load_speech(path: str | Path, max_seconds: float | None = MAX_SECONDS) -> Audio:
    """``read_wav`` plus the checks the speech tokenizer needs: not silent, not longer than ``max_seconds``."""
    audio = read_wav(path, max_seconds)
    if not np.any(audio.samples[0]):
        raise InputError(
            f"audio file {audio.path!r} is silent (every sample of its first channel is zero); "
            "pass a recording with speech"
        )
    return audio


def write_wav(path: str | Path, samples: torch.Tensor | np.ndarray, sample_rate: int, float32: bool = False) -> Path:
    """Write mono ``samples`` (floats in [-1, 1]) as 16-bit PCM, or 32-bit float (:mod:`reempathy.safe_write`)."""
    x = samples.detach().cpu().float().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    if float32:
        body, tag, width = x.astype("<f4").tobytes(), IEEE_FLOAT, 4
    else:
        # x · 32768, rounded and clipped: ffmpeg's float → s16 rule, the inverse of how read_wav scales
        body, tag, width = np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2").tobytes(), PCM, 2
    fmt = struct.pack("<HHIIHH", tag, 1, sample_rate, sample_rate * width, width, 8 * width)
    chunks = [b"fmt ", struct.pack("<I", len(fmt)), fmt]
    if float32:  # non-PCM formats carry a fact chunk with the frame count
        chunks += [b"fact", struct.pack("<II", 4, len(x))]
    chunks += [b"data", struct.pack("<I", len(body)), body]
    if len(body) % 2:
        chunks.append(b"\x00")
    riff = b"".join(chunks)
    out = Path(path)
    write_bytes(out, b"RIFF" + struct.pack("<I", 4 + len(riff)) + b"WAVE" + riff, "output WAV")
    return out


def _sniff(data: bytes) -> str | None:
    for magic, kind in _OTHER_FORMATS.items():
        if data.startswith(magic):
            return kind
    if data[4:8] == b"ftyp":
        return "MP4/M4A"
    return None


def _chunks(data: bytes, name: str) -> tuple[tuple[int, int, int, int], bytes]:
    """The fmt fields (format tag, channels, rate, bytes per sample) and the data payload."""
    fmt = None
    pos = 12
    while pos + 8 <= len(data):
        cid = data[pos : pos + 4]
        (size,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        body = data[pos + 8 : pos + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise InputError(f"audio file {name!r} has a truncated fmt chunk; the file is damaged")
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == EXTENSIBLE and len(body) >= 26:
                (tag,) = struct.unpack("<H", body[24:26])  # first two bytes of the sub-format GUID
            if (tag, bits) not in {(PCM, 8), (PCM, 16), (PCM, 24), (PCM, 32), (IEEE_FLOAT, 32), (IEEE_FLOAT, 64)}:
                raise InputError(
                    f"audio file {name!r} uses WAV format {tag} with {bits}-bit samples; "
                    "re-export it as 16-bit PCM or 32-bit float WAV"
                )
            fmt = (tag, channels, rate, bits // 8)
        elif cid == b"data":
            if fmt is None:
                raise InputError(f"audio file {name!r} has its data before its fmt chunk; the file is damaged")
            # Streaming writers leave the size at 0 or 0xFFFFFFFF: the data runs to the end of the file.
            if size in (0, 0xFFFFFFFF):
                body = data[pos + 8 :]
            elif len(body) < size:
                raise InputError(
                    f"audio file {name!r} is cut short: its data chunk declares {size} bytes but the file holds "
                    f"{len(body)}; the file is damaged or was still being written"
                )
            return fmt, body
        pos += 8 + size + (size & 1)
    if fmt is None:
        raise InputError(f"audio file {name!r} has no fmt chunk; it is not a usable WAV file")
    raise InputError(f"audio file {name!r} has no data chunk; it holds no audio")


def _decode(payload: bytes, tag: int, width: int, name: str) -> np.ndarray:
    if tag == IEEE_FLOAT:
        return np.frombuffer(payload, dtype="<f4" if width == 4 else "<f8").astype(np.float32)
    if width == 1:
        return (np.frombuffer(payload, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(payload, dtype="<i2").astype(np.float32) / 32768.0
    if width == 3:
        b = np.frombuffer(payload, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        return v.astype(np.float32) / float(1 << 23)
    return (np.frombuffer(payload, dtype="<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)


def resample_ratio(sample_rate: int, target: int) -> tuple[int, int]:
    """``(orig, new)`` for torchaudio's resampler: the exact reduced ratio when its terms are small, else the nearest small one."""
    g = math.gcd(sample_rate, target)
    orig, new = sample_rate // g, target // g
    if orig <= MAX_RATIO_TERM and new <= MAX_RATIO_TERM:
        return orig, new
    ratio = Fraction(sample_rate, target)
    # limit the denominator so that the numerator (ratio × denominator) stays within the bound too
    best = ratio.limit_denominator(max(1, MAX_RATIO_TERM // max(1, math.ceil(ratio))))
    return max(1, best.numerator), best.denominator


def resample(wave: torch.Tensor, sample_rate: int, target: int) -> torch.Tensor:
    """``wave`` (samples along the last dimension) at ``target`` Hz, through :func:`resample_ratio`'s bounded kernel."""
    if sample_rate == target:
        return wave
    import torchaudio.functional as F

    return F.resample(wave, *resample_ratio(sample_rate, target))


__all__ = [
    "Audio",
    "MAX_SECONDS",
    "MAX_WAV_BYTES",
    "MAX_RATIO_TERM",
    "MIN_RATE",
    "MAX_RATE",
    "load_speech",
    "read_wav",
    "resample",
    "resample_ratio",
    "write_wav",
]

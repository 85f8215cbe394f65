"""WAV in and out: read with every user error turned into a one-line ``InputError``; write atomically.

Reading accepts RIFF/WAVE files with integer PCM (8, 16, 24, 32 bit) or IEEE float (32, 64 bit)
samples, plain or WAVE_FORMAT_EXTENSIBLE, any sample rate and any channel count. Samples are
scaled to [-1, 1) the way torchaudio/ffmpeg scale them (int16 / 32768, …), so that the speech
tokenizer sees what the published ``torchaudio.load`` gave it. Other containers (FLAC, MP3, Ogg,
MP4) are recognised and refused with a message that says how to convert them.
"""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reempathy.errors import InputError

PCM = 1
IEEE_FLOAT = 3
EXTENSIBLE = 0xFFFE
MAX_SECONDS = 600.0  # GLM-4-Voice's 8192-token context holds about 650 s of 12.5 Hz units

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


def read_wav(path: str | Path) -> Audio:
    """Read a WAV file; raise ``InputError`` naming the file for anything that is not usable audio."""
    p = Path(path)
    name = str(p)
    if not p.exists():
        raise InputError(f"audio file {name!r} not found")
    if p.is_dir():
        raise InputError(f"audio file {name!r} is a directory; pass a WAV file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise InputError(f"audio file {name!r} cannot be read ({e.strerror or e}); check its permissions") from None
    if not data:
        raise InputError(f"audio file {name!r} is empty (0 bytes); pass a WAV file with speech")
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        kind = _sniff(data)
        if kind:
            raise InputError(
                f"audio file {name!r} is {kind} audio; only WAV is read: convert it, e.g. "
                f"`ffmpeg -i {p.name} {p.stem}.wav`"
            )
        raise InputError(f"audio file {name!r} is not a WAV file (no RIFF/WAVE header); pass a WAV recording")
    fmt, payload = _chunks(data, name)
    tag, channels, rate, width = fmt
    if channels < 1:
        raise InputError(f"audio file {name!r} declares {channels} channels; the file is damaged")
    if rate < 1:
        raise InputError(f"audio file {name!r} declares sample rate {rate}; the file is damaged")
    frame = channels * width
    frames = len(payload) // frame
    if frames == 0:
        raise InputError(f"audio file {name!r} holds no audio samples; pass a recording with speech")
    samples = _decode(payload[: frames * frame], tag, width, name).reshape(frames, channels).T
    if not np.isfinite(samples).all():
        raise InputError(f"audio file {name!r} contains NaN or infinite samples; re-export it")
    return Audio(np.ascontiguousarray(samples, dtype=np.float32), rate, name)


def load_speech(path: str | Path, max_seconds: float | None = MAX_SECONDS) -> Audio:
    """``read_wav`` plus the checks the speech tokenizer needs: not silent, not longer than ``max_seconds``."""
    audio = read_wav(path)
    if max_seconds is not None and audio.seconds > max_seconds:
        raise InputError(
            f"audio file {audio.path!r} is {audio.seconds:.1f} s long; the limit is {max_seconds:.0f} s "
            "(about what GLM-4-Voice's context holds): cut it into shorter files"
        )
    if not np.any(audio.samples[0]):
        raise InputError(
            f"audio file {audio.path!r} is silent (every sample of its first channel is zero); "
            "pass a recording with speech"
        )
    return audio


def write_wav(path: str | Path, samples: torch.Tensor | np.ndarray, sample_rate: int, float32: bool = False) -> Path:
    """Write mono ``samples`` (floats in [-1, 1]) as 16-bit PCM, or 32-bit float; temp file then rename."""
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
    atomic_write(out, b"RIFF" + struct.pack("<I", 4 + len(riff)) + b"WAVE" + riff)
    return out


def check_writable(out: str | Path) -> Path:
    """``out`` as a path whose directory exists (checked before any work is done); ``InputError`` otherwise."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"cannot write {str(out)!r}: it is a directory; give a file name")
    if not out.parent.is_dir():
        raise InputError(f"cannot write {str(out)!r}: directory {str(out.parent)!r} does not exist")
    return out


def atomic_write(out: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``out``, then rename it over ``out``."""
    directory = check_writable(out).parent
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


__all__ = ["Audio", "MAX_SECONDS", "atomic_write", "check_writable", "load_speech", "read_wav", "write_wav"]

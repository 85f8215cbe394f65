"""``audio-stats``: duration, silence, clipping and loudness of each answer's WAV, with no model.

Where it decides (:func:`audio_stats`, all on the samples ``read_wav`` gives, in [-1, 1]):

- Channels are averaged into one for silence and loudness; clipping looks at every sample of
  every channel, since a clipped channel is clipped whatever the other one does.
- **Silence**: the answer is cut into consecutive frames of ``frame_ms`` (the last one may be
  shorter). A frame is silent when its RMS is strictly below ``silence_threshold_dbfs``, in dB
  relative to full scale as ``20·log10(RMS)`` (a full-scale square wave is 0 dBFS, a full-scale
  sine -3.01). ``silence_share`` is the share of the duration in silent frames.
- **Loudness** (``loudness_dbfs``): ``20·log10(RMS)`` over the samples of the non-silent frames
  only, so pauses do not pull it down. An answer with no non-silent frame has no loudness: the
  score is left out of its line (its ``silence_share`` is 1), never invented. This is RMS level,
  not perceived loudness: LUFS (ITU-R BS.1770) weights frequencies and gates 400 ms blocks, and
  would add a dependency for a column that only has to flag answers far too quiet or too loud.
- **Clipping** (``clipping_share``): the share of samples with ``|x| >= clip_level``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from reempathy.evaluation.base import EvalItem, Evaluation
from reempathy.evaluation.speech.answer import NoAudio, answer_audio
from reempathy.evaluation.speech.options import AudioStatsOptions

SCORES = ("duration_s", "silence_share", "clipping_share", "loudness_dbfs")


@dataclass(frozen=True)
class AudioStats:
    """What :func:`audio_stats` measures; ``loudness_dbfs`` is None when every frame is silent."""

    duration_s: float
    silence_share: float
    clipping_share: float
    loudness_dbfs: float | None

    def scores(self) -> dict[str, float]:
        """The score line's values (loudness left out when there is none)."""
        out = {"duration_s": self.duration_s, "silence_share": self.silence_share, "clipping_share": self.clipping_share}
        if self.loudness_dbfs is not None:
            out["loudness_dbfs"] = self.loudness_dbfs
        return out

    def describe(self) -> str:
        """One line for the score file's ``text``."""
        loud = f"{self.loudness_dbfs:.1f} dBFS when not silent" if self.loudness_dbfs is not None else "silent throughout"
        return (f"{self.duration_s:.2f} s, {100 * self.silence_share:.0f} % silent, "
                f"{100 * self.clipping_share:.2f} % of samples clipped, {loud}")


def dbfs(rms: float) -> float:
    """``20·log10(rms)``: dB relative to full scale (a full-scale square wave is 0)."""
    return 20.0 * math.log10(rms)


def audio_stats(samples: np.ndarray, sample_rate: int, options: AudioStatsOptions | None = None) -> AudioStats:
    """Duration, silence share, clipping share and loudness of ``samples`` (``(channels, frames)`` or mono, in [-1, 1])."""
    o = options or AudioStatsOptions()
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    frames = x.shape[1]
    if frames == 0:
        raise ValueError("audio_stats needs at least one sample")
    mono = x.mean(axis=0)
    clipped = int(np.count_nonzero(np.abs(x) >= o.clip_level))
    n = max(1, round(sample_rate * o.frame_ms / 1000.0))
    starts = np.arange(0, frames, n)
    # per frame: the sum of squares and the length (the last frame may be shorter)
    energy = np.add.reduceat(mono * mono, starts)
    lengths = np.diff(np.append(starts, frames))
    threshold = 10.0 ** (o.silence_threshold_dbfs / 20.0)
    # rms < threshold  <=>  energy < threshold² · length: no log of zero, no division
    silent = energy < threshold * threshold * lengths
    loud_energy, loud_frames = float(energy[~silent].sum()), int(lengths[~silent].sum())
    loudness = dbfs(math.sqrt(loud_energy / loud_frames)) if loud_frames and loud_energy > 0 else None
    return AudioStats(
        duration_s=frames / sample_rate,
        silence_share=float(lengths[silent].sum()) / frames,
        clipping_share=clipped / x.size,
        loudness_dbfs=loudness,
    )


class AudioStatsEvaluator:
    """Measures each answer's WAV (:func:`audio_stats`); a record without one is a failure, never a score."""

    score_names = SCORES

    def __init__(self, options: AudioStatsOptions) -> None:
        self.options = options

    def evaluate(self, items: Sequence[EvalItem]) -> list[Evaluation]:
        """One ``Evaluation`` per item: the four measures, or the reason its audio could not be read."""
        out = []
        for item in items:
            try:
                audio = answer_audio(item)
            except NoAudio as exc:
                out.append(Evaluation(item.id, {}, error=str(exc)))
                continue
            stats = audio_stats(audio.samples, audio.sample_rate, self.options)
            out.append(Evaluation(item.id, stats.scores(), stats.describe()))
        return out


__all__ = ["AudioStats", "AudioStatsEvaluator", "audio_stats", "dbfs", "SCORES"]

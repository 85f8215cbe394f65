"""The result of one decoded answer, and its JSON form (schema ``reempathy.result/1``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

RESULT_SCHEMA = "reempathy.result/1"


@dataclass
class Timings:
    """Seconds. ``token_latencies_s[i]`` is the wall time between sampled token ``i-1`` (or decode start) and ``i``.

    ``time_to_first_audio_s`` is when the first audio unit was sampled; ``time_to_first_speech_s``
    when a streaming spoken turn had its first waveform piece (None elsewhere).
    """

    prefill_s: float = 0.0
    time_to_first_token_s: float | None = None
    time_to_first_audio_s: float | None = None
    time_to_first_speech_s: float | None = None
    total_s: float = 0.0
    token_latencies_s: list[float] = field(default_factory=list)


@dataclass
class SpokenChunk:
    """One spoken segment: what a listener reads and hears between two hidden segments (or chunk boundaries)."""

    index: int
    text: str
    text_ids: list[int]
    audio_units: list[int]
    start: int = 0
    end: int = 0


@dataclass
class HiddenSegment:
    """One unspoken segment (a reflection, a thought): its text, ids and position in the sequence."""

    kind: str
    index: int
    text: str
    ids: list[int]
    start: int
    end: int


@dataclass
class Counts:
    """Token counts. Nothing is re-encoded: ``forwarded + unforwarded == prompt + generated + forced``.

    ``unforwarded`` are the tokens appended after the model's last call (the final sampled token
    and any tokens forced with it): the answer ended, so the model never needed to read them.
    """

    prompt: int
    generated: int
    forced: int
    forwarded: int
    unforwarded: int = 0


@dataclass
class DecodeResult:
    """Everything one decode produced, the spoken stream kept apart from the hidden trace."""

    strategy: str
    backbone: str
    spoken_text: str
    spoken_text_ids: list[int]
    audio_units: list[int]
    chunks: list[SpokenChunk]
    hidden: list[HiddenSegment]
    spans: list[dict[str, Any]]
    ids: list[int]
    stop_reason: str
    counts: Counts
    timings: Timings
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, documented in docs/result-schema.md."""
        d = asdict(self)
        return {
            "schema": RESULT_SCHEMA,
            "strategy": d["strategy"],
            "backbone": d["backbone"],
            "spoken": {
                "text": d["spoken_text"],
                "text_ids": d["spoken_text_ids"],
                "audio_units": d["audio_units"],
                "chunks": d["chunks"],
            },
            "hidden": d["hidden"],
            "spans": d["spans"],
            "ids": d["ids"],
            "stop_reason": d["stop_reason"],
            "counts": d["counts"],
            "timings": d["timings"],
            "extra": d["extra"],
        }

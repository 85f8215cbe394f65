"""The result of one decoded answer, and its JSON form (schema ``reempathy.result/1``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from reempathy.decoding.spans import SPOKEN_AUDIO, SPOKEN_TEXT

if TYPE_CHECKING:
    from reempathy.decoding.session import DecodeSession

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
    ``spoken`` and ``hidden`` split the generated tokens by stream: spoken text and audio tokens,
    and the content of hidden segments (reflections, thoughts); the rest of ``generated`` are
    control tokens the model sampled (a delimiter that closes a reflection, say).
    """

    prompt: int
    generated: int
    forced: int
    forwarded: int
    unforwarded: int = 0
    spoken: int = 0
    hidden: int = 0


@dataclass
class DecodeResult:
    """Everything one decode produced, the spoken stream kept apart from the hidden trace.

    ``prompt_ids`` are the prompt's token ids (so ``prompt_ids + ids`` replays the whole sequence).
    """

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
    prompt_ids: list[int] = field(default_factory=list)

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
            "prompt_ids": d["prompt_ids"],
            "ids": d["ids"],
            "stop_reason": d["stop_reason"],
            "counts": d["counts"],
            "timings": d["timings"],
            "extra": d["extra"],
        }


def build_result(session: DecodeSession, strategy_name: str, stop_reason: str, timings: Timings) -> DecodeResult:
    """Split the session's sequence into the spoken stream and the hidden trace."""
    backbone = session.backbone
    layout = session.layout
    chunks: list[SpokenChunk] = []
    hidden: list[HiddenSegment] = []
    text_ids: list[int] = []
    units: list[int] = []
    for seg in session.segments:
        if seg.hidden:
            ids = session.segment_ids(seg)
            hidden.append(
                HiddenSegment(seg.phase, seg.index, backbone.decode_text(ids), ids, seg.start, seg.end)
            )
            continue
        c_text = [session.ids[i] for i in range(seg.start, seg.end) if session.labels[i] == SPOKEN_TEXT]
        c_units = [
            layout.token_to_unit(session.ids[i])
            for i in range(seg.start, seg.end)
            if session.labels[i] == SPOKEN_AUDIO
        ]
        if not c_text and not c_units:
            continue
        chunks.append(SpokenChunk(seg.index, backbone.decode_text(c_text), c_text, c_units, seg.start, seg.end))
        text_ids.extend(c_text)
        units.extend(c_units)
    spans = [
        {"label": s.label, "start": s.start, "end": s.end, "segment": s.segment} for s in session.spans()
    ]
    counts = Counts(
        session.prompt_len, session.generated, session.forced, session.forwarded, session.unforwarded,
        session.spoken_tokens, session.hidden_tokens,
    )
    return DecodeResult(
        strategy=strategy_name,
        backbone=backbone.name,
        spoken_text=backbone.decode_text(text_ids),
        spoken_text_ids=text_ids,
        audio_units=units,
        chunks=chunks,
        hidden=hidden,
        spans=spans,
        ids=session.ids[session.prompt_len :],
        stop_reason=stop_reason,
        counts=counts,
        timings=timings,
        extra=dict(session.extra),
        prompt_ids=session.ids[: session.prompt_len],
    )

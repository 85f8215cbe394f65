"""Spoken turns, streamed: user WAV → units → decode with any strategy → spoken units → answer audio as it is made.

One streaming driver (:func:`drive`) decodes in a worker thread and hands token events to an
audio sink (:class:`AudioSink`: the speech decoder, or a talker); the queue, the cancel and the
worker's errors are written once. It sits above the runner (it decodes through it) and below the
commands and the server that stream.


- ``run_spoken_turn`` decodes the whole answer, then synthesises its spoken units in one pass
  (the published offline path) and writes the WAV atomically.
- ``stream_spoken_turn`` yields events while the answer is decoded: spoken text as it arrives,
  audio pieces synthesised chunk by chunk with the published demo's growing blocks
  (``StreamingSynthesizer``), and each reflection or thought once it is complete. Its two halves
  are reusable: :class:`TokenEvents` reads tokens off a decoding session, :class:`SpokenStream`
  turns them into these events (the server, :mod:`reempathy.serve`, runs them on the batched loop).

Only ``DecodeResult.audio_units`` is synthesised: the units of the spoken chunks. Reflections and
thoughts are never heard. Speech facts (seconds, synthesis time, time to first audio, real-time
factor) go to ``result.extra["speech"]``.

Backbones declare how speech goes in and out, and these functions follow the declaration:
speech in as units from the backbone's speech tokenizer, or as the WAV itself for a backbone that
reads audio in its prompt (``Backbone.reads_audio``); speech out from the units by the speech
decoder, or — for a text-only spoken stream — by the backbone's talker (``Backbone.talker``),
which is fed the decoder's states at the spoken positions only, chunk by chunk as the spoken
chunks complete (:class:`reempathy.backbones.base.TalkerTurn`). A talker's waveform comes in one
piece at the end: Qwen2.5-Omni's token2wav, as transformers has it, works on the whole code
sequence.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from reempathy.backbones.base import Backbone
from reempathy.config import DecodeConfig
from reempathy.registry import Registry
from reempathy.decoding.result import DecodeResult
from reempathy.decoding.spans import CONTROL, PROMPT, SPOKEN_AUDIO, SPOKEN_TEXT
from reempathy.errors import ConfigError
from reempathy.hooks import hookimpl
from reempathy.runner import load_backbone, run_decode
from reempathy.safe_write import check_output_file
from reempathy.speech.audio import read_wav, write_wav
from reempathy.speech.decoder import DEFAULT_SEED
from reempathy.speech.decoder.streaming import BLOCK_SIZES, StreamingSynthesizer


@dataclass
class TextEvent:
    """New spoken text (a delta to append) from spoken segment ``segment``."""

    text: str
    segment: int


@dataclass
class AudioEvent:
    """The next piece of the answer's audio: ``samples`` ``(n,)`` float32 at ``sample_rate``, played after the last."""

    samples: torch.Tensor
    sample_rate: int
    index: int
    units: int  # units in the chunk that made it (0 for the held-back tail)
    elapsed_s: float  # since decoding began


@dataclass
class ReflectionEvent:
    """A finished hidden segment (``kind`` is its phase: reflection, thought, …); never spoken."""

    kind: str
    index: int
    text: str


@dataclass
class HiddenTextEvent:
    """New text of hidden segment ``index`` of phase ``kind`` as it is written (only when asked for); never spoken."""

    kind: str
    index: int
    text: str


@dataclass
class DoneEvent:
    """The answer is complete; ``result.extra["speech"]`` holds the speech timings."""

    result: DecodeResult


SpeechEvent = TextEvent | AudioEvent | ReflectionEvent | HiddenTextEvent | DoneEvent


class SpokenText:
    """Text as its tokens arrive: each call gives what is new and final (never half a character).

    Used for the spoken text, and (by the server) for each hidden segment's text as it is written.
    """

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self.ids: list[int] = []
        self.shown = ""

    def add(self, token_id: int) -> str:
        """Take one text token; the text it completes ("" while a character is still cut short)."""
        self.ids.append(token_id)
        return self._new(final=False)

    def rest(self) -> str:
        """At the end: what was held back waiting for the rest of a character."""
        return self._new(final=True) if self.ids else ""

    def _new(self, final: bool) -> str:
        text = self.backbone.decode_text(self.ids)
        if len(text) <= len(self.shown) or not text.startswith(self.shown) or (not final and text.endswith("\ufffd")):
            return ""
        piece, self.shown = text[len(self.shown) :], text
        return piece


class SpokenStream:
    """The consumer side of a streamed answer: token events in (from :class:`TokenEvents`), speech events out.

    Spoken text as it completes, audio synthesised per block of units as soon as the block is full
    (``StreamingSynthesizer``; no decoder: no audio), finished reflections, and with
    ``hidden_text`` each hidden segment's text as it is written. Reflections never reach the
    synthesiser. ``stream_spoken_turn`` and the server (:mod:`reempathy.serve`) both drive it.
    """

    def __init__(
        self,
        backbone: Backbone,
        decoder: Any | None,
        seed: int = DEFAULT_SEED,
        block_sizes: Sequence[int] = BLOCK_SIZES,
        started: float | None = None,
        hidden_text: bool = False,
    ) -> None:
        self.backbone = backbone
        self.synth = StreamingSynthesizer(decoder, seed=seed, block_sizes=block_sizes) if decoder is not None else None
        self.sample_rate = decoder.sample_rate if decoder is not None else 0
        self.started = time.perf_counter() if started is None else started
        self.spoken = SpokenText(backbone)
        self.hidden_text = hidden_text
        self._hidden: dict[tuple[str, int], SpokenText] = {}
        self.segment = 0
        self.pieces: list[torch.Tensor] = []
        self.first_audio: float | None = None
        self.synthesis_s = 0.0

    def feed(self, kind: str, payload: Any) -> list[SpeechEvent]:
        """The events one token event makes (synthesis runs here, in the caller's thread)."""
        out: list[SpeechEvent] = []
        synth = self.synth
        if synth is not None and kind in ("token", "text", "audio", "hidden"):
            out.extend(self._audio(*self._synthesize(synth.tick)))
        if kind == "audio":
            if synth is not None:
                synth.add(payload)
        elif kind == "text":
            token_id, self.segment = payload
            piece = self.spoken.add(token_id)
            if piece:
                out.append(TextEvent(piece, self.segment))
        elif kind == "hidden":
            if self.hidden_text:
                token_id, phase, index = payload
                text = self._hidden.setdefault((phase, index), SpokenText(self.backbone))
                piece = text.add(token_id)
                if piece:
                    out.append(HiddenTextEvent(phase, index, piece))
        elif kind == "reflection":
            if self.hidden_text:
                phase, index, _ = payload
                held = self._hidden.pop((phase, index), None)
                piece = held.rest() if held is not None else ""
                if piece:
                    out.append(HiddenTextEvent(phase, index, piece))
            out.append(ReflectionEvent(*payload))
        return out

    def end(self) -> list[SpeechEvent]:
        """What is left when the answer is complete: text held back for a cut character, the last audio."""
        out: list[SpeechEvent] = []
        piece = self.spoken.rest()
        if piece:
            out.append(TextEvent(piece, self.segment))
        if self.synth is not None:
            synth = self.synth
            made, sizes = self._synthesize(lambda: [p for p in [synth.finish()] if p is not None])
            out.extend(self._audio(made, sizes + [0] * (len(made) - len(sizes))))
        return out

    def _audio(self, made: list[torch.Tensor], units_in_chunk: list[int]) -> list[AudioEvent]:
        out = []
        for piece, n in zip(made, units_in_chunk, strict=False):
            elapsed = time.perf_counter() - self.started
            self.first_audio = elapsed if self.first_audio is None else self.first_audio
            self.pieces.append(piece)
            out.append(AudioEvent(piece, self.sample_rate, len(self.pieces) - 1, n, elapsed))
        return out

    def _synthesize(self, step: Any) -> tuple[list[torch.Tensor], list[int]]:
        synth = self.synth
        assert synth is not None
        before, t = len(synth.chunk_sizes), time.perf_counter()
        made = step()
        self.synthesis_s += time.perf_counter() - t
        return made, synth.chunk_sizes[before:]


def speech_parts(backbone: Backbone, need_tokenizer: bool = True, need_decoder: bool = True) -> tuple[Any, Any]:
    """The backbone's speech tokenizer and decoder; ``ConfigError`` saying how to attach a missing one."""
    if need_tokenizer and backbone.speech_tokenizer is None:
        raise ConfigError(
            f"backbone {backbone.name!r} has no speech tokenizer; use glm-4-voice with "
            "backbone.options.tokenizer_path = the glm-4-voice-tokenizer directory"
        )
    if need_decoder and backbone.speech_decoder is None:
        raise ConfigError(
            f"backbone {backbone.name!r} has no speech decoder; use glm-4-voice with "
            "backbone.options.decoder_path = the glm-4-voice-decoder directory"
        )
    return backbone.speech_tokenizer, backbone.speech_decoder


def run_spoken_turn(
    cfg: DecodeConfig,
    registry: Registry,
    audio_path: str,
    out_path: str | None = None,
    backbone: Backbone | None = None,
    seed: int = DEFAULT_SEED,
) -> DecodeResult:
    """Hear ``audio_path``, decode an answer as ``cfg`` says, write its spoken audio to ``out_path``.

    Without ``out_path`` nothing is synthesised (and no speech decoder or talker is needed).
    """
    if backbone is None:
        read_wav(audio_path)  # a file that is not usable audio fails before the model is loaded
        backbone = load_backbone(cfg, registry)
    talker = backbone.talker if out_path is not None else None
    if out_path is not None and talker is None and backbone.stream.text_only:
        raise ConfigError(
            f"backbone {backbone.name!r} speaks text only and has no talker loaded; "
            "enable its talker (backbone option talker = true) to write speech"
        )
    hears_units = not backbone.reads_audio
    tokenizer, decoder = speech_parts(
        backbone, need_tokenizer=hears_units, need_decoder=out_path is not None and talker is None
    )
    out = check_output_file(out_path, "--out") if out_path is not None else None
    t0 = time.perf_counter()
    units = tokenizer.tokenize(audio_path) if hears_units else None
    heard: dict[str, Any] = {"units": units} if hears_units else {"audio": audio_path}
    tokenize_s = time.perf_counter() - t0
    input_units = len(units) if units is not None else None
    if talker is not None:
        turn = talker.turn(seed)
        with turn:
            result = run_decode(cfg, registry, backbone=backbone, observers=[turn], **heard)
        t1 = time.perf_counter()
        wave = turn.finish()
        synthesis_s = time.perf_counter() - t1
        rate = talker.sample_rate
    else:
        result = run_decode(cfg, registry, backbone=backbone, **heard)
        if out is None:
            result.extra["speech"] = {"input": audio_path, "input_units": input_units, "tokenize_s": tokenize_s}
            return result
        t1 = time.perf_counter()
        wave = decoder.synthesize(result.audio_units, seed=seed) if result.audio_units else torch.zeros(0)
        synthesis_s = time.perf_counter() - t1
        rate = decoder.sample_rate
    write_wav(out, wave, rate)
    result.extra["speech"] = _speech_facts(
        audio_path, input_units, tokenize_s, synthesis_s, wave.shape[0], rate, out, seed, result
    )
    if talker is not None:
        result.extra["speech"]["codec_tokens"] = len(turn.codes)  # type: ignore[attr-defined]
    return result


class AudioSink(Protocol):
    """What turns a streamed answer's spoken stream into audio, as the one streaming driver uses it.

    Two ship: :class:`DecoderSink` (the speech decoder, audio per block of units as the units
    arrive) and :class:`TalkerSink` (a thinker–talker backbone's talker, fed the spoken positions
    as chunks complete). Both also make the text and reflection events.
    """

    sample_rate: int

    def observers(self) -> list[object]:
        """Plugin objects the decode runs with (a talker watches the decode's states)."""

    def decoding(self) -> Any:
        """A context manager held around the decode (in the decoding thread)."""

    def feed(self, kind: str, payload: Any) -> list[SpeechEvent]:
        """The events one token event makes; called in the consumer's thread, between events."""

    def end(self) -> list[SpeechEvent]:
        """What is left once the answer is complete (text held back, the last audio)."""

    def wave(self) -> torch.Tensor:
        """The whole answer's audio."""

    def facts(self) -> dict[str, Any]:
        """``synthesis_s``, ``first_audio_s`` and what else the sink knows, for ``result.extra["speech"]``."""


class DecoderSink:
    """The speech decoder as an :class:`AudioSink`: a :class:`SpokenStream` (audio per block of units)."""

    def __init__(self, backbone: Backbone, decoder: Any, seed: int, block_sizes: Sequence[int], started: float) -> None:
        self.stream = SpokenStream(backbone, decoder, seed=seed, block_sizes=block_sizes, started=started)
        self.sample_rate = decoder.sample_rate

    def observers(self) -> list[object]:
        return []

    def decoding(self) -> Any:
        return contextlib.nullcontext()

    def feed(self, kind: str, payload: Any) -> list[SpeechEvent]:
        return self.stream.feed(kind, payload)

    def end(self) -> list[SpeechEvent]:
        return self.stream.end()

    def wave(self) -> torch.Tensor:
        return torch.cat(self.stream.pieces) if self.stream.pieces else torch.zeros(0)

    def facts(self) -> dict[str, Any]:
        synth = self.stream.synth
        return {"synthesis_s": self.stream.synthesis_s, "first_audio_s": self.stream.first_audio,
                "chunks": list(synth.chunk_sizes) if synth is not None else []}


class TalkerSink:
    """A talker as an :class:`AudioSink`: it reads the spoken rows released so far between events; its waveform
    comes in one piece at the end (token2wav needs every code)."""

    def __init__(self, backbone: Backbone, talker: Any, seed: int, started: float) -> None:
        self.turn = talker.turn(seed)
        self.stream = SpokenStream(backbone, None, started=started)
        self.sample_rate = talker.sample_rate
        self.started = started
        self.synthesis_s = 0.0
        self.first_audio: float | None = None
        self._wave = torch.zeros(0)

    def observers(self) -> list[object]:
        return [self.turn]

    def decoding(self) -> Any:
        return self.turn

    def feed(self, kind: str, payload: Any) -> list[SpeechEvent]:
        t = time.perf_counter()
        self.turn.advance()
        self.synthesis_s += time.perf_counter() - t
        return self.stream.feed(kind, payload)

    def end(self) -> list[SpeechEvent]:
        out = self.stream.end()
        t = time.perf_counter()
        self._wave = self.turn.finish()
        self.synthesis_s += time.perf_counter() - t
        if self._wave.shape[0]:
            self.first_audio = time.perf_counter() - self.started
            out.append(AudioEvent(self._wave, self.sample_rate, 0, len(self.turn.codes), self.first_audio))
        return out

    def wave(self) -> torch.Tensor:
        return self._wave

    def facts(self) -> dict[str, Any]:
        return {"synthesis_s": self.synthesis_s, "first_audio_s": self.first_audio, "codec_tokens": len(self.turn.codes)}


def stream_spoken_turn(
    cfg: DecodeConfig,
    registry: Registry,
    audio_path: str | None = None,
    *,
    units: Sequence[int] | None = None,
    out_path: str | None = None,
    backbone: Backbone | None = None,
    seed: int = DEFAULT_SEED,
    block_sizes: Sequence[int] = BLOCK_SIZES,
) -> Iterator[SpeechEvent]:
    """Decode an answer to ``audio_path`` (or prompt ``units``) and yield its text, audio and reflections as they come.

    The model decodes in a worker thread; audio is made here, between events, by the backbone's
    speech decoder or its talker (:class:`AudioSink`). Closing the iterator early stops the
    decoding at its next token.
    """
    if (audio_path is None) == (units is None):
        raise ConfigError("give either an audio file or prompt units to stream_spoken_turn")
    if backbone is None:
        if audio_path is not None:
            read_wav(audio_path)  # a file that is not usable audio fails before the model is loaded
        backbone = load_backbone(cfg, registry)
    started = time.perf_counter()
    tokenize_s = 0.0
    sink: AudioSink
    if backbone.talker is not None or backbone.stream.text_only:
        talker = backbone.talker
        if talker is None:
            raise ConfigError(
                f"backbone {backbone.name!r} speaks text only and has no talker loaded; "
                "enable its talker (backbone option talker = true) to stream speech"
            )
        if units is not None and backbone.reads_audio:
            raise ConfigError(f"backbone {backbone.name!r} hears audio, not units; give stream_spoken_turn an audio file")
        if units is not None:
            heard: dict[str, Any] = {"units": list(units)}
        elif backbone.reads_audio:
            heard = {"audio": audio_path}
        else:
            tokenizer, _ = speech_parts(backbone, need_decoder=False)
            heard = {"units": tokenizer.tokenize(audio_path)}
        out = check_output_file(out_path, "--out") if out_path is not None else None
        sink = TalkerSink(backbone, talker, seed, started)
    else:
        tokenizer, decoder = speech_parts(backbone, need_tokenizer=audio_path is not None)
        out = check_output_file(out_path, "--out") if out_path is not None else None
        t0 = time.perf_counter()
        heard = {"units": list(units) if units is not None else tokenizer.tokenize(audio_path)}
        tokenize_s = time.perf_counter() - t0
        sink = DecoderSink(backbone, decoder, seed, block_sizes, started)
    result = None
    for event in drive(cfg, registry, backbone, heard, sink):
        if isinstance(event, DecodeResult):
            result = event
        else:
            yield event
    assert result is not None
    wave = sink.wave()
    if out is not None:
        write_wav(out, wave, sink.sample_rate)
    sunk = sink.facts()
    facts = _speech_facts(
        audio_path, len(heard["units"]) if "units" in heard else None, tokenize_s, sunk.pop("synthesis_s"),
        wave.shape[0], sink.sample_rate, out, seed, result,
    )
    facts.update(sunk, streamed=True)
    result.extra["speech"] = facts
    result.timings.time_to_first_speech_s = facts["first_audio_s"]
    yield DoneEvent(result)


def drive(
    cfg: DecodeConfig, registry: Registry, backbone: Backbone, heard: dict[str, Any], sink: AudioSink
) -> Iterator[SpeechEvent | DecodeResult]:
    """The one streaming driver: decode in a worker thread, turn its token events into speech events here.

    Yields the sink's events as they come, then the :class:`DecodeResult`. An error in the
    decoding thread is raised here; closing the iterator early cancels the decode at its next
    token and waits for the thread.
    """
    events: queue.Queue = queue.Queue()
    cancel = threading.Event()
    feed = _TokenFeed(events, cancel, backbone)

    def work() -> None:
        try:
            with sink.decoding():
                result = run_decode(cfg, registry, backbone=backbone, observers=[feed, *sink.observers()], **heard)
            events.put(("done", result))
        except _Cancelled:
            events.put(("cancelled", None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            events.put(("error", exc))

    worker = threading.Thread(target=work, name="reempathy-decode", daemon=True)
    worker.start()
    try:
        while True:
            kind, payload = events.get()
            if kind == "error":
                raise payload
            if kind == "done":
                yield from sink.end()
                yield payload
                return
            yield from sink.feed(kind, payload)
    finally:
        cancel.set()
        worker.join()


def _speech_facts(
    audio_path: str | None,
    input_units: int | None,
    tokenize_s: float,
    synthesis_s: float,
    samples: int,
    sample_rate: int,
    out: Path | None,
    seed: int,
    result: DecodeResult,
) -> dict[str, Any]:
    seconds = samples / sample_rate
    facts: dict[str, Any] = {
        "input": audio_path,
        "input_units": input_units,
        "output_units": len(result.audio_units),
        "tokenize_s": tokenize_s,
        "synthesis_s": synthesis_s,
        "audio_s": seconds,
        "sample_rate": sample_rate,
        "real_time_factor": (synthesis_s / seconds) if seconds else None,
        "seed": seed,
        "out": str(out) if out is not None else None,
    }
    if not samples:
        facts["note"] = "the answer holds no spoken audio; the WAV has no samples"
    return facts


def _segment_index(session: Any, position: int) -> int:
    """Index of the segment holding ``position`` (segments are few; search from the latest)."""
    for seg in reversed(session.segments):
        if seg.start <= position < seg.end:
            return seg.index
    return 0


class _Cancelled(Exception):
    """The consumer closed the stream; raised inside the decode loop to stop it."""


class TokenEvents:
    """Hands each new position of an answer on as ``(kind, payload)``, read from the session (read-only).

    Kinds: ``text`` ``(token_id, spoken segment)``, ``audio`` (the unit), ``hidden``
    ``(token_id, phase, segment index)`` for a hidden segment's text, ``token`` (anything else), and
    ``reflection`` ``(phase, index, text)`` once a hidden segment is finished. ``emit`` is called in
    the decoding thread. Subclasses choose the hooks that call :meth:`scan`.
    """

    def __init__(self, emit: Any, backbone: Backbone) -> None:
        self.emit = emit
        self.backbone = backbone
        self.seen: int | None = None
        self.reflections = 0

    def scan(self, session: Any, finished: bool) -> None:
        """Emit every position appended since the last scan, then every hidden segment finished since."""
        if self.seen is None:
            self.seen = session.prompt_len
        layout = session.layout
        emit = self.emit
        labels = session.labels
        for i in range(self.seen, len(session.ids)):
            label = labels[i]
            if label == SPOKEN_TEXT:
                emit("text", (session.ids[i], _segment_index(session, i)))
            elif label == SPOKEN_AUDIO:
                emit("audio", layout.token_to_unit(session.ids[i]))
            elif label in (CONTROL, PROMPT):
                emit("token", None)
            else:  # a hidden phase's text (its label is the phase)
                emit("hidden", (session.ids[i], label, _segment_index(session, i)))
        self.seen = len(session.ids)
        done = session.segments if finished else session.segments[:-1]
        hidden = [seg for seg in done if seg.hidden]
        for seg in hidden[self.reflections :]:
            emit("reflection", (seg.phase, seg.index, self.backbone.decode_text(session.segment_ids(seg))))
        self.reflections = len(hidden)


class _TokenFeed(TokenEvents):
    """Read-only observer: hands each new position of the answer to the consuming thread.

    It looks at the session before every sampling step (``reempathy_logits``) and once at the
    end, so each token is seen one step after it is appended — the same point at which the
    published demo acts on a token. It never changes the logits.
    """

    def __init__(self, events: queue.Queue, cancel: threading.Event, backbone: Backbone):
        super().__init__(lambda kind, payload: events.put((kind, payload)), backbone)
        self.cancel = cancel

    @hookimpl
    def reempathy_logits(self, session: Any, logits: torch.Tensor) -> None:
        if self.cancel.is_set():
            raise _Cancelled()
        self.scan(session, finished=False)

    @hookimpl
    def reempathy_decode_end(self, session: Any, result: DecodeResult) -> None:
        self.scan(session, finished=True)

"""``reempathy voice``: audio units for every turn of a training set that lacks them, spoken by the backbone (or a TTS plugin).

The path: read and check the records (the training schema, ``FILE:LINE`` for a bad one) → load
the backbone of ``--config`` (and its checkpoint, if the config names one) and the TTS →
every record not done yet gives one :class:`~reempathy.speech.tts.SpeechRequest` per turn that
has text and no units (user and assistant messages, and the ``rejected`` answer) → the TTS
speaks them (``read-aloud``: rows of the batched loop, the text forced into the backbone's
interleave) → each record is written back as it was, with ``units`` filled in (and ``audio``,
the path of the turn's WAV, with ``--wav``) → appended to the progress file; ``OUT`` is written
when every record is done (the one job driver with a :class:`reempathy.jobs.partial.PartialJsonl`).
``make-data --speech`` voices its new records through the same :class:`Voicer`.

Where it decides:

- **which TTS** (:meth:`Voicer.requests`): user turns go to ``--user-tts`` when given (another
  voice for the user), everything else to ``--tts`` (default ``read-aloud``). System turns are
  never spoken.
- **seeds**: turn ``T`` of record ``R`` is spoken with ``row_seed(--seed, "R#T")``, so its units
  depend neither on the batch nor on an interruption.
- **a waveform** from a TTS becomes units through the backbone's speech tokenizer (written to a
  temporary WAV beside the output, removed after); a backbone without one is a ConfigError at
  the first such speech.
- **usable speech** (:meth:`Voicer.assemble`): every spoken answer (the last assistant turn and
  ``rejected``) must lay out in the backbone's interleave, as ``reempathy train`` will lay it out
  (:func:`reempathy.training.builders.spoken_chunks`): units too few for the text are that
  record's failure, named with ``FILE:LINE`` and the turn, and a rerun tries it again. So is a
  TTS's own per-turn error.
- **WAVs** (``--wav DIR``): each voiced turn's units through the speech decoder (``--decoder DIR``,
  else the backbone's) into ``DIR/<record>-<turn>.wav``, or the TTS's own waveform; the message's
  ``audio`` is that path, relative to the output file's folder (how data files name WAVs).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pydantic import ValidationError

from reempathy.backbones.base import Backbone
from reempathy.data.records import BadRecord, bad_records_message, describe_record_error, parse_record_line
from reempathy.data.schema import Message, Record
from reempathy.decoding.batch import row_seed
from reempathy.errors import ConfigError, InputError, PluginFailure, ReempathyError
from reempathy.jobs.driver import Job, Outcome, run_job
from reempathy.jobs.partial import PartialJsonl
from reempathy.registry import Registry
from reempathy.safe_write import check_output_dir
from reempathy.speech.tts import Speech, SpeechRequest
from reempathy.training.builders import spoken_chunks, stream_layout

#: ``--set`` keys that go to the decode config (everything else is an option of ``--tts``).
CONFIG_TABLES = ("backbone", "decode")
DEFAULT_TTS = "read-aloud"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# --- one record's turns -------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnRef:
    """A turn to speak: ``name`` (``m0``, ``m1``, … for messages, ``rejected``), its role and text."""

    name: str
    role: str
    text: str


def turns_to_voice(record: Record) -> list[TurnRef]:
    """The turns of ``record`` that have text and no units (system turns are never spoken)."""
    out = [TurnRef(f"m{i}", m.role, m.text) for i, m in enumerate(record.messages)
           if m.role != "system" and m.text and not m.units]
    if record.rejected is not None and record.rejected.text and not record.rejected.units:
        out.append(TurnRef("rejected", "assistant", record.rejected.text))
    return out


@dataclass
class VoiceItem:
    """One record to voice: its progress ``key``, ``where`` (``FILE:LINE``), the JSON as read, the validated record."""

    key: str
    where: str
    raw: dict[str, Any]
    record: Record
    line: int = 0

    @property
    def name(self) -> str:
        """What its seeds and WAV names are made from: the record's ``id``, else its key."""
        rid = self.raw.get("id")
        return str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid) else self.key


def wav_name(record: str, turn: str) -> str:
    """A file name for a turn's WAV that is safe on any file system (a hash keeps two unsafe ids apart)."""
    safe = _UNSAFE.sub("_", record).strip("._") or "record"
    if safe != record or len(safe) > 100:
        safe = f"{safe[:80]}-{hashlib.sha256(record.encode('utf-8')).hexdigest()[:8]}"
    return f"{safe}-{turn}.wav"


# --- the voicer: shared by `voice` and `make-data --speech` ----------------------------------------


class Voicer:
    """The backbone, the TTS (and the user's), the speech decoder for WAVs: turns in, records with units out."""

    def __init__(
        self,
        backbone: Backbone,
        tts: Any,
        tts_name: str,
        *,
        user_tts: Any = None,
        user_tts_name: str | None = None,
        seed: int = 0,
        wav_dir: Path | None = None,
        decoder: Any = None,
        out_dir: Path | None = None,
    ) -> None:
        self.backbone = backbone
        self.tts, self.tts_name = tts, tts_name
        self.user_tts, self.user_tts_name = user_tts, user_tts_name
        self.seed = seed
        self.wav_dir = wav_dir
        self.decoder = decoder
        self.out_dir = out_dir or Path.cwd()
        self.context = {"audio_count": backbone.layout.audio_count or None, "max_text_chars": backbone.max_text_chars}

    def _speak(self, tts: Any, name: str, requests: list[SpeechRequest]) -> dict[Any, Speech]:
        if not requests:
            return {}
        try:
            spoken = dict(tts.speak(requests))
        except ReempathyError:
            raise
        except Exception as exc:  # the TTS's own code failed
            raise PluginFailure(name, "tts.speak", exc) from exc
        missing = [r.key for r in requests if r.key not in spoken]
        if missing:
            raise PluginFailure(name, "tts.speak", ValueError(f"gave no speech for {len(missing)} of {len(requests)} turns"))
        return spoken

    def voice(self, items: Sequence[VoiceItem]) -> Iterator[tuple[VoiceItem, dict[str, Any] | BadRecord, int]]:
        """``(item, the record with units | why it failed, turns voiced)`` for every item, in order."""
        turns = {item.key: turns_to_voice(item.record) for item in items}
        by_tts: dict[bool, list[SpeechRequest]] = {False: [], True: []}
        for item in items:
            for turn in turns[item.key]:
                user = self.user_tts is not None and turn.role == "user"
                seed = row_seed(self.seed, f"{item.name}#{turn.name}")
                by_tts[user].append(SpeechRequest((item.key, turn.name), turn.text, turn.role, seed))
        spoken = self._speak(self.tts, self.tts_name, by_tts[False])
        if by_tts[True]:
            spoken.update(self._speak(self.user_tts, self.user_tts_name or "", by_tts[True]))
        for item in items:
            done = self.assemble(item, turns[item.key], {t.name: spoken[(item.key, t.name)] for t in turns[item.key]})
            yield item, done, len(turns[item.key])

    def assemble(self, item: VoiceItem, turns: list[TurnRef], speech: dict[str, Speech]) -> dict[str, Any] | BadRecord:
        """The record with each turn's units (and WAV), checked as training reads it; or the first problem."""
        doc = dict(item.raw)
        doc["messages"] = [dict(m) for m in item.raw["messages"]]
        if "rejected" in doc and isinstance(doc["rejected"], dict):
            doc["rejected"] = dict(doc["rejected"])
        waves: dict[str, Any] = {}
        for turn in turns:
            s = speech[turn.name]
            if s.error:
                return BadRecord(item.where, f"{turn.name} ({turn.role}): the tts failed: {s.error}")
            units = s.units
            if units is None:
                if s.wave is None or not s.sample_rate:
                    return BadRecord(item.where, f"{turn.name} ({turn.role}): the tts gave neither units nor a waveform")
                units = self.tokenize(s.wave, s.sample_rate)
                waves[turn.name] = (s.wave, s.sample_rate)
            target = doc["rejected"] if turn.name == "rejected" else doc["messages"][int(turn.name[1:])]
            target["units"] = [int(u) for u in units]
        try:
            record = Record.model_validate(doc, context=self.context)
        except ValidationError as exc:  # units out of range, say: the TTS's, so the record's failure
            return BadRecord(item.where, f"after voicing: {describe_record_error(exc)}")
        answers: list[tuple[str, Message]] = [("answer", record.messages[-1])] if record.messages[-1].role == "assistant" else []
        if record.rejected is not None:
            answers.append(("rejected answer", record.rejected))
        layout = stream_layout(self.backbone)
        for what, message in answers:
            if message.text and message.units:
                try:
                    spoken_chunks(message, self.backbone, layout, item.where, what)
                except InputError as exc:
                    return BadRecord(item.where, str(exc).removeprefix(f"{item.where}: "))
        if self.wav_dir is not None:
            for turn in turns:
                target = doc["rejected"] if turn.name == "rejected" else doc["messages"][int(turn.name[1:])]
                target["audio"] = self.write_wav(item.name, turn.name, target["units"], waves.get(turn.name))
        return doc

    def tokenize(self, wave: Any, sample_rate: int) -> list[int]:
        """Units of a TTS's waveform through the backbone's speech tokenizer (a temporary WAV, removed after)."""
        from reempathy.speech.audio import write_wav

        tokenizer = self.backbone.speech_tokenizer
        if tokenizer is None:
            raise ConfigError(
                f"the tts gave a waveform, and backbone {self.backbone.name!r} has no speech tokenizer to turn it into "
                "units; set backbone.tokenizer_path (the glm-4-voice-tokenizer directory), or use a tts that gives units"
            )
        fd, name = tempfile.mkstemp(suffix=".wav", prefix=".voice-", dir=self.out_dir)
        os.close(fd)
        try:
            write_wav(name, wave, sample_rate)
            return [int(u) for u in tokenizer.tokenize(name)]
        finally:
            Path(name).unlink(missing_ok=True)

    def write_wav(self, record: str, turn: str, units: Sequence[int], wave: Any = None) -> str:
        """Write the turn's WAV (its own waveform, or its units through the speech decoder); the path a record names."""
        from reempathy.speech.audio import write_wav
        from reempathy.speech.decoder import DEFAULT_SEED

        assert self.wav_dir is not None
        path = self.wav_dir / wav_name(record, turn)
        if wave is not None:
            write_wav(path, wave[0], wave[1])
        else:
            write_wav(path, self.decoder.synthesize(list(units), seed=DEFAULT_SEED), self.decoder.sample_rate)
        return os.path.relpath(path.resolve(), self.out_dir.resolve())


def build_tts(registry: Registry, name: str, options: dict[str, Any], backbone: Backbone, flag: str) -> Any:
    """The TTS ``name`` built on ``backbone``; a ConfigError naming ``flag`` when it is unknown or its options are wrong."""
    from reempathy.speech.tts import TTS

    tts = registry.create("tts", name, options, backbone)
    if not isinstance(tts, TTS):
        reg = registry.get("tts", name)
        raise PluginFailure(reg.plugin, f"the tts factory of {name!r}",
                            TypeError(f"{flag} {name!r}: the factory returned {type(tts).__name__}, which has no speak(requests)"))
    return tts


def load_decoder(path: str | None, backbone: Backbone) -> Any:
    """The speech decoder for ``--wav``: ``--decoder DIR``, else the backbone's; ConfigError without one."""
    if path:
        from reempathy.speech.decoder import load_speech_decoder

        return load_speech_decoder(path, device="cpu")
    if backbone.speech_decoder is None:
        raise ConfigError(
            f"--wav writes each turn's units as a WAV through a speech decoder, and backbone {backbone.name!r} has none: "
            "give --decoder DIR (a glm-4-voice-decoder directory) or set backbone.decoder_path"
        )
    return backbone.speech_decoder


# --- the command -----------------------------------------------------------------------------------


@dataclass
class VoiceOptions:
    """What ``voice`` was asked to do (the command line, parsed)."""

    data: str
    out: str
    config: str | None = None
    config_overrides: list[str] = field(default_factory=list)
    tts: str = DEFAULT_TTS
    tts_options: dict[str, Any] = field(default_factory=dict)
    user_tts: str | None = None
    user_tts_options: dict[str, Any] = field(default_factory=dict)
    wav: str | None = None
    decoder: str | None = None
    seed: int = 0
    group: int = 16  # records voiced together (their turns share the TTS's batches); a kill loses at most these
    skip_bad: bool = False
    force: bool = False
    progress: bool | None = None


@dataclass
class VoiceSummary:
    """What one invocation did."""

    out: Path
    records: int
    already_done: int
    written: int
    turns: int
    skipped: list[BadRecord]
    failed: list[BadRecord]
    finished: bool
    final_count: int | None
    seconds: float

    def line(self) -> str:
        """The summary line printed at the end."""
        parts = [f"voice: {self.written} records given units for {self.turns} turns"
                 + (f" ({self.already_done} done before)" if self.already_done else "") + f" in {self.seconds:.1f} s"]
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)} bad record{'s' if len(self.skipped) != 1 else ''} (first: {self.skipped[0]})")
        if self.failed:
            parts.append(f"left out {len(self.failed)} the tts failed on (first: {self.failed[0]})")
        if self.finished:
            parts.append(f"wrote {self.final_count} records to {self.out}")
        return "; ".join(parts)


def read_voice_data(path: str | Path, context: dict[str, Any]) -> tuple[str, list[VoiceItem], list[BadRecord]]:
    """The data file's SHA-256, its valid records as items (keyed by line) and its bad lines (``FILE:LINE: why``)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"dataset {str(path)!r} not found; give the path of a JSONL file of training records")
    raw_bytes = p.read_bytes()
    items: list[VoiceItem] = []
    bad: list[BadRecord] = []
    for lineno, raw in enumerate(raw_bytes.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        parsed = parse_record_line(raw, where, context)
        if isinstance(parsed, BadRecord):
            if parsed.message:
                bad.append(parsed)
            continue
        items.append(VoiceItem(str(lineno), where, parsed[0], parsed[1], lineno))
    return hashlib.sha256(raw_bytes).hexdigest(), items, bad


def voice(opts: VoiceOptions, registry: Registry, say: Callable[[str], None] | None = None) -> VoiceSummary:
    """Write ``opts.out``: each record of ``opts.data`` with units for every turn (module docstring)."""
    from reempathy.config import load_config
    from reempathy.runner import load_backbone

    started = time.perf_counter()
    registry.get("tts", opts.tts)
    tts_options = registry.validate("tts", opts.tts, opts.tts_options)
    user_options = None
    if opts.user_tts is not None:
        registry.get("tts", opts.user_tts)
        user_options = registry.validate("tts", opts.user_tts, opts.user_tts_options)
    if isinstance(opts.group, bool) or not isinstance(opts.group, int) or opts.group < 1:
        raise ConfigError(f"records voiced together must be at least 1, got {opts.group!r}")
    cfg = load_config(opts.config, list(opts.config_overrides), None, registry)
    if opts.wav:
        check_output_dir(opts.wav, "--wav")
    data_path = Path(opts.data)
    if not data_path.is_file():
        raise InputError(f"dataset {opts.data!r} not found; give the path of a JSONL file of training records")
    config = cfg.model_dump(mode="json")
    identity = {
        "data": {"path": str(data_path.resolve()), "sha256": hashlib.sha256(data_path.read_bytes()).hexdigest()},
        "backbone": config["backbone"],
        "checkpoint": str(Path(cfg.decode.checkpoint).resolve()) if cfg.decode.checkpoint else None,
        "tts": {"name": opts.tts, "options": tts_options.model_dump(mode="json")},
        "user_tts": None if opts.user_tts is None else {"name": opts.user_tts, "options": user_options.model_dump(mode="json")},  # type: ignore[union-attr]
        "seed": opts.seed,
        "wav": str(Path(opts.wav).resolve()) if opts.wav else None,
        "decoder": str(Path(opts.decoder).resolve()) if opts.decoder else None,
    }
    output = PartialJsonl(opts.out, identity, "voice", [("DATA", opts.data), ("--config", opts.config)], skip_bad=opts.skip_bad)
    output.check(opts.force)  # a refused --out has cost nothing: checked before the backbone is loaded
    backbone = load_backbone(cfg, registry)
    sha, items, bad = read_voice_data(data_path, {"audio_count": backbone.layout.audio_count or None,
                                                  "max_text_chars": backbone.max_text_chars})
    if bad and not opts.skip_bad:
        raise InputError(bad_records_message(str(opts.data), bad, "fix them, or add --skip-bad to skip bad records"))

    def build() -> Voicer:
        tts = build_tts(registry, opts.tts, tts_options.model_dump(), backbone, "--tts")
        user = build_tts(registry, opts.user_tts, user_options.model_dump(), backbone, "--user-tts") if opts.user_tts else None  # type: ignore[union-attr]
        decoder = load_decoder(opts.decoder, backbone) if opts.wav else None
        wav_dir = None
        if opts.wav:
            wav_dir = Path(opts.wav)
            wav_dir.mkdir(parents=True, exist_ok=True)
        return Voicer(backbone, tts, opts.tts, user_tts=user, user_tts_name=opts.user_tts, seed=opts.seed,
                      wav_dir=wav_dir, decoder=decoder, out_dir=Path(opts.out).resolve().parent)

    def work(voicer: Voicer, todo: list[VoiceItem]) -> Iterator[Outcome]:
        for start in range(0, len(todo), opts.group):
            for item, done, turns in voicer.voice(todo[start : start + opts.group]):
                if isinstance(done, BadRecord):
                    yield Outcome(item.key, failure=done)
                else:
                    yield Outcome(item.key, {"id": item.key, "line": item.line, "record": done},
                                  tally={"written": 1, "turns": turns})

    job = Job("voice", "record", items, key=lambda i: i.key, store=output, build=build, work=work)
    report = run_job(job, force=opts.force, progress=opts.progress)
    summary = VoiceSummary(
        out=Path(opts.out), records=len(items), already_done=report.already_done, written=int(report.tally["written"]),
        turns=int(report.tally["turns"]), skipped=bad, failed=report.failures, finished=report.complete,
        final_count=output.final_count, seconds=time.perf_counter() - started,
    )
    if say is not None:
        say(summary.line())
    return summary


__all__ = [
    "VoiceOptions", "VoiceSummary", "Voicer", "VoiceItem", "TurnRef", "voice", "turns_to_voice", "build_tts",
    "load_decoder", "read_voice_data", "wav_name", "CONFIG_TABLES", "DEFAULT_TTS",
]

"""The test set a run decodes: records in the training data schema, split into a prompt and a reference answer.

Where it decides:

- **prompt and reference** (:func:`split_prompt`): the prompt is every message before the last
  assistant turn, which is kept as the reference answer; a record that ends with a user turn
  has no reference (a test set without answers). A prompt must end with a user message.
- **record ids** (:func:`read_records`): the record's own ``id`` (a string or an integer) if it
  has one, else its 1-based line number; two records with one id are refused, since resuming
  and scoring go by id.
- **speech in a prompt**: a message may carry ``units`` (audio unit ids, as in training data)
  or ``audio``, a WAV path (relative paths are read from the data file's folder) that the
  backbone's speech tokenizer turns into units when the record is decoded. A user message is
  heard as its units when it has them, else read as its text — the same rule the training
  builders use (:func:`reempathy.data.dialogue.prompt_turn`), so that what is trained is
  what is run. A backbone without audio-unit tokens (a text-only spoken stream) reads the text,
  or, if it reads audio itself (``Backbone.reads_audio``, e.g. Qwen2.5-Omni), the user's WAV.

Every problem a user can cause is found before anything is decoded or written, and named
``FILE:LINE``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from reempathy.backbones.base import Backbone, PromptInputs, Turn
from reempathy.errors import ConfigError, InputError
from reempathy.data.records import BadRecord, bad_records_message, describe_record_error
from reempathy.data.schema import parse_units


class PromptMessage(BaseModel):
    """One message of a test record: its role and its content as text, audio units, a WAV file, or several."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    role: Literal["user", "assistant", "system"]
    text: str | None = None
    units: list[int] | None = None
    audio: str | None = None

    @field_validator("units", mode="before")
    @classmethod
    def _parse_units(cls, value: Any) -> list[int] | None:
        return parse_units(value)

    @model_validator(mode="after")
    def _has_content(self) -> "PromptMessage":
        if not self.text and not self.units and not self.audio:
            raise ValueError(f"a {self.role} message needs text, units or audio")
        return self

    def to_json(self) -> dict[str, Any]:
        """The message as a run record stores it: ``role``, ``text``, ``units``, ``audio`` (WAV path)."""
        return {"role": self.role, "text": self.text, "units": self.units, "audio": self.audio}


class _RecordIn(BaseModel):
    """What a run reads of a data line; other keys (assessment, rejected, reflections) are ignored."""

    model_config = ConfigDict(extra="ignore")

    id: str | int | None = None
    messages: list[PromptMessage]

    @field_validator("id", mode="before")
    @classmethod
    def _plain_id(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("id must be a string or an integer")
        return value


@dataclass(frozen=True)
class RunRecord:
    """One record to decode: where it is, its id, the prompt messages and the reference answer."""

    index: int  # 0-based position among the file's records
    line: int  # 1-based line in the data file
    id: str
    where: str  # FILE:LINE, for messages
    prompt: tuple[PromptMessage, ...]
    reference: PromptMessage | None

    def reference_json(self) -> dict[str, Any] | None:
        """``{"text", "units"}`` of the reference answer, or None."""
        if self.reference is None:
            return None
        return {"text": self.reference.text, "units": self.reference.units}


@dataclass
class DataSet:
    """The records of one data file, with the file's SHA-256 (a run is tied to the data it decoded)."""

    path: str
    sha256: str
    records: list[RunRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)


def split_prompt(messages: list[PromptMessage], where: str) -> tuple[list[PromptMessage], PromptMessage | None]:
    """The prompt (every message before the last assistant turn) and the reference answer (that turn, or None)."""
    if messages and messages[-1].role == "assistant":
        prompt, reference = list(messages[:-1]), messages[-1]
    else:
        prompt, reference = list(messages), None
    if not prompt:
        raise InputError(
            f"{where}: the record has no prompt: its only message is the assistant's answer; "
            "put the user's turn before it"
        )
    if prompt[-1].role != "user":
        raise InputError(
            f"{where}: the prompt must end with a user message (the turn to answer), not a {prompt[-1].role} message"
        )
    return prompt, reference


def read_records(path: str | Path) -> DataSet:
    """Read and check every record of a JSONL test set; ``InputError`` names ``FILE:LINE`` of each bad one.

    Blank lines are skipped. Relative ``audio`` paths are resolved against the file's folder
    and must exist.
    """
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise InputError(f"data file {name!r} not found; give the path of a JSONL file of records")
    if not p.is_file():
        raise InputError(f"data file {name!r} is not a file; give the path of a JSONL file of records")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InputError(f"data file {name!r} cannot be read ({exc.strerror or exc})") from None
    data = DataSet(path=name, sha256=hashlib.sha256(raw).hexdigest())
    text = raw.decode("utf-8-sig", errors="replace")
    bad: list[BadRecord] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            record = _parse_line(line, lineno, where, p.parent, len(data.records))
        except InputError as exc:
            bad.append(BadRecord(where, str(exc).removeprefix(f"{where}: ")))
            continue
        if record.id in seen:
            bad.append(BadRecord(where, f"id {record.id!r} is also the id of line {seen[record.id]}; ids must be unique"))
            continue
        seen[record.id] = lineno
        data.records.append(record)
    if bad:
        raise InputError(bad_records_message(name, bad, "fix them and run again"))
    if not data.records:
        raise InputError(f"data file {name!r} holds no records")
    return data


def _parse_line(line: str, lineno: int, where: str, folder: Path, index: int) -> RunRecord:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply to be a record") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" not in obj:
        raise InputError(f"{where}: the record has no prompt: missing field 'messages'")
    if isinstance(obj.get("messages"), list) and not obj["messages"]:
        raise InputError(f"{where}: the record has no prompt: 'messages' is empty")
    try:
        rec = _RecordIn.model_validate(obj)
    except ValidationError as exc:
        raise InputError(f"{where}: {describe_record_error(exc)}") from None
    messages = [_resolve_audio(m, folder, where) for m in rec.messages]
    prompt, reference = split_prompt(messages, where)
    record_id = str(rec.id) if rec.id is not None else str(lineno)
    if not record_id.strip():
        raise InputError(f"{where}: id is empty; give each record a non-empty id or none (its line number is used)")
    return RunRecord(index, lineno, record_id, where, tuple(prompt), reference)


def _resolve_audio(message: PromptMessage, folder: Path, where: str) -> PromptMessage:
    if not message.audio:
        return message
    path = Path(message.audio)
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise InputError(f"{where}: audio file {str(path)!r} not found (relative paths are read from the data file's folder)")
    return message.model_copy(update={"audio": str(path)})


# --- prompts for one backbone -------------------------------------------------------------


def hears_wav(message: PromptMessage, backbone: Backbone) -> bool:
    """True when the backbone reads this message's WAV itself (``Backbone.reads_audio``), in place of units or text."""
    return (
        message.role == "user"
        and bool(message.audio)
        and backbone.reads_audio
        and not (message.units and backbone.layout.audio_count > 0)
    )


def uses_wav(record: RunRecord, backbone: Backbone) -> bool:
    """True when building the record's prompt reads a WAV (tokenized into units, or read by the backbone)."""
    hears_units = backbone.layout.audio_count > 0
    return any(
        hears_wav(m, backbone) or (hears_units and m.audio and not m.units) for m in record.prompt
    )


def check_records(data: DataSet, backbone: Backbone, system_prompt: str | None = None) -> dict[int, PromptInputs]:
    """Check every record against ``backbone`` before anything runs; return the prompts of those without WAVs.

    Unit ids must be in the backbone's audio range, a WAV prompt needs a backbone that reads
    audio or a speech tokenizer, and a prompt must fit the context (prompts read from WAVs are
    built, and measured, when their record is decoded). A backbone without audio-unit tokens
    reads each message's text, unless it reads the WAV itself.
    """
    hears_units = backbone.layout.audio_count > 0
    inputs: dict[int, PromptInputs] = {}
    for record in data.records:
        for message in record.prompt:
            if hears_units:
                for u in message.units or ():
                    if not 0 <= u < backbone.layout.audio_count:
                        raise InputError(
                            f"{record.where}: audio unit {u} is outside the range 0..{backbone.layout.audio_count - 1} "
                            f"of backbone {backbone.name!r}; check the units come from this backbone's speech tokenizer"
                        )
            if hears_units and message.audio and not message.units and not backbone.reads_audio:
                if backbone.speech_tokenizer is None:
                    raise ConfigError(
                        f"{record.where}: the prompt is a WAV file, but backbone {backbone.name!r} has no speech "
                        "tokenizer; give the record's units instead, or use glm-4-voice with backbone.tokenizer_path"
                    )
            elif not hears_units and not hears_wav(message, backbone) and not message.text:
                raise InputError(
                    f"{record.where}: backbone {backbone.name!r} has no audio-unit tokens"
                    + ("" if backbone.reads_audio else " and reads no WAV")
                    + f", so a {message.role} message needs its text (a transcript)"
                )
        if not uses_wav(record, backbone):
            inputs[record.index] = prompt_inputs(record, backbone, system_prompt)
    return inputs


def prompt_inputs(record: RunRecord, backbone: Backbone, system_prompt: str | None = None) -> PromptInputs:
    """A record's prompt as the model reads it (ids and any prefill inputs); WAVs are tokenized or read here."""
    from reempathy.data.dialogue import prompt_turn
    from reempathy.data.schema import Message

    hears_units = backbone.layout.audio_count > 0
    turns: list[Turn] = []
    if system_prompt and record.prompt[0].role != "system":
        turns.append(Turn("system", text=system_prompt))
    for m in record.prompt:
        if hears_wav(m, backbone):
            turns.append(Turn(m.role, audio=m.audio))
            continue
        units = m.units if hears_units else None
        if hears_units and not units and m.audio:
            units = _tokenize(backbone, m.audio, record.where)
        turns.append(prompt_turn(Message(role=m.role, text=m.text, units=units), hears_units))
    try:
        backbone.check_text_fits(sum(len(t.text or "") for t in turns))  # before a huge text is tokenized
        built = backbone.build_prompt_inputs(turns)
    except InputError as exc:
        raise InputError(f"{record.where}: {exc}") from None
    if len(built.ids) >= backbone.max_context:
        raise InputError(
            f"{record.where}: the prompt is {len(built.ids)} tokens, longer than the context of backbone "
            f"{backbone.name!r} ({backbone.max_context}); shorten it"
        )
    return built


def _tokenize(backbone: Backbone, path: str, where: str) -> list[int]:
    if backbone.speech_tokenizer is None:
        raise ConfigError(f"{where}: backbone {backbone.name!r} has no speech tokenizer for {path!r}")
    try:
        units = backbone.speech_tokenizer.tokenize(path)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    if not units:
        raise InputError(f"{where}: audio file {path!r} gave no speech units (is it silent or very short?)")
    return list(units)


__all__ = [
    "PromptMessage",
    "RunRecord",
    "DataSet",
    "read_records",
    "split_prompt",
    "check_records",
    "prompt_inputs",
    "hears_wav",
    "uses_wav",
]

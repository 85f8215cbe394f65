"""Reading a JSONL dataset: every bad record is reported with its file and line number."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from reempathy.errors import InputError
from reempathy.paths import check_name, describe_kind, resolved_kind
from reempathy.data.schema import Record

# How many bad lines one error message lists before it says "and N more".
SHOWN_BAD = 3


@dataclass(frozen=True)
class SourcedRecord:
    """A valid record and where it came from (``where`` is ``FILE:LINE``)."""

    where: str
    record: Record


@dataclass(frozen=True)
class BadRecord:
    """A record that failed validation: ``FILE:LINE`` and what is wrong, on one line."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class RecordSet:
    """The valid records of one file and the bad ones that were skipped."""

    path: str
    records: list[SourcedRecord] = field(default_factory=list)
    skipped: list[BadRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)


def describe_record_error(exc: ValidationError) -> str:
    """One line from a pydantic error on a record: the field path and what is wrong."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        text = f"missing field {loc!r}"
    else:
        text = f"{loc}: {msg}" if loc else msg
    more = len(exc.errors()) - 1
    return text + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def bad_records_message(path: str, bad: list[BadRecord], hint: str) -> str:
    """The one-line error for bad records: the first few in full, the rest counted."""
    shown = "; ".join(str(b) for b in bad[:SHOWN_BAD])
    rest = len(bad) - SHOWN_BAD
    extra = f"; and {rest} more bad line{'s' if rest > 1 else ''}" if rest > 0 else ""
    count = f"{len(bad)} bad record{'s' if len(bad) > 1 else ''} in {path}: " if len(bad) > 1 else ""
    return f"{count}{shown}{extra}; {hint}"


def _lone_surrogate(line: str, data: Any) -> str | None:
    """A message when the record holds a lone surrogate (``"\\ud800"``), which no tokenizer can encode."""
    if "\\u" not in line.lower():
        return None  # a surrogate can only come from an escape: the line itself is valid UTF-8
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return "a text holds a lone surrogate escape (e.g. \"\\ud800\"), which is not valid Unicode; fix the text"
    except RecursionError:
        return "JSON nested too deeply to be a record"
    return None


def load_records(
    path: str | Path, audio_count: int | None = None, skip_bad: bool = False, max_text_chars: int | None = None
) -> RecordSet:
    """Read and validate every line of a JSONL file.

    ``audio_count`` is the backbone's number of audio units (units at or above it are bad);
    ``max_text_chars`` its :attr:`~reempathy.backbones.base.Backbone.max_text_chars` (a record with
    more text cannot fit the context, and is bad before anything is tokenized).
    Without ``skip_bad`` any bad record raises an InputError naming ``FILE:LINE`` of each bad
    line (the first few); with it, bad records are left out and listed in ``RecordSet.skipped``.
    Blank lines are ignored.
    """
    p = check_name(path, "dataset")
    name = str(path)
    kind = resolved_kind(p, "dataset")
    if kind not in ("file", "fifo"):
        state = "not found" if kind == "missing" else describe_kind(kind)
        raise InputError(f"dataset {name!r}: {state}; give the path of a JSONL file")
    result = RecordSet(path=name)
    context = {"audio_count": audio_count, "max_text_chars": max_text_chars}
    with p.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{name}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                result.skipped.append(BadRecord(where, f"not UTF-8 text (byte {exc.start + 1} of the line)"))
                continue
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                result.skipped.append(BadRecord(where, f"malformed JSON ({exc.msg} at column {exc.colno})"))
                continue
            except RecursionError:
                result.skipped.append(BadRecord(where, "JSON nested too deeply to be a record"))
                continue
            surrogate = _lone_surrogate(line, data)
            if surrogate:
                result.skipped.append(BadRecord(where, surrogate))
                continue
            if not isinstance(data, dict):
                result.skipped.append(BadRecord(where, f"expected a JSON object, got {type(data).__name__}"))
                continue
            try:
                record = Record.model_validate(data, context=context)
            except ValidationError as exc:
                result.skipped.append(BadRecord(where, describe_record_error(exc)))
                continue
            result.records.append(SourcedRecord(where, record))
    if result.skipped and not skip_bad:
        raise InputError(
            bad_records_message(name, result.skipped, "fix them, or set [data] skip_bad = true to skip bad records")
        )
    if not result.records:
        raise InputError(f"dataset {name!r} holds no valid records")
    return result


__all__ = ["load_records", "RecordSet", "SourcedRecord", "BadRecord", "bad_records_message"]

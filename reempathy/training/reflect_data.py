"""``reempathy reflect-data``: per-chunk reflections for a training set, asked of an evaluator prefix by prefix.

For each record the answer (its last message) is cut into spoken chunks r1, r2, … with the
layout ``reempathy`` trains and decodes with (the shared chunk walk,
:func:`reempathy.training.builders.spoken_chunks`, on the backbone's tokenizer), and for every
*full* chunk k the evaluator is asked for a reflection on the prefix r1…rk in the context of the
dialogue: an :class:`~reempathy.evaluation.base.EvalItem` whose answer is the prefix (its text
and audio units) and whose ``instruction`` is the prompt template rendered for k. The record is
written as it was, plus ``reflections: [f1, …, fn]`` (one per full chunk; a shorter last chunk
gets none, as in training and decoding) and ``reflections_layout: "TEXT+AUDIO"``.

Where it decides:

- **the layout** (:func:`resolve_layout`): ``--layout`` if given, else the ``[strategy]`` of
  ``--config`` when it is ``reempathy`` (a training or decode config), else 5 text tokens and
  the backbone's default audio slots (10, or 0 on a text-only stream).
- **the prompt** (:data:`DEFAULT_TEMPLATE`, ``--template FILE``): placeholders are checked
  before anything runs (:func:`check_template`).
- **bad records** (a line that is not a valid training record, an answer that cannot be laid
  out): found before the evaluator is built. Strict (default): one error naming ``FILE:LINE``
  of each, nothing written. ``--skip-bad``: left out and counted.
- **a failing evaluator** (:func:`reflections_from`): an ``Evaluation`` with an error, no text,
  or text holding special-token markup fails the *record*: it is not written (never with a
  hole), it is reported with ``FILE:LINE`` and which reflection failed, and a rerun asks again.
  The output is finished only when every record is written, unless ``--skip-bad``, which
  finishes without the failed records and counts them.
- **resuming and atomicity**: the one job driver with a :class:`reempathy.jobs.partial.PartialJsonl` (one line per
  record done in ``OUT.partial``; ``OUT`` written at the end by rename). A record's id there is
  its line number; the data file's hash is part of what a rerun must match.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pydantic import ValidationError

from reempathy.backbones.base import Backbone
from reempathy.config import ComponentConfig, apply_overrides, read_toml
from reempathy.registry import Registry
from reempathy.errors import ConfigError, InputError
from reempathy.evaluation.base import EvalItem, Evaluation
from reempathy.decoding.chunking import DEFAULT_TEXT_TOKENS, ChunkLayout, layout_for_stream
from reempathy.data.dialogue import split_record
from reempathy.training.builders import encode_text, spoken_chunks
from reempathy.data.records import BadRecord, SourcedRecord, bad_records_message, describe_record_error
from reempathy.training.evaluator_calls import call_evaluator
from reempathy.jobs.driver import Job, Outcome, run_job
from reempathy.jobs.partial import PartialJsonl
from reempathy.data.schema import Record

#: What the evaluator is asked for each prefix (``EvalItem.instruction``). The evaluator shows the
#: dialogue and the answer so far itself; this replaces its task line.
DEFAULT_TEMPLATE = (
    "The answer above is not finished: it is what the assistant has said so far (spoken chunk {k}), and it will go "
    "on speaking. Write the assistant's own silent reflection at this point, as one short note of at most 12 words: "
    "how well the words so far meet the user's feelings and needs, and what the next words should do. "
    "Reply with the note only: no scores, no JSON, no quotes."
)

#: The placeholders a template may use.
TEMPLATE_FIELDS = {
    "k": "the number of the chunk the reflection follows (1, 2, …)",
    "chunks": "how many full chunks the answer has (so how many reflections it gets)",
    "answer_so_far": "the text of the answer up to and including chunk k",
    "latest": "the text of chunk k alone",
    "user": "the text of the user's last turn ('[speech]' when it has none)",
}

#: ``--set`` keys that go to the config (everything else is an evaluator option).
CONFIG_TABLES = ("backbone", "strategy")

_LAYOUT = re.compile(r"^\s*(\d+)\s*(?:\+\s*(\d+)\s*)?$")


# --- settings ----------------------------------------------------------------------------------


def check_template(template: str, where: str = "the reflection template") -> str:
    """``template`` if it parses and names only :data:`TEMPLATE_FIELDS`; else a ConfigError naming the problem."""
    if not template.strip():
        raise ConfigError(f"{where} is empty; write the instruction the evaluator gets for each answer prefix")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc} (write a literal brace as {{{{ or }}}})") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS or spec or conversion:
            raise ConfigError(
                f"{where}: unknown placeholder {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}; "
                f"available: {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)} (a literal brace is {{{{ or }}}})"
            )
    return template


def read_template(path: str | Path) -> str:
    """The template in a UTF-8 text file, checked."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"template file {str(p)!r} not found; give a UTF-8 text file (placeholders: docs/training.md)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"template file {str(p)!r} is not UTF-8 text") from None
    return check_template(text.strip(), f"template file {str(p)!r}")


def parse_layout(text: str) -> tuple[int, int | None]:
    """``"5+10"`` → (5, 10); ``"5"`` → (5, None): the backbone's default audio slots."""
    m = _LAYOUT.match(text)
    if not m or int(m.group(1)) < 1:
        raise ConfigError(f"--layout {text!r}: expected TEXT+AUDIO tokens per spoken chunk, e.g. 5+10 (or 5+0 on a text-only backbone)")
    return int(m.group(1)), None if m.group(2) is None else int(m.group(2))


def read_config_tables(path: str | None, overrides: Sequence[str]) -> tuple[ComponentConfig, tuple[int, int | None] | None]:
    """The ``[backbone]`` of a decode or training config (default: tiny) and its ``reempathy`` layout, if any.

    Other tables are not read, so the training config you will train with is the natural ``--config``.
    """
    where = f"config file {path!r}" if path else "config"
    raw: dict[str, Any] = read_toml(path) if path else {}
    raw = {k: v for k, v in raw.items() if k in CONFIG_TABLES}
    raw = apply_overrides(raw, list(overrides))
    for key in CONFIG_TABLES:
        if key in raw and not isinstance(raw[key], dict):
            raise ConfigError(f"{where}: {key} must be a table, e.g. [{key}] name = \"...\"")
    backbone = ComponentConfig(**{"name": "tiny", **raw.get("backbone", {})})
    strategy = raw.get("strategy") or {}
    layout = None
    # A reempathy strategy gives its layout; so do layout keys without a name (``--set strategy.text_tokens=7``).
    if strategy.get("name") == "reempathy" or ("name" not in strategy and {"text_tokens", "audio_tokens"} & set(strategy)):
        text, audio = strategy.get("text_tokens", DEFAULT_TEXT_TOKENS), strategy.get("audio_tokens")
        if not isinstance(text, int) or isinstance(text, bool) or not (audio is None or (isinstance(audio, int) and not isinstance(audio, bool))):
            raise ConfigError(f"{where}: [strategy] text_tokens and audio_tokens must be whole numbers")
        layout = (text, audio)
    return backbone, layout


def resolve_layout(backbone: Backbone, requested: tuple[int, int | None] | None, source: str) -> ChunkLayout:
    """The chunk layout on ``backbone``'s spoken stream (checked as the ``reempathy`` strategy checks it)."""
    text, audio = requested if requested is not None else (DEFAULT_TEXT_TOKENS, None)
    return layout_for_stream(backbone.stream, backbone.name, text, audio, source)


def layout_name(layout: ChunkLayout) -> str:
    """``"TEXT+AUDIO"``, as records carry it in ``reflections_layout``."""
    return f"{layout.text_tokens}+{layout.audio_tokens}"


# --- the data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prefix:
    """The answer up to and including full chunk ``k``: its text and audio units, and chunk k's own text."""

    k: int
    text: str
    units: list[int]
    latest: str


@dataclass
class Entry:
    """One valid record: where it is, the line as read (written back with its reflections), the prefixes."""

    line: int
    where: str
    raw: dict[str, Any]
    record: SourcedRecord
    prefixes: list[Prefix] = field(default_factory=list)


@dataclass
class DataFile:
    """The records of a data file that can get reflections, the bad ones, and the file's SHA-256."""

    path: str
    sha256: str
    entries: list[Entry]
    bad: list[BadRecord]


def chunk_prefixes(sr: SourcedRecord, backbone: Backbone, layout: ChunkLayout) -> list[Prefix]:
    """One prefix per full spoken chunk of the record's answer; InputError (``FILE:LINE``) when it cannot be laid out."""
    _, answer = split_record(sr)
    chunks = spoken_chunks(answer, backbone, layout, sr.where)
    full = sum(1 for chunk in chunks if len(chunk) == layout.size)  # every chunk but a shorter last one
    vocab = backbone.layout
    out: list[Prefix] = []
    text_ids: list[int] = []
    units: list[int] = []
    for k, chunk in enumerate(chunks[:full], start=1):
        own = [t for t in chunk if vocab.is_text(t)]
        text_ids += own
        units += [vocab.token_to_unit(t) for t in chunk if vocab.is_audio(t)]
        out.append(Prefix(k, backbone.decode_text(text_ids), list(units), backbone.decode_text(own)))
    return out


def read_data(path: str | Path, backbone: Backbone, layout: ChunkLayout) -> DataFile:
    """Every line of the data file: valid records with their prefixes, and bad ones (``FILE:LINE: why``)."""
    p = Path(path)
    name = str(path)
    if not p.is_file():
        raise InputError(f"dataset {name!r} not found; give the path of a JSONL file of training records")
    raw_bytes = p.read_bytes()
    data = DataFile(name, hashlib.sha256(raw_bytes).hexdigest(), [], [])
    context = {"audio_count": backbone.layout.audio_count or None, "max_text_chars": backbone.max_text_chars}
    for lineno, line in enumerate(raw_bytes.decode("utf-8", errors="replace").split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            data.bad.append(BadRecord(where, f"malformed JSON ({exc.msg} at column {exc.colno})"))
            continue
        except RecursionError:
            data.bad.append(BadRecord(where, "JSON nested too deeply to be a record"))
            continue
        if not isinstance(obj, dict):
            data.bad.append(BadRecord(where, f"expected a JSON object, got {type(obj).__name__}"))
            continue
        try:
            record = Record.model_validate(obj, context=context)
        except ValidationError as exc:
            data.bad.append(BadRecord(where, describe_record_error(exc)))
            continue
        entry = Entry(lineno, where, obj, SourcedRecord(where, record))
        try:
            entry.prefixes = chunk_prefixes(entry.record, backbone, layout)
        except InputError as exc:
            data.bad.append(BadRecord(where, str(exc).removeprefix(f"{where}: ")))
            continue
        data.entries.append(entry)
    return data


def eval_items(entry: Entry, template: str, folder: Path) -> list[EvalItem]:
    """One item per prefix: the dialogue before the answer, the prefix as the answer, the rendered instruction."""
    context = entry.record.record.messages[:-1]
    messages = []
    for message, raw in zip(context, entry.raw["messages"]):
        m = {k: v for k, v in raw.items() if k not in ("role", "text", "units")}
        m.update(role=message.role, text=message.text, units=message.units)
        if isinstance(m.get("audio"), str) and m["audio"] and not Path(m["audio"]).is_absolute():
            m["audio"] = str(folder / m["audio"])  # relative WAV paths are read from the data file's folder
        messages.append(m)
    user = next((m.text or "[speech]" for m in reversed(context) if m.role == "user"), "")
    chunks = len(entry.prefixes)
    return [
        EvalItem(
            id=f"{entry.line}#{p.k}",
            messages=messages,
            answer_text=p.text,
            answer_units=list(p.units),
            instruction=template.format(k=p.k, chunks=chunks, answer_so_far=p.text, latest=p.latest, user=user),
        )
        for p in entry.prefixes
    ]


class RecordFailed(Exception):
    """The evaluator did not give a usable reflection for one prefix of a record (the message says which)."""


def reflections_from(evaluations: Sequence[Evaluation], backbone: Backbone, where: str) -> list[str]:
    """The reflection texts (whitespace collapsed); RecordFailed on the first prefix without a usable one."""
    texts = []
    for k, ev in enumerate(evaluations, start=1):
        if ev.error:
            raise RecordFailed(f"reflection {k}: the evaluator failed: {ev.error}")
        text = " ".join((ev.text or "").split())
        if not text:
            raise RecordFailed(f"reflection {k}: the evaluator gave no text")
        try:
            encode_text(backbone, text, where, f"reflection {k}")
        except InputError as exc:
            raise RecordFailed(str(exc).removeprefix(f"{where}: ")) from None
        texts.append(text)
    return texts


# --- the command -------------------------------------------------------------------------------


@dataclass
class ReflectOptions:
    """What ``reflect-data`` was asked to do (the command line, parsed)."""

    data: str
    out: str
    evaluator: str
    evaluator_options: dict[str, Any] = field(default_factory=dict)
    config: str | None = None
    config_overrides: list[str] = field(default_factory=list)
    layout: str | None = None
    template: str = DEFAULT_TEMPLATE
    skip_bad: bool = False
    force: bool = False
    progress: bool | None = None  # None: a bar on a terminal only


@dataclass
class ReflectSummary:
    """What one invocation did."""

    out: Path
    records: int  # valid records in the data file
    already_done: int
    written: int  # records given reflections in this invocation
    reflections: int  # reflections asked for and written in this invocation
    skipped: list[BadRecord]
    failed: list[BadRecord]
    finished: bool
    final_count: int | None  # records in OUT once finished
    seconds: float

    def line(self) -> str:
        """The summary line printed at the end."""
        done = f"{self.written} records given {self.reflections} reflections"
        if self.already_done:
            done += f" ({self.already_done} done before)"
        parts = [f"reflect-data: {done} in {self.seconds:.1f} s"]
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)} bad record{'s' if len(self.skipped) != 1 else ''} (first: {self.skipped[0]})")
        if self.failed:
            parts.append(f"left out {len(self.failed)} the evaluator failed on (first: {self.failed[0]})")
        if self.finished:
            parts.append(f"wrote {self.final_count} records to {self.out}")
        return "; ".join(parts)


def reflect_data(opts: ReflectOptions, registry: Registry, say: Callable[[str], None] | None = None) -> ReflectSummary:
    """Write ``opts.out``: each record of ``opts.data`` with its per-chunk reflections (module docstring)."""
    from reempathy.evaluation.registry import build_evaluator, evaluator_options

    started = time.perf_counter()
    template = check_template(opts.template)
    requested = parse_layout(opts.layout) if opts.layout else None
    registry.get("evaluator", opts.evaluator)
    validated = evaluator_options(registry, opts.evaluator, opts.evaluator_options).model_dump(mode="json")
    backbone_cfg, config_layout = read_config_tables(opts.config, opts.config_overrides)
    backbone_options = registry.validate("backbone", backbone_cfg.name, backbone_cfg.options)
    source = "--layout" if requested else (f"[strategy] of {opts.config!r}" if config_layout else "reflect-data")
    data_path = Path(opts.data)
    if not data_path.is_file():
        raise InputError(f"dataset {opts.data!r} not found; give the path of a JSONL file of training records")

    backbone = registry.create("backbone", backbone_cfg.name, backbone_options)
    layout = resolve_layout(backbone, requested or config_layout, source)
    data = read_data(data_path, backbone, layout)
    if data.bad and not opts.skip_bad:
        raise InputError(bad_records_message(data.path, data.bad, "fix them, or add --skip-bad to skip bad records"))
    identity = {
        "data": {"path": str(data_path.resolve()), "sha256": data.sha256},
        "evaluator": {"name": opts.evaluator, "options": validated},
        "backbone": {"name": backbone_cfg.name, "options": backbone_options.model_dump(mode="json")},
        "layout": layout_name(layout),
        "template": template,
    }
    output = PartialJsonl(opts.out, identity, "reflect-data", [("--data", opts.data), ("--config", opts.config)],
                          skip_bad=opts.skip_bad)

    def build() -> Any:  # before anything is written: a model to load, options its factory may still refuse
        return build_evaluator(registry, opts.evaluator, opts.evaluator_options)

    def work(evaluator: Any, todo: list[Entry]) -> Iterator[Outcome]:
        for entry in todo:
            texts: list[str] = []
            if entry.prefixes:
                evaluations = call_evaluator(evaluator, opts.evaluator, eval_items(entry, template, data_path.parent))
                try:
                    texts = reflections_from(evaluations, backbone, entry.where)
                except RecordFailed as exc:
                    yield Outcome(str(entry.line), failure=BadRecord(entry.where, str(exc)))
                    continue
            record = dict(entry.raw, reflections=texts, reflections_layout=layout_name(layout))
            yield Outcome(str(entry.line), {"id": str(entry.line), "line": entry.line, "record": record},
                          tally={"written": 1, "reflections": len(texts)})

    job = Job("reflect-data", "record", data.entries, key=lambda e: str(e.line), store=output, build=build, work=work)
    report = run_job(job, force=opts.force, progress=opts.progress)
    summary = ReflectSummary(
        out=Path(opts.out), records=len(data.entries), already_done=report.already_done,
        written=int(report.tally["written"]), reflections=int(report.tally["reflections"]), skipped=data.bad,
        failed=report.failures, finished=report.complete, final_count=output.final_count,
        seconds=time.perf_counter() - started,
    )
    if say is not None:
        say(summary.line())
    return summary



__all__ = [
    "DEFAULT_TEMPLATE",
    "TEMPLATE_FIELDS",
    "ReflectOptions",
    "ReflectSummary",
    "reflect_data",
    "check_template",
    "read_template",
    "parse_layout",
    "chunk_prefixes",
    "read_data",
    "eval_items",
    "reflections_from",
]

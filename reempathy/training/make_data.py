"""``reempathy make-data``: training records from nothing but an LLM — scenario → dialogue → assessment → (rejected, speech, reflections).

The paper's data D: a strong LLM invents a scenario and its story, writes the spoken dialogue
(user turns and the assistant's reference answer), and assesses the answer on the four
EmpathyEval dimensions; here it may also write a worse answer for DPO (``--rejected``), the
backbone can voice every turn (``--speech``, :mod:`reempathy.training.voice`), and the LLM can
write per-chunk reflections (``--reflections``, the ``reflect-data`` path:
:func:`reempathy.training.reflect_data.reflect_entry`). The LLM is any OpenAI-compatible
endpoint or a local instruct model — the back ends of ``llm-judge``, with its options — and
every request goes through the request engine llm-judge uses
(:class:`reempathy.evaluation.judge.engine.RequestEngine`): ``concurrency`` records in flight,
retries with backoff, a rate limit.

Where it decides:

- **prompts** (:func:`load_templates`): one template file per step (``system``, ``scenario``,
  ``dialogue``, ``assessment``, ``rejected``) in ``--templates DIR``, each step falling back to
  the shipped one (``reempathy/training/templates/make-data/``). A placeholder is ``{name}``;
  every other brace is literal text, so JSON examples need no escaping. Each template must hold
  its step's required placeholders and no unknown ``{name}`` (:data:`STEPS`), checked before
  any request.
- **replies** (``parse_*``): the first JSON object in the reply (bare, fenced, or in prose), then
  the training schema: the scenario's two texts; the dialogue as schema messages that alternate
  user/assistant from a user turn to an assistant answer, without special-token markup; the
  assessment as the schema's ``Assessment`` with all four scores; the rejected answer as the
  schema's ``Answer`` with a scored assessment whose total is *below* the reference answer's (so
  DPO prefers the reference, never swaps). A reply that fails is asked again (``retries``); after
  the last try the *record* fails: not written, counted, its step, error and the raw reply put in
  ``OUT.failures.jsonl``, and a rerun tries it again. One record's failure never touches another.
- **variety** (:func:`hints`): record ``R`` draws its topic, emotion and number of user turns
  from ``random.Random(row_seed(--seed, R))``, so records differ even at temperature 0 and the
  same ``--seed`` asks the same questions.
- **duplicates** (:class:`MadeJsonl`): a record whose dialogue (its texts, case and spacing
  ignored) repeats an earlier record's is dropped when ``OUT`` is written (the earlier, by id,
  stays) and counted.
- **the order of steps**: text (every record on its own, ``concurrency`` at once) → speech (a
  group of records through the backbone's batches) → reflections (need the answer's units on a
  backbone that interleaves audio, so ``--reflections`` there requires ``--speech``).
- **resuming and atomicity**: the one job driver with a :class:`reempathy.jobs.partial.PartialJsonl`
  (record ``md-000001`` … ``md-N``). What a rerun must match: ``--seed``, ``--language``, the
  templates' text, the LLM's model settings and the steps asked for; ``--n`` may grow while the
  output is unfinished, and how requests are sent (:data:`TRANSPORT_OPTIONS`: the endpoint's URL,
  ``concurrency``, ``timeout_s``, ``retries``, ``backoff_s``, ``rate_limit_per_s``, …) may change at any time.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reempathy.data.records import BadRecord, describe_record_error
from reempathy.data.schema import SCORE_NAMES, Answer, Assessment, Record
from reempathy.decoding.batch import row_seed
from reempathy.errors import ConfigError
from reempathy.evaluation.judge.engine import Reply, RequestEngine
from reempathy.evaluation.judge.parsing import ParseError, find_json_object
from reempathy.jobs.driver import Job, Outcome, run_job
from reempathy.jobs.partial import PartialJsonl
from reempathy.jobs.rundir import dumps_line, write_bytes_atomic
from reempathy.registry import Registry
from reempathy.safe_write import check_not_input, check_output_file

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates" / "make-data"

#: step → (required placeholders, optional placeholders). What each placeholder holds: :data:`PLACEHOLDERS`.
STEPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "system": ((), ("language",)),
    "scenario": (("language",), ("topic", "emotion", "turns", "index")),
    "dialogue": (("scenario", "story", "language"), ("turns", "topic", "emotion")),
    "assessment": (("dialogue", "answer"), ("scenario", "story", "language")),
    "rejected": (("dialogue", "answer"), ("scenario", "story", "language")),
}
PLACEHOLDERS = {
    "language": "--language (e.g. English, Mandarin Chinese)",
    "topic": "the record's topic, drawn from TOPICS with the record's seed",
    "emotion": "the user's emotion, drawn from EMOTIONS with the record's seed",
    "turns": "how many times the user speaks, 1 to --turns, drawn with the record's seed",
    "index": "the record's number (1, 2, …)",
    "scenario": "the scenario sentence the scenario step wrote",
    "story": "the story the scenario step wrote",
    "dialogue": "the dialogue before the answer, one 'User: …' / 'Assistant: …' line per turn",
    "answer": "the assistant's reference answer (the dialogue's last turn)",
}
TOPICS = (
    "work", "family", "health", "friendship", "study and exams", "money", "moving to a new place", "a pet",
    "a breakup", "the loss of someone close", "good news", "a hobby", "parenting", "neighbours", "sleep",
)
EMOTIONS = (
    "sad", "anxious", "angry", "lonely", "ashamed", "exhausted", "excited", "proud", "confused", "frustrated",
    "hopeful", "grieving", "nervous", "relieved", "disappointed",
)
#: Defaults make-data gives the LLM options unless ``--set`` says otherwise (varied, long enough for a dialogue).
LLM_DEFAULTS = {"temperature": 0.7, "max_tokens": 1024}
#: LLM options that change how requests are sent (where, how many at once, how patiently), not what is asked or of
#: which model: a rerun may change them.
TRANSPORT_OPTIONS = (
    "endpoint", "concurrency", "timeout_s", "retries", "backoff_s", "rate_limit_per_s", "api_key_env", "client", "device",
)
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SPECIAL = re.compile(r"<\|[^|<>]{1,64}\|>")


# --- templates -------------------------------------------------------------------------------------


def check_template(step: str, text: str, where: str) -> str:
    """``text`` if it holds every required placeholder of ``step`` and no unknown one; else a one-line ConfigError."""
    required, optional = STEPS[step]
    if not text.strip():
        raise ConfigError(f"{where} is empty; write the {step} prompt (placeholders: docs/training.md#records-from-an-llm-reempathy-make-data)")
    used = set(_PLACEHOLDER.findall(text))
    unknown = sorted(used - set(required) - set(optional))
    if unknown:
        allowed = ", ".join("{" + p + "}" for p in (*required, *optional))
        raise ConfigError(f"{where}: unknown placeholder {{{unknown[0]}}}; the {step} template may use {allowed}")
    missing = [p for p in required if p not in used]
    if missing:
        raise ConfigError(
            f"{where}: missing placeholder {{{missing[0]}}}; the {step} template must hold "
            f"{', '.join('{' + p + '}' for p in required)} (what each holds: docs/training.md#records-from-an-llm-reempathy-make-data)"
        )
    return text


def load_templates(directory: str | Path | None) -> dict[str, str]:
    """Every step's template: ``directory/STEP.txt`` where it exists, else the shipped one; each checked."""
    folder = Path(directory) if directory else None
    if folder is not None and not folder.is_dir():
        raise ConfigError(f"--templates {str(folder)!r} is not a directory; give a folder of STEP.txt files "
                          f"({', '.join(f + '.txt' for f in STEPS)}), any of them")
    out = {}
    for step in STEPS:
        path = folder / f"{step}.txt" if folder is not None and (folder / f"{step}.txt").exists() else TEMPLATE_DIR / f"{step}.txt"
        if not path.is_file():
            raise ConfigError(f"template {str(path)!r} is not a file; give a UTF-8 text file")
        try:
            text = path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise ConfigError(f"template {str(path)!r} is not UTF-8 text") from None
        out[step] = check_template(step, text, f"template {str(path)!r}")
    return out


def render(template: str, values: dict[str, Any]) -> str:
    """``template`` with each ``{name}`` replaced by ``values[name]`` (other braces are literal)."""
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), template)


# --- what the LLM must reply -----------------------------------------------------------------------


class ScenarioReply(BaseModel):
    """The scenario step's reply: who and what happened, and the story behind it."""

    model_config = ConfigDict(extra="ignore", strict=True)
    scenario: str = Field(min_length=1)
    story: str = Field(min_length=1)


def _schema_error(exc: ValidationError) -> ParseError:
    return ParseError(f"not the training schema: {describe_record_error(exc)}")


def _plain(text: str, what: str) -> str:
    text = " ".join(text.split())
    if not text:
        raise ParseError(f"{what} is empty")
    if _SPECIAL.search(text):
        raise ParseError(f"{what} holds special-token markup such as '<|user|>'")
    return text


def parse_scenario(reply: str) -> dict[str, str]:
    """``{"scenario", "story"}`` from the reply; ParseError otherwise."""
    try:
        parsed = ScenarioReply.model_validate(find_json_object(reply))
    except ValidationError as exc:
        raise _schema_error(exc) from None
    return {"scenario": _plain(parsed.scenario, "scenario"), "story": _plain(parsed.story, "story")}


def parse_dialogue(reply: str) -> list[dict[str, str]]:
    """The dialogue's messages (schema messages, user first, alternating, ending with the assistant); ParseError otherwise."""
    obj = find_json_object(reply)
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ParseError("no \"messages\" list")
    try:
        record = Record.model_validate({"messages": messages})
    except ValidationError as exc:
        raise _schema_error(exc) from None
    out = []
    for i, m in enumerate(record.messages):
        want = "user" if i % 2 == 0 else "assistant"
        if m.role != want:
            raise ParseError(f"message {i + 1} is from the {m.role}, but turns must alternate from the user: expected {want}")
        if not m.text:
            raise ParseError(f"message {i + 1} has no text")
        out.append({"role": m.role, "text": _plain(m.text, f"message {i + 1}")})
    if out[-1]["role"] != "assistant":
        raise ParseError("the dialogue must end with the assistant's answer")
    return out


def parse_assessment(reply: str) -> dict[str, Any]:
    """The schema's ``Assessment`` with all four scores, as JSON; ParseError otherwise."""
    try:
        assessment = Assessment.model_validate(find_json_object(reply))
    except ValidationError as exc:
        raise _schema_error(exc) from None
    if assessment.scores is None:
        raise ParseError(f"no \"scores\" ({', '.join(SCORE_NAMES)}, each 1-5)")
    return {"text": _plain(assessment.text, "assessment"), "scores": assessment.scores.model_dump()}


def parse_rejected(reply: str, chosen_total: float) -> dict[str, Any]:
    """The schema's ``Answer`` with a scored assessment whose total is below ``chosen_total``; ParseError otherwise."""
    obj = find_json_object(reply)
    try:
        answer = Answer.model_validate({**obj, "role": "assistant"})
    except ValidationError as exc:
        raise _schema_error(exc) from None
    if not answer.text:
        raise ParseError("the rejected answer has no text")
    if answer.assessment is None or answer.assessment.scores is None:
        raise ParseError("the rejected answer needs an \"assessment\" with \"scores\"")
    total = answer.assessment.scores.total()
    if total >= chosen_total:
        raise ParseError(f"the rejected answer scores {total:g} in total, not below the reference answer's {chosen_total:g}")
    return {"role": "assistant", "text": _plain(answer.text, "the rejected answer"),
            "assessment": {"text": _plain(answer.assessment.text, "the rejected answer's assessment"),
                           "scores": answer.assessment.scores.model_dump()}}


def transcript(messages: Sequence[dict[str, Any]]) -> str:
    """One ``User: …`` / ``Assistant: …`` line per message."""
    return "\n".join(f"{m['role'].capitalize()}: {m['text']}" for m in messages)


def fingerprint(record: dict[str, Any]) -> str:
    """What makes two records duplicates: their dialogue's texts, case and spacing ignored."""
    texts = [" ".join(str(m.get("text") or "").lower().split()) for m in record.get("messages", [])]
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode("utf-8")).hexdigest()


# --- one record ------------------------------------------------------------------------------------


@dataclass
class Failure:
    """A record that could not be made: which ``step``, the ``error``, the last ``raw`` reply, the ``attempts``."""

    id: str
    step: str
    error: str
    raw: str | None = None
    attempts: int = 0

    def __str__(self) -> str:
        return f"{self.id}: {self.step}: {self.error}"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "step": self.step, "error": self.error, "raw": self.raw, "attempts": self.attempts}


@dataclass(frozen=True)
class Item:
    """One record to make: its id, number (1-based) and seed."""

    id: str
    index: int
    seed: int


def hints(item: Item, max_turns: int) -> dict[str, Any]:
    """The record's topic, emotion and number of user turns, drawn with its own seed."""
    rng = random.Random(item.seed)
    return {"topic": rng.choice(TOPICS), "emotion": rng.choice(EMOTIONS), "turns": rng.randint(1, max_turns)}


class Maker:
    """The text steps of one record, every request through ``engine`` (module docstring)."""

    def __init__(self, engine: RequestEngine, templates: dict[str, str], language: str, max_turns: int, rejected: bool) -> None:
        self.engine = engine
        self.templates = templates
        self.language = language
        self.max_turns = max_turns
        self.rejected = rejected

    def _ask(self, step: str, values: dict[str, Any], parse: Callable[[str], Any]) -> Reply:
        messages = [{"role": "system", "content": render(self.templates["system"], {"language": self.language})},
                    {"role": "user", "content": render(self.templates[step], {"language": self.language, **values})}]
        return self.engine.ask(messages, parse)

    def make(self, item: Item) -> dict[str, Any] | Failure:
        """Scenario → dialogue → assessment (→ rejected): the record, or the step that failed."""
        h = hints(item, self.max_turns)
        values: dict[str, Any] = {**h, "index": item.index}
        reply = self._ask("scenario", values, parse_scenario)
        if not reply.ok:
            return Failure(item.id, "scenario", reply.error or "", reply.raw, reply.attempts)
        values.update(reply.value)
        reply = self._ask("dialogue", values, parse_dialogue)
        if not reply.ok:
            return Failure(item.id, "dialogue", reply.error or "", reply.raw, reply.attempts)
        messages = reply.value
        values.update(dialogue=transcript(messages[:-1]), answer=messages[-1]["text"])
        reply = self._ask("assessment", values, parse_assessment)
        if not reply.ok:
            return Failure(item.id, "assessment", reply.error or "", reply.raw, reply.attempts)
        assessment = reply.value
        record: dict[str, Any] = {
            "id": item.id, "language": self.language,
            "scenario": {"topic": h["topic"], "emotion": h["emotion"], "scenario": values["scenario"], "story": values["story"]},
            "messages": messages, "assessment": assessment,
        }
        if self.rejected:
            total = sum(assessment["scores"].values())
            reply = self._ask("rejected", values, lambda r: parse_rejected(r, total))
            if not reply.ok:
                return Failure(item.id, "rejected", reply.error or "", reply.raw, reply.attempts)
            record["rejected"] = reply.value
        return record


# --- the store: a JSONL made whole at the end, duplicates dropped ----------------------------------


class MadeJsonl(PartialJsonl):
    """:class:`PartialJsonl` that drops a record whose dialogue repeats an earlier one's (by line) when it writes ``OUT``."""

    duplicates = 0

    def finish(self, report: Any) -> bool:
        self.close()
        if report.failures and not self.skip_bad:
            return False
        seen: set[str] = set()
        kept = []
        self.duplicates = 0
        for entry in sorted(self.done.values(), key=lambda e: int(e["line"])):
            record = entry.get("record")
            if record is None:
                continue
            key = fingerprint(record)
            if key in seen:
                self.duplicates += 1
                continue
            seen.add(key)
            kept.append(entry)
        self.done = {str(e["id"]): e for e in kept}
        return super().finish(report)


# --- the command -----------------------------------------------------------------------------------


@dataclass
class MakeDataOptions:
    """What ``make-data`` was asked to do (the command line, parsed)."""

    out: str
    n: int
    llm_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    language: str = "English"
    turns: int = 2
    templates: str | None = None
    rejected: bool = False
    speech: bool = False
    reflections: bool = False
    config: str | None = None
    config_overrides: list[str] = field(default_factory=list)
    layout: str | None = None
    reflection_template: str | None = None
    tts: str = "read-aloud"
    tts_options: dict[str, Any] = field(default_factory=dict)
    user_tts: str | None = None
    user_tts_options: dict[str, Any] = field(default_factory=dict)
    wav: str | None = None
    decoder: str | None = None
    skip_bad: bool = False
    force: bool = False
    progress: bool | None = None


@dataclass
class MakeDataSummary:
    """What one invocation did."""

    out: Path
    asked: int
    already_done: int
    made: int
    failed: list[Failure]
    failures_file: Path | None
    duplicates: int
    finished: bool
    final_count: int | None
    seconds: float
    requests: int = 0

    def line(self) -> str:
        """The summary line printed at the end."""
        done = f"{self.made} of {self.asked} records made" + (f" ({self.already_done} done before)" if self.already_done else "")
        parts = [f"make-data: {done} in {self.seconds:.1f} s ({self.requests} requests)"]
        if self.failed:
            parts.append(f"{len(self.failed)} failed (first: {self.failed[0]}); their replies are in {self.failures_file}")
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate{'s' if self.duplicates != 1 else ''} dropped")
        if self.finished:
            parts.append(f"wrote {self.final_count} records to {self.out}")
        return "; ".join(parts)


def failures_path(out: str | Path) -> Path:
    """Where the failures of the last invocation go: ``OUT.failures.jsonl``."""
    out = Path(out)
    return out.with_name(out.name + ".failures.jsonl")


def make_data(opts: MakeDataOptions, registry: Registry, say: Callable[[str], None] | None = None) -> MakeDataSummary:
    """Write ``opts.out``: ``opts.n`` records asked of the LLM (module docstring)."""
    from reempathy.evaluation.judge.backends import make_backend
    from reempathy.evaluation.judge.evaluator import LlmJudge, engine_for

    started = time.perf_counter()
    if isinstance(opts.n, bool) or not isinstance(opts.n, int) or opts.n < 1:
        raise ConfigError(f"--n must be at least 1, got {opts.n!r}")
    if isinstance(opts.turns, bool) or not isinstance(opts.turns, int) or not 1 <= opts.turns <= 16:
        raise ConfigError(f"--turns must be 1 to 16 (the user's turns in a dialogue), got {opts.turns!r}")
    if not opts.language.strip() or "\n" in opts.language:
        raise ConfigError(f"--language {opts.language!r}: give a language's name on one line, e.g. English")
    templates = load_templates(opts.templates)
    prefix = "evaluator 'llm-judge': "  # the registry's wording, replaced by make-data's
    try:
        llm = registry.validate("evaluator", "llm-judge", {**LLM_DEFAULTS, **opts.llm_options})
    except ConfigError as exc:
        raise ConfigError(
            f"make-data: the LLM's options (llm-judge's: --set endpoint=URL --set model=NAME, or --set backend=local "
            f"--set path=DIR): {str(exc).removeprefix(prefix)}"
        ) from None
    failures_file = failures_path(opts.out)
    for path, what in ((failures_file, "failures file"),):
        check_output_file(path, what)
        check_not_input(path, what, [("--config", opts.config)])

    # The backbone: only when speech or reflections need it. Checked before anything is asked.
    voicing: dict[str, Any] = {}
    if opts.speech or opts.reflections:
        voicing = _speech_setup(opts, registry)
    model_options = {k: v for k, v in llm.model_dump(mode="json").items() if k not in TRANSPORT_OPTIONS}
    identity = {
        "seed": opts.seed, "language": opts.language, "turns": opts.turns, "templates": templates, "llm": model_options,
        "rejected": opts.rejected, "speech": voicing.get("speech_identity"), "reflections": voicing.get("reflect_identity"),
    }
    output = MadeJsonl(opts.out, identity, "make-data", [("--config", opts.config)], skip_bad=opts.skip_bad)
    output.check(opts.force)
    items = [Item(f"md-{i:06d}", i, row_seed(opts.seed, f"md-{i:06d}")) for i in range(1, opts.n + 1)]
    counted: dict[str, int] = {"requests": 0}

    def build() -> Any:
        backend = make_backend(llm)  # type: ignore[arg-type]
        engine = engine_for(llm, _Counting(backend, counted))  # type: ignore[arg-type]
        maker = Maker(engine, templates, opts.language, opts.turns, opts.rejected)
        voicer = voicing["build_voicer"]() if opts.speech else None
        judge = None
        if opts.reflections:  # the reflect-data path, one request at a time per record (the records run side by side)
            single = RequestEngine(engine.backend, concurrency=1, retries=llm.retries, backoff_s=llm.backoff_s,  # type: ignore[attr-defined]
                                   rate=engine.rate)
            judge = LlmJudge(llm, engine=single)  # type: ignore[arg-type]
        return maker, voicer, judge

    def reflect(judge: Any, record: dict[str, Any], item: Item) -> dict[str, Any] | Failure:
        from reempathy.training.reflect_data import make_entry, reflect_entry

        backbone, layout, template = voicing["backbone"], voicing["layout"], voicing["reflection_template"]
        entry = make_entry(record, item.index, item.id, backbone, layout)
        if isinstance(entry, BadRecord):
            return Failure(item.id, "reflections", entry.message)
        done = reflect_entry(entry, judge, "llm-judge", template, Path(opts.out).resolve().parent, backbone, layout)
        if isinstance(done, BadRecord):
            return Failure(item.id, "reflections", done.message)
        return done

    def outcome(item: Item, made: dict[str, Any] | Failure) -> Outcome:
        if isinstance(made, Failure):
            return Outcome(item.id, failure=made)
        return Outcome(item.id, {"id": item.id, "line": item.index, "record": made}, tally={"made": 1})

    def work(worker: Any, todo: list[Item]) -> Iterator[Outcome]:
        maker, voicer, judge = worker
        engine = maker.engine
        if voicer is None:  # every record on its own, `concurrency` at once, written as each is done
            def one(item: Item) -> dict[str, Any] | Failure:
                made = maker.make(item)
                if judge is not None and not isinstance(made, Failure):
                    made = reflect(judge, made, item)
                return made

            for item, made in engine.as_completed(one, todo):
                yield outcome(item, made)
            return
        group = max(8, 4 * engine.concurrency)  # text for a group side by side, then its speech in the backbone's batches
        for start in range(0, len(todo), group):
            texts = dict(engine.as_completed(maker.make, todo[start : start + group]))
            ready = [(item, made) for item, made in texts.items() if not isinstance(made, Failure)]
            for item, made in texts.items():
                if isinstance(made, Failure):
                    yield outcome(item, made)
            voiced = _voice_records(voicer, ready)
            if judge is not None:
                ok = [(item, made) for item, made in voiced if not isinstance(made, Failure)]
                voiced = [(item, made) for item, made in voiced if isinstance(made, Failure)]
                for (item, _record), made in engine.as_completed(lambda pair: reflect(judge, pair[1], pair[0]), ok):
                    voiced.append((item, made))
            for item, made in voiced:
                yield outcome(item, made)

    job = Job("make-data", "record", items, key=lambda i: i.id, store=output, build=build, work=work)
    report = run_job(job, force=opts.force, progress=opts.progress)
    failed = list(report.failures)
    if failed:
        write_bytes_atomic(failures_file, b"".join(dumps_line(f.to_json()) for f in failed))
    else:
        failures_file.unlink(missing_ok=True)
    summary = MakeDataSummary(
        out=Path(opts.out), asked=len(items), already_done=report.already_done, made=int(report.tally["made"]),
        failed=failed, failures_file=failures_file if failed else None, duplicates=output.duplicates,
        finished=report.complete, final_count=output.final_count, seconds=time.perf_counter() - started,
        requests=counted["requests"],
    )
    if say is not None:
        say(summary.line())
    return summary


class _Counting:
    """A back end that counts the requests it is sent (for the summary line); thread-safe enough for a counter."""

    def __init__(self, backend: Any, counted: dict[str, int]) -> None:
        self.backend, self.counted, self.lock = backend, counted, threading.Lock()

    def complete(self, messages: list[dict[str, str]]) -> str:
        with self.lock:
            self.counted["requests"] += 1
        return self.backend.complete(messages)


def _voice_records(voicer: Any, ready: list[tuple[Item, dict[str, Any]]]) -> list[tuple[Item, dict[str, Any] | Failure]]:
    """Units for every turn of the records (``voice``'s :class:`~reempathy.training.voice.Voicer`); a failure per record."""
    from reempathy.training.voice import VoiceItem

    items = []
    out: list[tuple[Item, dict[str, Any] | Failure]] = []
    for item, record in ready:
        try:
            valid = Record.model_validate(record, context=voicer.context)
        except ValidationError as exc:  # e.g. more text than the backbone's context holds
            out.append((item, Failure(item.id, "speech", describe_record_error(exc))))
            continue
        items.append(VoiceItem(item.id, item.id, record, valid, item.index))
    by_key = {item.id: item for item, _ in ready}
    for vi, done, _ in voicer.voice(items):
        out.append((by_key[vi.key], Failure(vi.key, "speech", done.message) if isinstance(done, BadRecord) else done))
    return out


def _speech_setup(opts: MakeDataOptions, registry: Registry) -> dict[str, Any]:
    """The backbone, layout and TTS for ``--speech`` / ``--reflections``, checked before anything is asked."""
    from reempathy.config import load_config
    from reempathy.runner import load_backbone
    from reempathy.safe_write import check_output_dir
    from reempathy.training.reflect_data import DEFAULT_TEMPLATE, layout_name, parse_layout, read_template, resolve_layout
    from reempathy.training.voice import Voicer, build_tts, load_decoder

    cfg = load_config(opts.config, list(opts.config_overrides), None, registry)
    out: dict[str, Any] = {}
    tts_options = user_options = None
    if opts.speech:
        tts_options = registry.validate("tts", opts.tts, opts.tts_options)
        if opts.user_tts is not None:
            user_options = registry.validate("tts", opts.user_tts, opts.user_tts_options)
        if opts.wav:
            check_output_dir(opts.wav, "--wav")
    elif opts.wav or opts.user_tts:
        raise ConfigError("--wav and --user-tts voice the records: add --speech")
    template = read_template(opts.reflection_template) if opts.reflection_template else DEFAULT_TEMPLATE
    requested = parse_layout(opts.layout) if opts.layout else None
    backbone = load_backbone(cfg, registry)
    out["backbone"] = backbone
    if opts.reflections:
        if not backbone.stream.text_only and not opts.speech:
            raise ConfigError(
                f"--reflections on backbone {backbone.name!r} needs each answer's audio units (its spoken stream interleaves "
                "text and audio, and the reflections follow its spoken chunks): add --speech"
            )
        layout = resolve_layout(backbone, requested, "--layout" if requested else "make-data")
        out.update(layout=layout, reflection_template=template,
                   reflect_identity={"layout": layout_name(layout), "template": template})
    config = cfg.model_dump(mode="json")
    if opts.speech:
        out["speech_identity"] = {
            "backbone": config["backbone"], "checkpoint": str(Path(cfg.decode.checkpoint).resolve()) if cfg.decode.checkpoint else None,
            "tts": {"name": opts.tts, "options": tts_options.model_dump(mode="json")},  # type: ignore[union-attr]
            "user_tts": None if opts.user_tts is None else {"name": opts.user_tts, "options": user_options.model_dump(mode="json")},  # type: ignore[union-attr]
            "wav": str(Path(opts.wav).resolve()) if opts.wav else None,
        }

        def build_voicer() -> Voicer:
            tts = build_tts(registry, opts.tts, tts_options.model_dump(), backbone, "--tts")  # type: ignore[union-attr]
            user = (build_tts(registry, opts.user_tts, user_options.model_dump(), backbone, "--user-tts")  # type: ignore[union-attr]
                    if opts.user_tts else None)
            wav_dir = None
            decoder = None
            if opts.wav:
                decoder = load_decoder(opts.decoder, backbone)
                wav_dir = Path(opts.wav)
                wav_dir.mkdir(parents=True, exist_ok=True)
            return Voicer(backbone, tts, opts.tts, user_tts=user, user_tts_name=opts.user_tts, seed=opts.seed,
                          wav_dir=wav_dir, decoder=decoder, out_dir=Path(opts.out).resolve().parent)

        out["build_voicer"] = build_voicer
    return out


__all__ = [
    "MakeDataOptions", "MakeDataSummary", "Maker", "MadeJsonl", "Failure", "Item", "make_data", "load_templates",
    "check_template", "render", "parse_scenario", "parse_dialogue", "parse_assessment", "parse_rejected", "hints",
    "fingerprint", "transcript", "failures_path", "STEPS", "PLACEHOLDERS", "TOPICS", "EMOTIONS", "TEMPLATE_DIR",
    "LLM_DEFAULTS", "TRANSPORT_OPTIONS",
]

"""``reempathy pairs``: on-policy preference pairs for DPO — N sampled answers per prompt, scored, best against worst.

The path: read and check the prompts (the test-set reader of ``reempathy run``) → load the
checkpoint's backbone and adapter → every prompt not done yet becomes N rows of the batched loop
(:func:`reempathy.decoding.batch.decode_batch`), each with its own plugin objects and its own
seed → when a prompt's N answers are in, the evaluator scores them in one call → the best and the
worst become one training record → appended to the progress file; ``OUT`` is written when every
prompt is done (the one job driver with a :class:`reempathy.jobs.partial.PartialJsonl`).

Where it decides:

- **seeds** (:func:`sample_seed`): sample i of record R samples with
  ``row_seed(sampling.seed, "R#i")``, so the answers do not depend on the batch size, the
  neighbours or an interruption. Greedy decoding is refused (it would give N copies of one answer).
- **usable answers** (:func:`answer_problem`): an answer must be a spoken answer ``reempathy
  train`` can lay out — text or audio units, enough units for its text on the backbone's
  stream, prompt + answer within the context. Others are left out before scoring. An answer
  cut by the token budget (``stop_reason`` ``max_new_tokens``) is used as it is; raise
  ``decode.max_new_tokens`` if that matters. An answer is stored as text and units, so training
  tokenizes its text again; where that gives other tokens than were sampled (rare with a real
  tokenizer, common with the random tiny model's broken UTF-8) the sample says
  ``"retokenized": true`` and the pair trains on the text as re-tokenized.
- **the score** (:func:`score_total`): the sum of the evaluator's scores over its
  ``score_names`` (the four EmpathyEval dimensions for ``empathyeval`` and ``llm-judge``); an
  evaluation with an error or without one of those scores is a failed sample, left out.
- **the pair** (:func:`pick_pair`): chosen = the highest total, rejected = the lowest; among
  equal totals the earlier sample (lower index) is taken. No pair when fewer than two samples are
  usable and scored, or when they all tie. A prompt without a pair is done (a rerun does not
  sample it again) and counted — unless the evaluator failed on some of its samples: then it is
  a failed record, reported with ``FILE:LINE`` and tried again by a rerun; the output is
  finished only without such records, or with ``--skip-bad``.
- **the record** (:func:`pair_record`): the training schema ``reempathy train`` reads for
  ``dpo``, unchanged: the prompt messages then the chosen answer, ``assessment`` (the chosen
  answer's), ``rejected`` (the rejected answer with its own ``assessment``). The four scores are
  written into the assessments only when the evaluator's score names are exactly the four
  EmpathyEval dimensions; then ``preferred_first`` sees the chosen total is the higher one, and
  otherwise it keeps the record's answer as chosen: the same pair either way. Every record is
  built with the DPO builder before it is written, so the file trains as written.
- **prompts**: a record whose prompt is read from a WAV is refused (``FILE:LINE``): a training
  record carries text and units, so the pair would be trained on another prompt than it was
  sampled with. ``[decode] system_prompt`` is written as the first message.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pydantic import ValidationError

from reempathy.backbones.base import Backbone
from reempathy.checkpoints import read_manifest
from reempathy.config import DecodeConfig
from reempathy.decoding.batch import RowRequest, decode_batch, row_seed
from reempathy.registry import Registry
from reempathy.decoding.result import DecodeResult
from reempathy.errors import ConfigError, InputError
from reempathy.evaluation.base import EvalItem, Evaluation
from reempathy.data.testset import DataSet, RunRecord, check_records, read_records, uses_wav
from reempathy.training.builders import build_dpo, prompt_ids, sequence_length, spoken_chunks, stream_layout
from reempathy.data.records import BadRecord, SourcedRecord, bad_records_message
from reempathy.training.evaluator_calls import call_evaluator
from reempathy.jobs.driver import Job, Outcome, run_job
from reempathy.jobs.partial import PartialJsonl
from reempathy.data.schema import SCORE_NAMES, Message, Record

#: ``--set`` keys that go to the decode config (everything else is an evaluator option).
DECODE_TABLES = ("backbone", "strategy", "processors", "sampling", "decode")


# --- the rules ---------------------------------------------------------------------------------


def sample_seed(run_seed: int, record_id: str, index: int) -> int:
    """The sampling seed of answer ``index`` to record ``record_id``."""
    return row_seed(run_seed, f"{record_id}#{index}")


@dataclass(frozen=True)
class NoPair:
    """Why a prompt gave no pair: ``code`` is ``tie`` or ``too-few``; ``text`` says it in words."""

    code: str
    text: str


def pick_pair(totals: Sequence[float | None]) -> tuple[int, int] | NoPair:
    """(chosen, rejected) sample indices from the samples' totals (None: not usable or not scored), or why none."""
    scored = [(i, t) for i, t in enumerate(totals) if t is not None]
    if len(scored) < 2:
        return NoPair("too-few", f"{len(scored)} of {len(totals)} samples usable and scored; a pair needs 2")
    best = max(t for _, t in scored)
    worst = min(t for _, t in scored)
    if best == worst:
        return NoPair("tie", f"all {len(scored)} scored samples have the same total, {best:g}")
    chosen = next(i for i, t in scored if t == best)
    rejected = next(i for i, t in scored if t == worst)
    return chosen, rejected


def score_total(evaluation: Evaluation, names: Sequence[str]) -> float | str:
    """The sum of ``names`` in the evaluation's scores, or why there is none (an error, a missing score)."""
    if evaluation.error:
        return f"the evaluator failed: {evaluation.error}"
    total = 0.0
    for name in names:
        value = evaluation.scores.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return f"the evaluation has no score {name!r}"
        total += float(value)
    return total


def answer_message(result: DecodeResult) -> Message | None:
    """A sampled answer as a training message (text and audio units), None when it has neither."""
    try:
        return Message(role="assistant", text=result.spoken_text or None, units=list(result.audio_units) or None)
    except ValidationError:
        return None


def answer_problem(result: DecodeResult, backbone: Backbone, prompt_len: int, where: str) -> str | None:
    """Why ``reempathy train`` could not use this answer, or None when it can (laid out as the DPO builder does)."""
    message = answer_message(result)
    if message is None:
        return "an empty answer (no spoken text, no audio units)"
    try:
        chunks = spoken_chunks(message, backbone, stream_layout(backbone), where, "sampled answer")
    except InputError as exc:
        return str(exc).removeprefix(f"{where}: ")
    length = prompt_len + sum(len(c) for c in chunks) + 1  # + the stop token
    if length > backbone.max_context:
        return f"prompt and answer are {length} tokens, longer than the backbone's context of {backbone.max_context}"
    return None


def assessment_json(evaluation: Evaluation, names: Sequence[str]) -> dict[str, Any]:
    """The ``assessment`` of a scored answer: the evaluator's text (or its scores in words), the four scores when they are EmpathyEval's."""
    text = " ".join((evaluation.text or "").split())
    if not text:
        text = ", ".join(f"{name} {evaluation.scores[name]:g}" for name in names)
    doc: dict[str, Any] = {"text": text}
    if tuple(sorted(names)) == tuple(sorted(SCORE_NAMES)) and all(1 <= evaluation.scores[n] <= 5 for n in SCORE_NAMES):
        doc["scores"] = {name: evaluation.scores[name] for name in SCORE_NAMES}
    return doc


# --- one prompt's samples ----------------------------------------------------------------------


@dataclass
class Sample:
    """One sampled answer: its index and seed, the result, and its evaluation and total (or why it has none)."""

    index: int
    seed: int
    result: DecodeResult
    evaluation: Evaluation | None = None
    total: float | None = None
    note: str | None = None  # why the sample is not in the running: unusable, or the evaluator failed on it
    retokenized: bool = False  # its text encodes to other tokens than were sampled (training reads the text)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "seed": self.seed, "total": self.total, "stop_reason": self.result.stop_reason,
                "retokenized": self.retokenized, "note": self.note}


def prompt_messages(record: RunRecord, system_prompt: str | None) -> list[dict[str, Any]]:
    """The record's prompt as training messages (role, text, units), with the config's system prompt first."""
    out = []
    if system_prompt and record.prompt[0].role != "system":
        out.append({"role": "system", "text": system_prompt})
    for m in record.prompt:
        out.append({k: v for k, v in (("role", m.role), ("text", m.text), ("units", m.units)) if v is not None})
    return out


def pair_record(
    record: RunRecord, system_prompt: str | None, samples: Sequence[Sample], chosen: int, rejected: int,
    evaluator: str, names: Sequence[str],
) -> dict[str, Any]:
    """The training record of one pair (module docstring); ``sampled`` keeps every sample's seed, total and note."""
    good, bad = samples[chosen], samples[rejected]

    def answer(sample: Sample) -> dict[str, Any]:
        message = answer_message(sample.result)
        assert message is not None  # a scored sample was usable
        return {k: v for k, v in (("role", "assistant"), ("text", message.text), ("units", message.units)) if v is not None}

    rejected_doc = answer(bad)
    rejected_doc["assessment"] = assessment_json(bad.evaluation, names)  # type: ignore[arg-type]
    return {
        "id": record.id,
        "messages": prompt_messages(record, system_prompt) + [answer(good)],
        "assessment": assessment_json(good.evaluation, names),  # type: ignore[arg-type]
        "rejected": rejected_doc,
        "sampled": {"evaluator": evaluator, "score_names": list(names), "chosen": chosen, "rejected": rejected,
                    "samples": [s.to_json() for s in samples]},
    }


# --- the command -------------------------------------------------------------------------------


@dataclass
class PairsOptions:
    """What ``pairs`` was asked to do (the command line, parsed); the checkpoint is the config's ``decode.checkpoint``."""

    data: str
    out: str
    samples: int
    evaluator: str
    evaluator_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    skip_bad: bool = False
    force: bool = False
    progress: bool | None = None  # None: a bar on a terminal only


@dataclass
class PairsSummary:
    """What one invocation did."""

    out: Path
    prompts: int
    samples: int
    already_done: int
    pairs: int  # made in this invocation
    no_pair: dict[str, int]  # prompts without a pair in this invocation, by NoPair.code
    unusable: int  # samples left out as answers training cannot use
    failed: list[BadRecord]
    finished: bool
    final_count: int | None
    seconds: float

    def line(self) -> str:
        """The summary line printed at the end."""
        parts = [f"pairs: {self.prompts} prompts x {self.samples} samples: {self.pairs} pairs made"
                 + (f" ({self.already_done} prompts done before)" if self.already_done else "") + f" in {self.seconds:.1f} s"]
        if self.no_pair:
            words = {"tie": "all samples tied", "too-few": "fewer than 2 usable, scored samples"}
            parts.append(f"no pair for {sum(self.no_pair.values())} ("
                         + ", ".join(f"{words.get(k, k)} {v}" for k, v in sorted(self.no_pair.items())) + ")")
        if self.unusable:
            parts.append(f"{self.unusable} sampled answers unusable for training, left out")
        if self.failed:
            parts.append(f"{len(self.failed)} prompts failed in the evaluator (first: {self.failed[0]})")
        if self.finished:
            parts.append(f"wrote {self.final_count} pairs to {self.out}")
        return "; ".join(parts)


def make_pairs(
    cfg: DecodeConfig, registry: Registry, opts: PairsOptions, say: Callable[[str], None] | None = None
) -> PairsSummary:
    """Sample, score and pair every prompt of ``opts.data`` with the policy of ``cfg.decode.checkpoint`` (module docstring)."""
    from reempathy.evaluation.registry import build_evaluator, evaluator_options
    from reempathy.runner import build_plugins, load_backbone, loop_options, run_config

    started = time.perf_counter()
    if isinstance(opts.samples, bool) or not isinstance(opts.samples, int) or opts.samples < 2:
        raise ConfigError(f"--samples must be at least 2 (a pair needs two answers), got {opts.samples!r}")
    cfg = run_config(cfg)
    if not cfg.decode.checkpoint:
        raise ConfigError("pairs samples the policy of a checkpoint: give --checkpoint DIR (written by `reempathy train`)")
    if cfg.sampling.greedy:
        raise ConfigError(
            "pairs samples several answers per prompt, and greedy decoding gives the same answer every time: "
            "set sampling.greedy = false"
        )
    options = loop_options(cfg)
    registry.get("evaluator", opts.evaluator)
    validated = evaluator_options(registry, opts.evaluator, opts.evaluator_options).model_dump(mode="json")
    data = read_records(opts.data)
    manifest = read_manifest(cfg.decode.checkpoint)
    config = cfg.model_dump(mode="json")
    config["decode"]["checkpoint"] = str(Path(cfg.decode.checkpoint).resolve())
    identity = {
        "data": {"path": str(Path(data.path).resolve()), "sha256": data.sha256},
        "checkpoint": {"path": config["decode"]["checkpoint"], "created": manifest.created, "steps": manifest.steps},
        "config": config,
        "samples": opts.samples,
        "evaluator": {"name": opts.evaluator, "options": validated},
    }
    if isinstance(opts.batch_size, bool) or not isinstance(opts.batch_size, int) or opts.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {opts.batch_size!r}")
    output = PartialJsonl(opts.out, identity, "pairs", [("--data", opts.data)], skip_bad=opts.skip_bad)
    loaded: dict[str, Any] = {}

    def build() -> Any:
        """The policy and the evaluator — before anything is written (a model to load, options a factory may refuse)."""
        backbone = load_backbone(cfg, registry)
        decode_batch(backbone, (), options, opts.batch_size)  # refuses loop settings it cannot run; starts nothing
        loaded["ready"] = trainable_prompts(data, backbone, cfg.decode.system_prompt)
        evaluator = build_evaluator(registry, opts.evaluator, opts.evaluator_options)
        names = tuple(evaluator.score_names)
        if not names:
            raise ConfigError(f"evaluator {opts.evaluator!r} gives no scores (its score_names are empty); "
                              "pairs ranks answers by their scores: use a scoring evaluator such as llm-judge")
        return backbone, evaluator, names

    def work(worker: Any, todo: list[RunRecord]) -> Iterator[Outcome]:
        backbone, evaluator, names = worker
        ready, system_prompt = loaded["ready"], cfg.decode.system_prompt

        def requests() -> Iterator[RowRequest]:
            for record in todo:
                inputs = ready[record.index]
                for i in range(opts.samples):
                    strategy, processors = build_plugins(cfg, backbone, registry)
                    yield RowRequest(key=(record.id, i), prompt_ids=inputs.ids, strategy=strategy,
                                     processors=processors, seed=sample_seed(cfg.sampling.seed, record.id, i))

        by_id = {r.id: r for r in todo}
        results: dict[str, dict[int, DecodeResult]] = {}
        for (record_id, i), result in decode_batch(backbone, requests(), options, opts.batch_size):
            got = results.setdefault(record_id, {})
            got[i] = result
            if len(got) < opts.samples:
                continue
            record = by_id[record_id]
            samples = [Sample(j, sample_seed(cfg.sampling.seed, record_id, j), got[j]) for j in range(opts.samples)]
            del results[record_id]
            entry, failure = _pair_one(record, samples, backbone, ready[record.index].ids, system_prompt,
                                       evaluator, opts.evaluator, names)
            tally = {"unusable": sum(1 for s in samples if s.note is not None and s.evaluation is None)}
            if failure is not None:
                yield Outcome(record.id, failure=failure, tally=tally)
            elif entry["record"] is not None:
                yield Outcome(record.id, entry, tally={**tally, "made": 1})
            else:
                yield Outcome(record.id, entry, tally={**tally, f"no_pair:{entry['no_pair']}": 1})

    report = run_job(Job("pairs", "prompt", data.records, key=lambda r: r.id, store=output, build=build, work=work),
                     force=opts.force, progress=opts.progress)
    summary = PairsSummary(
        out=Path(opts.out), prompts=len(data.records), samples=opts.samples, already_done=report.already_done,
        pairs=int(report.tally["made"]), unusable=int(report.tally["unusable"]), failed=report.failures,
        no_pair={k.split(":", 1)[1]: int(v) for k, v in report.tally.items() if k.startswith("no_pair:")},
        finished=report.complete, final_count=output.final_count, seconds=time.perf_counter() - started,
    )
    if say is not None:
        say(summary.line())
    return summary


def _pair_one(
    record: RunRecord, samples: list[Sample], backbone: Backbone, prompt: list[int], system_prompt: str | None,
    evaluator: Any, name: str, names: Sequence[str],
) -> tuple[dict[str, Any], BadRecord | None]:
    """Score one prompt's samples and pick its pair: (progress entry, None), or (_, the failure) when the evaluator failed."""
    usable = []
    for s in samples:
        text = s.result.spoken_text
        s.retokenized = bool(text) and list(backbone.tokenizer.encode(text, add_special_tokens=False)) != list(s.result.spoken_text_ids)
        s.note = answer_problem(s.result, backbone, len(prompt), record.where)
        if s.note is None:
            usable.append(s)
    if usable:
        items = [EvalItem(id=f"{record.id}#{s.index}", messages=[m.to_json() for m in record.prompt],
                          answer_text=s.result.spoken_text, answer_units=list(s.result.audio_units)) for s in usable]
        for s, evaluation in zip(usable, call_evaluator(evaluator, name, items)):
            s.evaluation = evaluation
            total = score_total(evaluation, names)
            if isinstance(total, str):
                s.note = total
            else:
                s.total = total
    entry: dict[str, Any] = {"id": record.id, "line": record.line, "record": None}
    choice = pick_pair([s.total for s in samples])
    if isinstance(choice, NoPair):
        errors = [s for s in samples if s.evaluation is not None and s.total is None]
        if errors:
            first = errors[0]
            return entry, BadRecord(record.where, f"no pair: sample {first.index}: {first.note}"
                                    + (f" (and {len(errors) - 1} more samples)" if len(errors) > 1 else ""))
        entry.update(no_pair=choice.code, reason=choice.text, samples=[s.to_json() for s in samples])
        return entry, None
    doc = pair_record(record, system_prompt, samples, choice[0], choice[1], name, names)
    _check_trains(doc, backbone, record.where)
    entry["record"] = doc
    return entry, None


def _check_trains(doc: dict[str, Any], backbone: Backbone, where: str) -> None:
    """Build ``doc`` with the DPO builder, as ``reempathy train`` will: the pair must come out as written."""
    record = Record.model_validate(doc, context={"audio_count": backbone.layout.audio_count or None})
    pair = build_dpo(SourcedRecord(where, record), backbone)
    if pair is None or pair.swapped or sequence_length(pair) > backbone.max_context:
        raise InputError(f"{where}: the pair written for this record would not train as written; please report this")


def trainable_prompts(data: DataSet, backbone: Backbone, system_prompt: str | None) -> dict[int, Any]:
    """Every record's prompt as it is sampled, by record index, after checking that training reads it the same.

    ``FILE:LINE`` for each record whose prompt is read from a WAV (a training record carries
    text and units only) or that training would tokenize differently.
    """
    wav = [BadRecord(r.where, "the prompt is read from a WAV ('audio'), which a training record does not carry; give "
                     "the turn's units (reempathy speech tokenize) or its text instead")
           for r in data.records if uses_wav(r, backbone)]
    if wav:
        raise InputError(bad_records_message(data.path, wav, "fix them and run again"))
    ready = check_records(data, backbone, system_prompt)
    bad: list[BadRecord] = []
    for record in data.records:
        messages = prompt_messages(record, system_prompt) + [{"role": "assistant", "text": "x"}]
        try:
            training = prompt_ids(SourcedRecord(record.where, Record.model_validate({"messages": messages})), backbone)
        except (InputError, ValidationError) as exc:
            bad.append(BadRecord(record.where, str(exc).removeprefix(f"{record.where}: ")))
            continue
        if training != ready[record.index].ids:
            bad.append(BadRecord(record.where, "training would read this prompt differently from how it is sampled "
                                 f"({len(training)} vs {len(ready[record.index].ids)} tokens); give text or units only"))
    if bad:
        raise InputError(bad_records_message(data.path, bad, "fix them and run again"))
    return ready



__all__ = [
    "PairsOptions",
    "PairsSummary",
    "NoPair",
    "Sample",
    "make_pairs",
    "pick_pair",
    "score_total",
    "sample_seed",
    "answer_problem",
    "assessment_json",
    "pair_record",
    "trainable_prompts",
    "DECODE_TABLES",
]

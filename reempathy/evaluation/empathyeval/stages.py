"""EmpathyEval's training stages: what ``ser``, ``caption`` and ``empathy`` each read, train and report.

The paper trains its evaluator in three stages before it scores anything: speech emotion
recognition, then audio captioning, then the empathy data. A training config lists them as
``[[stages]]`` (docs/evaluation.md); :func:`parse_stages` checks the list and
:mod:`reempathy.evaluation.empathyeval.train` runs it, each stage starting from the adapter the
one before it wrote. What differs between the kinds is all here, one :class:`Kind` each:

- ``ser``: one heard clip → a label of ``labels``; a classification head (one linear layer on the
  pooled states, as the score heads) under cross-entropy; validation **accuracy**.
- ``caption``: one heard clip → its caption; LM loss on the caption; validation **lm_loss** (mean
  cross-entropy per caption token, and its perplexity).
- ``empathy``: today's training — a dialogue → its assessment text and four scores; LM loss +
  score MSE; validation **LCC / SRCC / MSE**.

Every kind uses the evaluator's one prompt layout (:func:`reempathy.evaluation.empathyeval.prompt.encode_dialogue`),
so what the early stages teach the adapter is seen the same way by the last.

Where it decides:

- **the order** (:func:`parse_stages`): kinds go ``ser`` → ``caption`` → ``empathy``, each at most
  once, and the chain ends with ``empathy`` (its heads are what scores); anything else is a
  one-line ConfigError before any model is loaded.
- **labels** (:func:`read_clips`): a ``ser`` record's label must be one of the stage's ``labels``;
  one that is not is an InputError naming ``FILE line N`` (or skipped with ``skip_bad``), found
  before any model is loaded.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from reempathy.data.schema import parse_units
from reempathy.errors import ConfigError, InputError

KINDS = ("ser", "caption", "empathy")
"""The stage kinds, in the only order they may come."""
SER_TASK = "What emotion does the speaker's voice express? Answer with one word."
CAPTION_TASK = "Describe this audio: who speaks, how they sound, and what can be heard."


class StageConfig(BaseModel):
    """One ``[[stages]]`` table: its kind, its data, and the ``[train]`` settings it overrides."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    data: str = Field(description="the stage's JSONL (formats: docs/evaluation.md)")
    validation: str | None = Field(None, description="a separate JSONL of held-out records")
    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="else hold out this share of data (seeded)")
    skip_bad: bool = False
    labels: list[str] | None = Field(None, description="ser: the label set, in the order of the head's outputs")
    task: str | None = Field(None, description="the task line of the prompt (default: the kind's own)")
    max_steps: int | None = Field(None, ge=1, lt=2**31)
    learning_rate: float | None = Field(None, gt=0.0, le=10.0)
    heads_learning_rate: float | None = Field(None, gt=0.0, le=10.0)
    batch_size: int | None = Field(None, ge=1, le=65536)
    save_steps: int | None = Field(None, ge=1, lt=2**31)
    lm_weight: float | None = Field(None, ge=0.0, description="empathy: weight of the LM loss (default [train]'s)")
    score_weight: float | None = Field(None, ge=0.0, description="empathy: weight of the score MSE (default [train]'s)")

    @model_validator(mode="after")
    def _fits_the_kind(self) -> "StageConfig":
        if self.kind == "ser":
            labels = self.labels or []
            if len(labels) < 2 or len(set(labels)) != len(labels) or not all(isinstance(x, str) and x.strip() for x in labels):
                raise ValueError("a ser stage needs labels = [\"...\", \"...\"]: at least two different, non-empty labels")
        elif self.labels is not None:
            raise ValueError(f"labels is for a ser stage, not {self.kind}")
        if self.kind != "empathy" and (self.lm_weight is not None or self.score_weight is not None):
            raise ValueError(f"lm_weight and score_weight are for the empathy stage, not {self.kind}")
        return self


def parse_stages(raw: Any, where: str) -> list[StageConfig]:
    """The ``[[stages]]`` list, checked: known kinds, in order, each once, ending with ``empathy``; one-line errors."""
    if not isinstance(raw, list) or not raw or not all(isinstance(s, dict) for s in raw):
        raise ConfigError(f"{where}: stages must be a list of tables: [[stages]] kind = \"ser\" | \"caption\" | \"empathy\"")
    stages = []
    for n, table in enumerate(raw, start=1):
        kind = table.get("kind")
        if kind not in KINDS:
            raise ConfigError(
                f"{where}: stage {n}: unknown kind {kind!r}; the kinds are {', '.join(KINDS)} (in that order)"
            )
        try:
            stages.append(StageConfig.model_validate(table))
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                raise ConfigError(f"{where}: stage {n} ({kind}): unknown key {loc!r}; valid keys: "
                                  f"{', '.join(sorted(StageConfig.model_fields))}") from None
            if err["type"] == "missing":
                raise ConfigError(f"{where}: stage {n} ({kind}): key {loc!r} is required") from None
            msg = err["msg"].removeprefix("Value error, ")
            raise ConfigError(f"{where}: stage {n} ({kind}): {loc + ': ' if loc else ''}{msg}") from None
    for n in range(1, len(stages)):
        before, here = stages[n - 1].kind, stages[n].kind
        if KINDS.index(here) <= KINDS.index(before):
            raise ConfigError(
                f"{where}: stage {n + 1} ({here}) comes after stage {n} ({before}); stages go "
                f"{' -> '.join(KINDS)}, each at most once"
            )
    if stages[-1].kind != "empathy":
        raise ConfigError(
            f"{where}: the last stage is {stages[-1].kind}, but the chain must end with the empathy stage "
            "(its score heads are what the evaluator scores with): add [[stages]] kind = \"empathy\""
        )
    return stages


# --- the clip data of ser and caption --------------------------------------------------------------


class ClipRecord(BaseModel):
    """One line of a ser or caption JSONL: a heard clip (``audio`` WAV or ``units``), and its ``label`` or ``caption``."""

    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    audio: str | None = None
    units: list[int] | None = None
    text: str | None = None
    label: str | None = None
    caption: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _units(cls, value: Any) -> Any:
        if isinstance(value, dict) and "units" in value:
            value = dict(value, units=parse_units(value["units"]))
        return value

    @model_validator(mode="after")
    def _heard(self) -> "ClipRecord":
        if not self.audio and not self.units:
            raise ValueError("a clip needs audio (a WAV path) or units to be heard")
        return self


@dataclass
class Clip:
    """A clip record as read: its line, WAV path (resolved) or units, and its target."""

    line: int
    id: str
    audio: str | None
    units: list[int] | None
    text: str | None
    target: str


@dataclass
class ClipSet:
    """The clips of one file and the bad lines skipped."""

    clips: list[Clip] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def read_clips(path: str | Path, kind: str, labels: Sequence[str] | None, skip_bad: bool) -> ClipSet:
    """A ser (``label``) or caption (``caption``) JSONL; a bad line is an InputError naming it (or skipped)."""
    from reempathy.evaluation.runs import read_jsonl

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{kind} data file {str(p)!r} not found; give a JSONL of clips (docs/evaluation.md)")
    out = ClipSet()
    target_key = "label" if kind == "ser" else "caption"
    for n, obj in read_jsonl(p, f"{kind} data file"):
        problem = None
        try:
            rec = ClipRecord.model_validate(obj)
        except ValidationError as exc:
            err = exc.errors()[0]
            problem = f"{'.'.join(map(str, err['loc'])) or 'record'}: {err['msg'].removeprefix('Value error, ')}"
        else:
            target = getattr(rec, target_key)
            if not target or not target.strip():
                problem = f"no {target_key!r}"
            elif kind == "ser" and target not in (labels or ()):
                problem = f"label {target!r} is not in the ser stage's labels ({', '.join(labels or ())}); add it to labels or fix the record"
        if problem is not None:
            reason = f"{p} line {n}: {problem}"
            if skip_bad:
                out.skipped.append(reason)
                continue
            raise InputError(reason + " (or set the stage's skip_bad = true)")
        audio = None
        if rec.audio:
            q = Path(rec.audio)
            audio = str(q if q.is_absolute() else p.parent / q)
        out.clips.append(Clip(n, rec.id or str(n), audio, rec.units, rec.text, target.strip()))
    if not out.clips:
        raise InputError(f"{kind} data file {str(p)!r} holds no usable records")
    return out


def split(records: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(training, validation): ``fraction`` of the records held out, chosen with ``seed``."""
    if fraction <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(fraction * len(records))))
    val = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]


# --- the models of ser and caption ------------------------------------------------------------------


class SerModel(nn.Module):
    """The thinker (LoRA-wrapped) and a classification head on the pooled states; cross-entropy on the labels."""

    def __init__(self, thinker: Any, hidden_size: int, labels: Sequence[str]) -> None:
        super().__init__()
        self.thinker = thinker
        self.labels = tuple(labels)
        self.classifier = nn.Linear(hidden_size, len(self.labels))
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pool_mask: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        """``logits`` ``[batch, labels]``; with ``class_labels`` also ``loss`` (cross-entropy)."""
        from reempathy.evaluation.empathyeval.model import masked_mean

        kwargs = {}
        if input_features is not None:
            kwargs = {"input_features": input_features, "feature_attention_mask": feature_attention_mask}
        out = self.thinker(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False, **kwargs)
        pooled = masked_mean(out.hidden_states[-1], pool_mask)
        logits = self.classifier(pooled.to(self.classifier.weight.dtype)).float()
        result = {"logits": logits}
        if class_labels is not None:
            result["loss"] = nn.functional.cross_entropy(logits, class_labels)
        return result


class CaptionModel(nn.Module):
    """The thinker (LoRA-wrapped) writing the caption: next-token cross-entropy on the caption tokens."""

    def __init__(self, thinker: Any) -> None:
        super().__init__()
        self.thinker = thinker

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        """``loss``: the mean cross-entropy over the caption's tokens."""
        from reempathy.evaluation.empathyeval.model import lm_loss

        kwargs = {}
        if input_features is not None:
            kwargs = {"input_features": input_features, "feature_attention_mask": feature_attention_mask}
        out = self.thinker(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        return {"loss": lm_loss(out.logits, labels)}


# --- what each kind does ----------------------------------------------------------------------------


@dataclass
class ClipExample:
    """A ser or caption example: the batchable example and, for ser, the label's index."""

    example: Any
    label: int | None = None


def clip_examples(omni: Any, clips: Sequence[Clip], audio: Any, kind: str, labels: Sequence[str] | None,
                  task: str | None, progress: bool, what: str) -> list[ClipExample]:
    """The clips heard (WAV, or units through the speech decoder) in the evaluator's prompt, with their targets."""
    from tqdm import tqdm

    from reempathy.evaluation.empathyeval.prompt import Example, HeardTurn, encode_dialogue, target_ids

    out = []
    for clip in tqdm(clips, desc=f"preparing {what}", disable=not progress, unit="clip"):
        turn = HeardTurn("user", clip.text, audio.waveform(clip.audio, clip.units))
        ids, waves, start = encode_dialogue(omni, [turn], task or (SER_TASK if kind == "ser" else CAPTION_TASK))
        if kind == "ser":
            out.append(ClipExample(Example(ids, waves, [], None, start), list(labels or ()).index(clip.target)))
        else:
            out.append(ClipExample(Example(ids, waves, target_ids(omni, clip.target), None, start)))
    return out


def collate_clips(omni: Any, batch: Sequence[ClipExample], kind: str) -> dict[str, torch.Tensor]:
    """The batch tensors of ser (with ``class_labels``) or caption examples."""
    from reempathy.evaluation.empathyeval.prompt import collate

    out = collate(omni, [b.example for b in batch], with_targets=kind == "caption")
    if kind == "ser":
        out["class_labels"] = torch.tensor([b.label for b in batch], dtype=torch.long)
    return out


@torch.no_grad()
def ser_accuracy(model: SerModel, omni: Any, examples: Sequence[ClipExample], device: Any) -> dict[str, Any]:
    """Share of held-out clips whose most likely label is theirs, with the count per label."""
    right = 0
    per: dict[str, list[int]] = {label: [0, 0] for label in model.labels}
    for ex in examples:
        batch = {k: v.to(device) for k, v in collate_clips(omni, [ex], "ser").items()}
        batch.pop("class_labels")
        guess = int(model(**batch)["logits"].argmax(dim=-1)[0])
        truth = model.labels[int(ex.label)]  # type: ignore[arg-type]
        per[truth][1] += 1
        if guess == ex.label:
            right += 1
            per[truth][0] += 1
    return {"accuracy": right / len(examples), "records": len(examples),
            "per_label": {k: {"right": v[0], "of": v[1]} for k, v in per.items() if v[1]}}


@torch.no_grad()
def caption_loss(model: CaptionModel, omni: Any, examples: Sequence[ClipExample], device: Any) -> dict[str, Any]:
    """Mean cross-entropy per caption token over the held-out clips (teacher-forced), and its perplexity."""
    total, tokens = 0.0, 0
    for ex in examples:
        batch = {k: v.to(device) for k, v in collate_clips(omni, [ex], "caption").items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch)["loss"]) * n
        tokens += n
    mean = total / max(1, tokens)
    return {"lm_loss": mean, "perplexity": math.exp(min(mean, 50.0)), "records": len(examples), "tokens": tokens}


def metric_line(kind: str, validation: dict[str, Any] | None) -> str:
    """The one-line report of a stage's validation."""
    if not validation:
        return "no validation records"
    if kind == "ser":
        return f"validation accuracy {validation['accuracy']:.3f} on {validation['records']} records"
    if kind == "caption":
        return (f"validation caption loss {validation['lm_loss']:.4f} per token (perplexity {validation['perplexity']:.1f}) "
                f"on {validation['records']} records")
    overall = validation.get("overall") or {}

    def shown(key: str) -> str:
        value = overall.get(key)
        return "n/a" if value is None else f"{value:.3f}"

    return f"validation overall LCC {shown('lcc')}, SRCC {shown('srcc')}, MSE {shown('mse')}"


__all__ = [
    "KINDS", "SER_TASK", "CAPTION_TASK", "StageConfig", "parse_stages", "ClipRecord", "Clip", "ClipSet", "read_clips",
    "split", "SerModel", "CaptionModel", "ClipExample", "clip_examples", "collate_clips", "ser_accuracy", "caption_loss",
    "metric_line",
]

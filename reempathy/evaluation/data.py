"""Labelled dialogues for training an evaluator and for checking one against human scores.

One JSON object per line; the last message is the answer being assessed::

    {"id": "a1",
     "messages": [{"role": "user", "text": "...", "units": [..], "audio": "clips/a1-user.wav", "caption": "..."},
                  {"role": "assistant", "text": "...", "units": [..], "audio": "clips/a1-answer.wav"}],
     "assessment": {"text": "The user needs ...", "scores": {"need_support": 4, "wording_appropriateness": 3,
                                                           "emotion_understanding": 4, "emotional_support": 3}}}

``scores`` may also stand at the top level (human MOS files), with any score names (those of the
evaluator being checked); the assessment's scores are the four EmpathyEval dimensions, 1–5. Audio paths are relative to the
file's directory. Unknown keys are ignored, so the training dataset of ``reempathy train`` (which
has the same shape) can be used as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from reempathy.errors import InputError
from reempathy.evaluation.base import EvalItem
from reempathy.evaluation.runs import read_jsonl
from reempathy.data.schema import Scores, parse_units


class EvalMessage(BaseModel):
    """A turn: role and any of text, units, a WAV path, a paralinguistic caption."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["user", "assistant", "system"]
    text: str | None = None
    units: list[int] | None = None
    audio: str | None = None
    caption: str | None = None

    @field_validator("units", mode="before")
    @classmethod
    def _units(cls, value: Any) -> list[int] | None:
        return parse_units(value)

    @model_validator(mode="after")
    def _content(self) -> "EvalMessage":
        if not (self.text or self.units or self.audio):
            raise ValueError(f"a {self.role} message needs text, units or audio")
        return self


class EvalAssessment(BaseModel):
    """The reference assessment text and/or the four scores."""

    model_config = ConfigDict(extra="ignore")
    text: str | None = None
    scores: Scores | None = None


class EvalRecord(BaseModel):
    """One labelled dialogue (see the module docstring)."""

    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    messages: list[EvalMessage] = Field(min_length=2)
    assessment: EvalAssessment | None = None
    scores: dict[str, float] | None = Field(None, description="human scores by name (any evaluator's names)")

    @model_validator(mode="after")
    def _answer_last(self) -> "EvalRecord":
        if self.messages[-1].role != "assistant":
            raise ValueError("the last message must be the assistant's answer that is assessed")
        return self

    def human_scores(self) -> dict[str, float] | None:
        """Top-level ``scores``, else the assessment's four scores, else None."""
        if self.scores:
            return dict(self.scores)
        s = self.assessment.scores if self.assessment else None
        return s.model_dump() if s is not None else None


@dataclass
class Labelled:
    """An ``EvalItem`` with its reference assessment text and scores (either may be None)."""

    item: EvalItem
    assessment: str | None
    scores: dict[str, float] | None
    line: int = 0


@dataclass
class LabelledSet:
    """The records read, and the bad ones skipped (line: reason)."""

    records: list[Labelled] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _path(base: Path, p: str | None) -> str | None:
    if not p:
        return None
    q = Path(p)
    return str(q if q.is_absolute() else base / q)


def load_labelled(path: str | Path, skip_bad: bool = False) -> LabelledSet:
    """Read a labelled JSONL; a bad record is an ``InputError`` naming its line (or skipped with ``skip_bad``)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"data file {str(p)!r} not found; give a JSONL of dialogues (docs/evaluation.md)")
    out = LabelledSet()
    for n, obj in read_jsonl(p, "data file"):
        try:
            rec = EvalRecord.model_validate(obj)
        except ValidationError as exc:
            err = exc.errors()[0]
            reason = f"{p} line {n}: {'.'.join(map(str, err['loc'])) or 'record'}: {err['msg']}"
            if skip_bad:
                out.skipped.append(reason)
                continue
            raise InputError(reason + " (set skip_bad to skip bad records)") from None
        *prompt, answer = rec.messages
        item = EvalItem(
            id=rec.id or str(n),
            messages=[dict(m.model_dump(exclude_none=True), audio=_path(p.parent, m.audio)) for m in prompt],
            answer_text=answer.text or "",
            answer_units=list(answer.units or []),
            answer_wav=_path(p.parent, answer.audio),
        )
        for m in item.messages:
            if m.get("audio") is None:
                m.pop("audio", None)
        out.records.append(Labelled(item, rec.assessment.text if rec.assessment else None, rec.human_scores(), n))
    if not out.records:
        raise InputError(f"data file {str(p)!r} holds no usable records")
    return out


__all__ = ["EvalRecord", "EvalMessage", "EvalAssessment", "Labelled", "LabelledSet", "load_labelled"]

"""The dataset record: OpenS2S-style messages with text and audio units, an EmpathyEval assessment, a rejected answer.

One JSON object per line::

    {"messages": [{"role": "user", "text": "...", "units": [12, 7, ...]},
                  {"role": "assistant", "text": "...", "units": "<|audio_3|><|audio_9|>..."}],
     "assessment": {"text": "...", "scores": {"need_support": 4, "wording_appropriateness": 3,
                                              "emotion_understanding": 4, "emotional_support": 3}},
     "rejected": {"role": "assistant", "text": "...", "units": [...], "assessment": {...}},
     "reflections": ["...", "..."], "reflections_layout": "5+10"}

``reflections`` (optional) are per-chunk reflections for ``reempathy``: the k-th follows the k-th
full spoken chunk of the answer in the training layout (so a record carries them for one
layout and one tokenizer). ``reflections_layout`` (optional, e.g. ``"5+10"``) names that layout:
training with another one then splits the assessment instead. Without reflections the
assessment is split into reflections (:mod:`reempathy.training.reflections`).

Keys this schema does not name are ignored, so records carrying more fields (audio paths, ids)
load as they are. Audio units are checked against the backbone's range when the caller passes
``audio_count`` in the validation context, and the record's text against what the context can
hold when it passes ``max_text_chars`` (see :func:`reempathy.data.records.load_records`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

_AUDIO_TOKEN = re.compile(r"<\|audio_(\d+)\|>")
_AUDIO_STRING = re.compile(r"^(\s*<\|audio_\d+\|>)*\s*$")

SCORE_NAMES = ("need_support", "wording_appropriateness", "emotion_understanding", "emotional_support")


def parse_units(value: Any) -> list[int] | None:
    """Units as a list of ints from a list or a ``<|audio_N|>…`` string; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        if not _AUDIO_STRING.match(value):
            raise ValueError("a units string must be <|audio_N|> tokens only, e.g. \"<|audio_12|><|audio_7|>\"")
        return [int(m) for m in _AUDIO_TOKEN.findall(value)]
    if isinstance(value, list):
        if not all(isinstance(u, int) and not isinstance(u, bool) for u in value):
            raise ValueError("units must be a list of integers")
        return list(value)
    raise ValueError(f"units must be a list of integers or a <|audio_N|> string, not {type(value).__name__}")


class Scores(BaseModel):
    """EmpathyEval's four scores, each on the 1–5 scale (numbers: ``true`` or ``"4"`` is not a score)."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    need_support: float = Field(ge=1, le=5)
    wording_appropriateness: float = Field(ge=1, le=5)
    emotion_understanding: float = Field(ge=1, le=5)
    emotional_support: float = Field(ge=1, le=5)

    def total(self) -> float:
        """Sum of the four scores: what DPO compares to pick the chosen answer."""
        return self.need_support + self.wording_appropriateness + self.emotion_understanding + self.emotional_support


class Assessment(BaseModel):
    """A descriptive assessment of an answer and, optionally, its scores."""

    model_config = ConfigDict(extra="ignore")

    text: str = Field(min_length=1)
    scores: Scores | None = None


class Message(BaseModel):
    """One turn: its role and its content as text, audio units, or both."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["user", "assistant", "system"]
    text: str | None = None
    units: list[int] | None = None

    @field_validator("units", mode="before")
    @classmethod
    def _parse_units(cls, value: Any) -> list[int] | None:
        return parse_units(value)

    @field_validator("units")
    @classmethod
    def _units_in_range(cls, value: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if value is None:
            return None
        count = (info.context or {}).get("audio_count")
        for u in value:
            if u < 0 or (count is not None and u >= count):
                upper = f"0..{count - 1}" if count is not None else "0 and up"
                raise ValueError(f"audio unit {u} is outside the backbone's range {upper}")
        return value

    @model_validator(mode="after")
    def _has_content(self) -> "Message":
        if not self.text and not self.units:
            raise ValueError(f"a {self.role} message needs text or units")
        return self


class Answer(Message):
    """A rejected assistant answer for DPO; it may carry its own assessment."""

    role: Literal["assistant"] = "assistant"
    assessment: Assessment | None = None


class Record(BaseModel):
    """One training dialogue: the messages, the assessment of the last answer, an optional rejected answer
    and optional per-chunk reflections."""

    model_config = ConfigDict(extra="ignore")

    messages: list[Message] = Field(min_length=1)
    assessment: Assessment | None = None
    rejected: Answer | None = None
    reflections: list[str] | None = Field(
        None, description="per-chunk reflections: the k-th follows the k-th full spoken chunk of the answer"
    )
    reflections_layout: str | None = Field(
        None,
        pattern=r"^\d+\+\d+$",
        description='the chunk layout the reflections were written for, "TEXT+AUDIO" (e.g. "5+10"); training with '
        "another layout splits the assessment instead",
    )

    @field_validator("reflections")
    @classmethod
    def _reflections_have_text(cls, value: list[str] | None) -> list[str] | None:
        for k, text in enumerate(value or [], start=1):
            if not text.strip():
                raise ValueError(f"reflection {k} is empty; write what the model thinks after chunk {k}")
        return value

    @model_validator(mode="after")
    def _fits_the_context(self, info: ValidationInfo) -> "Record":
        # Checked on the text, before anything is tokenized: a 64 MB answer would take minutes to
        # tokenize only to be refused as too long. The limit is Backbone.max_text_chars.
        limit = (info.context or {}).get("max_text_chars")
        if limit is None:
            return self
        before = sum(len(m.text or "") for m in self.messages[:-1])
        chosen = before + len(self.messages[-1].text or "") + sum(map(len, self.reflections or ()))
        chosen += len(self.assessment.text) if self.assessment else 0
        rejected = before + len(self.rejected.text or "") if self.rejected else 0
        longest = max(chosen, rejected)
        if longest > limit:
            raise ValueError(
                f"the record's text is {longest:,} characters, more than the backbone's context can hold "
                f"(at most {limit:,} characters, checked before tokenizing); shorten it"
            )
        return self


__all__ = ["Record", "Message", "Answer", "Assessment", "Scores", "SCORE_NAMES", "parse_units"]

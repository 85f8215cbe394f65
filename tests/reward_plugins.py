"""A user's own reward, as a plugin: the share of spoken words from a target list (a synthetic reward for tests).

``TargetWords`` is an ordinary evaluator (``score_names = ("share",)``) registered with a ``reward``
field, so on-policy training takes its score as the reward without any change to the trainer. The
target list is every whole word the tiny backbone's tokenizer holds as one token after a space
(``" feel"``, ``" sorry"``, …): a random policy says one now and then, so GRPO and DPO have a signal
to follow, and a LoRA adapter can learn to say them more often in a few dozen steps.
"""

from __future__ import annotations

import re

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from reempathy.evaluation.base import Evaluation
from reempathy.hooks import hookimpl

_WORD = re.compile(r"[a-z]+")


def tiny_target_words(tokenizer, min_letters: int = 3) -> list[str]:
    """The words of at least ``min_letters`` letters that ``tokenizer`` encodes as one token after a space."""
    return sorted({t[1:].lower() for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha()
                   and len(t) > min_letters})


class TargetWordsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # options that change how it runs, not what it scores (as llm-judge's concurrency): a resumed run may change them
    runtime_options: ClassVar[frozenset[str]] = frozenset({"workers"})
    words: list[str]
    score: Literal["share", "count"] = "share"  # count: how many target words the answer speaks
    workers: int = 1  # not used: a runtime option for the resume test


def share(text: str, words: set[str]) -> float:
    """The share of ``text``'s words that are in ``words`` (0 for a text without words)."""
    found = _WORD.findall(text.lower())
    return sum(w in words for w in found) / len(found) if found else 0.0


def count(text: str, words: set[str]) -> int:
    """How many of ``text``'s words are in ``words``."""
    return sum(w in words for w in _WORD.findall(text.lower()))


class TargetWords:
    def __init__(self, options: TargetWordsOptions) -> None:
        self.words = set(options.words)
        self.score = options.score
        self.score_names = (options.score,)

    def evaluate(self, items):
        measure = share if self.score == "share" else count
        return [Evaluation(item.id, {self.score: float(measure(item.answer_text, self.words))}, f"{self.score} of target words")
                for item in items]


def share_reward(evaluation: Evaluation) -> float | None:
    values = list(evaluation.scores.values())
    return values[0] if len(values) == 1 else None


class TargetWordsPlugin:
    @hookimpl
    def reempathy_register_evaluators(self, register):
        register("target-words", TargetWords, TargetWordsOptions, "share of spoken words from a list (tests)",
                 reward=share_reward)

"""The evaluator interface: what an evaluator is given and what it gives back.

An evaluator scores a batch of records (``EvalItem``: the dialogue, the spoken answer's text,
units and WAV) and returns one ``Evaluation`` per item, in order: named scores, optional text
(an assessment or a rationale), and on failure an ``error`` with the model's ``raw`` output.
A failure is never a score: ``scores`` is empty whenever ``error`` is set. Evaluators that can
compare two answers (pairwise A/B) also implement ``compare``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

from reempathy.data.schema import SCORE_NAMES

EMPATHY_SCORES = SCORE_NAMES
"""The four EmpathyEval dimensions, in the paper's order (1–5 each)."""
SCORE_MIN, SCORE_MAX = 1.0, 5.0


@dataclass
class EvalItem:
    """One record to score: the prompt ``messages`` (role, text, units, audio) and the spoken answer.

    ``answer_wav`` is a WAV path of the answer when the run wrote one; ``answer_units`` its audio
    units otherwise (an evaluator that listens synthesises them). ``instruction``, when given,
    replaces a text-generating evaluator's default task prompt.
    """

    id: str
    messages: list[dict[str, Any]]
    answer_text: str
    answer_units: list[int] = field(default_factory=list)
    answer_wav: str | None = None
    instruction: str | None = None


@dataclass
class Evaluation:
    """One item's result: ``scores`` by name (empty on failure), ``text``, and ``error``/``raw`` when it failed."""

    id: str
    scores: dict[str, float]
    text: str | None = None
    error: str | None = None
    raw: str | None = None

    @property
    def ok(self) -> bool:
        """True when the item was scored (no ``error``)."""
        return self.error is None


@dataclass
class PairItem:
    """Two answers to the same prompt, ``a`` and ``b`` (same ``id``), for a pairwise comparison."""

    id: str
    a: EvalItem
    b: EvalItem


@dataclass
class Comparison:
    """A pairwise verdict for A: ``win``, ``tie`` or ``loss`` (None with ``error`` when it failed).

    ``orders`` holds the verdict of each presentation order (``ab``: A shown first, ``ba``: B first)
    as ``first``/``second``/``tie``, so position bias can be seen.
    """

    id: str
    outcome: str | None
    orders: dict[str, str | None] = field(default_factory=dict)
    error: str | None = None
    raw: str | None = None


@runtime_checkable
class Evaluator(Protocol):
    """What ``reempathy eval`` needs of an evaluator built by a registered factory."""

    #: the score names it returns (for summaries and checks against human scores)
    score_names: tuple[str, ...]

    def evaluate(self, items: Sequence[EvalItem]) -> list[Evaluation]:
        """Score ``items``; one ``Evaluation`` per item, in order. Per-item failures go in ``Evaluation.error``."""
        ...


@runtime_checkable
class PairwiseEvaluator(Protocol):
    """An evaluator that can also judge two answers against each other (``reempathy ab``)."""

    def compare(self, pairs: Sequence[PairItem]) -> list[Comparison]:
        """One ``Comparison`` per pair, in order, each judged in both presentation orders."""
        ...


def combine_orders(ab: str | None, ba: str | None) -> str | None:
    """Outcome for A from two verdicts: ``ab`` with A shown first, ``ba`` with B shown first.

    Each verdict is ``first``, ``second`` or ``tie``. A wins only if it wins in both orders or wins
    one and ties the other; contradicting verdicts (each order prefers the first answer shown,
    i.e. position bias) are a tie. None when either order failed.
    """
    if ab is None or ba is None:
        return None
    points = {"first": 1, "tie": 0, "second": -1}
    a = points[ab] - points[ba]  # in ``ba`` A is the second answer
    return "win" if a > 0 else "loss" if a < 0 else "tie"


__all__ = [
    "EMPATHY_SCORES",
    "SCORE_MIN",
    "SCORE_MAX",
    "EvalItem",
    "Evaluation",
    "PairItem",
    "Comparison",
    "Evaluator",
    "PairwiseEvaluator",
    "combine_orders",
]

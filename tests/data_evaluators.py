"""An evaluator the data-command tests (reflect-data, pairs) control, registered through the real discovery hook.

``Scripted`` answers every item from what it is shown, so a test can compute the expected output:

- with ``instruction`` (reflect-data): the text ``"reflection on <units> units and <words> words"``;
- without (pairs): the four EmpathyEval scores from the number of audio units, so different
  answers usually get different totals (``constant = True``: every answer scores 3, all tie).

Class attributes script failures: ``fail`` (item ids whose evaluation is an error),
``crash_on_call`` (the evaluator's own code raises on that call, 1-based). ``calls`` records the
item ids of every call and ``items`` every item.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from reempathy.evaluation.base import EMPATHY_SCORES, Evaluation
from reempathy.hooks import hookimpl


class ScriptedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str = "scripted"  # an option that changes nothing but the settings a rerun must match


class Scripted:
    score_names = EMPATHY_SCORES
    calls: list[list[str]] = []
    items: list = []
    fail: set[str] = set()
    crash_on_call: int | None = None
    constant: bool = False

    def __init__(self, options: ScriptedOptions) -> None:
        self.options = options

    @classmethod
    def reset(cls) -> None:
        cls.calls, cls.items, cls.fail, cls.crash_on_call, cls.constant = [], [], set(), None, False

    def evaluate(self, items):
        Scripted.calls.append([i.id for i in items])
        Scripted.items.extend(items)
        if Scripted.crash_on_call is not None and len(Scripted.calls) >= Scripted.crash_on_call:
            raise RuntimeError("the scripted evaluator crashed")
        return [self._one(item) for item in items]

    def _one(self, item) -> Evaluation:
        if item.id in Scripted.fail:
            return Evaluation(item.id, {}, None, "scripted failure", "raw reply")
        if item.instruction:
            words = len(item.answer_text.split())
            return Evaluation(item.id, {}, f"reflection on {len(item.answer_units)} units and {words} words")
        if Scripted.constant:
            return Evaluation(item.id, {name: 3.0 for name in EMPATHY_SCORES}, "all the same")
        return Evaluation(item.id, unit_scores(len(item.answer_units)), f"{len(item.answer_units)} units")


def unit_scores(units: int) -> dict[str, float]:
    """The scores ``Scripted`` gives an answer with ``units`` audio units."""
    return {name: float(1 + (units + i) % 5) for i, name in enumerate(EMPATHY_SCORES)}


class ScriptedPlugin:
    @hookimpl
    def reempathy_register_evaluators(self, register):
        register("scripted", Scripted, ScriptedOptions, "a scripted evaluator (tests)")

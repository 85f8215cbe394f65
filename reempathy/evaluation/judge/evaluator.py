"""``llm-judge``: a rubric judge over the transcript, and pairwise A/B in both orders.

Where it decides:

- Requests go through the request engine (:class:`reempathy.evaluation.judge.engine.RequestEngine`):
  a reply that does not parse, or a request that fails, is tried again up to ``retries`` more times
  (waiting ``backoff_s``, doubling, at most :data:`MAX_WAIT_S`, after a failed request); after the
  last try the record is a failure carrying the last error and the raw reply — never a score.
  ``concurrency`` requests are in flight at once (1 by default: one at a time, as before), under
  ``rate_limit_per_s``; the results keep the order of the items.
- ``compare`` asks twice per pair, A shown first and then B shown first, and combines the two
  verdicts with ``combine_orders`` (contradicting verdicts are a tie), cancelling position bias.
"""

from __future__ import annotations

import time  # noqa: F401 - the judge's waits are time.sleep in the engine; tests patch it through this module
from typing import Any, Callable, Sequence

from reempathy.evaluation.base import EMPATHY_SCORES, Comparison, EvalItem, Evaluation, PairItem, combine_orders
from reempathy.evaluation.judge.backends import ChatBackend, make_backend
from reempathy.evaluation.judge.engine import MAX_WAIT_S, RequestEngine
from reempathy.evaluation.judge.options import JudgeOptions
from reempathy.evaluation.judge.parsing import ParseError, parse_scores, parse_verdict
from reempathy.evaluation.judge.rubric import pair_messages, score_messages


def engine_for(options: JudgeOptions, backend: ChatBackend) -> RequestEngine:
    """The request engine of these options (concurrency, retries, backoff, rate limit) over ``backend``."""
    return RequestEngine(
        backend, concurrency=options.concurrency, retries=options.retries, backoff_s=options.backoff_s,
        rate_limit_per_s=options.rate_limit_per_s,
    )


class LlmJudge:
    """The ``llm-judge`` evaluator; ``backend`` may be given directly (tests, custom transports), and so may the
    request ``engine`` (``make-data`` shares its own, so that one rate limit spans both)."""

    score_names = EMPATHY_SCORES

    def __init__(self, options: JudgeOptions, backend: ChatBackend | None = None, engine: RequestEngine | None = None) -> None:
        self.options = options
        self.backend = backend if backend is not None else (engine.backend if engine is not None else make_backend(options))
        self.engine = engine if engine is not None else engine_for(options, self.backend)

    def _ask(self, messages: list[dict[str, str]], parse: Callable[[str], Any]) -> tuple[Any, str | None, str | None]:
        """(parsed, None, raw) on success; (None, error, raw) after the last try."""
        reply = self.engine.ask(messages, parse)
        return reply.value, reply.error, reply.raw

    def _evaluate_one(self, item: EvalItem) -> Evaluation:
        if item.instruction:
            text, error, raw = self._ask(score_messages(item), lambda r: r)
            scores: dict[str, float] = {}
            if text is not None:
                try:
                    scores, _ = parse_scores(text, self.score_names)
                except ParseError:
                    pass  # an instruction may ask for prose only
            return Evaluation(item.id, scores, text, error, raw)
        parsed, error, raw = self._ask(score_messages(item), lambda r: parse_scores(r, self.score_names))
        if parsed is None:
            return Evaluation(item.id, {}, None, error, raw)
        return Evaluation(item.id, parsed[0], parsed[1], None, raw)

    def evaluate(self, items: Sequence[EvalItem]) -> list[Evaluation]:
        """Four scores per item (or, with ``item.instruction``, the reply as text and any scores it holds)."""
        return self.engine.map(self._evaluate_one, items)

    def compare(self, pairs: Sequence[PairItem]) -> list[Comparison]:
        """Each pair judged with A first and with B first; ``outcome`` is A's win, tie or loss."""
        asks: list[list[dict[str, str]]] = []
        for pair in pairs:  # both orders of every pair, so that they run side by side too
            asks += [pair_messages(pair.a, pair.b), pair_messages(pair.b, pair.a)]
        replies = self.engine.map(lambda messages: self._ask(messages, parse_verdict), asks)
        out = []
        for k, pair in enumerate(pairs):
            (ab, err_ab, raw_ab), (ba, err_ba, raw_ba) = replies[2 * k], replies[2 * k + 1]
            v_ab, v_ba = (ab[0] if ab else None), (ba[0] if ba else None)
            errors = [f"{order}: {e}" for order, e in (("A first", err_ab), ("B first", err_ba)) if e]
            out.append(
                Comparison(
                    id=pair.id,
                    outcome=combine_orders(v_ab, v_ba),
                    orders={"ab": v_ab, "ba": v_ba},
                    error="; ".join(errors) or None,
                    raw=None if not errors else f"A first: {raw_ab!r} | B first: {raw_ba!r}",
                )
            )
        return out


__all__ = ["LlmJudge", "MAX_WAIT_S", "engine_for"]

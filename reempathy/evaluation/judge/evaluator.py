"""``llm-judge``: a rubric judge over the transcript, and pairwise A/B in both orders.

Where it decides:

- ``_ask`` retries: a reply that does not parse, or a request that fails, is tried again up to
  ``retries`` more times (waiting ``backoff_s``, doubling, at most :data:`MAX_WAIT_S`, after a failed request); after the
  last try the record is a failure carrying the last error and the raw reply — never a score.
- ``compare`` asks twice per pair, A shown first and then B shown first, and combines the two
  verdicts with ``combine_orders`` (contradicting verdicts are a tie), cancelling position bias.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from reempathy.evaluation.base import EMPATHY_SCORES, Comparison, EvalItem, Evaluation, PairItem, combine_orders
from reempathy.evaluation.judge.backends import BackendError, ChatBackend, make_backend
from reempathy.evaluation.judge.options import JudgeOptions
from reempathy.evaluation.judge.parsing import ParseError, parse_scores, parse_verdict
from reempathy.evaluation.judge.rubric import pair_messages, score_messages

MAX_WAIT_S = 600.0
"""The longest wait before a retry: ``backoff_s`` doubles per failed request, up to this."""


class LlmJudge:
    """The ``llm-judge`` evaluator; ``backend`` may be given directly (tests, custom transports)."""

    score_names = EMPATHY_SCORES

    def __init__(self, options: JudgeOptions, backend: ChatBackend | None = None) -> None:
        self.options = options
        self.backend = backend if backend is not None else make_backend(options)

    def _ask(self, messages: list[dict[str, str]], parse: Callable[[str], Any]) -> tuple[Any, str | None, str | None]:
        """(parsed, None, raw) on success; (None, error, raw) after the last try."""
        error, raw = "no attempt", None
        for attempt in range(self.options.retries + 1):
            try:
                raw = self.backend.complete(messages)
            except BackendError as exc:
                error, raw = str(exc), None
                if attempt < self.options.retries and self.options.backoff_s > 0:
                    time.sleep(min(self.options.backoff_s * 2**attempt, MAX_WAIT_S))
                continue
            try:
                return parse(raw), None, raw
            except ParseError as exc:
                error = f"unusable reply: {exc}"
        tries = self.options.retries + 1
        return None, f"{error} (after {tries} tr{'y' if tries == 1 else 'ies'})", raw

    def evaluate(self, items: Sequence[EvalItem]) -> list[Evaluation]:
        """Four scores per item (or, with ``item.instruction``, the reply as text and any scores it holds)."""
        out = []
        for item in items:
            if item.instruction:
                text, error, raw = self._ask(score_messages(item), lambda r: r)
                scores: dict[str, float] = {}
                if text is not None:
                    try:
                        scores, _ = parse_scores(text, self.score_names)
                    except ParseError:
                        pass  # an instruction may ask for prose only
                out.append(Evaluation(item.id, scores, text, error, raw))
                continue
            parsed, error, raw = self._ask(score_messages(item), lambda r: parse_scores(r, self.score_names))
            if parsed is None:
                out.append(Evaluation(item.id, {}, None, error, raw))
            else:
                out.append(Evaluation(item.id, parsed[0], parsed[1], None, raw))
        return out

    def compare(self, pairs: Sequence[PairItem]) -> list[Comparison]:
        """Each pair judged with A first and with B first; ``outcome`` is A's win, tie or loss."""
        out = []
        for pair in pairs:
            ab, err_ab, raw_ab = self._ask(pair_messages(pair.a, pair.b), parse_verdict)
            ba, err_ba, raw_ba = self._ask(pair_messages(pair.b, pair.a), parse_verdict)
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


__all__ = ["LlmJudge", "MAX_WAIT_S"]

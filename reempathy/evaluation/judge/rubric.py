"""The judge's prompts: the empathy rubric (four dimensions, 1–5) and the pairwise A/B question.

The transcript is built from the item: each prompt message as ``User:``/``Assistant:``/``System:``
with its text (``[speech]`` when a turn has only audio), its paralinguistic ``caption`` when
the record carries one, then the spoken answer's text.
"""

from __future__ import annotations

from typing import Any

from reempathy.evaluation.base import EMPATHY_SCORES, EvalItem

RUBRIC = """You judge how empathetic a spoken assistant's answer is. Score four dimensions from 1 (poor) to 5 (excellent):
- need_support: does the answer recognise what the user needs (comfort, advice, to be heard) and address it?
- wording_appropriateness: is the wording natural, warm and suitable to be spoken to this user?
- emotion_understanding: does the answer show it understood the user's emotion, including what their voice conveys?
- emotional_support: does the answer actually support the user emotionally?
Judge the answer, not the user. Be strict: 3 is an adequate answer, 5 is rare."""

SCORE_FORMAT = (
    "Reply with only a JSON object, no other text: "
    '{"need_support": <1-5>, "wording_appropriateness": <1-5>, "emotion_understanding": <1-5>, '
    '"emotional_support": <1-5>, "rationale": "<one or two sentences>"}'
)

PAIR_QUESTION = """Two answers, A and B, were given to the same user. Which is more empathetic overall (needs met, wording, understanding of the emotion, support)? Ignore which one is shown first.
Reply with only a JSON object, no other text: {"winner": "A" | "B" | "tie", "rationale": "<one sentence>"}"""


def _turn(message: dict[str, Any]) -> str:
    role = str(message.get("role", "user")).capitalize()
    text = message.get("text") or ("[speech]" if (message.get("units") or message.get("audio")) else "")
    caption = message.get("caption")
    return f"{role}: {text}" + (f"\n  (how it sounds: {caption})" if caption else "")


def transcript(item: EvalItem) -> str:
    """The dialogue as text, one turn per line, with captions where the record has them."""
    return "\n".join(_turn(m) for m in item.messages)


def score_messages(item: EvalItem) -> list[dict[str, str]]:
    """Chat messages asking for the four scores of ``item``'s answer (or ``item.instruction`` instead)."""
    task = item.instruction or SCORE_FORMAT
    user = f"Dialogue:\n{transcript(item)}\n\nThe assistant's spoken answer:\n{item.answer_text or '[no words]'}\n\n{task}"
    return [{"role": "system", "content": RUBRIC}, {"role": "user", "content": user}]


def pair_messages(first: EvalItem, second: EvalItem) -> list[dict[str, str]]:
    """Chat messages asking which of two answers to the same dialogue is better (``first`` shown as A)."""
    user = (
        f"Dialogue:\n{transcript(first)}\n\nAnswer A:\n{first.answer_text or '[no words]'}\n\n"
        f"Answer B:\n{second.answer_text or '[no words]'}\n\n{PAIR_QUESTION}"
    )
    return [{"role": "system", "content": RUBRIC}, {"role": "user", "content": user}]


__all__ = ["RUBRIC", "SCORE_FORMAT", "PAIR_QUESTION", "transcript", "score_messages", "pair_messages", "EMPATHY_SCORES"]

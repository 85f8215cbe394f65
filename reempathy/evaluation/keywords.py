"""``keyword-empathy``: a word-list HEURISTIC for the four empathy dimensions — NOT the paper's EmpathyEval.

It reads only the answer's spoken text and counts cue phrases from five fixed lists. It needs no
model and no server and is deterministic, so that a whole study (decode → eval → report) can run
offline, e.g. on the tiny backbone. Its numbers say which cue words an answer contains, nothing
about how empathetic it sounds; use ``empathyeval`` or ``llm-judge`` for results worth reporting.

Where it decides:

- :func:`find_cues`: the text is lowercased (curly apostrophes made straight) and split into words
  (letters and digits, with an inner apostrophe: ``i'm``, ``don't``). Cue phrases are matched on
  whole words, left to right, the longest phrase first and without overlap (``i'm here for you``
  is one support cue, not also ``i'm here``). A cue counts once however often it occurs.
  Negation and context are not understood: ``not sad`` counts the emotion word ``sad``.
- :func:`keyword_scores`, with A, E, S, P, H the numbers of distinct acknowledgement, emotion,
  support, polite and harsh cues found and ``clamp`` keeping a score within 1–5::

      need_support            = clamp(1 + 2·min(A, 1) + min(S, 2) − 2·min(H, 1))
      wording_appropriateness = clamp(3 + min(A + P, 2) − 2·min(H, 2))
      emotion_understanding   = clamp(1 + 2·min(A, 1) + min(E, 2) − min(H, 1))
      emotional_support       = clamp(1 + min(A, 1) + min(S, 3) − 2·min(H, 1))

  Wording starts at a neutral 3 (plain words are appropriate) and loses 2 per harsh cue; the
  others start at 1 and need cues to rise. An answer with no spoken text fails (nothing to read).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from pydantic import BaseModel

from reempathy.evaluation.base import EMPATHY_SCORES, EvalItem, Evaluation
from reempathy.options import STRICT

ACKNOWLEDGE = (
    "i hear you", "i understand", "i can understand", "i can imagine", "i can see why", "that sounds",
    "it sounds like", "sounds like", "that must be", "must have been", "i'm sorry", "i am sorry", "so sorry",
    "sorry to hear", "sorry that", "makes sense", "understandable", "no wonder", "it's okay to", "it is okay to",
    "it's normal to", "it is normal to", "it's natural to", "it is natural to", "of course you",
    "that's hard", "that is hard", "that's tough", "that is tough", "that's a lot", "that is a lot",
)  # fmt: skip
EMOTION = (
    "sad", "sadness", "upset", "angry", "anger", "frustrated", "frustrating", "frustration", "worried", "worry",
    "worrying", "anxious", "anxiety", "nervous", "scared", "afraid", "fear", "lonely", "hurt", "hurts", "painful",
    "disappointed", "disappointing", "disappointment", "stressed", "stress", "stressful", "overwhelmed",
    "overwhelming", "grief", "grieving", "heartbroken", "devastated", "ashamed", "embarrassed", "guilty", "tired",
    "exhausted", "happy", "glad", "excited", "proud", "relieved", "joy", "feel", "feeling", "feelings", "emotional",
)  # fmt: skip
SUPPORT = (
    "i'm here for you", "i am here for you", "i'm here", "i am here", "here for you", "with you", "not alone",
    "we can", "let's", "let us", "would you like", "do you want to", "want to talk", "talk about it", "if you need",
    "you can do", "you've got this", "you could try", "you can try", "maybe you could", "one step", "take a break",
    "take care", "be kind to yourself", "proud of you", "it will be okay", "it'll be okay", "it's going to be okay",
    "things will get better", "help", "support", "together", "reach out",
)  # fmt: skip
POLITE = (
    "please", "thank you", "thanks for sharing", "thank you for sharing", "if you want", "if you'd like",
    "maybe", "perhaps", "gently", "take your time", "it's okay", "it is okay",
)  # fmt: skip
HARSH = (
    "whatever", "stupid", "idiot", "dumb", "lazy", "pathetic", "ridiculous", "deal with it", "get over it",
    "move on", "not a big deal", "no big deal", "not a big problem", "stop complaining", "stop crying",
    "calm down", "shut up", "your fault", "your own fault", "who cares", "don't care", "overreacting",
    "too sensitive", "grow up", "so what", "man up", "that's nothing",
)  # fmt: skip
LISTS = {"acknowledge": ACKNOWLEDGE, "emotion": EMOTION, "support": SUPPORT, "polite": POLITE, "harsh": HARSH}

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")


def words(text: str) -> list[str]:
    """Lowercase words of ``text`` (letters and digits, inner apostrophes kept, curly ones made straight)."""
    return _WORD.findall(text.lower().replace("\u2019", "'").replace("\u2018", "'"))


def _table() -> dict[tuple[str, ...], str]:
    table: dict[tuple[str, ...], str] = {}
    for kind, phrases in LISTS.items():
        for phrase in phrases:
            key = tuple(words(phrase))
            if key in table:
                raise ValueError(f"cue {phrase!r} is in two lists ({table[key]} and {kind})")
            table[key] = kind
    return table


_CUES = _table()
_LONGEST = max(len(k) for k in _CUES)


@dataclass
class Cues:
    """The distinct cue phrases found, by list (``acknowledge``, ``emotion``, ``support``, ``polite``, ``harsh``)."""

    found: dict[str, list[str]] = field(default_factory=lambda: {kind: [] for kind in LISTS})

    def count(self, kind: str) -> int:
        return len(self.found[kind])

    def describe(self) -> str:
        """One line for the score file's ``text``: what was found in each list."""
        parts = [f"{kind}: {', '.join(self.found[kind]) or '-'}" for kind in LISTS]
        return "keyword heuristic, not EmpathyEval; cues found: " + "; ".join(parts)


def find_cues(text: str) -> Cues:
    """The cue phrases in ``text``: whole words, left to right, longest first, no overlap, each counted once."""
    w = words(text)
    cues = Cues()
    i = 0
    while i < len(w):
        for n in range(min(_LONGEST, len(w) - i), 0, -1):
            kind = _CUES.get(tuple(w[i : i + n]))
            if kind is not None:
                phrase = " ".join(w[i : i + n])
                if phrase not in cues.found[kind]:
                    cues.found[kind].append(phrase)
                i += n
                break
        else:
            i += 1
    return cues


def _clamp(x: int) -> float:
    return float(min(5, max(1, x)))


def keyword_scores(cues: Cues) -> dict[str, float]:
    """The four 1–5 scores from the cue counts (the rule in the module docstring)."""
    a, e, s = cues.count("acknowledge"), cues.count("emotion"), cues.count("support")
    p, h = cues.count("polite"), cues.count("harsh")
    scores = {
        "need_support": _clamp(1 + 2 * min(a, 1) + min(s, 2) - 2 * min(h, 1)),
        "wording_appropriateness": _clamp(3 + min(a + p, 2) - 2 * min(h, 2)),
        "emotion_understanding": _clamp(1 + 2 * min(a, 1) + min(e, 2) - min(h, 1)),
        "emotional_support": _clamp(1 + min(a, 1) + min(s, 3) - 2 * min(h, 1)),
    }
    return {name: scores[name] for name in EMPATHY_SCORES}


class KeywordEmpathyOptions(BaseModel):
    """``keyword-empathy`` takes no options: the word lists and the rule are fixed (docs/evaluation.md), so scores compare across runs."""

    model_config = STRICT


class KeywordEmpathy:
    """The four empathy scores from cue words in the spoken text: a heuristic for offline runs, NOT the paper's EmpathyEval."""

    score_names = EMPATHY_SCORES

    def __init__(self, options: KeywordEmpathyOptions) -> None:
        self.options = options

    def evaluate(self, items: Sequence[EvalItem]) -> list[Evaluation]:
        """One ``Evaluation`` per item; an answer without spoken text fails."""
        out = []
        for item in items:
            if not item.answer_text.strip():
                out.append(Evaluation(item.id, {}, error="the answer has no spoken text; keyword-empathy reads the text only"))
                continue
            cues = find_cues(item.answer_text)
            out.append(Evaluation(item.id, keyword_scores(cues), cues.describe()))
        return out


__all__ = [
    "KeywordEmpathy", "KeywordEmpathyOptions", "Cues", "find_cues", "keyword_scores", "words",
    "ACKNOWLEDGE", "EMOTION", "SUPPORT", "POLITE", "HARSH", "LISTS",
]

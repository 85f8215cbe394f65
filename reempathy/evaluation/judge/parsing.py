"""Reading a judge's reply: four scores 1–5, or an A/B verdict, out of whatever the model wrote.

Where decisions are made (``find_json_object``): the reply may be bare JSON, JSON in a Markdown
fence, or JSON inside chatty prose; the first balanced ``{…}`` that parses as a JSON object is
taken. A reply that opens an object but never closes it is *truncated* (usually ``max_tokens``).
A score must be a number (or a numeric string) within 1–5 — out-of-range values are rejected,
never clipped — and all four dimensions must be there: a reply that fails any of this raises
``ParseError`` so the caller can retry and finally record the failure with the raw text.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

from reempathy.evaluation.base import SCORE_MAX, SCORE_MIN

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


class ParseError(ValueError):
    """A reply that holds no usable answer; the message says why in a few words."""


def _balanced_objects(text: str) -> list[str]:
    """Every top-level ``{…}`` span, braces counted outside JSON strings; an unclosed one raises."""
    spans, depth, start, in_str, esc = [], 0, -1, False, False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"' and depth > 0:
            in_str = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                spans.append(text[start : i + 1])
    if depth > 0 and not spans:
        raise ParseError("truncated reply: a JSON object is opened but never closed")
    return spans


def find_json_object(text: str) -> dict[str, Any]:
    """The first JSON object in ``text`` (bare, fenced or inside prose)."""
    if not text or not text.strip():
        raise ParseError("empty reply")
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for chunk in candidates:
        for span in _balanced_objects(chunk):
            try:
                obj = json.loads(span)
            except json.JSONDecodeError:
                continue
            except RecursionError:
                raise ParseError("JSON nested too deeply to be an answer") from None
            if isinstance(obj, dict):
                return obj
    raise ParseError("no JSON object in the reply")


def _key(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise ParseError(f"{name} is not a number ({value!r})")
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value.strip().split("/")[0])
        except ValueError:
            raise ParseError(f"{name} is not a number ({value!r})") from None
    else:
        raise ParseError(f"{name} is not a number ({value!r})")
    if not SCORE_MIN <= x <= SCORE_MAX:
        raise ParseError(f"{name} = {x:g} is outside {SCORE_MIN:g}-{SCORE_MAX:g}")
    return x


def parse_scores(text: str, names: Sequence[str]) -> tuple[dict[str, float], str | None]:
    """Scores by name (each within 1–5) and the rationale, from a judge's reply; ``ParseError`` otherwise."""
    obj = find_json_object(text)
    scores_obj = obj.get("scores") if isinstance(obj.get("scores"), dict) else obj
    found = {_key(k): v for k, v in scores_obj.items()}
    missing = [n for n in names if n not in found]
    if missing:
        raise ParseError(f"missing score(s) {', '.join(missing)}")
    scores = {n: _number(found[n], n) for n in names}
    rationale = obj.get("rationale") or obj.get("reason") or obj.get("explanation")
    return scores, str(rationale) if rationale is not None else None


def parse_verdict(text: str) -> tuple[str, str | None]:
    """``first``, ``second`` or ``tie`` (answer A is the first shown) and the rationale; ``ParseError`` otherwise."""
    obj = find_json_object(text)
    raw = obj.get("winner", obj.get("better"))
    value = str(raw).strip().lower() if raw is not None else ""
    verdict = {"a": "first", "answer a": "first", "b": "second", "answer b": "second", "tie": "tie", "equal": "tie"}.get(value)
    if verdict is None:
        raise ParseError(f"winner must be \"A\", \"B\" or \"tie\", got {raw!r}")
    rationale = obj.get("rationale") or obj.get("reason")
    return verdict, str(rationale) if rationale is not None else None


__all__ = ["ParseError", "find_json_object", "parse_scores", "parse_verdict"]

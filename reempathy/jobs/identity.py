"""What makes an output: a job's identity, compared setting by setting when a rerun wants to continue it.

Every resumable output keeps the settings that made it (a run's manifest, a score file's options,
a half-made JSONL's ``.partial.json``); a rerun with other settings would mix two jobs in one
file, so it is refused, naming the first setting that differs. A setting absent on one side and
null on the other is the same setting: a key added to a config later (with no value, the old
behaviour) must not make earlier outputs unresumable.
"""

from __future__ import annotations

import json
from typing import Any


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": leaf}``; an empty dict is a leaf of its own."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def first_difference(old: Any, new: Any) -> tuple[str, str, str] | None:
    """``(key, old value, new value)`` as JSON text for the first setting that differs, or None."""
    a, b = flatten(old), flatten(json.loads(json.dumps(new)))
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            there = json.dumps(a[key]) if key in a else "unset"
            here = json.dumps(b[key]) if key in b else "unset"
            return key, there, here
    return None


__all__ = ["flatten", "first_difference"]

"""A decoded answer as the policy produced it: every token after the prompt, and which of them the policy chose.

On-policy training (whole-trace DPO, GRPO) trains the answer *exactly as decoded*: spoken chunks
and the reflections or thoughts between them, token ids included, never re-tokenized text. A
:class:`TraceRecorder` rides along with a row of the batched decoder as one more observer (it only
reads ``reempathy_token_appended``), so no strategy and no part of the core knows about it; at the
end :func:`trace_of` turns the row's :class:`~reempathy.decoding.result.DecodeResult` and what the
recorder saw into a :class:`Trace`.

Where it decides:

- **roles** (:class:`TraceRecorder`): each token of the trace is ``s`` (sampled by the policy
  while speaking), ``h`` (sampled while in a hidden phase: a reflection's or thought's content,
  and the delimiter the model samples to close it) or ``f`` (forced by the strategy: delimiters,
  a ``Switch``'s prefix). Forced tokens are not the policy's choices, so they are never in the
  loss; hidden tokens are, unless training masks them (the ablation).
- **the stop token**: the loop does not append a sampled stop token to the answer; the trace
  does (role of the phase it was sampled in), since the policy chose to stop there and training
  must teach it. A sampled token a ``Switch(keep_token=False)`` dropped is in no sequence and
  is not trained.
- :meth:`Trace.loss_mask`: 1 for every sampled token, 0 for forced ones; with ``hidden=False``
  also 0 for hidden ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from reempathy.decoding.result import DecodeResult
from reempathy.decoding.session import DecodeSession
from reempathy.decoding.spans import PROMPT
from reempathy.hooks import hookimpl

SPOKEN = "s"
"""Role of a token the policy sampled while speaking (heard, or a control token such as the stop token)."""
HIDDEN = "h"
"""Role of a token the policy sampled in a hidden phase (reflection, thought): never heard."""
FORCED = "f"
"""Role of a token the strategy forced (delimiters, prefixes): not a choice of the policy."""
ROLES = frozenset({SPOKEN, HIDDEN, FORCED})


class TraceRecorder:
    """An observer for one row: the role of every token appended to the answer, and the stop token sampled."""

    def __init__(self) -> None:
        self.roles: list[str] = []
        self.stop: tuple[int, str] | None = None

    @hookimpl
    def reempathy_token_appended(self, session: DecodeSession, token_id: int, kind: str) -> None:
        if kind == "sampled":
            self.roles.append(HIDDEN if session.hidden else SPOKEN)
        elif kind == "forced":
            self.roles.append(FORCED)
        elif kind == "stop":
            self.stop = (token_id, HIDDEN if session.hidden else SPOKEN)


@dataclass
class Trace:
    """The answer as decoded: ``ids`` after the prompt (stop token included), one role letter per id in ``roles``.

    ``labels`` is the span label of each id (``spoken_text``, ``spoken_audio``, ``control``, the
    hidden phase's name); ``strategy`` and ``options`` name the policy's decoding strategy, and
    ``chunk_layout`` the layout it reported (``None`` for strategies without one).
    """

    ids: list[int]
    roles: str
    labels: list[str]
    strategy: str
    options: dict[str, Any] = field(default_factory=dict)
    chunk_layout: dict[str, int] | None = None
    hidden_text: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str = ""

    def loss_mask(self, hidden: bool = True) -> list[int]:
        """1 where the policy chose the token (and, with ``hidden=False``, it was spoken), else 0."""
        keep = (SPOKEN, HIDDEN) if hidden else (SPOKEN,)
        return [1 if r in keep else 0 for r in self.roles]

    @property
    def hidden_count(self) -> int:
        """Hidden tokens the policy sampled."""
        return self.roles.count(HIDDEN)

    @property
    def spoken_count(self) -> int:
        """Tokens the policy sampled while speaking."""
        return self.roles.count(SPOKEN)

    def to_json(self) -> dict[str, Any]:
        """The trace as written into a pairs record (``labels`` as runs ``[label, count]``)."""
        runs: list[list[Any]] = []
        for label in self.labels:
            if runs and runs[-1][0] == label:
                runs[-1][1] += 1
            else:
                runs.append([label, 1])
        doc: dict[str, Any] = {"strategy": {"name": self.strategy, "options": self.options}, "ids": list(self.ids),
                               "roles": self.roles, "labels": runs}
        if self.chunk_layout is not None:
            doc["chunk_layout"] = dict(self.chunk_layout)
        doc["hidden"] = list(self.hidden_text)
        doc["stop_reason"] = self.stop_reason
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Trace":
        """A trace from :meth:`to_json`'s form (validated by :class:`reempathy.data.schema.DecodedTrace` first)."""
        labels = [str(label) for label, n in doc["labels"] for _ in range(int(n))]
        return cls(
            ids=list(doc["ids"]),
            roles=doc["roles"],
            labels=labels,
            strategy=doc["strategy"]["name"],
            options=dict(doc["strategy"].get("options") or {}),
            chunk_layout=doc.get("chunk_layout"),
            hidden_text=list(doc.get("hidden") or []),
            stop_reason=str(doc.get("stop_reason") or ""),
        )


@dataclass(frozen=True)
class TracePolicy:
    """The decoding strategy, options and chunk layout traces were sampled with (one per whole-trace dataset)."""

    strategy: str
    options_json: str
    layout_json: str

    @classmethod
    def of(cls, trace: Trace) -> "TracePolicy":
        return cls(trace.strategy, json.dumps(trace.options, sort_keys=True), json.dumps(trace.chunk_layout, sort_keys=True))

    @property
    def options(self) -> dict[str, Any]:
        return json.loads(self.options_json)

    @property
    def chunk_layout(self) -> dict[str, int] | None:
        return json.loads(self.layout_json)

    def describe(self) -> str:
        return f"strategy {self.strategy!r} with {self.options_json}"


def trace_of(result: DecodeResult, recorder: TraceRecorder, options: dict[str, Any] | None = None) -> Trace:
    """The trace of a finished row: its result's answer ids (plus the sampled stop token) and the recorder's roles."""
    roles = list(recorder.roles)
    if len(roles) != len(result.ids):
        raise RuntimeError(
            f"the trace recorder saw {len(roles)} tokens appended but the answer has {len(result.ids)}; "
            "it must observe the row from its start"
        )
    labels = _labels(result)
    ids = list(result.ids)
    if recorder.stop is not None:
        token, role = recorder.stop
        ids.append(token)
        roles.append(role)
        labels.append("control")
    hidden = [{"kind": h.kind, "index": h.index, "text": h.text} for h in result.hidden]
    layout = result.extra.get("chunk_layout")
    return Trace(ids, "".join(roles), labels, result.strategy, dict(options or {}),
                 dict(layout) if isinstance(layout, dict) else None, hidden, result.stop_reason)


def _labels(result: DecodeResult) -> list[str]:
    """The span label of every answer position (the prompt's left out)."""
    start = len(result.prompt_ids)
    labels = ["control"] * len(result.ids)
    for span in result.spans:
        if span["label"] == PROMPT:
            continue
        for pos in range(max(span["start"], start), span["end"]):
            labels[pos - start] = span["label"]
    return labels


__all__ = ["Trace", "TracePolicy", "TraceRecorder", "trace_of", "SPOKEN", "HIDDEN", "FORCED", "ROLES"]

"""Run hook specifications: the contract between the token loop and a session's plugins.

Run hooks are called by the token loop on a per-session plugin manager that holds only the
strategy, processors and observers chosen for that session. The discovery hooks (called once,
to register what plugins provide) are in :mod:`reempathy.hookspecs`, with the registry above the
core. Every hook is documented with its signature in docs/plugins.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from reempathy.decoding.attention import KeyBias
    from reempathy.decoding.directives import Directive
    from reempathy.decoding.result import DecodeResult
    from reempathy.decoding.session import DecodeSession

from reempathy.hooks import Register, hookspec  # noqa: E402,F401 - Register kept here for plugins written before it moved


# --- run hooks (called by the loop, per session) ------------------------------------------


@hookspec
def reempathy_decode_start(session: DecodeSession) -> Directive | None:
    """The prompt is ready, the model has not run yet; a strategy may return a ``Switch`` to begin in another phase."""


@hookspec
def reempathy_logits(session: DecodeSession, logits: torch.Tensor) -> None:
    """Change the next-token ``logits`` (float32, shape ``[vocab]``) in place: strategies first, then processors in config order."""


@hookspec(firstresult=True)
def reempathy_token(session: DecodeSession, token_id: int) -> Directive | None:
    """``token_id`` was sampled and is about to be appended; the strategy answers with a directive (None means continue)."""


@hookspec
def reempathy_token_appended(session: DecodeSession, token_id: int, kind: str) -> None:
    """Observe every token of the answer, whatever the strategy answered: ``kind`` is ``sampled``, ``forced`` or ``stop``.

    Called once per token appended to ``session.ids`` (``sampled`` or ``forced``), in order, after it
    is appended; once with ``kind="stop"`` for a sampled token that ended the answer without being
    appended (a stop token, or a ``Stop`` with ``keep_token=False``); and once with ``kind="dropped"``
    for a sampled token a ``Switch(keep_token=False)`` left out. Return values are ignored.
    """


@hookspec
def reempathy_phase_change(session: DecodeSession, old: str | None, new: str) -> None:
    """The phase changed from ``old`` to ``new`` (forced tokens already appended); a new segment has begun."""


@hookspec
def reempathy_attention_plan(session: DecodeSession) -> dict[int, list[KeyBias]] | None:
    """Return additive attention biases per layer for the phase that just began (called once per phase change)."""


@hookspec
def reempathy_decode_end(session: DecodeSession, result: DecodeResult) -> None:
    """The answer is finished; ``result`` is final and may be read (or annotated in ``result.extra``)."""


RUN_HOOKS = (
    "reempathy_decode_start",
    "reempathy_logits",
    "reempathy_token",
    "reempathy_token_appended",
    "reempathy_phase_change",
    "reempathy_attention_plan",
    "reempathy_decode_end",
)

__all__ = ["hookspec", "Register", "RUN_HOOKS", "Any"]

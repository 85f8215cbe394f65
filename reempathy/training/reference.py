"""The teacher-forcing reference: a training sequence replayed through the real decoder, token by token.

A builder lays a record out in one go; this decodes the same prompt with the real token loop
and the real decoding strategy, while a processor leaves the model only the training
sequence's next token at each step. The strategy sees every token as it would at inference
(its chunker, its slot masks, its directives) and the loop forces the delimiters where the
strategy says. What comes out is the sequence decoding produces when the model says exactly
what it was trained to say; tests compare it with the builder's, so that what is trained is
what is decoded. There is no second walk of the chunk layout here: the layout is walked by
the strategy alone.

Where it decides: :class:`TeacherForcing` raises :class:`TeacherForcingMismatch` at the first
position where the decoder's sequence leaves the training sequence, or where the strategy
bans the token the training sequence wants.
"""

from __future__ import annotations

from typing import Sequence

import torch

from reempathy.backbones.base import Backbone
from reempathy.decoding.loop import LoopOptions, decode
from reempathy.decoding.session import DecodeSession
from reempathy.errors import PluginFailure
from reempathy.hooks import hookimpl


class TeacherForcingMismatch(AssertionError):
    """The decoder cannot produce the training sequence: ``position`` is where they part."""

    def __init__(self, position: int, message: str) -> None:
        self.position = position
        super().__init__(f"position {position}: {message}")


class TeacherForcing:
    """A processor that leaves only the training sequence's next token (runs after the strategy's masks)."""

    name = "teacher-forcing"

    def __init__(self, sequence: Sequence[int]) -> None:
        self.sequence = list(sequence)
        self.session: DecodeSession | None = None

    @hookimpl(trylast=True)
    def reempathy_logits(self, session: DecodeSession, logits: torch.Tensor) -> None:
        self.session = session
        pos = len(session.ids)
        for i, token in enumerate(session.ids):
            want = self.sequence[i] if i < len(self.sequence) else None
            if token != want:
                raise TeacherForcingMismatch(i, f"the decoder wrote {token} where the training sequence has {want}")
        if pos >= len(self.sequence):
            raise TeacherForcingMismatch(pos, "the decoder goes on after the training sequence ended")
        target = self.sequence[pos]
        if logits[target] == float("-inf"):
            raise TeacherForcingMismatch(pos, f"the strategy bans token {target}, which the training sequence has here")
        logits.fill_(float("-inf"))
        logits[target] = 0.0


def teacher_forced_sequence(backbone: Backbone, prompt_len: int, sequence: Sequence[int], strategy: object) -> list[int]:
    """The ids the decoder writes for ``sequence[:prompt_len]`` when the model picks each next token of ``sequence``.

    Includes the stop token when the decoder stopped at one. Raises :class:`TeacherForcingMismatch`
    when the decoder and the sequence part.
    """
    forcing = TeacherForcing(sequence)
    budget = len(sequence) - prompt_len + 1
    try:
        result = decode(
            backbone, list(sequence[:prompt_len]), strategy, [forcing], LoopOptions(max_new_tokens=budget, greedy=True)
        )
    except PluginFailure as exc:  # the loop names the failing plugin; here the mismatch itself is the answer
        if isinstance(exc.__cause__, TeacherForcingMismatch):
            raise exc.__cause__ from None
        raise
    if forcing.session is None:
        raise TeacherForcingMismatch(prompt_len, "the decoder asked for no token")
    ids = list(forcing.session.ids)
    if result.stop_reason == "stop_token":
        ids.append(sequence[len(ids)])
    return ids


__all__ = ["teacher_forced_sequence", "TeacherForcing", "TeacherForcingMismatch"]

"""Strategy ``cotbs``: chain of thought before speaking — a reasoning segment in text, then the spoken answer.

The thought opens with a forced delimiter inside the prefill and closes when the model closes
it or at ``max_thought_tokens`` (forced). It never reaches the spoken stream.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from reempathy.backbones.base import DELIMITER_TOKENS, THOUGHT_CLOSE, THOUGHT_OPEN, Backbone
from reempathy.decoding.directives import Directive, Switch
from reempathy.decoding.session import DecodeSession
from reempathy.decoding.spans import SPEAK
from reempathy.hooks import hookimpl
from reempathy.options import MAX_SEGMENT, STRICT

THOUGHT = "thought"


class CotbsOptions(BaseModel):
    """Options of ``cotbs``."""

    model_config = STRICT
    max_thought_tokens: int = Field(64, ge=1, le=MAX_SEGMENT, description="the decoder closes the thought at this many tokens")


class CotbsStrategy:
    """Think (hidden, text only), then speak as the backbone emits its spoken stream."""

    name = "cotbs"

    def __init__(self, options: CotbsOptions, backbone: Backbone) -> None:
        self.options = options
        layout = backbone.layout
        self.open_id = layout.token_id(THOUGHT_OPEN)
        self.close_id = layout.token_id(THOUGHT_CLOSE)
        device = backbone.model.device
        self.ban_thought = ~layout.allowed_mask(text=True, extra_ids=(self.close_id,), device=device)
        self.delimiters = torch.tensor(
            [layout.special[t] for t in DELIMITER_TOKENS if t in layout.special], device=device
        )

    @hookimpl
    def reempathy_decode_start(self, session: DecodeSession) -> Directive:
        return Switch(THOUGHT, forced=(self.open_id,), hidden=True)

    @hookimpl(tryfirst=True)
    def reempathy_logits(self, session: DecodeSession, logits: torch.Tensor) -> None:
        if session.hidden:
            logits.masked_fill_(self.ban_thought, float("-inf"))
        else:
            logits[self.delimiters] = float("-inf")

    @hookimpl
    def reempathy_token(self, session: DecodeSession, token_id: int) -> Directive | None:
        if not session.hidden:
            return None
        if token_id == self.close_id:
            return Switch(SPEAK)
        if len(session.segment) + 1 >= self.options.max_thought_tokens:  # type: ignore[arg-type]
            return Switch(SPEAK, forced=(self.close_id,))
        return None

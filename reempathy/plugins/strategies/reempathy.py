"""Strategy ``reempathy``: spoken chunks and unspoken reflection chunks alternate, r1 f1 r2 f2 …, on one KV cache.

Where it decides: :meth:`ReEmpathyStrategy.reempathy_token` switches to a reflection when a
spoken chunk is full (:class:`SpokenChunker`), and back to speaking when the model closes the
reflection or the cap is reached. The decoder forces the delimiters; nothing is re-encoded.
The chunk layout comes from the options and the backbone's declared spoken stream
(:func:`layout_for_stream`): text+audio chunks, or chunks of text only for a text-only stream.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field, model_validator

from reempathy.backbones.base import DELIMITER_TOKENS, REFLECTION_CLOSE, REFLECTION_OPEN, Backbone
from reempathy.decoding.directives import Directive, Switch
from reempathy.decoding.session import DecodeSession
from reempathy.decoding.spans import SPEAK
from reempathy.hooks import hookimpl
from reempathy.options import MAX_SEGMENT, STRICT
from reempathy.decoding.chunking import DEFAULT_TEXT_TOKENS, SpokenChunker, layout_for_stream

REFLECTION = "reflection"


class ReEmpathyOptions(BaseModel):
    """Options of ``reempathy`` (the paper's best: 5+10 or 7+14 per spoken chunk)."""

    model_config = STRICT

    text_tokens: int = Field(
        DEFAULT_TEXT_TOKENS, ge=1, le=MAX_SEGMENT,
        description="text slots at the start of each spoken chunk (default 5 on every backbone, whatever interleave it declares)",
    )
    audio_tokens: int | None = Field(
        None,
        ge=0,
        le=MAX_SEGMENT,
        description="audio slots after them; default 10, or 0 on a backbone whose spoken stream is text only",
    )
    reflect: bool = Field(True, description="false: the paper's ablation, the same chunking with no reflections")
    max_reflection_tokens: int = Field(32, ge=1, le=MAX_SEGMENT, description="the decoder closes a reflection at this many tokens")
    reflection_tokens: int | None = Field(
        None, ge=1, le=MAX_SEGMENT, description="fixed-length mode: every reflection is exactly this many tokens"
    )

    @model_validator(mode="after")
    def _chunk_size(self) -> "ReEmpathyOptions":
        if self.audio_tokens is not None and self.text_tokens + self.audio_tokens < 2:
            raise ValueError("a spoken chunk needs at least 2 tokens")
        return self


class ReEmpathyStrategy:
    """Alternates spoken chunks of a fixed text+audio layout with reflections in text."""

    name = "reempathy"

    def __init__(self, options: ReEmpathyOptions, backbone: Backbone) -> None:
        self.options = options
        self.layout = layout_for_stream(
            backbone.stream, backbone.name, options.text_tokens, options.audio_tokens, "strategy 'reempathy'", min_size=2
        )
        layout = backbone.layout
        self.open_id = layout.token_id(REFLECTION_OPEN)
        self.close_id = layout.token_id(REFLECTION_CLOSE)
        self.chunker = SpokenChunker(self.layout)
        device = backbone.model.device
        # Precomputed "banned" masks, one per kind of slot, so each step is one masked_fill.
        self.ban_text_slot = ~layout.allowed_mask(text=True, audio=True, stop=True, device=device)
        self.ban_audio_slot = ~layout.allowed_mask(audio=True, stop=True, device=device)
        close = (self.close_id,) if options.reflection_tokens is None else ()
        self.ban_reflection = ~layout.allowed_mask(text=True, extra_ids=close, device=device)
        self.limit = options.reflection_tokens or options.max_reflection_tokens
        self.delimiters = [layout.special[t] for t in DELIMITER_TOKENS if t in layout.special]

    @hookimpl
    def reempathy_decode_start(self, session: DecodeSession) -> None:
        self.chunker = SpokenChunker(self.layout)
        session.extra["chunk_layout"] = {
            "text_tokens": self.layout.text_tokens,
            "audio_tokens": self.layout.audio_tokens,
        }

    @hookimpl(tryfirst=True)
    def reempathy_logits(self, session: DecodeSession, logits: torch.Tensor) -> None:
        if session.hidden:
            logits.masked_fill_(self.ban_reflection, float("-inf"))
        elif self.chunker.text_allowed():
            logits.masked_fill_(self.ban_text_slot, float("-inf"))
        else:
            logits.masked_fill_(self.ban_audio_slot, float("-inf"))

    @hookimpl
    def reempathy_token(self, session: DecodeSession, token_id: int) -> Directive | None:
        if session.hidden:
            if token_id == self.close_id:
                return Switch(SPEAK)
            if len(session.segment) + 1 >= self.limit:  # type: ignore[arg-type]
                return Switch(SPEAK, forced=(self.close_id,))
            return None
        if not self.chunker.push(session.layout.is_audio(token_id)):
            return None
        if self.options.reflect:
            return Switch(REFLECTION, forced=(self.open_id,), hidden=True)
        return Switch(SPEAK)

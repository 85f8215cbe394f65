"""Strategy ``read-aloud``: the backbone speaks a given text — the text is forced token by token, the audio is the model's.

A speech LM that interleaves text and audio (GLM-4-Voice: 13 text tokens, then 26 audio tokens)
speaks whatever text is in its text slots: force the text there and let it sample the audio
slots, and the audio units it writes are that text read aloud, in its own voice. This is how
``reempathy voice`` gives training records their units without another TTS.

Where it decides: :meth:`ReadAloudStrategy.reempathy_logits`. The slots are the backbone's own
interleave (``backbone.stream``, walked by the shared :class:`SpokenChunker`, so what is decoded
is what ``reempathy train`` lays out for the record): in a text slot while text remains, every
token but the text's next one is banned; in an audio slot only audio units are allowed, never a
stop. Once the text is all spoken, the interleave block that holds its last token is filled
with audio (that audio speaks the last words), and then the model goes on with audio (as
GLM-4-Voice finishes speaking after its text ends) until it samples a stop token or
``max_tail_audio_tokens`` more audio tokens have followed (stop reason ``text_spoken``). On a
text-only stream (speech made afterwards from the text, Qwen2.5-Omni) the text is forced and then
the stop token.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from reempathy.backbones.base import Backbone
from reempathy.decoding.chunking import ChunkLayout, SpokenChunker
from reempathy.decoding.directives import Directive, Stop
from reempathy.decoding.session import DecodeSession
from reempathy.errors import ConfigError
from reempathy.hooks import hookimpl
from reempathy.options import MAX_SEGMENT, STRICT, Text

TEXT_SPOKEN = "text_spoken"
"""The stop reason when the tail of audio after the text reached ``max_tail_audio_tokens``."""


class ReadAloudOptions(BaseModel):
    """Options of ``read-aloud``."""

    model_config = STRICT

    text: Text | None = Field(
        None, description="the text to speak (required; `reempathy voice` gives each turn's text)"
    )
    max_tail_audio_tokens: int | None = Field(
        None, ge=0, le=MAX_SEGMENT,
        description="audio tokens allowed after the interleave block of the text's last token is full, unless the "
        "model stops first (default: two audio blocks of the backbone's interleave, 52 on GLM-4-Voice)",
    )


def tail_cap(options: ReadAloudOptions, backbone: Backbone) -> int:
    """The most audio tokens after the text: the option, or two audio blocks of the stream."""
    if options.max_tail_audio_tokens is not None:
        return options.max_tail_audio_tokens
    return 2 * backbone.stream.audio_tokens


def read_aloud_budget(text_tokens: int, backbone: Backbone, tail: int) -> int:
    """Tokens the answer may take at most: every interleave block the text needs, full, then the tail and a stop."""
    stream = backbone.stream
    blocks = -(-text_tokens // stream.text_tokens) if text_tokens else 0
    return blocks * (stream.text_tokens + stream.audio_tokens) + tail + 1


class ReadAloudStrategy:
    """Forces ``options.text`` into the text slots of the backbone's interleave; the model fills the audio slots."""

    name = "read-aloud"

    def __init__(self, options: ReadAloudOptions, backbone: Backbone) -> None:
        if options.text is None or not options.text.strip():
            raise ConfigError(
                "strategy 'read-aloud' needs option text, the words to speak (e.g. --set strategy.text=\"I hear you.\"); "
                "`reempathy voice DATA.jsonl` gives each turn's own text"
            )
        self.options = options
        self.text_ids = backbone.encode_text(options.text)  # InputError for text that spells a special token
        stream = backbone.stream
        self.text_only = stream.text_only
        self.layout = ChunkLayout(stream.text_tokens, stream.audio_tokens)
        self.tail_cap = tail_cap(options, backbone)
        layout = backbone.layout
        device = backbone.model.device
        # Precomputed "banned" masks, so each step is one masked_fill.
        self.ban_in_audio_slot = ~layout.allowed_mask(audio=True, device=device)
        self.ban_in_tail = ~layout.allowed_mask(audio=True, stop=True, device=device)
        self.ban_but_stop = ~layout.allowed_mask(stop=True, device=device)
        self._reset()

    def _reset(self) -> None:
        self.chunker = SpokenChunker(self.layout)
        self.spoken = 0  # text tokens of options.text spoken so far
        self.block_done = False  # the interleave block of the text's last token is full
        self.tail = 0  # audio tokens after that block

    @property
    def text_left(self) -> bool:
        """True while some of the text is still to be spoken."""
        return self.spoken < len(self.text_ids)

    @hookimpl
    def reempathy_decode_start(self, session: DecodeSession) -> None:
        self._reset()
        session.extra["read_aloud"] = {"text_tokens": len(self.text_ids), "tail_cap": self.tail_cap}

    @hookimpl(tryfirst=True)
    def reempathy_logits(self, session: DecodeSession, logits: torch.Tensor) -> None:
        if self.text_left and (self.text_only or self.chunker.text_allowed()):
            target = self.text_ids[self.spoken]
            logits.fill_(float("-inf"))
            logits[target] = 0.0
        elif self.text_only or (self.block_done and self.tail >= self.tail_cap):
            logits.masked_fill_(self.ban_but_stop, float("-inf"))  # all said, no more tail: only a stop
        elif self.text_left or not self.block_done:
            logits.masked_fill_(self.ban_in_audio_slot, float("-inf"))  # an audio slot of the text's blocks
        else:
            logits.masked_fill_(self.ban_in_tail, float("-inf"))

    @hookimpl
    def reempathy_token(self, session: DecodeSession, token_id: int) -> Directive | None:
        is_audio = session.layout.is_audio(token_id)
        if not is_audio:
            self.spoken += 1
            if not self.text_only:
                self.chunker.push(False)
            return None
        if self.text_only:
            return None
        if self.block_done:
            self.tail += 1
            return Stop(TEXT_SPOKEN, keep_token=True) if self.tail >= self.tail_cap else None
        if self.chunker.push(True) and not self.text_left:
            self.block_done = True  # from the next step on: the tail (or only a stop, when its cap is 0)
        return None


__all__ = ["ReadAloudOptions", "ReadAloudStrategy", "TEXT_SPOKEN", "read_aloud_budget", "tail_cap"]

"""The spoken-chunk layout: the contract between strategies that speak in chunks and the training builders.

It lives in the core (the one module both sides import downward) because it describes the spoken
stream, not any one strategy: a chunk is so many text slots, then so many audio slots.

A spoken chunk has ``text_tokens`` text slots, then ``audio_tokens`` audio slots. An audio token
in a text slot means the text is finished: that chunk and every later one are filled with audio
up to the same total size, the way GLM-4-Voice goes on with audio once its text ends.
Decoding and training both walk this one state machine, so what is trained is what is decoded.

A backbone whose spoken stream is text only (``StreamPolicy.audio_tokens == 0``, e.g.
Qwen2.5-Omni, whose talker makes the speech afterwards) has chunks of ``text_tokens`` text
tokens and no audio slots. :func:`layout_for_stream` is where that is decided, from the
backbone's declaration: ``audio_tokens = 0`` is valid only for a text-only stream, and a
text-only stream takes no audio slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from reempathy.backbones.base import StreamPolicy
from reempathy.errors import ConfigError

DEFAULT_TEXT_TOKENS = 5
DEFAULT_AUDIO_TOKENS = 10  # the paper's 15 = 5 + 10, for streams that interleave audio


@dataclass(frozen=True)
class ChunkLayout:
    """Text and audio slots of one spoken chunk (the paper's 15 = 5 + 10 by default; ``audio_tokens = 0``: text only)."""

    text_tokens: int = DEFAULT_TEXT_TOKENS
    audio_tokens: int = DEFAULT_AUDIO_TOKENS

    def __post_init__(self) -> None:
        if self.text_tokens < 1 or self.audio_tokens < 0:
            raise ConfigError(
                f"chunk layout {self.text_tokens}+{self.audio_tokens}: text_tokens must be at least 1 "
                "and audio_tokens at least 0"
            )

    @property
    def size(self) -> int:
        return self.text_tokens + self.audio_tokens

    @property
    def text_only(self) -> bool:
        return self.audio_tokens == 0


def layout_for_stream(
    stream: StreamPolicy, backbone: str, text_tokens: int, audio_tokens: int | None, where: str, min_size: int = 1
) -> ChunkLayout:
    """The chunk layout for a backbone's spoken stream; ``audio_tokens=None`` takes the stream's default.

    ``where`` names the options in error messages (e.g. ``strategy 'reempathy'``). The default is
    :data:`DEFAULT_AUDIO_TOKENS` for a stream with audio and 0 for a text-only stream; an explicit
    value must fit the stream (0 exactly when it is text only).
    """
    if audio_tokens is None:
        audio_tokens = 0 if stream.text_only else DEFAULT_AUDIO_TOKENS
    elif stream.text_only and audio_tokens != 0:
        raise ConfigError(
            f"{where}: option 'audio_tokens' = {audio_tokens}, but backbone {backbone!r} speaks text only "
            "(its speech is made from the text afterwards); set audio_tokens = 0 or leave it out"
        )
    elif not stream.text_only and audio_tokens == 0:
        raise ConfigError(
            f"{where}: option 'audio_tokens' = 0 (text-only chunks) is for backbones whose spoken stream has no audio; "
            f"backbone {backbone!r} interleaves {stream.text_tokens} text and {stream.audio_tokens} audio tokens: "
            "set audio_tokens to 1 or more"
        )
    layout = ChunkLayout(text_tokens, audio_tokens)
    if layout.size < min_size:
        raise ConfigError(
            f"{where}: a spoken chunk of {text_tokens}+{audio_tokens} tokens is too small; "
            f"it needs at least {min_size} (raise option 'text_tokens')"
        )
    return layout


class SpokenChunker:
    """Tracks the slot of the current spoken chunk: what kind of token may come next, and when a chunk is full."""

    def __init__(self, layout: ChunkLayout) -> None:
        self.layout = layout
        self.filled = 0
        self.text_done = False
        self.chunks_done = 0

    def text_allowed(self) -> bool:
        """True in a text slot (text, or audio which finishes the text, may come)."""
        return not self.text_done and self.filled < self.layout.text_tokens

    def push(self, is_audio: bool) -> bool:
        """Record one spoken token; True when it completes the chunk."""
        if is_audio and self.text_allowed():
            self.text_done = True
        elif not is_audio and not self.text_allowed():
            raise ValueError("a text token in an audio slot")
        self.filled += 1
        if self.filled == self.layout.size:
            self.filled = 0
            self.chunks_done += 1
            return True
        return False


def split_spoken(text_ids: Sequence[int], audio_ids: Sequence[int], layout: ChunkLayout) -> list[list[int]]:
    """Split a whole spoken answer (its text ids and its audio token ids) into chunks as decoding would emit them.

    The last chunk may be shorter when the answer ends inside it.
    """
    chunks: list[list[int]] = []
    for chunk in _walk(text_ids, audio_ids, layout):
        chunks.append(chunk)
    return chunks


def _walk(text_ids: Sequence[int], audio_ids: Sequence[int], layout: ChunkLayout) -> Iterator[list[int]]:
    chunker = SpokenChunker(layout)
    ti = ai = 0
    current: list[int] = []
    while ti < len(text_ids) or ai < len(audio_ids):
        if chunker.text_allowed() and ti < len(text_ids):
            tok, is_audio = text_ids[ti], False
            ti += 1
        elif ai < len(audio_ids):
            tok, is_audio = audio_ids[ai], True
            ai += 1
        else:
            # Text remains but only audio slots are left in this chunk and the audio ran out:
            # the answer cannot be laid out; callers give the text together with enough audio.
            raise ValueError("text left over with no audio to fill the chunk's audio slots")
        current.append(tok)
        if chunker.push(is_audio):
            yield current
            current = []
    if current:
        yield current

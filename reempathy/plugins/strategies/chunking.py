"""The spoken-chunk layout, shared by the ``reempathy`` strategy and the training builders.

A spoken chunk has ``text_tokens`` text slots, then ``audio_tokens`` audio slots. An audio token
in a text slot means the text is finished: that chunk and every later one are filled with audio
up to the same total size, the way GLM-4-Voice goes on with audio once its text ends.
Decoding and training both walk this one state machine, so what is trained is what is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from reempathy.errors import ConfigError


@dataclass(frozen=True)
class ChunkLayout:
    """Text and audio slots of one spoken chunk (the paper's 15 = 5 + 10 by default)."""

    text_tokens: int = 5
    audio_tokens: int = 10

    def __post_init__(self) -> None:
        if self.text_tokens < 1 or self.audio_tokens < 1:
            raise ConfigError(
                f"chunk layout {self.text_tokens}+{self.audio_tokens}: text_tokens and audio_tokens must both be at least 1"
            )

    @property
    def size(self) -> int:
        return self.text_tokens + self.audio_tokens


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

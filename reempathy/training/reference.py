"""The ReEmpathy sequence as decoding would produce it, token by token: the teacher-forcing reference.

The builder lays out whole chunks with :func:`split_spoken`; this walks the same answer one
token at a time through :class:`SpokenChunker`, the way the decoding strategy sees it, and
inserts the delimiters and the next reflection whenever the chunker says a chunk is complete.
Tests compare the two, so that what is trained is what is decoded.
"""

from __future__ import annotations

from typing import Sequence

from reempathy.plugins.strategies.chunking import ChunkLayout, SpokenChunker


def reempathy_reference_sequence(
    prompt_ids: Sequence[int],
    text_ids: Sequence[int],
    audio_ids: Sequence[int],
    reflections: Sequence[Sequence[int]],
    layout: ChunkLayout,
    open_id: int,
    close_id: int,
    stop_id: int,
) -> list[int]:
    """prompt, then each spoken token as decoding picks it (text while a text slot is open and text remains,
    else audio), with ``open_id reflection close_id`` after every completed chunk, then ``stop_id``.
    ``reflections`` must hold one piece per completed chunk (ValueError otherwise)."""
    chunker = SpokenChunker(layout)
    out = list(prompt_ids)
    ti = ai = k = 0
    while ti < len(text_ids) or ai < len(audio_ids):
        if chunker.text_allowed() and ti < len(text_ids):
            token, is_audio = text_ids[ti], False
            ti += 1
        elif ai < len(audio_ids):
            token, is_audio = audio_ids[ai], True
            ai += 1
        else:
            raise ValueError("text left over with no audio to fill the chunk's audio slots")
        out.append(token)
        if chunker.push(is_audio):
            if k >= len(reflections):
                raise ValueError(f"more completed chunks than the {len(reflections)} reflections given")
            out.extend([open_id, *reflections[k], close_id])
            k += 1
    if k != len(reflections):
        raise ValueError(f"{len(reflections)} reflections given for {k} completed chunks")
    out.append(stop_id)
    return out


__all__ = ["reempathy_reference_sequence"]

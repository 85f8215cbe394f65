"""GLM-4-Voice's chat format, shared by every backbone that uses its special-token layout."""

from __future__ import annotations

from typing import Sequence

from reempathy.backbones.base import Turn, VocabLayout
from reempathy.errors import InputError

SPEECH_SYSTEM_PROMPT = (
    "User will provide you with a speech instruction. Do it step by step. First, think about the "
    "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens. "
)
TEXT_SYSTEM_PROMPT = (
    "User will provide you with a text instruction. Do it step by step. First, think about the "
    "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens."
)


def build_glm_prompt(
    turns: Sequence[Turn],
    tokenizer,
    layout: VocabLayout,
    prefix: Sequence[int] = (),
    system_prompt: str | None = None,
) -> list[int]:
    """``[gMASK]<sop><|system|>\\n… <|user|>\\n… <|assistant|>streaming_transcription\\n`` as token ids."""
    if not turns or turns[-1].role != "user":
        raise InputError("a prompt needs at least one turn and must end with a user turn")
    ids: list[int] = list(prefix)

    def text(s: str) -> None:
        ids.extend(tokenizer.encode(s, add_special_tokens=False))

    def special(name: str) -> None:
        ids.append(layout.token_id(name))

    last_user = turns[-1]
    if system_prompt is None:
        system_prompt = SPEECH_SYSTEM_PROMPT if last_user.units is not None else TEXT_SYSTEM_PROMPT
    has_system = any(t.role == "system" for t in turns)
    if not has_system and system_prompt:
        special("<|system|>")
        text("\n" + system_prompt)
    for turn in turns:
        if turn.role not in ("system", "user", "assistant"):
            raise InputError(f"unknown turn role {turn.role!r}; use system, user or assistant")
        special(f"<|{turn.role}|>")
        if turn.role == "assistant":
            text("streaming_transcription\n")
        else:
            text("\n")
        if turn.text:
            text(turn.text)
        if turn.units is not None:
            if turn.role == "user":
                special("<|begin_of_audio|>")
            ids.extend(layout.unit_to_token(int(u)) for u in turn.units)
            if turn.role == "user":
                special("<|end_of_audio|>")
    special("<|assistant|>")
    text("streaming_transcription\n")
    return ids

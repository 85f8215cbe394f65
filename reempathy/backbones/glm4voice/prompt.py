"""GLM-4-Voice's published chat format as token ids.

The published demo (``web_demo.py`` + ``model_server.py`` of THUDM/GLM-4-Voice) builds a string

    <|system|>\\n{system prompt}<|user|>\\n{user input}<|assistant|>streaming_transcription\\n

where the user input is text, or ``<|begin_of_audio|><|audio_N|>…<|end_of_audio|>`` for speech,
and tokenizes it with ``tokenizer([prompt])``, which prefixes ``[gMASK]<sop>``. The system
prompt is written once, at the start, chosen by the first turn's input mode (the demo clears
the history when the mode changes). Later turns append the previous answer's tokens and then
``<|user|>\\n…<|assistant|>streaming_transcription\\n`` again; the answer ends at ``<|user|>``.

Here the same sequence is built from ids: control and audio tokens are placed directly, and
each run of text between them is encoded as one piece — exactly the pieces the published
tokenizer sees — as ordinary text, so user text cannot smuggle in control tokens. An
assistant turn from history is re-interleaved as the model produced it: 13 text tokens, 26
audio tokens, repeating, then the remaining audio (the stream policy's numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from reempathy.backbones.base import StreamPolicy, Turn, VocabLayout
from reempathy.errors import InputError

SPEECH_SYSTEM_PROMPT = (
    "User will provide you with a speech instruction. Do it step by step. First, think about the "
    "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens. "
)
TEXT_SYSTEM_PROMPT = (
    "User will provide you with a text instruction. Do it step by step. First, think about the "
    "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens."
)
ASSISTANT_HEADER = "streaming_transcription\n"
PREFIX = ("[gMASK]", "<sop>")
GLM4_VOICE_STREAM = StreamPolicy(text_tokens=13, audio_tokens=26)


def interleave(text_ids: Sequence[int], audio_ids: Sequence[int], stream: StreamPolicy) -> list[int]:
    """Text and audio ids in the model's output order: ``text_tokens`` text, ``audio_tokens`` audio, repeating."""
    out: list[int] = []
    t = a = 0
    while t < len(text_ids):
        out.extend(text_ids[t : t + stream.text_tokens])
        t += stream.text_tokens
        out.extend(audio_ids[a : a + stream.audio_tokens])
        a += stream.audio_tokens
    out.extend(audio_ids[a:])
    return out


@dataclass(frozen=True)
class Glm4VoicePrompt:
    """Callable ``turns -> ids`` for the published GLM-4-Voice chat format.

    ``system_prompt`` replaces the default (speech or text instruction prompt, by the first
    user turn's input); an empty string leaves the system block out. A leading ``system``
    turn overrides both.
    """

    encode_text: Callable[[str], list[int]]
    layout: VocabLayout
    stream: StreamPolicy = GLM4_VOICE_STREAM
    system_prompt: str | None = None

    def __call__(self, turns: Sequence[Turn]) -> list[int]:
        turns = list(turns)
        _check(turns)
        pieces: list[int | str] = [self.layout.token_id(t) for t in PREFIX]
        system = self._system_text(turns)
        if system is not None:
            pieces += [self.layout.token_id("<|system|>"), "\n" + system]
        for turn in turns:
            if turn.role == "user":
                pieces += self._user(turn)
            elif turn.role == "assistant":
                pieces += self._assistant(turn)
        pieces += [self.layout.token_id("<|assistant|>"), ASSISTANT_HEADER]
        return self._encode(pieces)

    def _system_text(self, turns: list[Turn]) -> str | None:
        if turns[0].role == "system":
            return turns[0].text or ""
        if self.system_prompt is not None:
            return self.system_prompt or None
        first_user = next(t for t in turns if t.role == "user")
        return SPEECH_SYSTEM_PROMPT if first_user.units is not None else TEXT_SYSTEM_PROMPT

    def _user(self, turn: Turn) -> list[int | str]:
        pieces: list[int | str] = [self.layout.token_id("<|user|>"), "\n" + (turn.text or "")]
        if turn.units is not None:
            pieces.append(self.layout.token_id("<|begin_of_audio|>"))
            pieces += [self.layout.unit_to_token(int(u)) for u in turn.units]
            pieces.append(self.layout.token_id("<|end_of_audio|>"))
        return pieces

    def _assistant(self, turn: Turn) -> list[int | str]:
        text_ids = self.encode_text(turn.text) if turn.text else []
        audio_ids = [self.layout.unit_to_token(int(u)) for u in turn.units or ()]
        return [self.layout.token_id("<|assistant|>"), ASSISTANT_HEADER, *interleave(text_ids, audio_ids, self.stream)]

    def _encode(self, pieces: list[int | str]) -> list[int]:
        ids: list[int] = []
        text = ""
        for piece in pieces:
            if isinstance(piece, str):
                text += piece
                continue
            if text:
                ids += self.encode_text(text)
                text = ""
            ids.append(piece)
        if text:
            ids += self.encode_text(text)
        return ids


def _check(turns: list[Turn]) -> None:
    if not turns:
        raise InputError("the prompt has no turns; give at least one user turn")
    for number, turn in enumerate(turns):
        if turn.role not in ("system", "user", "assistant"):
            raise InputError(f"turn {number} has role {turn.role!r}; use system, user or assistant")
        if turn.role == "system" and number != 0:
            raise InputError(f"turn {number} is a system turn; only the first turn may be a system turn")
        if turn.role == "user" and not turn.text and turn.units is None:
            raise InputError(f"user turn {number} has neither text nor units; give one of them")
    if turns[-1].role != "user":
        raise InputError(f"the last turn is a {turns[-1].role} turn; the prompt must end with the user turn to answer")

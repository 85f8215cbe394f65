"""The answer's audio of an ``EvalItem``: its WAV read, or one line saying why there is none.

Both speech-quality evaluators listen to the WAV ``reempathy run --speech`` wrote and never
synthesise units themselves: what they measure is the audio the run produced. A record without
a WAV, or whose WAV cannot be read, becomes a failed record with this line as its error.
"""

from __future__ import annotations

from reempathy.errors import InputError
from reempathy.evaluation.base import EvalItem
from reempathy.speech.audio import MAX_SECONDS, Audio, read_wav

NO_WAV = (
    "no WAV: run with --speech (`reempathy run … --speech` writes each answer's audio to DIR/wav/; "
    "an answer without audio units gets none)"
)


class NoAudio(Exception):
    """The item has no usable answer audio; the message is the record's one-line error."""


def answer_audio(item: EvalItem) -> Audio:
    """The answer's WAV (``EvalItem.answer_wav``) read by :func:`reempathy.speech.audio.read_wav`; ``NoAudio`` otherwise."""
    if not item.answer_wav:
        raise NoAudio(NO_WAV)
    try:
        return read_wav(item.answer_wav, MAX_SECONDS)
    except InputError as exc:
        raise NoAudio(str(exc)) from None


__all__ = ["NO_WAV", "NoAudio", "answer_audio"]

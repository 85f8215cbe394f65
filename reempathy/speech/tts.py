"""What a text-to-speech plugin is given and gives back: the contract of ``reempathy_register_tts``.

A TTS plugin (``register(name, factory, Options)`` in ``reempathy_register_tts``; ``factory(options,
backbone)``) returns an object with ``speak(requests)``: for each :class:`SpeechRequest` (a turn's
text, its role, a seed) one :class:`Speech`, either audio ``units`` of the backbone's speech
tokenizer (the built-in ``read-aloud`` gives those: the backbone speaks the text itself) or a
``wave`` at ``sample_rate`` (CosyVoice2 and the like), which ``reempathy voice`` turns into units
with the backbone's speech tokenizer. A request the TTS cannot speak is a :class:`Speech` with an
``error`` (that record fails alone); anything the TTS raises is its plugin's failure.

The role lets one TTS give the user and the assistant different voices; ``reempathy voice
--user-tts NAME`` gives user turns a TTS of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Protocol, runtime_checkable

import torch


@dataclass
class SpeechRequest:
    """One turn to speak: the caller's ``key`` (returned with the speech), its ``text``, ``role`` and ``seed``."""

    key: Any
    text: str
    role: str = "assistant"
    seed: int = 0


@dataclass
class Speech:
    """A turn spoken: ``units`` (audio units) or ``wave`` (mono float32 at ``sample_rate``), or an ``error``."""

    units: list[int] | None = None
    wave: torch.Tensor | None = None
    sample_rate: int | None = None
    error: str | None = None


@runtime_checkable
class TTS(Protocol):
    """What ``reempathy voice`` needs of an object a registered TTS factory built."""

    def speak(self, requests: Iterable[SpeechRequest]) -> Iterator[tuple[Any, Speech]]:
        """``(request.key, speech)`` for every request, in any order (a batch may finish its rows out of order)."""
        ...


__all__ = ["SpeechRequest", "Speech", "TTS"]

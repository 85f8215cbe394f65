"""Labels for every position of a decoded sequence, and the segments strategies ask about."""

from __future__ import annotations

from dataclasses import dataclass

PROMPT = "prompt"
"""Label of the prompt's positions."""
SPOKEN_TEXT = "spoken_text"
"""Label of a text token of the spoken stream (heard)."""
SPOKEN_AUDIO = "spoken_audio"
"""Label of an audio-unit token of the spoken stream (heard)."""
CONTROL = "control"
"""Label of forced tokens and of sampled tokens that are neither text nor audio (delimiters, specials)."""
SPEAK = "speak"
"""The phase whose tokens are heard; any other phase name (``reflection``, ``thought``) is a hidden phase's."""


@dataclass(slots=True)
class Segment:
    """One stay in a phase: positions ``[start, end)`` of its content — generated tokens and a ``Switch``'s ``prefix``, not delimiters.

    ``index`` counts the segments of that phase from 1 (reflection 1, reflection 2, …).
    """

    phase: str
    hidden: bool
    index: int
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Span:
    """A maximal run of positions with one ``label`` inside one segment (``segment`` is its number, 0 for prompt)."""

    label: str
    start: int
    end: int
    segment: int

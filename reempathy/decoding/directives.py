"""What a strategy answers when a token has been sampled."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Continue:
    """Append the token and go on in the same phase."""


@dataclass(frozen=True, slots=True)
class Switch:
    """Append the token (unless ``keep_token`` is False), then the ``forced`` tokens, then enter ``phase``.

    ``hidden`` marks a phase whose tokens are never spoken (reflection, thought). Entering a
    phase, even the same one again, starts a new segment. ``forced`` go through the model in the
    same forward call as the sampled token (in a batch: as that row's next inputs);
    they are labelled ``control``.
    """

    phase: str
    forced: tuple[int, ...] = ()
    hidden: bool = False
    keep_token: bool = True


@dataclass(frozen=True, slots=True)
class Stop:
    """End the answer; ``keep_token`` says whether the sampled token belongs to it."""

    reason: str = "strategy"
    keep_token: bool = False


Directive = Continue | Switch | Stop
"""What ``reempathy_token`` may answer (``None`` means :data:`CONTINUE`)."""
CONTINUE = Continue()
"""The shared :class:`Continue` instance."""

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
    they are labelled ``control`` (delimiters). ``prefix`` tokens are forced the same way, right
    after them, but belong to the new phase: labelled as its tokens, inside its segment, part of
    its text (``Switch("reflection", forced=(open_id,), hidden=True,
    prefix=tuple(backbone.encode_text("Thinking:")))``). Token ids must be in the backbone's
    vocabulary.
    """

    phase: str
    forced: tuple[int, ...] = ()
    hidden: bool = False
    keep_token: bool = True
    prefix: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Stop:
    """End the answer; ``keep_token`` says whether the sampled token belongs to it."""

    reason: str = "strategy"
    keep_token: bool = False


Directive = Continue | Switch | Stop
"""What ``reempathy_token`` may answer (``None`` means :data:`CONTINUE`)."""
CONTINUE = Continue()
"""The shared :class:`Continue` instance."""

"""Built-in backbones: ``tiny`` (random, built from a config) and ``glm-4-voice`` (a local checkpoint)."""

from __future__ import annotations

from reempathy.decoding.hookspecs import Register
from reempathy.hooks import hookimpl


@hookimpl
def reempathy_register_backbones(register: Register) -> None:
    from reempathy.backbones.tiny import TinyOptions, load_tiny

    register("tiny", load_tiny, TinyOptions, "small random GLM with GLM-4-Voice's token layout (no download)")

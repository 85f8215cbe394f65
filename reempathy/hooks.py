"""The marker plugins use: ``from reempathy.hooks import hookimpl``."""

import pluggy

hookimpl = pluggy.HookimplMarker("reempathy")

__all__ = ["hookimpl"]

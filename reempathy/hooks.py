"""The marker plugins use: ``from reempathy.hooks import hookimpl``."""

import pluggy

hookimpl = pluggy.HookimplMarker("reempathy")
"""Marks a hook implementation: ``@hookimpl``, or ``@hookimpl(tryfirst=True)``, ``@hookimpl(wrapper=True)`` (pluggy's options)."""

__all__ = ["hookimpl"]

"""The markers plugins and hook specifications use: ``from reempathy.hooks import hookimpl``."""

from typing import Callable

import pluggy

hookimpl = pluggy.HookimplMarker("reempathy")
"""Marks a hook implementation: ``@hookimpl``, or ``@hookimpl(tryfirst=True)``, ``@hookimpl(wrapper=True)`` (pluggy's options)."""

hookspec = pluggy.HookspecMarker("reempathy")
"""Marks a hook specification (reempathy.hookspecs, reempathy.decoding.hookspecs)."""

Register = Callable[..., None]
"""The callback a discovery hook receives: ``register(name, factory, config_model, description="", **fields)``."""

__all__ = ["hookimpl", "hookspec", "Register"]

"""What a plugin's hook implementations may be: the checks the registry and the session plugin manager share.

Where it decides: :func:`check_hooks` — known hook names (with a "did you mean" for a near miss),
argument names from the hookspec, ``@hookimpl`` present, a wrapper that is a generator. It knows
hooks only through the ``known`` map it is given, so the core checks run hooks and the registry
(above it) checks every hook with the same code.
"""

from __future__ import annotations

import difflib
import inspect
from types import FunctionType, ModuleType
from typing import Collection, Sequence

_HOOK_PREFIX = "reempathy_"


def spec_args(*modules: ModuleType) -> dict[str, tuple[str, ...]]:
    """Hook name → its argument names, for every ``reempathy_*`` hookspec in ``modules``."""
    out: dict[str, tuple[str, ...]] = {}
    for module in modules:
        for name, fn in vars(module).items():
            if name.startswith(_HOOK_PREFIX) and callable(fn) and name not in out:
                out[name] = tuple(inspect.signature(fn).parameters)
    return out


def _signature(name: str, args: Sequence[str]) -> str:
    return f"{name}({', '.join(args)})"


def check_hooks(
    plugin: object, known: dict[str, tuple[str, ...]], run_hooks: Collection[str]
) -> tuple[list[str], list[str]]:
    """``(errors, run_hooks)`` of a plugin's hook implementations (a module, class or object).

    ``known`` maps the hooks there are to their arguments (:func:`spec_args`). Errors: an argument
    that is not in the hookspec, an unknown ``reempathy_*`` hook marked ``@hookimpl``, a
    ``reempathy_*`` hook name defined without ``@hookimpl`` (never called), a wrapper that is not a
    generator. The second list names the implemented hooks among ``run_hooks``.
    """
    errors: list[str] = []
    run: list[str] = []
    for attr in sorted(dir(plugin)):
        if not attr.startswith(_HOOK_PREFIX):
            continue
        try:
            raw = inspect.getattr_static(plugin, attr)
        except AttributeError:
            continue
        fn = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
        # A function found on the class of an object is called bound: its first argument is the object.
        bound = (
            not isinstance(plugin, (ModuleType, type))
            and isinstance(raw, (classmethod, FunctionType))
            and attr not in getattr(plugin, "__dict__", {})
        )
        if not callable(fn):
            continue
        opts = getattr(fn, "reempathy_impl", None)
        marked = opts is not None
        if attr not in known:
            if marked:
                close = difflib.get_close_matches(attr, known, n=1, cutoff=0.8)
                hint = f"did you mean {close[0]}? " if close else ""
                errors.append(f"@hookimpl {attr} is not a reempathy hook ({hint}known: {', '.join(sorted(known))})")
            continue
        if not marked:
            errors.append(f"{attr} is defined without @hookimpl (from reempathy.api import hookimpl) and would never be called")
            continue
        params = list(inspect.signature(fn).parameters)
        if bound:
            params = params[1:]
        extra = [p for p in params if p not in known[attr]]
        if extra:
            errors.append(
                f"hook {_signature(attr, params)}: argument {extra[0]!r} is not in the hookspec "
                f"{_signature(attr, known[attr])}"
            )
            continue
        if (opts.get("wrapper") or opts.get("hookwrapper")) and not inspect.isgeneratorfunction(inspect.unwrap(fn)):
            errors.append(
                f"hook {attr} is marked @hookimpl(wrapper=True) but is not a generator: a wrapper must `yield` "
                "once to get the other implementations' result (docs/plugins.md, wrappers); drop wrapper=True "
                "for an ordinary hook"
            )
            continue
        if attr in run_hooks:
            run.append(attr)
    return errors, run


__all__ = ["check_hooks", "spec_args"]

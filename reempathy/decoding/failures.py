"""Which plugin failed: a run hook raising becomes ``PluginFailure(plugin, hook, error)``.

Where it decides: :func:`hook_failure` finds the hook implementation that raised by walking the
exception's traceback, so the loop pays nothing while nothing fails (a ``try`` costs nothing in
Python 3.11 until it catches); the plugin is named by the registered name the runner recorded
with :func:`remember_name` when it built the object, else by its class. Our own errors
(:class:`~reempathy.errors.ReempathyError`) pass through the loop unchanged: they already say what
to do. (A factory that raises is turned into ``PluginFailure`` by ``Registry.create``.)
"""

from __future__ import annotations

import inspect
import types
import weakref
from typing import Any

from reempathy.errors import PluginFailure

# plugin object -> the name it was registered under (objects that cannot be weakly referenced
# are named by their class instead).
_NAMES: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def remember_name(plugin: object, name: str) -> None:
    """Record that ``plugin`` was built for the registered name ``name`` (used in failure messages)."""
    try:
        _NAMES[plugin] = name
    except TypeError:  # not weakly referenceable or not hashable: its class names it
        pass


def plugin_name(plugin: object) -> str:
    """The plugin's registered name where known, else its class name (a module's name for a module)."""
    try:
        name = _NAMES.get(plugin)
    except TypeError:
        name = None
    if name is not None:
        return name
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    return type(plugin).__name__


def _code_of(function: Any) -> Any:
    function = inspect.unwrap(getattr(function, "__func__", function))
    return getattr(function, "__code__", None)


def culprit(pm: Any, hook_name: str, error: BaseException) -> object | None:
    """The plugin whose implementation of ``hook_name`` is on ``error``'s traceback (outermost first)."""
    impls = getattr(pm.hook, hook_name).get_hookimpls()
    by_code: dict[Any, list[Any]] = {}
    for impl in impls:
        code = _code_of(impl.function)
        if code is not None:
            by_code.setdefault(code, []).append(impl)
    tb = error.__traceback__
    while tb is not None:
        found = by_code.get(tb.tb_frame.f_code)
        if found:
            if len(found) == 1:
                return found[0].plugin
            this = tb.tb_frame.f_locals.get("self")  # two objects of one class: match the instance
            for impl in found:
                if impl.plugin is this:
                    return impl.plugin
            return found[0].plugin
        tb = tb.tb_next
    return impls[0].plugin if len(impls) == 1 else None


def hook_failure(pm: Any, hook_name: str, error: Exception) -> PluginFailure:
    """A ``PluginFailure`` naming the session plugin whose ``hook_name`` raised ``error``."""
    plugin = culprit(pm, hook_name, error)
    if plugin is not None:
        name = plugin_name(plugin)
    else:
        names = sorted({plugin_name(impl.plugin) for impl in getattr(pm.hook, hook_name).get_hookimpls()})
        name = "one of " + ", ".join(names) if names else "unknown"
    return PluginFailure(name, hook_name, error)


def answer_failure(pm: Any, hook_name: str, error: Exception) -> PluginFailure:
    """A ``PluginFailure`` for an answer of ``hook_name`` that the loop cannot use (``error`` says why).

    pluggy hands the loop the answers, not who gave them: the plugin is named when one
    implementation of the hook could have given it (the usual case: the strategy alone answers
    ``reempathy_token``), else the candidates are listed in call order. Nothing is called again.
    """
    impls = getattr(pm.hook, hook_name).get_hookimpls()
    names = list(dict.fromkeys(plugin_name(impl.plugin) for impl in reversed(impls)))  # pluggy calls the last first
    name = names[0] if len(names) == 1 else ("one of " + ", ".join(names) if names else "unknown")
    return PluginFailure(name, hook_name, error)


__all__ = ["answer_failure", "culprit", "hook_failure", "plugin_name", "remember_name"]

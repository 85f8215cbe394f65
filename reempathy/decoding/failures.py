"""Which plugin failed: a run hook raising, or answering what the loop cannot use, becomes ``PluginFailure(plugin, hook, error)``.

Where it decides: :func:`hook_failure` finds the hook implementation that raised by walking the
exception's traceback, so the loop pays nothing while nothing fails (a ``try`` costs nothing in
Python 3.11 until it catches); the plugin is named by the registered name the runner recorded
with :func:`remember_name` when it built the object, else by its class. Our own errors
(:class:`~reempathy.errors.ReempathyError`) pass through the loop unchanged: they already say what
to do. (A factory that raises is turned into ``PluginFailure`` by ``Registry.create``.)

An answer the loop cannot use — not ``None`` or a directive, a ``Switch`` whose ids are not token
ids of the vocabulary — is worded here too (:func:`not_a_directive`, :func:`switch_ids`) and named by
:func:`answer_failure`; the row checks the answer's type with the identity test it makes anyway,
and the ids only at a switch. :func:`register_checked` turns pluggy's refusal of a session plugin
(a wrapper that is not a generator) into one line naming the plugin.
"""

from __future__ import annotations

import inspect
import types
import weakref
from typing import Any

import pluggy

from reempathy.decoding.directives import Continue, Stop, Switch
from reempathy.errors import PluginError, PluginFailure

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

# --- answers the loop cannot use ------------------------------------------------------------------

DIRECTIVE_TYPES = frozenset({Continue, Switch, Stop, type(None)})
"""What a run hook may answer: ``None`` or one of the directives (exactly: a subclass is refused)."""


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def not_a_directive(value: Any) -> TypeError:
    """The error for a hook answer that is not ``None`` or a directive (a subclass of one included)."""
    if isinstance(value, (Continue, Switch, Stop)):
        what = f"a subclass of {type(value).__mro__[1].__name__}"
    else:
        what = f"a {type(value).__name__}"
    return TypeError(
        f"answered {_shown(value)} ({what}), which is not a directive; return None, Continue(), "
        "Switch(phase, forced=…, hidden=…, prefix=…) or Stop(reason) (from reempathy.api)"
    )


def _bad_ids(values: Any, vocab: int) -> str | None:
    """What is wrong with ``values`` as token ids (None: nothing, given as integers of another type)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (tuple, list)):
        return f"must be a tuple of token ids, got {_shown(values)}"
    for t in values:
        try:
            value = None if isinstance(t, bool) else int(t.__index__())
        except (AttributeError, TypeError, ValueError, RuntimeError):
            value = None
        if value is None:
            return f"holds {_shown(t)} (a {type(t).__name__}), not a token id"
        if not 0 <= value < vocab:
            return f"token id {value} is outside the vocabulary 0..{vocab - 1}"
    return None


def switch_ids(pm: Any, switch: Switch, hook_name: str, backbone: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(forced, prefix)`` of a ``Switch`` as token ids of ``backbone``'s vocabulary; ``PluginFailure`` otherwise.

    Called only at a switch (a few times an answer), so the common case costs one ``all()`` over a
    delimiter or two; anything else is looked at only to word the error.
    """
    if not isinstance(switch.phase, str) or not switch.phase:
        raise answer_failure(pm, hook_name, TypeError(
            f"{_shown(switch)}: phase must be a non-empty string (SPEAK, or a hidden phase such as 'reflection'), "
            f"got {_shown(switch.phase)}"
        ))
    vocab = backbone.layout.vocab_size
    out = []
    for field in ("forced", "prefix"):
        values = getattr(switch, field)
        if type(values) is tuple and all(type(t) is int and 0 <= t < vocab for t in values):
            out.append(values)
            continue
        problem = _bad_ids(values, vocab)
        if problem is None:  # numpy or 0-d tensor integers: kept as plain ints
            out.append(tuple(int(t.__index__()) for t in values))
            continue
        raise answer_failure(pm, hook_name, ValueError(
            f"{_shown(switch)}: {field} {problem} of backbone {backbone.name!r}; look ids up with "
            "backbone.layout.token_id(NAME) or backbone.encode_text(TEXT)"
        ))
    return out[0], out[1]


def register_checked(pm: Any, plugin: object, name: str) -> None:
    """Register one session plugin; pluggy's refusal (a wrapper that is not a generator, an argument
    not in the hookspec) becomes one line naming the plugin, as the registry words it."""
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        from reempathy.decoding import hookspecs
        from reempathy.decoding.hookcheck import check_hooks, spec_args

        problems = check_hooks(plugin, spec_args(hookspecs), hookspecs.RUN_HOOKS)[0] or [" ".join(str(exc).split())]
        raise PluginError(f"plugin {plugin_name(plugin)!r}: {'; '.join(problems)}") from None


__all__ = [
    "DIRECTIVE_TYPES",
    "answer_failure",
    "culprit",
    "hook_failure",
    "not_a_directive",
    "plugin_name",
    "register_checked",
    "remember_name",
    "switch_ids",
]

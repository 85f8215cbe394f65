"""Building an evaluator by name: options validated by the registered model, the factory wrapped.

An unknown evaluator or option is a ``ConfigError`` naming it (exit 2); a factory that raises
something other than our own errors is the plugin's fault: ``PluginFailure`` (exit 1).
"""

from __future__ import annotations

from typing import Any, Sequence

from pydantic import BaseModel

from reempathy.registry import Registry
from reempathy.errors import PluginError, PluginFailure, ReempathyError
from reempathy.evaluation.base import Evaluator


def evaluator_options(registry: Registry, name: str, options: dict[str, Any]) -> BaseModel:
    """The evaluator's options, validated (errors name the option and list the valid ones)."""
    return registry.validate("evaluator", name, options)


def build_evaluator(registry: Registry, name: str, options: dict[str, Any]) -> Evaluator:
    """Validate ``options`` and build evaluator ``name`` through its registered factory."""
    validated = evaluator_options(registry, name, options)
    reg = registry.get("evaluator", name)
    try:
        evaluator = reg.factory(validated)
    except ReempathyError:
        raise
    except Exception as exc:  # a plugin's own code may fail in any way
        raise PluginFailure(reg.plugin, f"evaluator {name!r} factory", exc) from exc
    if not isinstance(evaluator, Evaluator):
        raise PluginError(
            f"evaluator {name!r} (plugin {reg.plugin!r}): its factory returned {type(evaluator).__name__}, which has "
            "no evaluate(items) method or score_names"
        )
    return evaluator


def call_evaluator(evaluator: Any, name: str, items: Sequence[Any], method: str = "evaluate") -> list[Any]:
    """``evaluator.<method>(items)`` (``evaluate`` or ``compare``), one answer per item in order.

    The evaluator's own crash is a :class:`PluginFailure` (exit 1) naming it, and so is an answer
    with the wrong number of results; a per-item failure stays in the answer for the caller.
    """
    try:
        out = list(getattr(evaluator, method)(list(items)))
    except ReempathyError:
        raise
    except Exception as exc:  # the evaluator's own code failed, in any way
        raise PluginFailure(name, f"evaluator.{method}", exc) from exc
    if len(out) != len(items):
        raise PluginFailure(name, f"evaluator.{method}", ValueError(f"returned {len(out)} results for {len(items)} items"))
    return out


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set K=V`` pairs as an options dict (values read as TOML; dotted keys make tables)."""
    from reempathy.config import apply_overrides

    return apply_overrides({}, items)


__all__ = ["build_evaluator", "evaluator_options", "parse_sets", "call_evaluator"]

"""How the data commands (``reflect-data``, ``pairs``) talk to an evaluator and split their ``--set`` flags.

Where it decides:

- :func:`split_sets`: a ``--set KEY=VALUE`` whose first key part names a config table the command
  reads (``backbone.seed=1``, ``sampling.temperature=1.0``) overrides the config; every other key is
  an option of the evaluator, spelled as in ``reempathy eval`` (``--set endpoint=URL``).
- :func:`call_evaluator` (from :mod:`reempathy.evaluation.registry`): an evaluator's own crash is a
  :class:`PluginFailure` (exit 1) naming it, and so is an answer with the wrong number of results;
  a per-item failure stays an ``Evaluation.error`` for the command to handle.
"""

from __future__ import annotations

from typing import Any, Sequence

from reempathy.config import parse_override
from reempathy.evaluation.registry import call_evaluator  # noqa: F401 - the one place an evaluator is called


def split_sets(items: Sequence[str], config_tables: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """``--set`` items as (config overrides, evaluator options): see the module docstring."""
    from reempathy.evaluation.registry import parse_sets

    config: list[str] = []
    evaluator: list[str] = []
    for item in items:
        path, _ = parse_override(item)  # a malformed item is a ConfigError naming it
        (config if path[0] in config_tables else evaluator).append(item)
    return config, parse_sets(evaluator)


__all__ = ["split_sets", "call_evaluator"]

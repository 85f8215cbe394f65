"""``reempathy train`` with an ``[evaluator]`` table: find the evaluator's trainer through the registry.

Generic: an evaluator registered with a ``trainer`` field
(``register(name, factory, model, trainer=fn)``, ``fn(raw_config, options, progress, where) ->
result with .format()``) can be trained; the ``[evaluator]`` table names it and holds its
options, validated by its config model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reempathy.config import apply_overrides, read_toml
from reempathy.errors import ConfigError, NotAvailableError

TOP_LEVEL_KEYS = ("evaluator", "data", "train")


def is_evaluator_config(path: str | Path) -> bool:
    """Whether a training config trains an evaluator (it has an ``[evaluator]`` table)."""
    return "evaluator" in read_toml(path)


def train_evaluator(path: str | Path, overrides: list[str], progress: bool = True) -> Any:
    """Validate the config, build the evaluator's options, and run its trainer."""
    from reempathy.registry import default_discovery

    raw = apply_overrides(read_toml(path), overrides)
    where = f"config file {str(path)!r}"
    unknown = [k for k in raw if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys with [evaluator]: {', '.join(TOP_LEVEL_KEYS)}")
    table = raw.get("evaluator")
    if not isinstance(table, dict) or "name" not in table:
        raise ConfigError(f'{where}: [evaluator] needs a name, e.g. name = "empathyeval"')
    registry = default_discovery().registry
    name = str(table["name"])
    options = registry.validate("evaluator", name, {k: v for k, v in table.items() if k != "name"})
    reg = registry.get("evaluator", name)
    trainer = reg.trainer
    if trainer is None:
        raise NotAvailableError(f"evaluator {name!r} (plugin {reg.plugin!r}) cannot be trained by `reempathy train`")
    return trainer(raw, options, progress, where)


__all__ = ["train_evaluator", "is_evaluator_config"]

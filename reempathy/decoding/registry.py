"""Plugin discovery: the global plugin manager, entry points, and the registry of what plugins provide."""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import pluggy
from pydantic import BaseModel, ValidationError

from reempathy.decoding import hookspecs
from reempathy.errors import ConfigError, PluginError

ENTRY_POINT_GROUP = "reempathy"
STRICT_ENV = "REEMPATHY_STRICT_PLUGINS"
ONLY_ENV = "REEMPATHY_PLUGINS"
KINDS = ("strategy", "processor", "backbone", "evaluator")
_HOOK_OF_KIND = {
    "strategy": "reempathy_register_strategies",
    "processor": "reempathy_register_processors",
    "backbone": "reempathy_register_backbones",
    "evaluator": "reempathy_register_evaluators",
}


@dataclass
class Registration:
    """One named thing a plugin provides: ``factory`` builds it from a validated ``config_model``."""

    kind: str
    name: str
    factory: Callable[..., Any]
    config_model: type[BaseModel]
    description: str
    plugin: str


@dataclass
class PluginInfo:
    """A row of ``reempathy plugins``."""

    name: str
    source: str  # built-in | entry point | broken
    version: str | None
    hooks: list[str] = field(default_factory=list)
    provides: list[str] = field(default_factory=list)
    error: str | None = None


class Registry:
    """Strategies, processors, backbones and evaluators by name, filled by the discovery hooks."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Registration]] = {k: {} for k in KINDS}

    def add(self, reg: Registration) -> None:
        table = self.items[reg.kind]
        if reg.name in table:
            warnings.warn(
                f"plugin {reg.plugin!r} registers {reg.kind} {reg.name!r}, already registered by "
                f"{table[reg.name].plugin!r}; keeping the first",
                stacklevel=2,
            )
            return
        table[reg.name] = reg

    def names(self, kind: str) -> list[str]:
        return sorted(self.items[kind])

    def get(self, kind: str, name: str) -> Registration:
        try:
            return self.items[kind][name]
        except KeyError:
            raise ConfigError(
                f"unknown {kind} {name!r}; available: {', '.join(self.names(kind)) or '(none)'}"
            ) from None

    def validate(self, kind: str, name: str, options: dict[str, Any]) -> BaseModel:
        """Validate ``options`` with the registered config model; errors name the option."""
        reg = self.get(kind, name)
        try:
            return reg.config_model.model_validate(options)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, f"{kind} {name!r}", reg.config_model)) from None


def describe_validation_error(exc: ValidationError, where: str, model: type[BaseModel]) -> str:
    """One line from a pydantic error: the option, what is wrong, and the valid options when unknown."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(options)"
    if err["type"] == "extra_forbidden":
        valid = ", ".join(sorted(model.model_fields)) or "(none)"
        return f"{where}: unknown option {loc!r}; valid options: {valid}"
    if err["type"] == "missing":
        return f"{where}: option {loc!r} is required"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where}: option {loc!r}: {err['msg']} (got {err.get('input')!r}){more}"


class DiscoveryResult:
    """The global plugin manager, the registry it filled, and every plugin's row for the listing."""

    def __init__(self, pm: pluggy.PluginManager, registry: Registry, plugins: list[PluginInfo]) -> None:
        self.pm = pm
        self.registry = registry
        self.plugins = plugins


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _builtin_modules() -> list[Any]:
    from reempathy.plugins import BUILTIN_PLUGINS

    return list(BUILTIN_PLUGINS)


def discover(extra_plugins: list[tuple[str, object]] | None = None) -> DiscoveryResult:
    """Build a fresh plugin manager: built-ins, then entry points one at a time, then ``extra_plugins``."""
    pm = pluggy.PluginManager("reempathy")
    pm.add_hookspecs(hookspecs)
    rows: dict[str, PluginInfo] = {}
    for module in _builtin_modules():
        name = module.__name__
        pm.register(module, name=name)
        rows[name] = PluginInfo(name, "built-in", _own_version())
    only = {s.strip() for s in os.environ.get(ONLY_ENV, "").split(",") if s.strip()}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if only and ep.name not in only:
            continue
        version = ep.dist.version if ep.dist is not None else None
        try:
            obj = ep.load()
            pm.register(obj, name=ep.name)
        except Exception as exc:  # a third-party plugin may fail in any way
            _broken(rows, ep.name, version, f"{type(exc).__name__}: {exc}")
            continue
        rows[ep.name] = PluginInfo(ep.name, "entry point", version)
    for name, obj in extra_plugins or []:
        pm.register(obj, name=name)
        rows[name] = PluginInfo(name, "registered", None)

    registry = Registry()
    for kind, hook_name in _HOOK_OF_KIND.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin_name = impl.plugin_name

            def register(
                name: str,
                factory: Callable[..., Any],
                config_model: type[BaseModel],
                description: str = "",
                _kind: str = kind,
                _plugin: str = plugin_name,
            ) -> None:
                if not (isinstance(config_model, type) and issubclass(config_model, BaseModel)):
                    raise PluginError(f"{_kind} {name!r}: config_model must be a pydantic model class")
                registry.add(Registration(_kind, name, factory, config_model, description, _plugin))
                rows[_plugin].provides.append(f"{_kind}:{name}")

            try:
                impl.function(register=register)
            except Exception as exc:
                row = rows.get(plugin_name)
                _broken(rows, plugin_name, row.version if row else None, f"{type(exc).__name__}: {exc}")
                pm.unregister(name=plugin_name)
    for name, row in rows.items():
        plugin = pm.get_plugin(name)
        if plugin is not None:
            row.hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
    return DiscoveryResult(pm, registry, list(rows.values()))


def _broken(rows: dict[str, PluginInfo], name: str, version: str | None, error: str) -> None:
    if _strict():
        raise PluginError(f"plugin {name!r} failed to load ({error}); unset {STRICT_ENV} to skip it")
    warnings.warn(f"reempathy: plugin {name!r} failed to load and is skipped: {error}", stacklevel=3)
    rows[name] = PluginInfo(name, "broken", version, error=error)


@lru_cache(maxsize=1)
def _own_version() -> str:
    try:
        return importlib.metadata.version("reempathy")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


@lru_cache(maxsize=1)
def default_discovery() -> DiscoveryResult:
    """The process-wide discovery (cached; tests that install plugins call :func:`discover` themselves)."""
    return discover()

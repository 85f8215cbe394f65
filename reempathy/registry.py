"""Plugin discovery: the global plugin manager, where plugins come from, and the registry of what they provide.

Where it decides:

* :func:`discover` loads plugins in a fixed order (built-ins, installed entry points, single
  files from plugins directories, then ``extra_plugins``), each on its own: anything a plugin
  raises while loading or registering (``SystemExit`` included, ``KeyboardInterrupt`` excepted)
  marks that plugin broken and leaves the rest working.
* :func:`check_hooks` decides what a plugin's hook implementations may be: argument names
  from the hookspec, known hook names, ``@hookimpl`` present. Module-level *run* hooks are
  refused (never registered as hooks): run hooks are called on a per-session plugin manager
  that holds only the objects a session's factories returned (see docs/plugins.md).
* :meth:`Registry.add` keeps the first registration of a name; a later one loses the clash,
  is recorded and listed as lost.
* Every problem is one warning line per plugin per process (``logging``, logger
  ``reempathy.plugins``), or, with ``REEMPATHY_STRICT_PLUGINS=1``, a :class:`PluginError`.

The kinds of things plugins register live in :data:`KIND_HOOKS` (kind → discovery hook); a new
kind is one entry there and one hookspec.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Sequence

import pluggy
from pydantic import BaseModel, ValidationError

from reempathy import hookspecs
from reempathy.decoding.hookcheck import check_hooks as _check_hooks
from reempathy.decoding.hookcheck import spec_args
from reempathy.errors import ConfigError, PluginError, PluginFailure, ReempathyError

ENTRY_POINT_GROUP = "reempathy"
STRICT_ENV = "REEMPATHY_STRICT_PLUGINS"
ONLY_ENV = "REEMPATHY_PLUGINS"
PLUGINS_DIR_ENV = "REEMPATHY_PLUGINS_DIR"

#: kind → the discovery hook whose ``register`` callback fills it (one entry per kind).
KIND_HOOKS: dict[str, str] = {
    "strategy": "reempathy_register_strategies",
    "processor": "reempathy_register_processors",
    "backbone": "reempathy_register_backbones",
    "evaluator": "reempathy_register_evaluators",
    "command": "reempathy_register_commands",
}
#: kind → the registration fields a plugin may give besides name, factory, model and description.
KIND_FIELDS: dict[str, frozenset[str]] = {
    "strategy": frozenset({"special_tokens"}),  # tokens the strategy forces or samples: backbones add missing ones
    "evaluator": frozenset({"trainer"}),  # trainer(raw, options, progress, where): `reempathy train` an evaluator
}
#: kinds that have no options (their factory is not built from a config): ``config_model`` is None.
OPTIONLESS_KINDS = frozenset({"command"})
#: the plugins that ship with reempathy, loaded by name like any other (llm's DEFAULT_PLUGINS pattern):
#: the registry imports none of them, so the packages they live in may sit above it.
BUILTIN_PLUGINS = (
    "reempathy.plugins.strategies",
    "reempathy.plugins.processors",
    "reempathy.plugins.backbones",
    "reempathy.evaluation.plugin",
    "reempathy.commands",
)
KINDS = tuple(KIND_HOOKS)
#: kinds whose factories return session plugin objects (their run hooks are checked).
SESSION_KINDS = frozenset({"strategy", "processor"})

log = logging.getLogger("reempathy.plugins")


@dataclass
class Registration:
    """One named thing a plugin provides: ``factory`` builds it from a validated ``config_model``."""

    kind: str
    name: str
    factory: Callable[..., Any]
    config_model: type[BaseModel] | None
    description: str
    plugin: str
    fields: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        # A registration field of the kind (``special_tokens``, ``trainer``) reads as an attribute; None if not given.
        if name in KIND_FIELDS.get(self.__dict__.get("kind", ""), ()):
            return self.__dict__.get("fields", {}).get(name)
        raise AttributeError(name)


@dataclass
class PluginInfo:
    """A row of ``reempathy plugins``: where a plugin came from and what it provides.

    ``source`` is ``built-in``, ``entry point``, ``plugins dir`` or ``registered`` (passed to
    :func:`discover` in code). ``provides`` lists ``kind:name`` of every registration it won,
    ``lost`` those another plugin had registered first, ``refused`` hook implementations that
    are never called (with the reason), ``error`` why a broken plugin was skipped.
    """

    name: str
    source: str
    version: str | None
    hooks: list[str] = field(default_factory=list)
    provides: list[str] = field(default_factory=list)
    error: str | None = None
    distribution: str | None = None
    location: str | None = None
    lost: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    @property
    def broken(self) -> bool:
        """True when the plugin failed to load or register and was skipped."""
        return self.error is not None

    def to_json(self) -> dict[str, Any]:
        """The row as JSON (``reempathy plugins --json``)."""
        return {
            "name": self.name,
            "source": self.source,
            "status": "broken" if self.broken else "ok",
            "distribution": self.distribution,
            "version": self.version,
            "location": self.location,
            "hooks": self.hooks,
            "provides": self.provides,
            "lost": self.lost,
            "refused": self.refused,
            "error": self.error,
        }


class Registry:
    """Strategies, processors and backbones (and any kind in :data:`KIND_HOOKS`) by name."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Registration]] = {k: {} for k in KIND_HOOKS}
        #: ``(lost, kept)`` for every registration that lost a name clash
        self.lost: list[tuple[Registration, Registration]] = []

    def add(self, reg: Registration) -> bool:
        """Add ``reg``; False (and recorded in :attr:`lost`) when its name is already taken."""
        table = self.items.setdefault(reg.kind, {})
        if reg.name in table:
            self.lost.append((reg, table[reg.name]))
            return False
        table[reg.name] = reg
        return True

    def names(self, kind: str) -> list[str]:
        """Registered names of ``kind``, sorted."""
        return sorted(self.items.get(kind, {}))

    def get(self, kind: str, name: str) -> Registration:
        """The registration of ``kind`` ``name``; a :class:`ConfigError` listing what exists otherwise."""
        try:
            return self.items[kind][name]
        except KeyError:
            raise ConfigError(
                f"unknown {kind} {name!r}; available: {', '.join(self.names(kind)) or '(none)'}"
            ) from None

    def validate(self, kind: str, name: str, options: dict[str, Any], place: str | None = None) -> BaseModel:
        """Validate ``options`` with the registered config model; errors name the option (and ``place``, e.g. ``processors.1``)."""
        reg = self.get(kind, name)
        try:
            return reg.config_model.model_validate(options)
        except ValidationError as exc:
            where = f"{kind} {name!r}" + (f" ({place})" if place else "")
            raise ConfigError(describe_validation_error(exc, where, reg.config_model)) from None

    def create(self, kind: str, name: str, options: dict[str, Any] | BaseModel, *args: Any) -> Any:
        """Validate ``options`` and call the factory: ``factory(options, *args)``.

        A factory raising one of our errors (a :class:`ConfigError` for an option that does not
        fit the backbone, say) passes through; anything else it raises is the plugin's fault
        and becomes :class:`PluginFailure` naming the plugin and the factory. The returned
        session object's hook implementations are checked (:func:`check_hooks`), a backbone
        against the backbone contract (:func:`reempathy.backbones.contract.check_backbone`).
        """
        reg = self.get(kind, name)
        opts = options if isinstance(options, reg.config_model) else self.validate(kind, name, options)  # type: ignore[arg-type]
        try:
            obj = reg.factory(opts, *args)
        except (ReempathyError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise PluginFailure(reg.plugin, f"the {kind} factory of {name!r}", exc) from exc
        where = f"{kind} {name!r} of plugin {reg.plugin!r}"
        if kind in SESSION_KINDS:
            problems = _object_problems(obj)
            if problems:
                raise PluginError(f"{where}: {'; '.join(problems)}")
        elif kind == "backbone":
            from reempathy.backbones.contract import check_backbone

            check_backbone(obj, where)
        return obj


# pydantic puts the member of a union it tried into an error's location (``heads.list[int].0``);
# these parts are type names, not keys a user wrote, so messages leave them out.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|list|dict|tuple|set|literal)$|[\[\]\-,<>]", re.IGNORECASE)


def _shown(value: Any) -> str:
    """A value as the user wrote it in TOML: ``true``/``false`` for booleans, Python's repr otherwise."""
    return ("true" if value else "false") if isinstance(value, bool) else repr(value)


def describe_validation_error(exc: ValidationError, where: str, model: type[BaseModel]) -> str:
    """One line from a pydantic error: the option, what is wrong, and the valid options when unknown."""
    err = exc.errors()[0]
    parts = [str(p) for p in err["loc"]]
    keys = [p for p in parts if not _UNION_MEMBER.search(p)]
    loc = ".".join(keys) or "(options)"
    if len(keys) < len(parts) and keys and keys[0] in model.model_fields:
        # A value that fits none of a union's forms: say which forms the option takes.
        forms = _annotation_text(model.model_fields[keys[0]].annotation)
        msg = err["msg"].removeprefix("Value error, ")
        return f"{where}: option {loc!r}: {msg} (got {_shown(err.get('input'))}); {keys[0]!r} takes {forms}"
    if err["type"] == "extra_forbidden":
        valid = ", ".join(sorted(model.model_fields)) or "(none)"
        return f"{where}: unknown option {loc!r}; valid options: {valid}"
    if err["type"] == "missing":
        return f"{where}: option {loc!r} is required"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("value_error", "assertion_error"):  # the model's own check: its message names the values
        return f"{where}: {msg}{more}" if loc == "(options)" else f"{where}: option {loc!r}: {msg}{more}"
    return f"{where}: option {loc!r}: {msg} (got {_shown(err.get('input'))}){more}"


def _annotation_text(annotation: Any) -> str:
    """``list[int] | dict[str, list[int]] | None`` as written in the option model."""
    return str(annotation).replace("typing.", "")


@dataclass
class DiscoveryResult:
    """What :func:`discover` found: the global plugin manager, the registry it filled, one row per plugin."""

    pm: pluggy.PluginManager
    registry: Registry
    plugins: list[PluginInfo]

    def plugin(self, name: str) -> PluginInfo:
        """The row of plugin ``name``."""
        for row in self.plugins:
            if row.name == name:
                return row
        raise PluginError(f"no plugin named {name!r}; known: {', '.join(p.name for p in self.plugins)}")


# --- hook checks --------------------------------------------------------------------------------


def check_hooks(plugin: object) -> tuple[list[str], list[str]]:
    """``(errors, run_hooks)`` of a plugin's hook implementations, against every hook (:mod:`reempathy.hookspecs`)."""
    return _check_hooks(plugin, spec_args(hookspecs), hookspecs.RUN_HOOKS)


# Session objects are created for every decode; their class's hooks are checked once.
_checked_classes: weakref.WeakKeyDictionary[type, list[str]] = weakref.WeakKeyDictionary()


def _object_problems(obj: object) -> list[str]:
    if isinstance(obj, ModuleType):
        return check_hooks(obj)[0]
    cls = type(obj)
    try:
        known = _checked_classes.get(cls)
    except TypeError:
        known = None
    if known is None:
        known = check_hooks(obj)[0]
        try:
            _checked_classes[cls] = known
        except TypeError:
            pass
    return known


# --- discovery -----------------------------------------------------------------------------------


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


_warned: set[str] = set()


def _warn(key: str, message: str) -> None:
    """One clean line per plugin and kind of problem per process (``reempathy: warning: …``)."""
    if key in _warned:
        return
    _warned.add(key)
    log.warning("reempathy: warning: %s", message)


def _problem(key: str, what: str, consequence: str) -> None:
    """A plugin problem: an error in strict mode, else one warning line saying what happens instead."""
    if _strict():
        raise PluginError(f"{what}; unset {STRICT_ENV} to go on without it")
    _warn(key, f"{what}; {consequence}")


def plugin_command_failed(reg: Registration, exc: BaseException) -> None:
    """A registered command whose ``add_parser`` raised: one warning line (an error in strict mode); it is left out."""
    _problem(
        f"command:{reg.plugin}:{reg.name}",
        f"plugin {reg.plugin!r}: command {reg.name!r} failed to add its parser: {_one_line(exc)}",
        "the command is left out",
    )


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit({exc.code!r}) at import"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _builtin_modules() -> list[Any]:
    import importlib

    return [importlib.import_module(name) for name in BUILTIN_PLUGINS]


def _special_tokens(name: str, value: Any) -> tuple[str, ...]:
    """A strategy's ``special_tokens``: a sequence of distinct ``<|…|>`` strings."""
    tokens = (value,) if isinstance(value, str) else value
    try:
        tokens = tuple(tokens)
    except TypeError:
        tokens = (None,)
    if not all(isinstance(t, str) and re.fullmatch(r"<\|[A-Za-z0-9_]+\|>", t) for t in tokens) or len(set(tokens)) != len(tokens):
        raise PluginError(
            f"register({name!r}): special_tokens must be distinct strings such as '<|begin_of_aside|>', got {value!r}"
        )
    return tokens


def plugins_dirs_from_env() -> list[Path]:
    """Directories named by ``REEMPATHY_PLUGINS_DIR`` (``os.pathsep``-separated)."""
    return [Path(p) for p in os.environ.get(PLUGINS_DIR_ENV, "").split(os.pathsep) if p.strip()]


def _dir_plugins(dirs: Iterable[Path]) -> list[tuple[str, Path]]:
    found = []
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"plugins directory {str(d)!r} is not a directory; give a folder of *.py plugin files")
        for path in sorted(d.glob("*.py")):
            if not path.name.startswith(("_", ".")):
                found.append((path.stem, path))
    return found


def _import_file(name: str, path: Path) -> ModuleType:
    """Import a single-file plugin under a private module name (so it cannot shadow an installed module)."""
    module_name = f"reempathy_plugins_dir.{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


class _Discovery:
    """One run of :func:`discover` (kept small: each step is a method named for what it does)."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("reempathy")
        self.pm.add_hookspecs(hookspecs)
        self.rows: dict[str, PluginInfo] = {}
        self.order: list[str] = []

    def load(self, row: PluginInfo, loader: Callable[[], object]) -> None:
        """Load and register one plugin; whatever it raises (but Ctrl-C) makes it broken, not fatal."""
        name = row.name
        if name in self.rows and not self.rows[name].broken and self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)  # a later source replaces an earlier one of the same name
            self.order.remove(name)
        self.rows[name] = row
        try:
            obj = loader()
            errors, run = check_hooks(obj)
            if errors:
                raise PluginError("; ".join(errors))
            if self.pm.is_registered(obj):
                # The same object under another name (an installed plugin also passed in code).
                old = self.pm.get_name(obj)
                self.pm.unregister(obj)
                if old in self.order:
                    self.order.remove(old)
                    self.rows.pop(old, None)
            self.pm.register(obj, name=name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 — a third-party plugin may fail in any way, sys.exit() included
            self.broken(row, exc.args[0] if isinstance(exc, PluginError) else _one_line(exc))
            return
        self.order.append(name)
        if run:
            row.refused = [f"{h} (a module-level run hook is never called)" for h in run]
            _problem(
                f"refused:{name}",
                f"plugin {name!r} implements run hooks at module level ({', '.join(run)}), which are never called",
                "move them to the object a strategy or processor factory returns (docs/plugins.md, run hooks)",
            )

    def broken(self, row: PluginInfo, error: str) -> None:
        row.error = error
        row.provides = []
        if self.pm.get_plugin(row.name) is not None:
            self.pm.unregister(name=row.name)
        if row.name in self.order:
            self.order.remove(row.name)
        _problem(f"broken:{row.name}", f"plugin {row.name!r} failed to load: {error}", "it is skipped")

    def register_all(self, registry: Registry) -> None:
        """Call each plugin's discovery hooks; a plugin whose hook raises contributes nothing."""
        for name in list(self.order):
            plugin = self.pm.get_plugin(name)
            row = self.rows[name]
            mine: list[Registration] = []
            try:
                for kind, hook_name in KIND_HOOKS.items():
                    fn = getattr(plugin, hook_name, None)
                    if fn is None or getattr(fn, "reempathy_impl", None) is None:
                        continue
                    fn(register=self._register_callback(kind, name, mine))
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001
                self.broken(row, exc.args[0] if isinstance(exc, PluginError) else _one_line(exc))
                continue
            clashes = []
            lost = []
            for reg in mine:
                if registry.add(reg):
                    row.provides.append(f"{reg.kind}:{reg.name}")
                    continue
                kept = registry.items[reg.kind][reg.name]
                row.lost.append(f"{reg.kind}:{reg.name} (kept from {kept.plugin!r})")
                clashes.append(f"{reg.kind} {reg.name!r} (already registered by {kept.plugin!r})")
                lost.append(f"{reg.kind} {reg.name!r}")
            if clashes:
                _problem(
                    f"clash:{name}",
                    f"plugin {name!r} registers {', '.join(clashes)}: give {', '.join(lost)} another name in plugin {name!r}",
                    "until then the earlier registration is kept",
                )

    @staticmethod
    def _register_callback(kind: str, plugin: str, out: list[Registration]) -> Callable[..., None]:
        allowed = KIND_FIELDS.get(kind, frozenset())

        def register(
            name: str, factory: Callable[..., Any], config_model: type[BaseModel] | None = None,
            description: str = "", **fields: Any,
        ) -> None:
            if not isinstance(name, str) or not name.strip():
                raise PluginError(f"register(): the {kind} name must be a non-empty string, got {name!r}")
            if not callable(factory):
                raise PluginError(f"register({name!r}): factory must be callable, got {factory!r}")
            if kind in OPTIONLESS_KINDS:
                if config_model is not None:
                    raise PluginError(f"register({name!r}): a {kind} has no options; pass config_model=None")
            elif not (isinstance(config_model, type) and issubclass(config_model, BaseModel)):
                raise PluginError(f"register({name!r}): config_model must be a pydantic model class")
            unknown = sorted(set(fields) - allowed)
            if unknown:
                known = ", ".join(sorted(allowed)) or "none"
                raise PluginError(f"register({name!r}): unknown {kind} field {unknown[0]!r} (fields of a {kind}: {known})")
            if "special_tokens" in fields:
                fields["special_tokens"] = _special_tokens(name, fields["special_tokens"])
            if fields.get("trainer") is not None and not callable(fields["trainer"]):
                raise PluginError(f"register({name!r}): trainer must be callable, got {fields['trainer']!r}")
            out.append(Registration(kind, name, factory, config_model, str(description or ""), plugin, dict(fields)))

        return register

    def finish(self) -> list[PluginInfo]:
        for name, row in self.rows.items():
            plugin = self.pm.get_plugin(name)
            if plugin is not None and not row.broken:
                refused = {r.split(" ", 1)[0] for r in row.refused}
                callers = self.pm.get_hookcallers(plugin) or []
                row.hooks = sorted(h.name for h in callers if h.name not in refused)
        return list(self.rows.values())


def discover(
    extra_plugins: Sequence[tuple[str, object]] | None = None,
    *,
    installed: bool = True,
    plugins_dirs: Sequence[str | Path] | None = None,
) -> DiscoveryResult:
    """Find every plugin and fill a fresh registry.

    Order (the first registration of a name wins): built-ins; installed entry points of the
    ``reempathy`` group (unless ``installed=False``); ``*.py`` files of ``plugins_dirs`` (by
    default the directories in ``REEMPATHY_PLUGINS_DIR``, not read when ``installed=False``);
    then ``extra_plugins`` — ``(name, module or object)`` pairs — which replace an installed
    plugin of the same name or the same object. ``REEMPATHY_PLUGINS=a,b`` limits which
    entry points and plugin files load.
    """
    d = _Discovery()
    own = _own_version()
    for module in _builtin_modules():
        d.load(PluginInfo(module.__name__, "built-in", own, distribution="reempathy", location=module.__name__),
               lambda m=module: m)
    only = {s.strip() for s in os.environ.get(ONLY_ENV, "").split(",") if s.strip()}
    if installed:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if only and ep.name not in only:
                continue
            dist = ep.dist
            row = PluginInfo(
                ep.name, "entry point", dist.version if dist is not None else None,
                distribution=dist.metadata["Name"] if dist is not None else None, location=ep.value,
            )
            d.load(row, ep.load)
    dirs = [Path(p) for p in plugins_dirs] if plugins_dirs is not None else (plugins_dirs_from_env() if installed else [])
    for name, path in _dir_plugins(dirs):
        if only and name not in only:
            continue
        d.load(PluginInfo(name, "plugins dir", None, location=str(path)), lambda n=name, p=path: _import_file(n, p))
    for name, obj in extra_plugins or []:
        d.load(PluginInfo(name, "registered", None, location=getattr(obj, "__name__", type(obj).__name__)),
               lambda o=obj: o)
    registry = Registry()
    d.register_all(registry)
    return DiscoveryResult(d.pm, registry, d.finish())


@lru_cache(maxsize=1)
def _own_version() -> str:
    try:
        return importlib.metadata.version("reempathy")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


@lru_cache(maxsize=1)
def default_discovery() -> DiscoveryResult:
    """The process-wide discovery (cached; ``default_discovery.cache_clear()`` forgets it)."""
    return discover()


__all__ = [
    "DiscoveryResult",
    "KIND_HOOKS",
    "PluginInfo",
    "Registration",
    "Registry",
    "check_hooks",
    "plugin_command_failed",
    "BUILTIN_PLUGINS",
    "KIND_FIELDS",
    "default_discovery",
    "describe_validation_error",
    "discover",
]

"""``reempathy plugins`` (the listing), ``reempathy plugin new`` (the template) and ``--plugins-dir``.

Where it decides: :func:`describe_options` turns a plugin's pydantic options model into rows
(name, type, default, constraints, description) for ``--options``; :func:`format_listing` lays
the listing out; :class:`PluginsDirAction` makes ``--plugins-dir DIR`` (before or after the
command) add DIR to ``REEMPATHY_PLUGINS_DIR`` for this process and the processes it starts, so
every command and every worker discovers the same plugins.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel

_CONSTRAINTS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "min length"), ("max_length", "max length"))


def type_name(annotation: Any) -> str:
    """A short readable type: ``int``, ``str | None``, ``list[int | str]``, ``'float32' | 'bfloat16'``."""
    if annotation is None or annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        base = getattr(origin, "__name__", str(origin))
        return f"{base}[{', '.join(type_name(a) for a in args)}]" if args else base
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def describe_options(model: type[BaseModel], prefix: str = "") -> list[dict[str, Any]]:
    """One row per option (nested models flattened as ``outer.inner``)."""
    rows: list[dict[str, Any]] = []
    for name, info in model.model_fields.items():
        required = info.is_required()
        default = None if required else info.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump()
        constraints = []
        for meta in info.metadata:
            for attr, symbol in _CONSTRAINTS:
                value = getattr(meta, attr, None)
                if value is not None:
                    constraints.append(f"{symbol} {value}")
        rows.append(
            {
                "name": prefix + name,
                "type": type_name(info.annotation),
                "required": required,
                "default": default,
                "constraints": constraints,
                "description": info.description or "",
            }
        )
        nested = _model_in(info.annotation)
        if nested is not None:
            rows.extend(describe_options(nested, prefix=f"{prefix}{name}."))
    return rows


def _components(disc: Any, plugin: str) -> list[dict[str, Any]]:
    out = []
    for kind, table in disc.registry.items.items():
        for reg in table.values():
            if reg.plugin == plugin:
                out.append({"kind": kind, "name": reg.name, "description": reg.description, "options": describe_options(reg.config_model) if reg.config_model is not None else []})
    return out


def listing(disc: Any) -> list[dict[str, Any]]:
    """The JSON of ``reempathy plugins --json``: each plugin's row with its components and their options."""
    return [{**p.to_json(), "components": _components(disc, p.name)} for p in disc.plugins]


def _default_text(row: dict[str, Any]) -> str:
    if row["required"]:
        return "required"
    return "= " + json.dumps(row["default"], ensure_ascii=False, default=repr)


def format_listing(rows: list[dict[str, Any]], options: bool = False) -> str:
    """The human listing."""
    lines: list[str] = []
    for p in rows:
        dist = f"{p['distribution']} {p['version'] or ''}".strip() if p["distribution"] else (p["location"] or "")
        status = "  BROKEN" if p["status"] == "broken" else ""
        lines.append(f"{p['name']}  [{p['source']}]  {dist}{status}")
        if p["error"]:
            lines.append(f"    error: {p['error']}")
        width = max((len(c["kind"]) + len(c["name"]) + 1 for c in p["components"]), default=0)
        for c in p["components"]:
            label = f"{c['kind']} {c['name']}"
            lines.append(f"    {label:<{width}}  {c['description']}".rstrip())
            if options:
                if not c["options"]:
                    lines.append("        (no options)")
                for o in c["options"]:
                    limits = f" ({', '.join(o['constraints'])})" if o["constraints"] else ""
                    desc = f" — {o['description']}" if o["description"] else ""
                    lines.append(f"        {o['name']}: {o['type']} {_default_text(o)}{limits}{desc}")
        for lost in p["lost"]:
            lines.append(f"    lost clash: {lost}")
        for refused in p["refused"]:
            lines.append(f"    refused: {refused}")
        if p["hooks"]:
            lines.append(f"    hooks: {', '.join(p['hooks'])}")
    return "\n".join(lines)


def cmd_plugins(args: argparse.Namespace) -> int:
    """``reempathy plugins``."""
    from reempathy.registry import default_discovery

    rows = listing(default_discovery())
    if args.json:
        json.dump(rows, sys.stdout, indent=2, default=repr)
        sys.stdout.write("\n")
    else:
        print(format_listing(rows, options=args.options))
    return 0


def cmd_plugin_new(args: argparse.Namespace) -> int:
    """``reempathy plugin new NAME --kind KIND``."""
    from reempathy.plugin_template import write_package

    path = write_package(args.name, args.kind, args.dir)
    print(f"wrote a {args.kind} plugin package to {path}; next: pip install -e '{path}[test]' && pytest {path}")
    return 0


def add_plugins_parser(subparsers: Any) -> None:
    """``reempathy plugins`` and ``reempathy plugin new``."""
    from reempathy.plugin_template import KINDS

    p = subparsers.add_parser("plugins", help="list plugins: sources, versions, what they provide, lost clashes")
    p.add_argument("--json", action="store_true", help="print the listing as JSON")
    p.add_argument("--options", action="store_true", help="show each component's options: type, default, description")
    p.set_defaults(func=cmd_plugins)

    p = subparsers.add_parser("plugin", help="plugin authoring: `reempathy plugin new NAME --kind KIND`")
    sub = p.add_subparsers(dest="plugin_command", required=True)
    new = sub.add_parser("new", help="write a new plugin package (pyproject, plugin, passing test, README)")
    new.add_argument("name", help="plugin name: the registered name and the distribution, e.g. my-strategy")
    new.add_argument("--kind", required=True, choices=KINDS, help="what the plugin provides")
    new.add_argument("--dir", default=".", help="folder to create the package in (default: the current folder)")
    new.set_defaults(func=cmd_plugin_new)


def use_plugins_dirs(dirs: Sequence[str]) -> None:
    """Add each of ``dirs`` to ``REEMPATHY_PLUGINS_DIR`` and forget a cached discovery when that changed it."""
    from reempathy.registry import PLUGINS_DIR_ENV, default_discovery

    current = [p for p in os.environ.get(PLUGINS_DIR_ENV, "").split(os.pathsep) if p]
    added = [str(Path(d).expanduser()) for d in dirs]
    added = [d for i, d in enumerate(added) if d not in current and d not in added[:i]]
    if not added:
        return
    os.environ[PLUGINS_DIR_ENV] = os.pathsep.join([*current, *added])
    clear = getattr(default_discovery, "cache_clear", None)
    if clear is not None:
        clear()


class PluginsDirAction(argparse.Action):
    """``--plugins-dir DIR``: add DIR to ``REEMPATHY_PLUGINS_DIR`` and forget any cached discovery."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        use_plugins_dirs([values])


def add_plugins_dir_option(parser: argparse.ArgumentParser, subparsers: Any) -> None:
    """``--plugins-dir DIR`` (repeatable) on the main parser and on every command: load ``DIR/*.py`` as plugins."""
    kwargs = dict(action=PluginsDirAction, metavar="DIR", default=argparse.SUPPRESS,
                  help="also load every DIR/*.py as a plugin (repeatable; like REEMPATHY_PLUGINS_DIR)")
    parser.add_argument("--plugins-dir", **kwargs)
    pending = list(subparsers.choices.values())
    while pending:
        command = pending.pop()
        command.add_argument("--plugins-dir", **kwargs)
        for action in command._actions:  # nested commands (`speech tokenize`, `plugin new`)
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())


__all__ = ["add_plugins_dir_option", "add_plugins_parser", "describe_options", "format_listing", "listing", "type_name"]

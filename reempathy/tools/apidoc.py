"""Render the public API into one Markdown page, ``docs/reference.md``, from the code itself.

    python -m reempathy.tools.apidoc            # rewrite docs/reference.md
    python -m reempathy.tools.apidoc --check    # exit 1 if docs/reference.md is not what the code says

Readable without building the docs site: every name of ``reempathy.api.__all__`` (grouped by the
comments of that list), each hook specification, and the helpers of ``reempathy.testing``, with
signatures, docstrings, and for dataclasses and pydantic models their fields (type, default,
description). Where it decides: :func:`render` walks the names in ``__all__`` order;
:func:`_entry` picks how a name is shown by what it is (class, function, constant); constants'
docstrings are read from the source of the module that defines them (``ast``), since Python keeps
no docstring on a value. The output depends only on the code: no addresses, no paths, no dates.
``tests/test_docs_reference.py`` fails when the committed page is stale.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "docs" / "reference.md"
COMMAND = "python -m reempathy.tools.apidoc"

HEADER = f"""# API reference (generated)

Every name of `reempathy.api` (the public API, under the [compatibility promise](api.md#compatibility)),
the hook specifications and the helpers of `reempathy.testing`, with their signatures, fields and
docstrings. Generated from the code by `{COMMAND}`; do not edit by hand —
`tests/test_docs_reference.py` fails when this page is stale. Import every name from `reempathy.api`,
not from the module it is defined in (shown in brackets).
"""


# --- text -----------------------------------------------------------------------------------------

_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`~?([^`]+)`")


def _markdown(doc: str | None) -> str:
    """A docstring as Markdown: Sphinx roles and ``literals`` become `code`."""
    if not doc:
        return ""
    text = _ROLE.sub(lambda m: f"`{m.group(1)}`", doc)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    # An indented block after a line ending in "::" is a literal block in reST; fence it for Markdown.
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::") and i + 1 < len(lines):
            out.append(line.rstrip()[:-1])
            i += 1
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("    ")):
                block.append(lines[i][4:] if lines[i].startswith("    ") else "")
                i += 1
            while block and not block[0].strip():
                block.pop(0)
            while block and not block[-1].strip():
                block.pop()
            out += ["", "```", *block, "```", ""]
            continue
        out.append(line)
        i += 1
    return "\n".join(out).strip()


def _annotation(value: Any) -> str:
    """An annotation as source text: strings (postponed annotations) as written, objects without module paths."""
    if value is inspect.Parameter.empty:
        return ""
    if isinstance(value, str):
        return value
    text = inspect.formatannotation(value)
    text = re.sub(r"<function (\w+) at 0x[0-9a-f]+>", r"\1", text)
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*)", "", text)


_FACTORIES = {"list": "[]", "dict": "{}", "tuple": "()", "set": "set()"}


def _factory(factory: Any) -> str:
    name = getattr(factory, "__name__", "")
    if name in _FACTORIES:
        return _FACTORIES[name]
    return f"{name}()" if name and name != "<lambda>" else "(computed)"


def _source_annotation(cls: type, name: str) -> str | None:
    """The annotation of field ``name`` as written in the class body (the first class of the MRO that declares it)."""
    for klass in cls.__mro__:
        own = klass.__dict__.get("__annotations__", {})
        if name in own:
            return own[name] if isinstance(own[name], str) else _annotation(own[name])
    return None


def _default(value: Any, limit: int = 60) -> str:
    text = repr(value)
    if " at 0x" in text or len(text) > limit:
        return "…"
    return text


def _signature(obj: Callable[..., Any], skip_self: bool = False) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(…)"
    parts: list[str] = []
    star_done = False
    params = list(sig.parameters.values())
    if skip_self and params and params[0].name in ("self", "cls"):
        params = params[1:]
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if p.kind is p.VAR_POSITIONAL:
            star_done = True
        name = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        ann = _annotation(p.annotation)
        text = f"{name}: {ann}" if ann else name
        if p.default is not p.empty:
            text += f" = {_default(p.default)}" if ann else f"={_default(p.default)}"
        parts.append(text)
        if p.kind is p.POSITIONAL_ONLY and (params.index(p) + 1 == len(params) or params[params.index(p) + 1].kind is not p.POSITIONAL_ONLY):
            parts.append("/")
    ret = _annotation(sig.return_annotation)
    return f"({', '.join(parts)})" + (f" -> {ret}" if ret else "")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


# --- where things are defined -------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _module_source(module: str) -> ast.Module:
    path = importlib.import_module(module).__file__
    return ast.parse(Path(path).read_text(encoding="utf-8"))  # type: ignore[arg-type]


@functools.lru_cache(maxsize=None)
def _imported_from(module: str) -> dict[str, str]:
    """Name → the module ``module`` imports it from (``from X import name``)."""
    out: dict[str, str] = {}
    for node in _module_source(module).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                out[alias.asname or alias.name] = node.module
    return out


def _attribute_doc(module: str, name: str) -> str | None:
    """The string literal right after ``name = …`` at the top level of ``module`` (an attribute docstring)."""
    body = _module_source(module).body
    for node, after in zip(body, body[1:]):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                return inspect.cleandoc(after.value.value)
            return None
    return None


def _home(module: str, name: str, obj: Any) -> str:
    """The module that defines ``name`` as seen from ``module`` (follows re-exports)."""
    defined = getattr(obj, "__module__", None)
    if (inspect.isclass(obj) or inspect.isfunction(obj)) and defined:
        return defined
    seen = module
    while name in _imported_from(seen):
        seen = _imported_from(seen)[name]
    return seen


# --- one entry ------------------------------------------------------------------------------------------


def _fields(cls: type) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, description)`` of a dataclass's or pydantic model's fields."""
    rows = []
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            if not f.init and f.name.startswith("_"):
                continue
            if f.default is not dataclasses.MISSING:
                default = _default(f.default)
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = _factory(f.default_factory)
            else:
                default = "required"
            rows.append((f.name, _annotation(f.type), default, ""))
        return rows
    fields = getattr(cls, "model_fields", None)
    if isinstance(fields, dict):
        for name, info in fields.items():
            if info.is_required():
                default = "required"
            elif info.default_factory is not None:
                default = _factory(info.default_factory)
            else:
                default = _default(info.default)
            written = _source_annotation(cls, name) or _annotation(info.annotation)
            rows.append((name, written, default, info.description or ""))
    return rows


def _own_members(cls: type) -> list[tuple[str, Any]]:
    """Public methods and properties defined by ``cls`` itself, in source order."""
    out = []
    field_names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    for name, value in vars(cls).items():
        if name.startswith("_") or name in field_names or name in ("model_config", "model_fields"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, (property, functools.cached_property)) or inspect.isfunction(value):
            out.append((name, value))
    return out


def _class_entry(name: str, cls: type, home: str) -> list[str]:
    kind = "dataclass" if dataclasses.is_dataclass(cls) else "class"
    bases = [b.__name__ for b in cls.__bases__ if b is not object and b.__name__ not in ("Generic", "Protocol")]
    if getattr(cls, "_is_protocol", False):
        kind = "protocol"
    lines = [f"### `{name}`", "", f"*{kind}* ({home})" + (f", based on `{'`, `'.join(bases)}`" if bases else ""), ""]
    doc = _markdown(inspect.getdoc(cls))
    if doc:
        lines += [doc, ""]
    rows = _fields(cls)
    if rows:
        described = any(r[3] for r in rows)
        lines += ["| field | type | default |" + (" description |" if described else ""),
                  "|---|---|---|" + ("---|" if described else "")]
        for fname, ftype, default, desc in rows:
            row = f"| `{fname}` | `{_cell(ftype)}` | `{_cell(default)}` |"
            lines.append(row + (f" {_cell(desc)} |" if described else ""))
        lines.append("")
    for mname, member in _own_members(cls):
        if isinstance(member, (property, functools.cached_property)):
            fget = member.fget if isinstance(member, property) else member.func
            ret = _annotation(inspect.signature(fget).return_annotation)
            head = f"- `{mname}`" + (f" → `{ret}`" if ret else "") + " *(property)*"
            mdoc = _markdown(inspect.getdoc(fget))
        else:
            head = f"- `{mname}{_signature(member, skip_self=True)}`"
            mdoc = _markdown(inspect.getdoc(member))
        lines.append(head + (":" if mdoc else ""))
        if mdoc:
            lines += ["", *("  " + line if line.strip() else "" for line in mdoc.splitlines()), ""]
    if lines[-1] != "":
        lines.append("")
    return lines


def _entry(module: str, name: str) -> list[str]:
    obj = getattr(importlib.import_module(module), name)
    home = _home(module, name, obj)
    if inspect.isclass(obj):
        return _class_entry(name, obj, home)
    if inspect.isfunction(obj) or inspect.isbuiltin(obj) or (callable(obj) and hasattr(obj, "__wrapped__")):
        target = getattr(obj, "__wrapped__", obj)
        lines = [f"### `{name}{_signature(target)}`", "", f"*function* ({home})", ""]
        doc = _markdown(inspect.getdoc(target))
        return lines + ([doc, ""] if doc else [])
    doc = _attribute_doc(home, name) or ""
    if isinstance(obj, (str, int, float, tuple, frozenset)):
        shown = f"= `{_default(obj, limit=240)}`"
    elif type(obj).__repr__ is not object.__repr__ and " at 0x" not in repr(obj):
        shown = f"= `{_annotation(obj)}`"
    else:
        shown = f"(an instance of `{type(obj).__name__}`)"
    lines = [f"### `{name}`", "", f"*constant* ({home}) {shown}", ""]
    return lines + ([_markdown(doc), ""] if doc else [])


# --- the page -------------------------------------------------------------------------------------------


def _api_groups() -> list[tuple[str, list[str]]]:
    """The names of ``reempathy.api.__all__`` grouped under the comments that head them in the source."""
    import reempathy.api as api

    source = Path(api.__file__).read_text(encoding="utf-8")  # type: ignore[arg-type]
    block = source[source.index("__all__ = [") :]
    block = block[: block.index("\n]") + 2]
    groups: list[tuple[str, list[str]]] = [("", [])]
    for line in block.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            groups.append((stripped.lstrip("# ").strip(), []))
        else:
            groups[-1][1].extend(re.findall(r'"([^"]+)"', stripped))
    named = [(title or "version", names) for title, names in groups if names]
    listed = [n for _, names in named for n in names]
    if sorted(listed) != sorted(api.__all__):  # the parse must see exactly __all__
        raise RuntimeError("reempathy.api.__all__ could not be read from its source; keep it one list literal")
    return named


def render() -> str:
    """The whole page."""
    from reempathy import hookspecs

    lines = [HEADER.rstrip(), ""]
    groups = _api_groups()
    lines += ["## Contents", ""]
    lines += [f"- [{title.capitalize()}](#{_anchor(title)}): " + ", ".join(f"`{n}`" for n in names) for title, names in groups]
    lines += ["- [Hook specifications](#hook-specifications)", "- [Testing helpers](#testing-helpers)", ""]
    for title, names in groups:
        lines += [f"## {title.capitalize()}", ""]
        for name in names:
            lines += _entry("reempathy.api", name)
    lines += ["## Hook specifications", "",
              "Implemented with `@hookimpl` (docs/plugins.md says when each is called and what its answer does).", ""]
    for name in hookspecs.DISCOVERY_HOOKS + hookspecs.RUN_HOOKS:
        fn = getattr(hookspecs, name)
        first = " *(firstresult)*" if getattr(fn, "reempathy_spec", {}).get("firstresult") else ""
        lines += [f"### `{name}{_signature(fn)}`{first}", "", _markdown(inspect.getdoc(fn)), ""]
    import reempathy.testing as testing

    lines += ["## Testing helpers", "", _markdown(inspect.getdoc(testing)).split("\n\n")[0], ""]
    for name in testing.__all__:
        lines += _entry("reempathy.testing", name)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.capitalize().lower()).strip().replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    """Write ``docs/reference.md``, or with ``--check`` say whether it is current (exit 1 if not)."""
    parser = argparse.ArgumentParser(prog=COMMAND, description="Render the public API into docs/reference.md.")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/reference.md is not current")
    parser.add_argument("--out", type=Path, default=OUTPUT, help="where to write (default: docs/reference.md)")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is stale; run `{COMMAND}` and commit it", file=sys.stderr)
            return 1
        return 0
    from reempathy.safe_write import write_text

    write_text(args.out, text, "API reference")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["render", "main", "OUTPUT"]

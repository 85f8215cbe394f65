"""Read the published decoder ``config.yaml`` (HyperPyYAML) as plain data, without evaluating any tag.

HyperPyYAML files build Python objects as they load (``!new:module.Class``, ``!apply:func``).
Here every such tag becomes a plain dict instead, so nothing is imported or called:

- ``!new:x.Y`` / ``!name:x.Y`` / ``!module:x`` on a mapping → ``{"__class__": "x.Y", **mapping}``;
  on a sequence or scalar → ``{"__class__": "x.Y", "__args__": value}``;
- ``!apply:f`` / ``!applyref:f`` → ``{"__apply__": "f", "__args__": value}`` (the seed-setting
  lines of the published file; ignored);
- ``!ref <key>`` / ``!copy <key>`` → the value of top-level ``key`` (dotted paths allowed);
  a reference with arithmetic or string interpolation is refused;
- ``!tuple`` → a list.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from reempathy.errors import CheckpointError

_REF = re.compile(r"^<([A-Za-z_][\w.]*)>$")


class _Ref:
    def __init__(self, target: str, node: yaml.Node):
        self.target = target
        self.line = node.start_mark.line + 1


class _TagLoader(yaml.SafeLoader):
    """A ``SafeLoader`` that turns HyperPyYAML tags into plain data."""


def _value(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


def _object(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value = _value(loader, node)
    if isinstance(value, dict):
        return {"__class__": suffix, **value}
    return {"__class__": suffix, "__args__": value}


def _apply(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    return {"__apply__": suffix, "__args__": _value(loader, node)}


def _ref(loader: yaml.SafeLoader, node: yaml.Node) -> _Ref:
    text = str(loader.construct_scalar(node)).strip()
    m = _REF.match(text)
    if not m:
        raise yaml.constructor.ConstructorError(
            None, None, f"reference {text!r} is not a plain <key> reference", node.start_mark
        )
    return _Ref(m.group(1), node)


for _prefix in ("!new:", "!name:", "!module:"):
    _TagLoader.add_multi_constructor(_prefix, _object)
for _prefix in ("!apply:", "!applyref:"):
    _TagLoader.add_multi_constructor(_prefix, _apply)
_TagLoader.add_constructor("!ref", _ref)
_TagLoader.add_constructor("!copy", _ref)
_TagLoader.add_constructor("!tuple", lambda loader, node: loader.construct_sequence(node, deep=True))


def load_tagged_yaml(path: Path) -> dict[str, Any]:
    """The top-level mapping of a HyperPyYAML file, tags as plain dicts and references resolved."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e}); re-download the decoder") from None
    try:
        data = yaml.load(text, Loader=_TagLoader)  # noqa: S506 - a SafeLoader subclass; tags become data
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not valid YAML ({first}); re-download the decoder") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a YAML mapping; it is not a decoder config.yaml")
    return _resolve(data, data, path, depth=0)


def _resolve(value: Any, root: dict[str, Any], path: Path, depth: int) -> Any:
    if depth > 50:
        raise CheckpointError(f"{path}: references nest too deeply (a reference cycle?)")
    if isinstance(value, _Ref):
        target: Any = root
        for part in value.target.split("."):
            if not isinstance(target, dict) or part not in target:
                raise CheckpointError(f"{path} line {value.line}: !ref <{value.target}> names no key of the file")
            target = target[part]
        return _resolve(target, root, path, depth + 1)
    if isinstance(value, dict):
        return {k: _resolve(v, root, path, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root, path, depth) for v in value]
    return value

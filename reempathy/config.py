"""Decode configs: a TOML file picks backbone, strategy, processors and sampling; flags override keys.

Plugin options live in the same table as the plugin's ``name`` and are validated by the config
model the plugin registered, so an unknown option is an error that names it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reempathy.decoding.registry import Registry, describe_validation_error
from reempathy.errors import ConfigError

TOP_LEVEL_KEYS = ("backbone", "strategy", "processors", "sampling", "decode")


class SamplingConfig(BaseModel):
    """``[sampling]``: how the next token is chosen. Unset values take the backbone's defaults."""

    model_config = ConfigDict(extra="forbid")
    greedy: bool = False
    temperature: float | None = Field(None, gt=0.0)
    top_k: int | None = Field(None, ge=0, description="0 turns top-k off")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    seed: int = 0


class DecodeSettings(BaseModel):
    """``[decode]``: the question, the budget, and how the KV cache is kept."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(128, ge=1)
    prompt: str | None = None
    units: str | None = Field(None, description="file of speech unit ids (JSON list or whitespace-separated)")
    system_prompt: str | None = None
    checkpoint: str | None = Field(
        None, description="a directory written by `reempathy train`: its adapter, backbone and strategy are used"
    )
    cache: Literal["dynamic", "static"] = Field("dynamic", description="static: a preallocated KV cache (for compile)")
    compile: bool = Field(False, description="torch.compile the decode steps; needs cache = \"static\"")


class ComponentConfig(BaseModel):
    """A plugin choice: ``name`` plus that plugin's options."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DecodeConfig(BaseModel):
    """A whole decode config (see configs/*.toml and docs/config.md)."""

    model_config = ConfigDict(extra="forbid")
    backbone: ComponentConfig = ComponentConfig(name="tiny")
    strategy: ComponentConfig = ComponentConfig(name="sft")
    processors: list[ComponentConfig] = Field(default_factory=list)
    sampling: SamplingConfig = SamplingConfig()
    decode: DecodeSettings = DecodeSettings()
    source: str | None = Field(None, exclude=True)
    explicit: frozenset[str] = Field(frozenset(), exclude=True, description="tables the user set (file or flags)")


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, with one-line errors for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found; give a path to a TOML file such as configs/sft.toml")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], value); the value is read as TOML, else kept as a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set strategy.text_tokens=7")
    key, raw = item.split("=", 1)
    path = [k for k in key.strip().split(".") if k]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set single keys in the raw config dict (``processors.0.factor=1.2`` indexes the list)."""
    for item in overrides:
        path, value = parse_override(item)
        node: Any = data
        for i, key in enumerate(path[:-1]):
            if isinstance(node, list):
                try:
                    node = node[int(key)]
                except (ValueError, IndexError):
                    raise ConfigError(f"--set {item!r}: no list item {key!r} in {'.'.join(path[:i])}") from None
            else:
                node = node.setdefault(key, {})
                if not isinstance(node, (dict, list)):
                    raise ConfigError(f"--set {item!r}: {'.'.join(path[: i + 1])} is not a table")
        if isinstance(node, list):
            raise ConfigError(f"--set {item!r}: give an index into {'.'.join(path[:-1])}")
        node[path[-1]] = value
    return data


def set_strategy(data: dict[str, Any], name: str) -> dict[str, Any]:
    """``--strategy NAME``: keep the file's options only if they belong to that strategy."""
    current = data.get("strategy") or {}
    if isinstance(current, dict) and current.get("name") == name:
        return data
    data["strategy"] = {"name": name}
    return data


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    strategy: str | None = None,
    registry: Registry | None = None,
) -> DecodeConfig:
    """Read, override and validate a config; with ``registry``, plugin names and options are checked too."""
    data: dict[str, Any] = read_toml(path) if path is not None else {}
    where = f"config file {str(path)!r}" if path is not None else "config"
    unknown = [k for k in data if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(TOP_LEVEL_KEYS)}")
    if strategy:
        data = set_strategy(data, strategy)
    data = apply_overrides(data, overrides or [])
    explicit = frozenset(k for k in TOP_LEVEL_KEYS if k in data) | frozenset(
        f"{k}.name" for k in ("backbone", "strategy") if isinstance(data.get(k), dict) and "name" in data[k]
    )
    for key, default in (("backbone", "tiny"), ("strategy", "sft")):
        if key in data and not isinstance(data[key], dict):
            raise ConfigError(f"{where}: {key} must be a table with a name, e.g. [{key}] name = \"...\"")
        data.setdefault(key, {}).setdefault("name", default)
    try:
        cfg = DecodeConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            section = loc.rsplit(".", 1)[0] if "." in loc else "config"
            model = {"sampling": SamplingConfig, "decode": DecodeSettings}.get(section, DecodeConfig)
            raise ConfigError(
                f"{where}: unknown key {loc!r}; valid keys in [{section}]: {', '.join(sorted(model.model_fields))}"
            ) from None
        raise ConfigError(f"{where}: {loc}: {err['msg']} (got {err.get('input')!r})") from None
    cfg.source = str(path) if path is not None else None
    cfg.explicit = explicit
    if cfg.decode.checkpoint:
        apply_manifest(cfg)
    if registry is not None:
        validate_plugins(cfg, registry)
    return cfg


def apply_manifest(cfg: DecodeConfig) -> None:
    """Take backbone and strategy from the checkpoint's manifest unless the config names them; refuse contradictions."""
    from reempathy.checkpoints import checkpoint_config_overrides, read_manifest

    manifest = read_manifest(cfg.decode.checkpoint)  # type: ignore[arg-type]
    name, options = checkpoint_config_overrides(
        manifest,
        cfg.strategy.name if "strategy.name" in cfg.explicit else None,
        cfg.strategy.options if "strategy" in cfg.explicit else {},
    )
    cfg.strategy = ComponentConfig(name=name, **options)
    if "backbone" not in cfg.explicit:
        cfg.backbone = ComponentConfig(name=manifest.backbone.name, **manifest.backbone.options)


def validate_plugins(cfg: DecodeConfig, registry: Registry) -> None:
    """Check every plugin name and its options against what the plugins registered."""
    registry.validate("backbone", cfg.backbone.name, cfg.backbone.options)
    registry.validate("strategy", cfg.strategy.name, cfg.strategy.options)
    for proc in cfg.processors:
        registry.validate("processor", proc.name, proc.options)


__all__ = ["DecodeConfig", "load_config", "SamplingConfig", "DecodeSettings", "describe_validation_error"]

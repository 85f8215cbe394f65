"""Decode configs: a TOML file picks backbone, strategy, processors and sampling; flags override keys.

Plugin options live in the same table as the plugin's ``name`` and are validated by the config
model the plugin registered, so an unknown option is an error that names it. Where decisions
are made: :func:`load_config` (file → flags → validation → checkpoint manifest → plugin
options); :func:`apply_manifest` decides which backbone options a checkpoint pins (those that
change the weights) and which a config may change (device, dtype: ``runtime_options``);
:func:`describe_config_error` is the one place a pydantic error becomes a one-line message,
for decode and training configs alike.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from reempathy.registry import Registry, describe_validation_error
from reempathy.errors import ConfigError
from reempathy.options import STRICT, RepetitionPenalty, Seed, Temperature, Text, TopK, TopP
from reempathy.paths import check_name, read_input_file

TOP_LEVEL_KEYS = ("backbone", "strategy", "processors", "sampling", "decode")
MAX_DEPTH = 16  # tables and arrays nest at most this deep in a config; real ones use 3
MAX_CONFIG_BYTES = 4 * 2**20  # a config is a page of TOML; anything this large is a mistake
GUARD_PER_SPOKEN = 4  # max_new_tokens left out beside max_spoken_tokens: this many generated tokens per spoken one


class SamplingConfig(BaseModel):
    """``[sampling]``: how the next token is chosen. Unset values take the backbone's defaults."""

    model_config = STRICT
    greedy: bool = False
    temperature: Temperature | None = None
    top_k: TopK | None = None
    top_p: TopP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    seed: Seed = 0


SAMPLING_CHAIN: dict[str, tuple[str, str, float]] = {
    "repetition_penalty": ("repetition-penalty", "penalty", 1.0),
    "temperature": ("temperature", "value", 1.0),
    "top_k": ("top-k", "k", 0),
    "top_p": ("top-p", "p", 1.0),
}
"""``[sampling]`` key → (the processor it adds, that processor's option, the value that adds none), in
transformers' order. The processor's option model decides the bounds; :func:`validate_plugins`
reports a value it refuses under the key the user set (``sampling.temperature``)."""


class DecodeSettings(BaseModel):
    """``[decode]``: the question, the budget, and how the KV cache is kept."""

    model_config = STRICT
    max_new_tokens: int = Field(
        128,
        ge=1,
        lt=2**31,
        description="every generated token (spoken, hidden, control): the guard against runaway answers; "
        f"default 128, or {GUARD_PER_SPOKEN} x max_spoken_tokens when that is set",
    )
    max_spoken_tokens: int | None = Field(
        None, ge=1, lt=2**31, description="tokens of the spoken stream (text and audio): the budget comparisons share"
    )
    max_hidden_tokens: int | None = Field(
        None, ge=1, lt=2**31, description="tokens of the hidden stream (reflections and thoughts, all together)"
    )
    prompt: Text | None = None
    units: str | None = Field(None, min_length=1, description="file of speech unit ids (JSON list or whitespace-separated)")
    system_prompt: Text | None = None
    checkpoint: str | None = Field(
        None,
        min_length=1,
        description="a directory written by `reempathy train`: its adapter, backbone and strategy are used",
    )
    cache: Literal["dynamic", "static"] = Field("dynamic", description="static: a preallocated KV cache (for compile)")
    compile: bool = Field(False, description="torch.compile the decode steps; needs cache = \"static\"")
    attention: Literal["sdpa-bias", "flex"] = Field(
        "sdpa-bias",
        description='how an attention plan reaches the static path\'s attention: "sdpa-bias" (a dense bias in SDPA\'s '
        'mask, the reference) or "flex" (key ranges in FlexAttention\'s fused kernel in the compiled steps); '
        '"flex" needs cache = "static"',
    )

    @model_validator(mode="after")
    def _one_question(self) -> "DecodeSettings":
        if self.prompt is not None and self.units is not None:
            raise ValueError("set decode.prompt or decode.units, not both (the other would be ignored)")
        if self.attention == "flex" and self.cache != "static":
            raise ValueError('decode.attention = "flex" needs decode.cache = "static" (and compile = true for the fused kernel)')
        return self

    @model_validator(mode="after")
    def _guard_above_budgets(self) -> "DecodeSettings":
        if self.max_spoken_tokens is None:
            return self
        if "max_new_tokens" not in self.model_fields_set:
            # Room for the hidden and control tokens between spoken ones: ReEmpathy at 3+6 with
            # 12-token reflections writes about 1.5 per spoken token, CoT a thought once.
            self.max_new_tokens = min(GUARD_PER_SPOKEN * self.max_spoken_tokens + (self.max_hidden_tokens or 0), 2**31 - 1)
        need = self.max_spoken_tokens + (self.max_hidden_tokens or 0)
        if self.max_new_tokens < need:
            raise ValueError(
                f"max_new_tokens = {self.max_new_tokens} is below max_spoken_tokens"
                f"{' + max_hidden_tokens' if self.max_hidden_tokens else ''} = {need}: the overall guard would end "
                f"answers before their budget; raise max_new_tokens (it counts hidden and control tokens too) or leave "
                "it out"
            )
        return self


class ComponentConfig(BaseModel):
    """A plugin choice: ``name`` plus that plugin's options."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(min_length=1)

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
    """Read a TOML file, with one-line errors for a missing, unreadable, malformed or absurdly nested file."""
    if not str(path):
        raise ConfigError("--config: the path is empty; give a path to a TOML file such as configs/sft.toml")
    p = check_name(path, "config file", ConfigError)
    raw = read_input_file(p, "config file", MAX_CONFIG_BYTES, ConfigError, "give a path to a TOML file such as configs/sft.toml")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {str(p)!r} nests arrays or tables too deeply; a config needs a few levels") from None
    check_depth(data, f"config file {str(p)!r}")
    return data


def check_depth(value: Any, where: str, limit: int = MAX_DEPTH) -> None:
    """ConfigError when tables/arrays in ``value`` nest deeper than ``limit`` (checked without recursion)."""
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise ConfigError(f"{where}: values nest more than {limit} levels deep; a config needs a few levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], value); the value is read as TOML, else kept as a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set strategy.text_tokens=7")
    key, raw = item.split("=", 1)
    path = [k.strip() for k in key.strip().split(".") if k.strip()]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except (tomllib.TOMLDecodeError, KeyError):
        value = raw
    except RecursionError:
        raise ConfigError(f"--set {item[:40]!r}…: the value nests too deeply") from None
    check_depth(value, f"--set {key.strip()!r}")
    return path, value


def _component_names(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Split ``--set backbone.name=X`` / ``--set strategy.name=X`` from the other overrides."""
    names: dict[str, Any] = {}
    rest = []
    for item in overrides:
        path, value = parse_override(item)
        if len(path) == 2 and path[0] in ("backbone", "strategy") and path[1] == "name":
            names[path[0]] = value
        else:
            rest.append(item)
    return names, rest


LIST_KEYS = ("processors",)
"""Top-level keys that hold an array of tables: ``--set processors.N.KEY=…`` creates entry N when N is the next index."""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set single keys in the raw config dict (``processors.0.factor=1.2`` indexes the list).

    ``backbone.name`` and ``strategy.name`` are applied first and the way ``--backbone`` and
    ``--strategy`` are (:func:`set_component`), so ``--set strategy.name=cotbs`` drops the file's
    reempathy options while ``--set strategy.max_thought_tokens=8`` still applies to cotbs.
    In a list of :data:`LIST_KEYS`, index N is an existing entry or the next one, which is created
    (``--set processors.0.name=top-k`` on a config without ``[[processors]]``).
    """
    names, rest = _component_names(list(overrides))
    for kind, name in names.items():
        data = set_component(data, kind, name, f"--set {kind}.name")
    for item in rest:
        path, value = parse_override(item)
        growable = path[0] in LIST_KEYS
        if growable and len(path) > 1 and path[0] not in data and path[1].isdigit():
            data[path[0]] = []
        node: Any = data
        for i, key in enumerate(path[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, key, item, path[:i], growable)]
            else:
                node = node.setdefault(key, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {item!r}: {'.'.join(path[: i + 1])} is not a table")
        if isinstance(node, list):
            if not (growable and path[-1].isdigit()):
                raise ConfigError(f"--set {item!r}: give an index into {'.'.join(path[:-1])}")
            index = _list_index(node, path[-1], item, path[:-1], growable)
            node[index] = value
            continue
        node[path[-1]] = value
    return data


def _list_index(node: list[Any], key: str, item: str, where: list[str], growable: bool) -> int:
    """The index ``key`` names in ``node`` (appending an empty table when it is the next one of a growable list)."""
    name = ".".join(where)
    try:
        index = int(key)
    except ValueError:
        raise ConfigError(f"--set {item!r}: no list item {key!r} in {name}; give an index such as {name}.0") from None
    if growable and index == len(node):
        node.append({})
    if not 0 <= index < len(node):
        count = f"{len(node)} entr{'y' if len(node) == 1 else 'ies'}"
        nxt = f"; --set {name}.{len(node)}.name=NAME adds the next one" if growable else ""
        raise ConfigError(f"--set {item!r}: {name} has {count}, so there is no {name}.{key}{nxt}")
    return index


def set_component(data: dict[str, Any], kind: str, name: Any, flag: str) -> dict[str, Any]:
    """``--strategy NAME`` / ``--backbone NAME`` / ``--set KIND.name=NAME``: a different name drops the old options.

    The file's options belong to the plugin the file names; kept for another plugin they would
    be refused as unknown options (or, worse, mean something else), so they are kept only when
    the name is unchanged.
    """
    if not isinstance(name, str) or not name.strip():
        example = "reempathy" if kind == "strategy" else "tiny"
        usage = f"{flag}={example}" if flag.startswith("--set") else f"{flag} {example}"
        raise ConfigError(f"{flag}: give a {kind} name, e.g. {usage}")
    current = data.get(kind)
    if isinstance(current, dict) and current.get("name") == name:
        return data
    data[kind] = {"name": name}
    return data


def describe_config_error(exc: ValidationError, where: str, sections: dict[str, type[BaseModel]], top: type[BaseModel]) -> str:
    """One line from a pydantic error on a config: the key, what is wrong, the value given, the valid keys if unknown.

    ``sections`` maps table names to their models (for listing valid keys); ``top`` is the
    whole config's model. Decode and training configs both use this.
    """
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        section = loc.rsplit(".", 1)[0] if "." in loc else "config"
        model = sections.get(section, top)
        where_keys = f"in [{section}]" if section != "config" else "at the top level"
        return f"{where}: unknown key {loc!r}; valid keys {where_keys}: {', '.join(sorted(model.model_fields))}"
    if err["type"] == "missing":
        return f"{where}: key {loc!r} is required"
    msg = err["msg"].removeprefix("Value error, ")
    more = len(exc.errors()) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    if err["type"] in ("model_type", "dict_type") and loc and "." not in loc:
        return f"{where}: {loc} must be a table, e.g. [{loc}]{tail}"
    if err["type"] == "list_type" and loc in LIST_KEYS:
        return (
            f"{where}: {loc} must be an array of tables, one per entry: write [[{loc}]] (two brackets) and "
            f'name = "..." under it in the file, or --set {loc}.0.name=NAME on the command line '
            f"(got {toml_value(err.get('input'))}){tail}"
        )
    if err["type"] in ("value_error", "assertion_error"):  # a model's own check: its message says it all
        return f"{where}: {loc or 'config'}: {msg}{tail}"
    return f"{where}: {loc or 'config'}: {msg} (got {toml_value(err.get('input'))}){tail}"


def toml_value(value: Any, limit: int = 60) -> str:
    """``value`` as the TOML the user wrote (``true``, ``"text"``, ``1.5``), cut to ``limit`` characters."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = '"' + repr(value)[1:-1] + '"'  # repr escapes control characters and lone surrogates
    elif isinstance(value, dict):
        text = "a table"
    elif isinstance(value, list):
        text = f"an array of {len(value)}"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    strategy: str | None = None,
    registry: Registry | None = None,
    backbone: str | None = None,
) -> DecodeConfig:
    """Read, override and validate a config; with ``registry``, plugin names and options are checked too.

    ``strategy`` and ``backbone`` (``--strategy``, ``--backbone``) replace the file's choice;
    a changed name drops the file's options for that table, as ``--set strategy.name=X`` does.
    """
    data: dict[str, Any] = read_toml(path) if path is not None else {}
    where = f"config file {str(path)!r}" if path is not None else "config"
    unknown = [k for k in data if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(TOP_LEVEL_KEYS)}")
    for kind, flag, name in (("backbone", "--backbone", backbone), ("strategy", "--strategy", strategy)):
        if name is not None:
            data = set_component(data, kind, name, flag)
    data = apply_overrides(data, list(overrides or []))
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
        raise ConfigError(
            describe_config_error(exc, where, {"sampling": SamplingConfig, "decode": DecodeSettings}, DecodeConfig)
        ) from None
    cfg.source = str(path) if path is not None else None
    cfg.explicit = explicit
    if cfg.decode.checkpoint:
        apply_manifest(cfg, registry)
    if registry is not None:
        validate_plugins(cfg, registry)
    return cfg


def apply_manifest(cfg: DecodeConfig, registry: Registry | None = None) -> None:
    """Take backbone and strategy from the checkpoint's manifest unless the config names them; refuse contradictions.

    The backbone must be the one trained on: its name, and every option that changes the weights
    or the vocabulary (all options but the backbone's ``runtime_options``, by default ``device``
    and ``dtype``). Runtime options come from the config (or their defaults), never from the
    manifest, so a checkpoint trained on a GPU decodes on a CPU.
    """
    from reempathy.checkpoints import check_backbone_options, checkpoint_config_overrides, read_manifest

    manifest = read_manifest(cfg.decode.checkpoint)  # type: ignore[arg-type]
    name, options = checkpoint_config_overrides(
        manifest,
        cfg.strategy.name if "strategy.name" in cfg.explicit else None,
        cfg.strategy.options if "strategy" in cfg.explicit else {},
    )
    cfg.strategy = ComponentConfig(name=name, **options)
    requested_name = cfg.backbone.name if "backbone.name" in cfg.explicit else None
    requested = cfg.backbone.options if "backbone" in cfg.explicit else {}
    backbone_options = check_backbone_options(manifest, requested_name, requested, registry)
    # The table's ``name`` is the plugin's; an option of the same name (hf-interleaved's, recorded in its
    # manifest) cannot be written in a [backbone] table, so it gives way rather than collide.
    cfg.backbone = ComponentConfig.model_validate({**backbone_options, "name": manifest.backbone.name})


def validate_plugins(cfg: DecodeConfig, registry: Registry) -> None:
    """Check every plugin name and its options against what the plugins registered."""
    registry.validate("backbone", cfg.backbone.name, cfg.backbone.options)
    registry.validate("strategy", cfg.strategy.name, cfg.strategy.options)
    for i, proc in enumerate(cfg.processors):
        registry.validate("processor", proc.name, proc.options, place=f"processors.{i}")
    if not cfg.sampling.greedy:
        validate_sampling(cfg, registry)


def validate_sampling(cfg: DecodeConfig, registry: Registry) -> None:
    """Check each ``[sampling]`` value the config sets against the option model of the processor it becomes.

    An error names the key the user wrote (``sampling.temperature``), not the processor.
    """
    where = f"config file {cfg.source!r}" if cfg.source else "config"
    for key, (name, option, off) in SAMPLING_CHAIN.items():
        value = getattr(cfg.sampling, key)
        if value is None or value == off:
            continue
        try:
            registry.get("processor", name).config_model.model_validate({option: value})
        except ValidationError as exc:
            err = exc.errors()[0]
            msg = err["msg"].removeprefix("Value error, ")
            raise ConfigError(f"{where}: sampling.{key}: {msg} (got {toml_value(value)})") from None


__all__ = [
    "DecodeConfig",
    "ComponentConfig",
    "load_config",
    "SamplingConfig",
    "SAMPLING_CHAIN",
    "validate_sampling",
    "DecodeSettings",
    "apply_overrides",
    "LIST_KEYS",
    "read_toml",
    "describe_config_error",
    "describe_validation_error",
]

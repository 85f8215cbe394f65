"""Reading a checkpoint: the ``reempathy.json`` manifest, the adapter it describes, and what it means for decoding.

A checkpoint directory (written by ``reempathy train``, see :mod:`reempathy.jobs.trainrun`)
holds a LoRA adapter (safetensors) and a manifest written last: a directory is complete only
when its manifest is there. ``decode``, ``run`` and ``eval`` load checkpoints through this
module, so decoding never imports training.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reempathy.backbones.base import DELIMITER_TOKENS, Backbone
from reempathy.backbones.quiet import no_loading_bar
from reempathy.errors import CheckpointError, ConfigError, ReempathyError, ReempathyWarning
from reempathy.paths import check_name, describe_kind, resolved_kind

if TYPE_CHECKING:
    from reempathy.registry import Registry

MANIFEST = "reempathy.json"
SCHEMA = "reempathy.checkpoint/1"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
MAX_JSON_BYTES = 16 * 2**20  # a manifest or adapter config is a few kB
DEFAULT_RUNTIME_OPTIONS = frozenset({"device", "dtype"})


class Component(BaseModel):
    """A plugin choice as recorded in the manifest: name and options."""

    model_config = ConfigDict(extra="forbid")
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class ChunkLayoutRecord(BaseModel):
    """The spoken-chunk layout a ``reempathy`` checkpoint was trained with."""

    model_config = ConfigDict(extra="forbid")
    text_tokens: int
    audio_tokens: int

    @classmethod
    def of(cls, layout: dict[str, Any] | None, what: str) -> "ChunkLayoutRecord | None":
        """The record of a strategy's reported chunk layout (``extra["chunk_layout"]``), checked before any training:
        a layout a checkpoint cannot record is a ConfigError naming ``what`` reported it."""
        if not layout:
            return None
        try:
            return cls(**layout)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{what} reports the chunk layout {layout!r}; a checkpoint records a layout as text_tokens and "
                "audio_tokens (whole numbers) only: report that, or none"
            ) from None


class ReflectionRecord(BaseModel):
    """How a ``reempathy`` checkpoint's reflections were trained: free length (the model closes each one) or
    fixed length (every reflection exactly ``tokens`` tokens, as decoding's ``reflection_tokens`` mode writes them)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["free", "fixed"]
    tokens: int | None = Field(None, ge=1, description="fixed mode: the length of every reflection")


class HiddenLengths(BaseModel):
    """The longest thought and reflection (tokens) in the training data; decoding warns when a cap is shorter."""

    model_config = ConfigDict(extra="forbid")
    thought: int | None = Field(None, ge=0)
    reflection: int | None = Field(None, ge=0)


class Manifest(BaseModel):
    """``reempathy.json``: what the adapter was trained for, so the decoder can check and configure itself."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    schema_id: Literal["reempathy.checkpoint/1"] = Field(SCHEMA, alias="schema")
    backbone: Component
    strategy: Component
    chunk_layout: ChunkLayoutRecord | None = None
    reflection: ReflectionRecord | None = None
    longest: HiddenLengths | None = None
    delimiters: dict[str, int]
    steps: int = Field(ge=0)
    created: str
    training: dict[str, Any] = Field(default_factory=dict, description="method, LoRA settings, data")
    directory: str | None = Field(None, exclude=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def now_iso() -> str:
    """The current UTC time, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def delimiter_ids(backbone: Backbone) -> dict[str, int]:
    """The backbone's ids of the strategy delimiters (those it has)."""
    return {name: backbone.layout.special[name] for name in DELIMITER_TOKENS if name in backbone.layout.special}


def read_json_file(path: Path, what: str) -> Any:
    """A small JSON file's content; CheckpointError naming ``path`` when it is unreadable, too large or not JSON."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc}); {what}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: larger than {MAX_JSON_BYTES // 2**20} MiB, not a file reempathy wrote; {what}")
    try:
        return json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); {what}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply); {what}") from None


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of a complete checkpoint; CheckpointError (one line, naming the file) otherwise.

    Besides the manifest itself this checks what decoding will read: the adapter's config is
    JSON, the adapter's safetensors header is intact and covers the file, and the recorded
    chunk layout agrees with the recorded strategy options.
    """
    d = check_name(directory, "checkpoint", CheckpointError)
    kind = resolved_kind(d, "checkpoint", CheckpointError)
    if kind == "missing":
        raise CheckpointError(f"checkpoint {str(d)!r} not found; give a directory written by `reempathy train`")
    if kind != "dir":
        raise CheckpointError(f"checkpoint {str(d)!r} is {describe_kind(kind)}; give a directory written by `reempathy train`")
    path = d / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing, so checkpoint {str(d)!r} is incomplete (its training did not finish); "
            "rerun it with --resume"
        )
    data = read_json_file(path, "the checkpoint is damaged")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(manifest)"
        raise CheckpointError(f"{path}: invalid manifest, {loc}: {err['msg']}") from None
    _check_layout_agrees(manifest, path)
    missing = [name for name in ADAPTER_FILES if not (d / name).is_file()]
    if missing:
        raise CheckpointError(f"{d / missing[0]}: missing, so checkpoint {str(d)!r} is incomplete")
    check_adapter_files(d)
    manifest.directory = str(d)
    return manifest


def _check_layout_agrees(manifest: Manifest, path: Path) -> None:
    layout = manifest.chunk_layout
    if layout is None:
        return
    recorded = {"text_tokens": layout.text_tokens, "audio_tokens": layout.audio_tokens}
    for key, value in recorded.items():
        given = manifest.strategy.options.get(key)
        if given is not None and given != value:  # None: the strategy's default, resolved into chunk_layout
            raise CheckpointError(
                f"{path}: chunk_layout.{key} is {value} but strategy.options.{key} is "
                f"{manifest.strategy.options[key]!r}; the manifest contradicts itself, so the checkpoint is damaged"
            )


def check_adapter_files(directory: Path) -> None:
    """CheckpointError unless ``adapter_config.json`` is a JSON object and ``adapter_model.safetensors`` is intact."""
    from safetensors import SafetensorError, safe_open

    config = read_json_file(directory / "adapter_config.json", "the checkpoint is damaged; train it again")
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{directory / 'adapter_config.json'}: expected a JSON object of adapter settings; the checkpoint is damaged"
        )
    weights = directory / "adapter_model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as fh:
            if not list(fh.keys()):
                raise CheckpointError(f"{weights}: holds no tensors; the checkpoint is damaged, train it again")
    except (SafetensorError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{weights}: not a readable safetensors file ({reason}); the checkpoint is damaged") from None


def runtime_options(config_model: type[BaseModel] | None) -> frozenset[str]:
    """Options of a backbone that do not change its weights or vocabulary (``runtime_options`` on its model)."""
    return frozenset(getattr(config_model, "runtime_options", DEFAULT_RUNTIME_OPTIONS))


def check_backbone_options(
    manifest: Manifest,
    requested_name: str | None,
    requested: dict[str, Any],
    registry: "Registry | None" = None,
) -> dict[str, Any]:
    """The backbone options to decode a checkpoint with: the trained ones, with the config's runtime options.

    A requested backbone name must be the trained one, and a requested option that changes
    the weights (any option but the model's ``runtime_options``) must equal the trained value
    (compared after defaults are filled in, when ``registry`` knows the backbone's model).
    Runtime options of the manifest (the training machine's device) are not carried over.
    """
    where = f"checkpoint {manifest.directory!r}" if manifest.directory else "the checkpoint"
    trained = manifest.backbone
    if requested_name is not None and requested_name != trained.name:
        raise ConfigError(
            f"{where} was trained on backbone {trained.name!r}, not {requested_name!r}; "
            f"decode it with backbone {trained.name!r} (or leave [backbone] unset)"
        )
    model = None
    if registry is not None and trained.name in registry.items.get("backbone", {}):
        model = registry.get("backbone", trained.name).config_model
    runtime = runtime_options(model)
    fields = model.model_fields if model is not None else {}
    # A runtime option without a default (glm-4-voice's path) keeps the trained value unless the config gives one.
    carried = {
        k: v for k, v in trained.options.items() if k not in runtime or (k in fields and fields[k].is_required())
    }
    if model is not None:
        try:
            want = model.model_validate(carried)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "(options)"
            raise CheckpointError(
                f"{Path(manifest.directory or '.') / MANIFEST}: backbone option {loc!r}: {err['msg']}; "
                "the manifest is damaged"
            ) from None
        try:
            got = model.model_validate({**carried, **requested})
        except ValidationError:
            got = None  # the registry's own validation reports it with the option's name
        if got is not None:
            for key in sorted(set(fields) - runtime):
                if getattr(want, key) != getattr(got, key):
                    _contradiction(where, trained.name, key, getattr(want, key), getattr(got, key))
    else:
        for key in sorted(set(requested) & set(carried) - runtime):
            if requested[key] != carried[key]:
                _contradiction(where, trained.name, key, carried[key], requested[key])
    return {**carried, **requested}


def _contradiction(where: str, name: str, key: str, trained: Any, asked: Any) -> None:
    raise ConfigError(
        f"{where} was trained on backbone {name!r} with {key} = {json.dumps(trained)}, but the config asks for "
        f"{key} = {json.dumps(asked)}; an adapter only fits the model it was trained on: drop backbone.{key} "
        f"or set it to {json.dumps(trained)}"
    )


def apply_checkpoint(backbone: Backbone, directory: str | Path, merge: bool = True, trainable: bool = False) -> Backbone:
    """The backbone with the checkpoint's adapter loaded (and merged, by default) into its model.

    The backbone's model is changed in place; build a fresh backbone to decode without the
    adapter. Refuses a checkpoint trained on another backbone or with other delimiter ids.
    ``trainable`` (with ``merge=False``) keeps the adapter's weights trainable: training that
    continues from this checkpoint (``[train] init_from``).
    """
    if trainable and merge:
        raise ValueError("a trainable adapter cannot be merged; pass merge=False")
    from peft import PeftModel

    manifest = read_manifest(directory)
    where = Path(directory) / MANIFEST
    if manifest.backbone.name != backbone.name:
        raise CheckpointError(
            f"{where}: trained on backbone {manifest.backbone.name!r}, but the backbone is {backbone.name!r}"
        )
    have = delimiter_ids(backbone)
    for name, token in manifest.delimiters.items():
        if have.get(name) != token:
            raise CheckpointError(
                f"{where}: delimiter {name} is id {token} in the checkpoint but {have.get(name)} in backbone "
                f"{backbone.name!r}; the vocabularies differ"
            )
    from peft import PeftConfig
    from safetensors import SafetensorError

    try:
        adapter_config = PeftConfig.from_pretrained(str(directory))
    except Exception as exc:  # peft reports a bad file in many ways; any of them means a damaged config
        raise CheckpointError(
            f"{Path(directory) / 'adapter_config.json'}: not a peft adapter config ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); the checkpoint is damaged, train it again"
        ) from None
    try:
        with no_loading_bar():
            model = PeftModel.from_pretrained(backbone.model, str(directory), config=adapter_config, is_trainable=trainable)
    except SafetensorError as exc:
        raise CheckpointError(f"{directory}: the adapter weights cannot be read ({exc}); the checkpoint is damaged") from None
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        reason = "its weight shapes differ" if "size mismatch" in str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{directory}: the adapter does not fit backbone {backbone.name!r} ({reason}); it was trained on "
            f"{manifest.backbone.name!r} with options {json.dumps(manifest.backbone.options, sort_keys=True)}"
        ) from None
    if merge:
        model = model.merge_and_unload()
    if not trainable:
        model.eval()
    info = dict(backbone.info, checkpoint=str(directory))
    return dataclasses.replace(backbone, model=model, info=info)


LAYOUT_KEYS = ("text_tokens", "audio_tokens")
# The strategy option that caps each kind of hidden segment the manifest records a longest length of.
CAP_OPTIONS = {"thought": "max_thought_tokens", "reflection": "max_reflection_tokens"}


def checkpoint_config_overrides(
    manifest: Manifest,
    requested_strategy: str | None = None,
    requested_options: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The strategy name and options to decode a checkpoint with.

    With no request the manifest's strategy and options are used. A requested strategy must be
    the manifest's; requested options are laid over the manifest's, except that the chunk layout
    (``text_tokens``, ``audio_tokens``) must equal the one trained. Anything else is a
    ConfigError that says what the checkpoint was trained for.
    """
    where = f"checkpoint {manifest.directory!r}" if manifest.directory else "the checkpoint"
    trained = manifest.strategy.name
    if requested_strategy is not None and requested_strategy != trained:
        raise ConfigError(
            f"{where} was trained for strategy {trained!r}, not {requested_strategy!r}; "
            f"decode it with strategy {trained!r} (or leave the strategy unset), or use a checkpoint trained for "
            f"{requested_strategy!r}"
        )
    requested = dict(requested_options or {})
    layout = manifest.chunk_layout
    if layout is not None:
        trained_layout = {"text_tokens": layout.text_tokens, "audio_tokens": layout.audio_tokens}
        for key in LAYOUT_KEYS:
            if key in requested and requested[key] != trained_layout[key]:
                raise ConfigError(
                    f"{where} was trained with {trained!r} chunks of {layout.text_tokens}+{layout.audio_tokens} "
                    f"text+audio tokens, but the config asks for {key} = {requested[key]!r}; "
                    f"drop strategy.{key} or set it to {trained_layout[key]}"
                )
    if manifest.reflection is not None and "reflection_tokens" in requested:
        check_reflection_mode(manifest.reflection, requested["reflection_tokens"], where)
    options = dict(manifest.strategy.options)
    options.update(requested)
    for message in short_cap_messages(manifest, trained, options, where):
        warnings.warn(CapWarning(message), stacklevel=2)
    return trained, options


def check_reflection_mode(trained: ReflectionRecord, requested: Any, where: str) -> None:
    """ConfigError unless a requested ``reflection_tokens`` is the reflection mode and length trained."""
    if trained.mode == "fixed" and requested != trained.tokens:
        raise ConfigError(
            f"{where} was trained with fixed-length reflections of {trained.tokens} tokens, but the config asks for "
            f"reflection_tokens = {requested!r}; drop strategy.reflection_tokens or set it to {trained.tokens}"
        )
    if trained.mode == "free" and requested is not None:
        raise ConfigError(
            f"{where} was trained with free-length reflections (the model closes them), but the config asks for "
            f"fixed-length reflection_tokens = {requested!r}; drop strategy.reflection_tokens, or train with "
            f"strategy.reflection_tokens = {requested!r}"
        )


class CapWarning(ReempathyWarning):
    """A decoding cap is shorter than the thoughts or reflections the checkpoint was trained on."""


def short_cap_messages(manifest: Manifest, strategy: str, options: dict[str, Any], where: str) -> list[str]:
    """One message per cap (``max_thought_tokens``, ``max_reflection_tokens``) shorter than the longest trained.

    A cap the options do not set is the strategy's default, read from its registered options
    model. In fixed-length mode the reflection length is fixed, so its cap is not checked.
    """
    longest = manifest.longest
    if longest is None:
        return []
    messages = []
    for kind, key in CAP_OPTIONS.items():
        trained = getattr(longest, kind)
        if not trained or (kind == "reflection" and options.get("reflection_tokens") is not None):
            continue
        cap = options.get(key, _option_default(strategy, key))
        if isinstance(cap, int) and cap < trained:
            source = "" if key in options else " (the default)"
            messages.append(
                f"{where} was trained on {kind}s of up to {trained} tokens, but strategy.{key} = {cap}{source} "
                f"cuts them short; set strategy.{key} = {trained} or more"
            )
    return messages


def _option_default(strategy: str, key: str) -> Any:
    """The default of a strategy option from its registered options model, or None when there is none."""
    from reempathy.registry import default_discovery

    try:
        field = default_discovery().registry.get("strategy", strategy).config_model.model_fields.get(key)
    except ReempathyError:
        return None
    return None if field is None else field.default


__all__ = [
    "Manifest",
    "Component",
    "ChunkLayoutRecord",
    "ReflectionRecord",
    "HiddenLengths",
    "CapWarning",
    "short_cap_messages",
    "check_reflection_mode",
    "MANIFEST",
    "SCHEMA",
    "ADAPTER_FILES",
    "read_manifest",
    "apply_checkpoint",
    "delimiter_ids",
    "now_iso",
    "checkpoint_config_overrides",
    "check_backbone_options",
    "check_adapter_files",
    "read_json_file",
    "runtime_options",
]

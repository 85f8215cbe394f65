"""The server's config: a ``[serve]`` table (limits, speech parts) and the models it offers.

Where it decides: :func:`load_serve_config` reads the TOML file, loads each model's decode config
(``config = "sft.toml"``, relative to the serve file) through :func:`reempathy.config.load_config`,
and refuses a set of models that could not share one batch: every model must name the same
backbone with the same options and checkpoint (one server holds one set of weights; serve another
checkpoint from another process), and the same ``decode.cache`` / ``decode.compile``. A model is
then a strategy with its processors and default sampling on that backbone — what a session picks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, ValidationError

from reempathy.config import DecodeConfig, describe_config_error, load_config, read_toml
from reempathy.registry import Registry
from reempathy.errors import ConfigError
from reempathy.options import STRICT

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


class ModelEntry(BaseModel):
    """One ``[[serve.models]]`` entry: a name clients ask for, and the decode config behind it."""

    model_config = STRICT
    name: str = Field(min_length=1, max_length=64, description="the model id clients use (letters, digits, . _ -)")
    config: str = Field(min_length=1, description="a decode config file (relative to the serve config's folder)")
    description: str = Field("", max_length=500)


class ServeSettings(BaseModel):
    """``[serve]``: what the server offers and the limits it keeps (docs/serving.md, Configuration)."""

    model_config = STRICT
    models: list[ModelEntry] = Field(min_length=1, max_length=64)
    default_model: str | None = Field(None, description="the model of a session that names none (default: the first)")
    max_sessions: int = Field(8, ge=1, le=1024, description="realtime sessions open at once = rows of the batch")
    max_output_tokens: int = Field(512, ge=1, lt=2**31, description="the most tokens one response may generate")
    max_audio_seconds: float = Field(30.0, gt=0, le=600, description="the most seconds of one spoken user turn")
    max_message_bytes: int = Field(2**20, ge=1024, le=64 * 2**20, description="the largest websocket message or request body")
    max_conversation_items: int = Field(64, ge=1, le=4096, description="items one realtime conversation may hold")
    prefill_tokens_per_step: int = Field(
        1024, ge=1, lt=2**31, description="prompt tokens prefilled between two decode steps (at least one prompt)"
    )
    allowed_origins: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(
        default_factory=list, description="browser origins allowed besides the server's own ('*': any)"
    )
    speech_tokenizer: str | None = Field(
        None, min_length=1, description="a glm-4-voice-tokenizer folder to attach, or 'tiny' (random, for tests and demos)"
    )
    speech_decoder: str | None = Field(
        None, min_length=1, description="a glm-4-voice-decoder folder to attach, or 'tiny' (random, for tests and demos)"
    )
    speech_threads: int = Field(1, ge=1, le=64, description="threads that tokenize and synthesise speech beside the model")
    speech_blocks: list[Annotated[int, Field(ge=6, le=10000)]] = Field(
        default_factory=lambda: [25, 50, 100, 150, 200], min_length=1, max_length=32,
        description="units per synthesised block, the first block first (the published demo's; smaller first blocks speak sooner)",
    )


@dataclass
class Model:
    """A model as served: its name and its decode config (strategy, processors, sampling)."""

    name: str
    cfg: DecodeConfig
    description: str = ""


@dataclass
class ServeConfig:
    """The loaded serve config: settings, models (in file order) and the file's folder."""

    settings: ServeSettings
    models: dict[str, Model]
    default_model: str
    source: str | None = None

    @property
    def first(self) -> DecodeConfig:
        """A model's decode config whose backbone and cache settings every model shares."""
        return next(iter(self.models.values())).cfg


def load_serve_config(
    path: str | Path,
    registry: Registry,
    overrides: dict[str, object] | None = None,
    device: str | None = None,
) -> ServeConfig:
    """Read a serve config; ``overrides`` replace ``[serve]`` keys (command-line flags), ``device`` every model's backbone device."""
    data = read_toml(path)
    where = f"config file {str(path)!r}"
    unknown = [k for k in data if k != "serve"]
    if unknown or "serve" not in data:
        raise ConfigError(
            f"{where}: a serve config holds one [serve] table with [[serve.models]] entries"
            + (f"; unknown key {unknown[0]!r}" if unknown else "; [serve] is missing")
            + " (see configs/serve.toml)"
        )
    table = data["serve"]
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: serve must be a table, e.g. [serve]")
    table = {**table, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    try:
        settings = ServeSettings.model_validate(table)
    except ValidationError as exc:
        raise ConfigError(describe_config_error(exc, f"{where} [serve]", {}, ServeSettings)) from None
    folder = Path(path).resolve().parent
    extra = [f"backbone.device={_toml_string(device)}"] if device is not None else []
    models: dict[str, Model] = {}
    for entry in settings.models:
        if not MODEL_NAME.match(entry.name):
            raise ConfigError(
                f"{where}: model name {entry.name!r} must be letters, digits, '.', '_' or '-' (at most 64)"
            )
        if entry.name in models:
            raise ConfigError(f"{where}: model {entry.name!r} is listed twice; give each model its own name")
        cfg_path = Path(entry.config)
        cfg_path = cfg_path if cfg_path.is_absolute() else folder / cfg_path
        models[entry.name] = Model(entry.name, load_config(cfg_path, extra, None, registry), entry.description)
    default = settings.default_model or settings.models[0].name
    if default not in models:
        raise ConfigError(f"{where}: default_model {default!r} is not one of the models: {', '.join(models)}")
    _check_shared(models, where)
    if not math.isfinite(settings.max_audio_seconds):
        raise ConfigError(f"{where}: max_audio_seconds must be a finite number of seconds")
    return ServeConfig(settings, models, default, str(path))


def _check_shared(models: dict[str, Model], where: str) -> None:
    """Every model names the same backbone, checkpoint and cache: rows of one batch share one model."""
    first_name, first = next(iter(models.items()))
    for name, model in models.items():
        cfg = model.cfg
        same_backbone = cfg.backbone.model_dump() == first.cfg.backbone.model_dump()
        if not same_backbone or cfg.decode.checkpoint != first.cfg.decode.checkpoint:
            raise ConfigError(
                f"{where}: model {name!r} names another backbone or checkpoint than {first_name!r}; one server "
                "holds one set of weights (run one server per checkpoint behind a load balancer: docs/serving.md)"
            )
        if (cfg.decode.cache, cfg.decode.compile) != (first.cfg.decode.cache, first.cfg.decode.compile):
            raise ConfigError(
                f"{where}: model {name!r} sets decode.cache/compile unlike {first_name!r}; the rows of one batch share them"
            )


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def is_loopback(host: str) -> bool:
    """True for a host name or address that only this machine can reach."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


__all__ = ["Model", "ModelEntry", "ServeConfig", "ServeSettings", "is_loopback", "load_serve_config"]

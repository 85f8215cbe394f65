"""Training configs: a TOML file names the backbone, the strategy to train for, the data and the run settings.

    [backbone]            # same shape as a decode config: name + the backbone's options
    name = "tiny"
    [strategy]            # sft | cotbs | reempathy | dpo, + the strategy's training options
    name = "reempathy"
    text_tokens = 5
    [data]
    path = "examples/empathy_dialogues.jsonl"
    [train]
    output_dir = "runs/reempathy"

Unknown keys are errors that name the key. Relative paths are taken from the working directory,
as in decode configs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reempathy.config import ComponentConfig, apply_overrides, describe_config_error, read_toml
from reempathy.registry import describe_validation_error
from reempathy.errors import ConfigError
from reempathy.jobs.trainrun import TrainSettings
from reempathy.options import STRICT
from reempathy.training.builders import BUILDERS, BuilderSpec

TOP_LEVEL_KEYS = ("backbone", "strategy", "data", "train")


class DataConfig(BaseModel):
    """``[data]``: the JSONL dataset and what to do with bad records."""

    model_config = STRICT
    path: str = Field(min_length=1)
    skip_bad: bool = Field(False, description="skip (and count) bad records instead of stopping at them")


class TrainConfig(BaseModel):
    """A whole training config (see configs/train-*.toml)."""

    model_config = ConfigDict(extra="forbid")
    backbone: ComponentConfig = ComponentConfig(name="tiny")
    strategy: ComponentConfig
    data: DataConfig
    train: TrainSettings
    source: str | None = Field(None, exclude=True)

    @property
    def spec(self) -> BuilderSpec:
        """The builder table entry of the configured strategy."""
        return strategy_spec(self.strategy.name)

    def strategy_options(self) -> BaseModel:
        """The strategy's training options, validated (an unknown option is an error naming it)."""
        spec = self.spec
        try:
            return spec.options_model.model_validate(self.strategy.options)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, f"training strategy {spec.name!r}", spec.options_model)) from None


def strategy_spec(name: str) -> BuilderSpec:
    """The builder of a training strategy, or a ConfigError listing the ones there are."""
    try:
        return BUILDERS[name]
    except KeyError:
        raise ConfigError(f"unknown training strategy {name!r}; available: {', '.join(sorted(BUILDERS))}") from None


def load_train_config(path: str | Path | None, overrides: list[str] | None = None, data: dict[str, Any] | None = None) -> TrainConfig:
    """Read (or take ``data``), override (``train.max_steps=10``) and validate a training config."""
    raw: dict[str, Any] = read_toml(path) if path is not None else dict(data or {})
    where = f"config file {str(path)!r}" if path is not None else "training config"
    unknown = [k for k in raw if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(TOP_LEVEL_KEYS)}")
    raw = apply_overrides(raw, overrides or [])
    for key in TOP_LEVEL_KEYS:
        if key in raw and not isinstance(raw[key], dict):
            raise ConfigError(f"{where}: {key} must be a table, e.g. [{key}]")
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            describe_config_error(exc, where, {"data": DataConfig, "train": TrainSettings}, TrainConfig)
        ) from None
    cfg.source = str(path) if path is not None else None
    cfg.strategy_options()
    return cfg


__all__ = ["TrainConfig", "TrainSettings", "DataConfig", "load_train_config", "strategy_spec"]

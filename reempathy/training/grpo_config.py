"""GRPO configs: a decode config (what the rollouts decode with) plus the prompts, the run, the algorithm and the reward.

    [backbone] [strategy] [[processors]] [sampling] [decode]   as in a decode config: the rollouts
    [data]     path = "prompts.jsonl"                          read as `reempathy run` reads a test set
    [train]    output_dir, max_steps, ..., init_from           as for the other training methods
    [grpo]     num_generations, beta, ..., hidden, credit      the algorithm (TRL's GRPOTrainer)
    [reward]   evaluator, options, weights, [reward.penalties] how an evaluator's scores become one number

A training config with a ``[grpo]`` table is a GRPO config (:func:`is_grpo_config`). Unknown keys
are errors that name the key; values keep their TOML types. Where it decides:
:func:`load_grpo_config` (file → ``--set`` → validation; the decode tables are validated as a decode
config is, against the plugins' own option models).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reempathy.config import (
    DecodeConfig,
    DecodeSettings,
    SamplingConfig,
    apply_overrides,
    describe_config_error,
    read_toml,
    validate_plugins,
)
from reempathy.errors import ConfigError
from reempathy.options import STRICT
from reempathy.registry import Registry
from reempathy.training.config import DataConfig, PolicyTrainSettings

DECODE_KEYS = ("backbone", "strategy", "processors", "sampling", "decode")
TOP_LEVEL_KEYS = (*DECODE_KEYS, "data", "train", "grpo", "reward")


class GrpoSettings(BaseModel):
    """``[grpo]``: the algorithm. TRL's GRPOTrainer does the optimisation; these are its settings we expose."""

    model_config = STRICT

    num_generations: int = Field(4, ge=2, le=4096, description="G: answers sampled per prompt, compared within their group")
    beta: float = Field(0.04, ge=0.0, le=1e3, description="weight of the KL to the reference (0: no reference model)")
    epsilon: float = Field(0.2, gt=0.0, lt=1.0, description="clipping range of the probability ratio")
    epsilon_high: float | None = Field(None, gt=0.0, le=10.0, description="upper clipping range (DAPO); unset: epsilon")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(
        "dapo", description="how token losses are aggregated (TRL's loss_type)"
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide advantages by the std of the group's rewards, of the batch's, or not at all"
    )
    num_iterations: int = Field(1, ge=1, le=64, description="optimisation passes over each batch of rollouts")
    rollout_batch_size: int = Field(16, ge=1, le=65536, description="rows per forward call of the batched decoder")
    hidden: Literal["train", "mask"] = Field(
        "train", description="hidden tokens (reflections, thoughts) in the policy loss, or masked out of it (the ablation)"
    )
    credit: Literal["answer", "chunk"] = Field(
        "answer", description="answer: one advantage per answer (GRPO); chunk: each spoken chunk and the reflection "
        "after it get the advantage of the prefix ending there (our extension)"
    )
    mask_truncated: bool = Field(False, description="answers cut by the token budget stay out of the loss (DAPO)")


class PenaltySettings(BaseModel):
    """``[reward.penalties]``: subtracted from the evaluator's reward; each 0 (off) by default. Counts are tokens."""

    model_config = STRICT

    hidden_per_spoken: float = Field(0.0, ge=0.0, le=1e6, description="x hidden tokens per spoken token of the answer")
    length: float = Field(0.0, ge=0.0, le=1e6, description="x spoken tokens beyond length_budget")
    length_budget: int = Field(0, ge=0, lt=2**31, description="spoken tokens allowed before the length penalty")
    latency: float = Field(0.0, ge=0.0, le=1e6, description="x tokens decoded before the first heard token, beyond latency_budget")
    latency_budget: int = Field(0, ge=0, lt=2**31, description="tokens allowed before the first heard token")


class RewardSettings(BaseModel):
    """``[reward]``: the evaluator that scores each answer, and how its scores become one number."""

    model_config = STRICT

    evaluator: str = Field(min_length=1, description="a registered evaluator (reempathy plugins)")
    options: dict[str, Any] = Field(default_factory=dict, description="the evaluator's options, as in `reempathy eval --set`")
    weights: dict[str, float] | None = Field(
        None, description="score name -> weight; the reward is the weighted sum. Unset: the evaluator's registered "
        "reward, or its only score"
    )
    penalties: PenaltySettings = Field(default_factory=PenaltySettings)


class GrpoConfig(BaseModel):
    """A whole GRPO config (see configs/train-grpo.toml)."""

    model_config = ConfigDict(extra="forbid")
    decode: DecodeConfig
    data: DataConfig
    train: PolicyTrainSettings
    grpo: GrpoSettings = Field(default_factory=GrpoSettings)
    reward: RewardSettings
    source: str | None = Field(None, exclude=True)


def is_grpo_config(path: str | Path) -> bool:
    """Whether a training config trains with GRPO (it has a ``[grpo]`` table)."""
    return "grpo" in read_toml(path)


def load_grpo_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    data: dict[str, Any] | None = None,
    registry: Registry | None = None,
) -> GrpoConfig:
    """Read (or take ``data``), override and validate a GRPO config; with ``registry`` the plugins' options too."""
    raw: dict[str, Any] = read_toml(path) if path is not None else dict(data or {})
    where = f"config file {str(path)!r}" if path is not None else "GRPO config"
    raw = apply_overrides(raw, overrides or [])
    unknown = [k for k in raw if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys of a GRPO config: {', '.join(TOP_LEVEL_KEYS)}")
    for key in ("backbone", "strategy", "sampling", "decode", "data", "train", "grpo", "reward"):
        if key in raw and not isinstance(raw[key], dict):
            raise ConfigError(f"{where}: {key} must be a table, e.g. [{key}]")
    for key in ("data", "train", "reward"):
        if key not in raw:
            raise ConfigError(f"{where}: a GRPO config needs a [{key}] table (docs/training.md, GRPO)")
    decode_raw = {k: raw[k] for k in DECODE_KEYS if k in raw}
    for key, default in (("backbone", "tiny"), ("strategy", "sft")):
        decode_raw.setdefault(key, {}).setdefault("name", default)
    try:
        decode = DecodeConfig.model_validate(decode_raw)
        cfg = GrpoConfig.model_validate({"decode": decode, **{k: raw[k] for k in ("data", "train", "grpo", "reward") if k in raw}})
    except ValidationError as exc:
        sections = {"sampling": SamplingConfig, "decode": DecodeSettings, "data": DataConfig, "train": PolicyTrainSettings,
                    "grpo": GrpoSettings, "reward": RewardSettings,
                    "reward.penalties": PenaltySettings}
        raise ConfigError(describe_config_error(exc, where, sections, GrpoConfig)) from None
    cfg.source = str(path) if path is not None else None
    check_grpo_config(cfg, where)
    if registry is not None:
        decode.source = cfg.source
        validate_plugins(decode, registry)
        registry.get("evaluator", cfg.reward.evaluator)
        registry.validate("evaluator", cfg.reward.evaluator, cfg.reward.options)
    return cfg


def check_grpo_config(cfg: GrpoConfig, where: str) -> None:
    """The settings that cannot make a GRPO run, refused in one line before anything is loaded."""
    d = cfg.decode
    if d.decode.checkpoint:
        raise ConfigError(f"{where}: decode.checkpoint merges an adapter into the weights, so GRPO could not save one "
                          "adapter that decodes; start from the checkpoint with [train] init_from instead")
    if d.decode.prompt is not None or d.decode.units is not None:
        raise ConfigError(f"{where}: decode.prompt / decode.units are not used by GRPO; the prompts are [data] path")
    if d.sampling.greedy:
        raise ConfigError(f"{where}: sampling.greedy = true gives every answer of a group the same tokens, so GRPO "
                          "has nothing to compare; set sampling.greedy = false")
    if d.decode.cache != "dynamic" or d.decode.compile:
        raise ConfigError(f"{where}: GRPO rollouts decode with the dynamic cache while the weights change every "
                          "step; leave decode.cache and decode.compile unset")
    g, t = cfg.grpo, cfg.train
    per_generation = t.batch_size * t.gradient_accumulation_steps
    if per_generation % g.num_generations:
        raise ConfigError(f"{where}: train.batch_size x train.gradient_accumulation_steps = {per_generation} answers per "
                          f"round of rollouts, not a multiple of grpo.num_generations = {g.num_generations}: each "
                          "prompt's group must be whole")
    w = cfg.reward.weights
    if w is not None and (not w or not any(v != 0 for v in w.values())):
        raise ConfigError(f"{where}: reward.weights gives no score a weight; name at least one score, e.g. "
                          "[reward.weights] need_support = 1.0")


__all__ = [
    "GrpoConfig",
    "GrpoSettings",
    "RewardSettings",
    "PenaltySettings",
    "load_grpo_config",
    "is_grpo_config",
    "check_grpo_config",
    "TOP_LEVEL_KEYS",
]

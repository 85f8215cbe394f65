"""GRPO: on-policy RL of the whole trace, rollouts from our batched decoder, rewards from an evaluator, TRL's trainer.

The recipe, top to bottom: plan the output directory (refuse, resume or finish, as every training
run) → load the backbone with the strategy's special tokens, the prompts, the evaluator → the
adapter: a fresh LoRA (all linear layers, the strategy's delimiter rows as trainable tokens) or
``[train] init_from``'s → TRL's GRPOTrainer with :class:`~reempathy.training.rollouts.Rollouts` as
its ``rollout_func`` and :class:`~reempathy.training.rewards.RewardFunction` as its reward →
train (resuming from the last ``checkpoint-N`` when asked) → the adapter and a manifest that
records the decoding setup and the reward: its spec and its mean per step.

TRL does the optimisation (group advantages, clipping, KL to the reference, loss aggregation,
checkpoints); what it lacks is here: rollouts that are our decoder's (any strategy, per-row
phases, attention reweighting), a loss mask from the trace (forced tokens out; hidden ones in, or
out for the ablation), rewards from evaluator plugins, and chunk-level credit, the one place we
go past TRL: :class:`RolloutGRPOTrainer` replaces TRL's answer-level advantages by per-token ones
(TRL's loss takes advantages of shape ``[batch, tokens]`` from subclasses).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from reempathy.backbones.base import Backbone, PromptInputs
from reempathy.checkpoints import HiddenLengths, runtime_options
from reempathy.data.testset import DataSet, check_records, read_records, uses_wav
from reempathy.data.records import BadRecord, bad_records_message
from reempathy.errors import InputError, NotAvailableError
from reempathy.jobs.rundir import write_json_atomic
from reempathy.jobs.trainrun import (
    ChunkLayoutRecord,
    Component,
    Manifest,
    delimiter_ids,
    install_adapter,
    now_iso,
    plan_run,
)
from reempathy.registry import Registry
from reempathy.training.grpo_config import GrpoConfig
from reempathy.training.rewards import RewardFunction, chunk_advantages, scalar_rule
from reempathy.training.rollouts import Rollouts
from reempathy.training.start import Start, start_from, start_identity, sync_reference_adapter
from reempathy.training.train import common_args, policy_reflection, run_trainer, save_trained, trainable_token_targets

ROLLOUT_STATE = "reempathy-rollouts.json"  # beside TRL's files in each checkpoint-N: the rollouts' counts so far


@dataclass
class GrpoResult:
    """What a GRPO run did: the checkpoint, its steps, the mean reward of each logged step."""

    output_dir: Path
    steps: int
    rewards: list[float | None]
    manifest: Manifest
    prompts: int
    resumed_from: str | None = None
    main_process: bool = True
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        """The summary ``reempathy train`` prints."""
        lines = [f"trained 'grpo' for {self.steps} steps on {self.prompts} prompts"
                 + (f" (resumed from {self.resumed_from})" if self.resumed_from else "")]
        lines += [f"note: {n}" for n in self.notes]
        summary = self.manifest.training.get("rewards", {})
        if summary.get("first_tenth") is not None and summary.get("last_tenth") is not None:
            lines.append(f"reward: {summary['first_tenth']:.4f} (mean of the first tenth of steps) -> "
                         f"{summary['last_tenth']:.4f} (last tenth)")
        lines.append(f"checkpoint: {self.output_dir} (decodes with strategy {self.manifest.strategy.name!r})")
        return "\n".join(lines)


def reward_summary(per_step: Sequence[float | None]) -> dict[str, Any]:
    """The manifest's record of the reward: the mean of each logged step (None: no answer of the step could be
    scored), and the mean of the first and of the last tenth of the steps."""
    values = [_finite(v) for v in per_step]

    def mean(part: Sequence[float | None]) -> float | None:
        known = [v for v in part if v is not None]
        return sum(known) / len(known) if known else None

    n = max(1, len(values) // 10)
    return {"per_step": values, "first_tenth": mean(values[:n]), "last_tenth": mean(values[-n:])}


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def logged_rewards(log_history: Sequence[dict[str, Any]]) -> list[float | None]:
    """The mean reward of each logged step in Trainer's log history."""
    return [_finite(e["reward"]) for e in log_history if "reward" in e]


def grpo_run_info(cfg: GrpoConfig, runtime: frozenset[str], reward_runtime: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Settings that must not change between a GRPO run and its resumption. Left out, so that a resumed run may
    change them: the backbone's ``runtime`` options, the evaluator's (``reward_runtime``: llm-judge's
    ``concurrency``, say) and ``rollout_batch_size`` (rows per forward call; every row keeps its own seed)."""
    d = cfg.decode
    reward = cfg.reward.model_dump(mode="json")
    reward["options"] = {k: v for k, v in reward["options"].items() if k not in reward_runtime}
    info: dict[str, Any] = {
        "method": "grpo",
        "backbone": {"name": d.backbone.name, "options": {k: v for k, v in d.backbone.options.items() if k not in runtime}},
        "decode": {"strategy": {"name": d.strategy.name, "options": d.strategy.options},
                   "processors": [{"name": p.name, "options": p.options} for p in d.processors],
                   "sampling": d.sampling.model_dump(mode="json"), "decode": d.decode.model_dump(mode="json")},
        "data": cfg.data.path,
        "lora": {"rank": cfg.train.lora_rank, "alpha": cfg.train.lora_alpha, "dropout": cfg.train.lora_dropout},
        "batch_size": cfg.train.batch_size,
        "seed": cfg.train.seed,
        "grpo": cfg.grpo.model_dump(mode="json", exclude={"rollout_batch_size"}),
        "reward": reward,
    }
    if cfg.train.init_from:
        info["init_from"] = start_identity(cfg.train.init_from)
    return info


def grpo_prompts(data: DataSet, backbone: Backbone, system_prompt: str | None) -> dict[str, PromptInputs]:
    """Every record's prompt as token ids, by record id; ``FILE:LINE`` of each one GRPO cannot train on."""
    bad = [BadRecord(r.where, "the prompt is read from a WAV ('audio'); GRPO trains on token ids: give the turn's "
                     "units (reempathy speech tokenize) or its text") for r in data.records if uses_wav(r, backbone)]
    if bad:
        raise InputError(bad_records_message(data.path, bad, "fix them and run again"))
    ready = check_records(data, backbone, system_prompt)
    out: dict[str, PromptInputs] = {}
    for record in data.records:
        inputs = ready[record.index]
        if inputs.prefill_inputs:
            raise NotAvailableError(f"{record.where}: backbone {backbone.name!r} reads this prompt with extra model "
                                    "inputs (audio features), which TRL's training forward cannot pass; give units or text")
        out[record.id] = inputs
    return out


def trainer_class() -> type:
    """TRL's GRPOTrainer with chunk-level credit (imported on use: TRL is heavy)."""
    from trl import GRPOTrainer

    class RolloutGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose advantages may be per token: each chunk-and-reflection segment its prefix's (module docstring)."""

        chunk_credit: tuple[RewardFunction, str] | None = None

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            """TRL's checkpoint, plus what the rollouts so far saw (``ROLLOUT_STATE``): a resumed or finished run's
            manifest then counts every rollout row and every hidden segment, not only those after the resumption."""
            super()._save_checkpoint(model, trial)
            rollouts = self.rollout_func
            if isinstance(rollouts, Rollouts) and self.is_world_process_zero():
                folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
                write_json_atomic(folder / ROLLOUT_STATE, rollouts.state())

        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            out = super()._generate_and_score_completions(inputs)
            if self.chunk_credit is not None:
                reward, scale = self.chunk_credit
                width = out["completion_ids"].shape[1]
                advantages = chunk_advantages(reward.latest, self.num_generations, width, scale)
                out["advantages"] = advantages.to(out["completion_ids"].device)
            return out

    return RolloutGRPOTrainer


def strategy_delimiters(cfg: GrpoConfig, backbone: Backbone, registry: Registry) -> list[int]:
    """The ids of the special tokens the decoding strategy declared (its delimiters): trainable embedding rows."""
    names = registry.get("strategy", cfg.decode.strategy.name).special_tokens or ()
    return [backbone.layout.special[n] for n in names if n in backbone.layout.special]


def train_grpo(
    cfg: GrpoConfig,
    registry: Registry | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
    on_note: Callable[[str], None] | None = None,
) -> GrpoResult:
    """Train the adapter with GRPO (module docstring) and write a complete checkpoint to ``[train] output_dir``."""
    from reempathy.evaluation.registry import build_evaluator
    from reempathy.runner import add_strategy_tokens, loop_options

    if registry is None:
        from reempathy.registry import default_discovery

        registry = default_discovery().registry
    d = cfg.decode
    runtime = runtime_options(registry.get("backbone", d.backbone.name).config_model)
    evaluator_model = registry.get("evaluator", cfg.reward.evaluator).config_model
    info = grpo_run_info(cfg, runtime, frozenset(getattr(evaluator_model, "runtime_options", ())))
    plan = plan_run(cfg.train.output_dir, info, cfg.train.resume, cfg.train.overwrite, cfg.train.max_steps)
    for note in plan.notes:
        if on_note is not None:
            on_note(note)
    main = int(os.environ.get("RANK", "0")) == 0
    if plan.finished is not None:
        return GrpoResult(plan.output_dir, plan.finished.steps, list(plan.finished.training.get("rewards", {}).get("per_step", [])),
                          plan.finished, int(plan.finished.training.get("records", 0)), main_process=main, notes=plan.notes)

    backbone_options = registry.validate("backbone", d.backbone.name, d.backbone.options)
    backbone = registry.create("backbone", d.backbone.name, backbone_options)
    add_strategy_tokens(backbone, d, registry)
    strategy_options = registry.validate("strategy", d.strategy.name, d.strategy.options).model_dump(mode="json")
    data = read_records(cfg.data.path)
    prompts = grpo_prompts(data, backbone, d.decode.system_prompt)
    messages = {r.id: [m.to_json() for m in r.prompt] for r in data.records}
    evaluator = build_evaluator(registry, cfg.reward.evaluator, cfg.reward.options)
    scalar = scalar_rule(cfg.reward, registry, tuple(evaluator.score_names))
    delimiters = strategy_delimiters(cfg, backbone, registry)
    start = None
    if cfg.train.init_from:
        start = start_from(cfg.train.init_from, backbone, d.backbone.name, d.backbone.options, cfg.train, delimiters, registry)
    rollouts = Rollouts(backbone, d, registry, prompts, messages, loop_options(d), cfg.grpo.rollout_batch_size,
                        cfg.grpo.hidden == "train", strategy_options)
    layout = probe_layout(rollouts, next(iter(prompts)))
    ChunkLayoutRecord.of(layout, f"strategy {d.strategy.name!r}")  # one the manifest can record, or refused before training
    earlier = plan.finish_from or plan.resume_from
    if earlier is not None:
        if (Path(earlier) / ROLLOUT_STATE).is_file():
            rollouts.restore(json.loads((Path(earlier) / ROLLOUT_STATE).read_text(encoding="utf-8")))
        elif on_note is not None:  # a checkpoint written before the counts were kept
            on_note(f"{earlier} has no {ROLLOUT_STATE}: the manifest counts the rollouts from here on only")
    if plan.finish_from is not None:
        manifest = grpo_manifest(cfg, backbone, backbone_options, strategy_options, layout, rollouts, start,
                                 cfg.train.max_steps, len(prompts), _logged_rewards(plan.finish_from), evaluator)
        if main:
            install_adapter(plan.finish_from, plan.output_dir, manifest)
        return GrpoResult(plan.output_dir, cfg.train.max_steps, manifest.training["rewards"]["per_step"], manifest,
                          len(prompts), resumed_from=str(plan.finish_from), main_process=main, notes=plan.notes)

    reward = RewardFunction(cfg.reward, evaluator, scalar, backbone, cfg.grpo.credit == "chunk")
    trainer = make_grpo_trainer(cfg, backbone, rollouts, reward, delimiters, start, callbacks, progress)
    steps, resume_from = run_trainer(trainer, plan, info, progress)
    per_step = logged_rewards(trainer.state.log_history)
    manifest = grpo_manifest(cfg, backbone, backbone_options, strategy_options, layout, rollouts, start, steps,
                             len(prompts), per_step, evaluator)
    save_trained(trainer, cfg.train.output_dir, manifest)
    return GrpoResult(Path(cfg.train.output_dir), steps, per_step, manifest, len(prompts), resumed_from=resume_from,
                      main_process=trainer.is_world_process_zero(), notes=plan.notes)


class _QuietUnscored(logging.Filter):
    """TRL warns, printing every field of the row, each time no reward could be computed for a completion (an evaluator
    that fails on an answer without text, say); the run logs their share as ``reward/failed`` instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "All reward functions returned None" not in record.getMessage()


def _quiet_trl() -> None:
    logger = logging.getLogger("trl.trainer.grpo_trainer")
    if not any(isinstance(f, _QuietUnscored) for f in logger.filters):
        logger.addFilter(_QuietUnscored())


def make_grpo_trainer(
    cfg: GrpoConfig, backbone: Backbone, rollouts: Rollouts, reward: RewardFunction, delimiters: Sequence[int],
    start: Start | None, callbacks: Sequence[Any], progress: bool,
) -> Any:
    """TRL's GRPOTrainer (our subclass) on the backbone's model, with our rollouts and reward."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import set_seed
    from trl import GRPOConfig

    g, t, d = cfg.grpo, cfg.train, cfg.decode
    set_seed(t.seed)  # LoRA's A matrices are random: seed before wrapping
    temperature = d.sampling.temperature or backbone.sampling_defaults.get("temperature") or 1.0
    args = GRPOConfig(
        **common_args(t, progress),
        num_generations=g.num_generations,
        beta=g.beta,
        epsilon=g.epsilon,
        epsilon_high=g.epsilon_high,
        loss_type=g.loss_type,
        scale_rewards=g.scale_rewards,
        num_iterations=g.num_iterations,
        mask_truncated_completions=g.mask_truncated,
        max_completion_length=d.decode.max_new_tokens,
        temperature=float(temperature),  # TRL's log-probabilities divide the logits by it, as the sampler did
        remove_unused_columns=False,
    )
    peft_config = None
    if start is None:
        peft_config = LoraConfig(
            r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, target_modules="all-linear",
            # Input-embedding rows only: TRL reads the log-probabilities off the LM head's weight.
            trainable_token_indices=trainable_token_targets(backbone.model, delimiters, include_head=False),
            task_type="CAUSAL_LM",
        )
    dataset = Dataset.from_list([{"prompt": prompt_id} for prompt_id in rollouts.prompts])
    cls = trainer_class()
    _quiet_trl()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are using 'rollout_func'")
        trainer = cls(
            model=start.model if start is not None else backbone.model,
            reward_funcs=[reward],
            args=args,
            train_dataset=dataset,
            processing_class=backbone.tokenizer,
            peft_config=peft_config,
            rollout_func=rollouts,
            callbacks=list(callbacks),
        )
    # A completion ends at the backbone's stop tokens (TRL's own guess is the tokenizer's eos): truncation is read from them.
    trainer.eos_token_ids = list(backbone.layout.stop_ids)
    if g.credit == "chunk":
        if trainer.accelerator.num_processes > 1:
            raise NotAvailableError("grpo.credit = \"chunk\" runs in one process only: a group's answers may be spread "
                                    "over processes, and chunk advantages are normalised within the group")
        trainer.chunk_credit = (reward, g.scale_rewards)
    sync_reference_adapter(trainer.model)
    return trainer


def probe_layout(rollouts: Rollouts, prompt_id: str) -> dict[str, int] | None:
    """The chunk layout the strategy reports (``extra["chunk_layout"]``), from one token decoded: strategy-agnostic."""
    from reempathy.decoding.batch import RowRequest, decode_batch

    strategy, processors = rollouts.plugins()
    options = dataclasses.replace(rollouts.options, max_new_tokens=1)
    request = RowRequest(key=0, prompt_ids=rollouts.prompts[prompt_id].ids, strategy=strategy, processors=processors)
    for _, result in decode_batch(rollouts.backbone, [request], options, 1):
        layout = result.extra.get("chunk_layout")
        return dict(layout) if isinstance(layout, dict) else None
    return None


def _logged_rewards(checkpoint: Path) -> list[float | None]:
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return logged_rewards(state.get("log_history", []))


def grpo_manifest(
    cfg: GrpoConfig, backbone: Backbone, backbone_options: Any, strategy_options: dict[str, Any],
    layout: dict[str, int] | None, rollouts: Rollouts, start: Start | None, steps: int, prompts: int,
    per_step: Sequence[float | None], evaluator: Any,
) -> Manifest:
    """The checkpoint's manifest: decodes with the rollouts' strategy; records the reward's spec and its mean per step."""
    d, t = cfg.decode, cfg.train
    longest = rollouts.longest
    training: dict[str, Any] = {
        "method": "grpo",
        "lora_rank": start.rank if start is not None else t.lora_rank,
        "lora_alpha": start.alpha if start is not None else t.lora_alpha,
        "data": cfg.data.path,
        "records": prompts,
        "grpo": cfg.grpo.model_dump(mode="json"),
        "reward": {**cfg.reward.model_dump(mode="json"), "score_names": list(evaluator.score_names)},
        "rewards": reward_summary(per_step),
        "rollouts": {"processors": [{"name": p.name, **p.options} for p in d.processors],
                     "sampling": d.sampling.model_dump(mode="json"),
                     "max_new_tokens": d.decode.max_new_tokens, "rows": rollouts.rows},
    }
    if start is not None:
        training["init_from"] = start.record()
    return Manifest(
        backbone=Component(name=d.backbone.name, options=backbone_options.model_dump(mode="json")),
        strategy=Component(name=d.strategy.name, options=strategy_options),
        chunk_layout=ChunkLayoutRecord.of(layout, f"strategy {cfg.decode.strategy.name!r}"),
        reflection=policy_reflection(strategy_options),
        longest=HiddenLengths(thought=longest.get("thought"), reflection=longest.get("reflection")) if longest else None,
        delimiters=delimiter_ids(backbone),
        steps=steps,
        created=now_iso(),
        training=training,
    )


__all__ = ["train_grpo", "GrpoResult", "grpo_run_info", "grpo_prompts", "reward_summary", "make_grpo_trainer",
           "probe_layout", "trainer_class", "strategy_delimiters"]

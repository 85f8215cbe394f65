"""Training: LoRA (peft) on the backbone, Trainer for sft / cotbs / reempathy, TRL's DPOTrainer for dpo.

The recipe, top to bottom: load the backbone → read and validate the records → build one
sequence (or preference pair) per record → wrap the model with LoRA on all linear layers and
the strategy's delimiter tokens as peft trainable tokens → train (resuming from the last
``checkpoint-N`` when asked) → save the adapter and the manifest. Trainer does the device
placement and the distribution, so the same entry point runs under ``accelerate launch``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from pydantic import BaseModel

from reempathy.backbones.base import Backbone
from reempathy.registry import Registry
from reempathy.checkpoints import HiddenLengths, ReflectionRecord, runtime_options
from reempathy.training.builders import REFLECTION, THOUGHT, BuilderSpec, PreferencePair, TrainingSequence, build_all
from reempathy.jobs.trainrun import (
    ChunkLayoutRecord,
    Component,
    Manifest,
    RunPlan,
    begin_run,
    delimiter_ids,
    install_adapter,
    now_iso,
    plan_run,
    trainer_losses,
    write_checkpoint,
)
from reempathy.training.collate import PadCollator, PreferenceCollator
from reempathy.training.start import Start, drop_reference_adapter, start_from, start_identity, sync_reference_adapter
from reempathy.training.trace import TracePolicy
from reempathy.training.config import TrainConfig, TrainSettings
from reempathy.data.records import BadRecord, RecordSet, load_records
from reempathy.errors import ConfigError, InputError


@dataclass
class TrainResult:
    """What a run did: where the checkpoint is, its steps, the logged losses and the records left out."""

    output_dir: Path
    steps: int
    losses: list[float]
    manifest: Manifest
    records: int
    skipped: list[BadRecord] = field(default_factory=list)
    unused: int = 0
    resumed_from: str | None = None
    main_process: bool = True  # False on the other processes of a distributed run
    notes: list[str] = field(default_factory=list)  # what the run decided about earlier checkpoints


def _registry(registry: Registry | None) -> Registry:
    if registry is None:
        from reempathy.registry import default_discovery

        registry = default_discovery().registry
    return registry


def load_training_backbone(cfg: TrainConfig, registry: Registry | None = None) -> tuple[Backbone, BaseModel]:
    """The configured backbone and its validated options, through the plugin registry (as decoding does)."""
    registry = _registry(registry)
    options = registry.validate("backbone", cfg.backbone.name, cfg.backbone.options)
    return registry.create("backbone", cfg.backbone.name, options), options


def trainable_token_targets(model: Any, token_ids: Sequence[int], include_head: bool) -> dict[str, list[int]] | None:
    """peft ``trainable_token_indices`` for the delimiters: the input embedding rows, and the LM head rows
    when the head is a separate (untied) linear layer and ``include_head``."""
    if not token_ids:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    ids = sorted(set(int(i) for i in token_ids))
    targets = {names[id(model.get_input_embeddings())]: ids}
    head = model.get_output_embeddings()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if include_head and head is not None and not tied and isinstance(head, torch.nn.Linear) and head.bias is None:
        targets[names[id(head)]] = ids
    return targets


def trace_special_tokens(records: RecordSet, registry: Registry, backbone: Backbone) -> list[str]:
    """The special tokens of the strategies whole traces were decoded with (whole-trace DPO), in their
    registration order: added to the backbone when it lacks them (a plugin strategy's own), as decoding
    adds them, so that the traces' ids are the backbone's. An unknown strategy is a ConfigError naming it."""
    names: dict[str, None] = {}
    for sr in records.records:
        answer = sr.record.messages[-1] if sr.record.messages else None
        for message in (answer, sr.record.rejected):
            trace = getattr(message, "trace", None)
            if trace is not None:
                names.setdefault(trace.strategy.name)
    tokens: dict[str, None] = {}
    for name in names:
        try:
            registration = registry.get("strategy", name)
        except ConfigError as exc:
            raise ConfigError(f"dataset {records.path!r}: its traces were decoded with strategy {name!r}, which is not "
                              f"installed here ({exc}); install the plugin that provides it") from None
        tokens.update(dict.fromkeys(registration.special_tokens or ()))
    backbone.add_special_tokens(list(tokens))
    return list(tokens)


def lora_config(cfg: TrainConfig, delimiters: Sequence[str], include_head: bool, backbone: Backbone) -> Any:
    """LoRA on all linear layers (rank/alpha from ``[train]``) plus the ``delimiters`` as trainable tokens.

    The LM-head rows are left out for DPO (``include_head`` false): TRL computes its
    log-probabilities from ``lm_head.weight`` directly, so trainable rows there would never see a gradient.
    """
    from peft import LoraConfig

    delimiter_tokens = [backbone.layout.token_id(name) for name in delimiters]
    return LoraConfig(
        r=cfg.train.lora_rank,
        lora_alpha=cfg.train.lora_alpha,
        lora_dropout=cfg.train.lora_dropout,
        target_modules="all-linear",
        trainable_token_indices=trainable_token_targets(backbone.model, delimiter_tokens, include_head),
        task_type="CAUSAL_LM",
    )


def run_info(cfg: TrainConfig, runtime: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Settings that must not change between a run and its resumption (``runtime`` backbone options may)."""
    backbone_options = {k: v for k, v in cfg.backbone.options.items() if k not in runtime}
    start = {"init_from": start_identity(cfg.train.init_from)} if cfg.train.init_from else {}
    return {
        **start,
        "backbone": {"name": cfg.backbone.name, "options": backbone_options},
        "strategy": {"name": cfg.strategy.name, "options": cfg.strategy.options},
        "data": cfg.data.path,
        "lora": {"rank": cfg.train.lora_rank, "alpha": cfg.train.lora_alpha, "dropout": cfg.train.lora_dropout},
        "batch_size": cfg.train.batch_size,
        "seed": cfg.train.seed,
    }



def run_trainer(trainer: Any, plan: Any, info: dict[str, Any], progress: bool) -> tuple[int, str | None]:
    """Train a TRL/transformers ``trainer`` as a run directory's plan says: the run's info written first
    (rank 0), from the plan's ``checkpoint-N`` when it resumes. Returns (steps done, the checkpoint resumed from)."""
    if not progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    if trainer.is_world_process_zero():
        begin_run(plan, info)
    trainer.accelerator.wait_for_everyone()
    resume_from = str(plan.resume_from) if plan.resume_from else None
    trainer.train(resume_from_checkpoint=resume_from)
    return int(trainer.state.global_step), resume_from


def save_trained(trainer: Any, output_dir: str | Path, manifest: Any) -> None:
    """Write the trained adapter and its manifest (rank 0; the reference adapter left out), then wait for every rank."""
    drop_reference_adapter(trainer.model)
    if trainer.is_world_process_zero():
        write_checkpoint(trainer.model, output_dir, manifest)
    trainer.accelerator.wait_for_everyone()

def common_args(t: TrainSettings, progress: bool) -> dict[str, Any]:
    """Trainer arguments every method shares, from ``[train]`` (TRL's configs take them too)."""
    return dict(
        output_dir=t.output_dir,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        seed=t.seed,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        report_to="none",
        disable_tqdm=not progress,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=False,  # TRL turns it on by default; the models here are small
    )


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, list[int]]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


def make_lm_trainer(
    cfg: TrainConfig, backbone: Backbone, peft_config: Any, items: list[TrainingSequence], callbacks: Sequence[Any],
    progress: bool, start: Start | None = None,
) -> Any:
    """transformers' Trainer on the LoRA-wrapped model (or the adapter ``start`` continues), our padding collator, the built sequences."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(cfg.train.seed)  # LoRA's A matrices are random: seed before wrapping
    model = start.model if start is not None else get_peft_model(backbone.model, peft_config)
    data = _ListDataset([{"input_ids": s.input_ids, "labels": s.labels} for s in items])
    args = TrainingArguments(remove_unused_columns=False, **common_args(cfg.train, progress))
    pad = backbone.tokenizer.pad_token_id if backbone.tokenizer.pad_token_id is not None else 0
    return Trainer(model=model, args=args, train_dataset=data, data_collator=PadCollator(pad), callbacks=list(callbacks))


def make_dpo_trainer(
    cfg: TrainConfig, backbone: Backbone, peft_config: Any, options: BaseModel, items: list[PreferencePair],
    callbacks: Sequence[Any], progress: bool, start: Start | None = None,
) -> Any:
    """TRL's DPOTrainer on pre-tokenized pairs, each with its loss masks (:class:`PreferenceCollator`).

    The reference model is the backbone with the adapter disabled, or, when the run continues a
    checkpoint's adapter (``start``), a frozen copy of that adapter (:mod:`reempathy.training.start`).
    """
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOConfig

    from reempathy.training.dpo import PretokenizedDPOTrainer

    set_seed(cfg.train.seed)
    data = Dataset.from_list([
        {"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids,
         "chosen_mask": p.chosen_mask or [1] * len(p.chosen_ids), "rejected_mask": p.rejected_mask or [1] * len(p.rejected_ids)}
        for p in items
    ])
    # remove_unused_columns would drop the masks: TRL's own columns are only the ids.
    args = DPOConfig(beta=getattr(options, "beta", 0.1), max_length=backbone.max_context, remove_unused_columns=False,
                     **common_args(cfg.train, progress))
    pad = backbone.tokenizer.pad_token_id if backbone.tokenizer.pad_token_id is not None else 0
    trainer = PretokenizedDPOTrainer(
        model=start.model if start is not None else backbone.model,
        args=args,
        data_collator=PreferenceCollator(pad, backbone.max_context),
        train_dataset=data,
        processing_class=backbone.tokenizer,
        peft_config=None if start is not None else peft_config,
        callbacks=list(callbacks),
    )
    sync_reference_adapter(trainer.model)
    return trainer


def longest_hidden(items: Sequence[TrainingSequence | PreferencePair]) -> HiddenLengths:
    """The longest thought and reflection (content tokens, delimiters excluded) of the built sequences."""
    longest: dict[str, int] = {}
    for item in items:
        spans = item.spans if isinstance(item, TrainingSequence) else item.chosen_spans + ["control"] + item.rejected_spans
        run, label = 0, None
        for span in [*spans, None]:
            if span == label:
                run += 1
                continue
            if label in (THOUGHT, REFLECTION):
                longest[label] = max(longest.get(label, 0), run)
            run, label = 1, span
    return HiddenLengths(thought=longest.get(THOUGHT), reflection=longest.get(REFLECTION))


def reflection_record(options: BaseModel) -> ReflectionRecord | None:
    """Free or fixed-length reflections, for a strategy that writes them."""
    if not getattr(options, "reflect", False):
        return None
    tokens = getattr(options, "reflection_tokens", None)
    return ReflectionRecord(mode="fixed", tokens=tokens) if tokens is not None else ReflectionRecord(mode="free")


def build_manifest(
    cfg: TrainConfig,
    spec: BuilderSpec,
    options: BaseModel,
    backbone: Backbone,
    backbone_options: BaseModel,
    steps: int,
    records: int,
    longest: HiddenLengths | None = None,
    policy: TracePolicy | None = None,
    start: Start | None = None,
) -> Manifest:
    """The manifest that tells the decoder what this checkpoint was trained for.

    Whole-trace DPO (``policy``: the strategy the traces were decoded with) decodes with that
    strategy and its options; ``start`` records the checkpoint whose adapter the run continued.
    """
    training: dict[str, Any] = {
        "method": spec.name,
        "options": options.model_dump(mode="json"),
        "lora_rank": start.rank if start is not None else cfg.train.lora_rank,
        "lora_alpha": start.alpha if start is not None else cfg.train.lora_alpha,
        "data": cfg.data.path,
        "records": records,
    }
    if start is not None:
        training["init_from"] = start.record()
    if policy is not None:
        training["traces"] = {"strategy": policy.strategy, "hidden": getattr(options, "hidden", "train")}
        layout_doc = policy.chunk_layout
        return Manifest(
            backbone=Component(name=cfg.backbone.name, options=backbone_options.model_dump(mode="json")),
            strategy=Component(name=policy.strategy, options=policy.options),
            chunk_layout=ChunkLayoutRecord.of(layout_doc, f"the traces' strategy {policy.strategy!r}"),
            reflection=policy_reflection(policy.options),
            longest=longest,
            delimiters=delimiter_ids(backbone),
            steps=steps,
            created=now_iso(),
            training=training,
        )
    layout = spec.chunk_layout(options, backbone)
    strategy_options = options.model_dump(mode="json") if spec.decode_strategy == spec.name else {}
    return Manifest(
        backbone=Component(name=cfg.backbone.name, options=backbone_options.model_dump(mode="json")),
        strategy=Component(name=spec.decode_strategy, options=strategy_options),
        chunk_layout=ChunkLayoutRecord(text_tokens=layout.text_tokens, audio_tokens=layout.audio_tokens) if layout else None,
        reflection=reflection_record(options),
        longest=longest,
        delimiters=delimiter_ids(backbone),
        steps=steps,
        created=now_iso(),
        training=training,
    )


def policy_reflection(options: dict[str, Any]) -> ReflectionRecord | None:
    """Free or fixed-length reflections, read from a decoding strategy's options (``reflect``, ``reflection_tokens``)."""
    if not options.get("reflect", False):
        return None
    tokens = options.get("reflection_tokens")
    return ReflectionRecord(mode="fixed", tokens=tokens) if tokens is not None else ReflectionRecord(mode="free")


def trace_policy(items: Sequence[TrainingSequence | PreferencePair], where: str) -> TracePolicy | None:
    """The one policy whole-trace pairs were decoded with, None for pairs of spoken answers; mixed is an error."""
    policies = {item.policy for item in items if isinstance(item, PreferencePair)}
    if len(policies) <= 1:
        return next(iter(policies), None)
    if None in policies:
        raise InputError(f"dataset {where!r} mixes pairs with decoded traces and pairs without; a checkpoint decodes "
                         "with one strategy: train them apart, or set strategy.traces = false")
    first, second = sorted(policies, key=lambda p: (p.strategy, p.options_json))[:2]
    raise InputError(f"dataset {where!r} holds traces of different policies ({first.describe()} and "
                     f"{second.describe()}); a checkpoint decodes with one strategy: train them apart")


def train(
    cfg: TrainConfig,
    registry: Registry | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
    on_note: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train the configured strategy's adapter and write a complete checkpoint to ``[train] output_dir``.

    The output directory is planned first (:func:`~reempathy.jobs.trainrun.plan_run`),
    before anything is loaded, so a refused run costs nothing and changes nothing. ``on_note``
    hears each decision about earlier checkpoints (an incomplete one skipped, nothing left to train).
    """
    spec = cfg.spec
    options = cfg.strategy_options()
    registry = _registry(registry)
    runtime = runtime_options(registry.get("backbone", cfg.backbone.name).config_model)
    info = run_info(cfg, runtime)
    plan = plan_run(cfg.train.output_dir, info, cfg.train.resume, cfg.train.overwrite, cfg.train.max_steps)
    for note in plan.notes:
        if on_note is not None:
            on_note(note)
    main = int(os.environ.get("RANK", "0")) == 0
    if plan.finished is not None:
        return TrainResult(
            output_dir=plan.output_dir,
            steps=plan.finished.steps,
            losses=[],
            manifest=plan.finished,
            records=int(plan.finished.training.get("records", 0)),
            main_process=main,
            notes=plan.notes,
        )
    backbone, backbone_options = load_training_backbone(cfg, registry)
    # A backbone without audio-unit tokens (a text-only stream) does not read units: no range to check.
    records = load_records(cfg.data.path, backbone.layout.audio_count or None, cfg.data.skip_bad, backbone.max_text_chars)
    if getattr(options, "traces", False):  # whole-trace DPO: the tokens of the strategy the traces were decoded with
        trace_special_tokens(records, registry, backbone)
    built = build_all(records, backbone, spec, options, cfg.data.skip_bad)
    policy = trace_policy(built.items, cfg.data.path)
    if policy is not None:  # a layout the manifest can record, or refused before training
        ChunkLayoutRecord.of(policy.chunk_layout, f"the traces' strategy {policy.strategy!r}")
    delimiters = spec.delimiters(options)
    start = None
    if cfg.train.init_from:
        start = start_from(cfg.train.init_from, backbone, cfg.backbone.name, cfg.backbone.options, cfg.train,
                           [backbone.layout.token_id(name) for name in delimiters], registry)
    if plan.finish_from is not None:
        return _finish_from_checkpoint(cfg, plan, plan.finish_from, spec, options, backbone, backbone_options, records,
                                       built, main, policy, start)
    peft_config = lora_config(cfg, delimiters, not spec.preference, backbone)
    if spec.preference:
        trainer = make_dpo_trainer(cfg, backbone, peft_config, options, built.items, callbacks, progress, start)  # type: ignore[arg-type]
    else:
        trainer = make_lm_trainer(cfg, backbone, peft_config, built.items, callbacks, progress, start)  # type: ignore[arg-type]
    steps, resume_from = run_trainer(trainer, plan, info, progress)
    manifest = build_manifest(
        cfg, spec, options, backbone, backbone_options, steps, len(built.items), longest_hidden(built.items), policy, start
    )
    save_trained(trainer, cfg.train.output_dir, manifest)
    losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]
    return TrainResult(
        output_dir=Path(cfg.train.output_dir),
        steps=steps,
        losses=losses,
        manifest=manifest,
        records=len(built.items),
        skipped=records.skipped + built.skipped,
        unused=built.unused,
        resumed_from=resume_from,
        main_process=trainer.is_world_process_zero(),
        notes=plan.notes,
    )


def _finish_from_checkpoint(
    cfg: TrainConfig,
    plan: RunPlan,
    source: Path,
    spec: BuilderSpec,
    options: BaseModel,
    backbone: Backbone,
    backbone_options: BaseModel,
    records: Any,
    built: Any,
    main: bool,
    policy: TracePolicy | None = None,
    start: Start | None = None,
) -> TrainResult:
    """A run stopped after its last Trainer save: install that checkpoint's adapter instead of training again."""
    steps = cfg.train.max_steps
    manifest = build_manifest(
        cfg, spec, options, backbone, backbone_options, steps, len(built.items), longest_hidden(built.items), policy, start
    )
    if main:
        install_adapter(source, plan.output_dir, manifest)
    return TrainResult(
        output_dir=plan.output_dir,
        steps=steps,
        losses=trainer_losses(source),
        manifest=manifest,
        records=len(built.items),
        skipped=records.skipped + built.skipped,
        unused=built.unused,
        resumed_from=str(source),
        main_process=main,
        notes=plan.notes,
    )


__all__ = [
    "train",
    "run_info",
    "TrainResult",
    "lora_config",
    "trainable_token_targets",
    "load_training_backbone",
    "build_manifest",
    "longest_hidden",
    "reflection_record",
    "policy_reflection",
    "trace_policy",
    "make_dpo_trainer",
    "make_lm_trainer",
    "common_args",
]

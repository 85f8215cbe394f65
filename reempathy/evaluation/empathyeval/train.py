"""Training EmpathyEval: LoRA (r8/α32, all linear layers) on the thinker + four score heads, one joint loss.

The recipe, top to bottom: validate the config → load the base model → read the labelled
dialogues and turn each into heard audio (WAV, or units through the speech decoder) once → split
off a validation set → wrap the thinker with LoRA (the vision tower left out: it never sees
input here) → train ``lm_weight`` × LM loss on the assessment + ``score_weight`` × score MSE
with AdamW under ``accelerate`` (so ``accelerate launch`` spreads it over devices) → write the
adapter, heads and manifest → report validation LCC / SRCC / MSE per dimension and overall.

Resumable: every ``save_steps`` a ``checkpoint-N`` folder holds the trainable weights (adapter
and heads only, never the frozen base) and the optimizer state; ``--resume`` continues from the
last one, with the same data order.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reempathy.errors import ConfigError, InputError
from reempathy.evaluation.base import EMPATHY_SCORES
from reempathy.evaluation.data import Labelled, load_labelled
from reempathy.evaluation.empathyeval.audio import AudioSource
from reempathy.evaluation.empathyeval.checkpoint import (
    EvaluatorManifest, check_evaluator_output, now_iso, write_evaluator_checkpoint,
)
from reempathy.evaluation.empathyeval.evaluator import make_example, predict
from reempathy.evaluation.empathyeval.model import EmpathyEvalModel, ScoreHeads, clip_score
from reempathy.evaluation.empathyeval.omni import load_omni
from reempathy.evaluation.empathyeval.options import EmpathyEvalOptions
from reempathy.evaluation.empathyeval.prompt import Example, collate
from reempathy.evaluation.metrics import Agreement, agreement_table, format_agreement
from reempathy.safe_write import replacing_dir
from reempathy.jobs.trainrun import TrainSettings, begin_run, checkpoint_dirs, plan_run

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"


class EvaluatorDataConfig(BaseModel):
    """``[data]``: labelled dialogues, and where validation comes from."""

    model_config = ConfigDict(extra="forbid")
    path: str
    validation: str | None = Field(None, description="a separate labelled JSONL with held-out human scores")
    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="else hold out this share of path (seeded)")
    skip_bad: bool = False


class EvaluatorTrainSettings(TrainSettings):
    """``[train]``: the usual settings plus the two loss weights."""

    lm_weight: float = Field(1.0, ge=0.0, description="weight of the LM loss on the assessment text")
    score_weight: float = Field(1.0, ge=0.0, description="weight of the MSE on the four scores")
    heads_learning_rate: float | None = Field(None, gt=0.0, description="learning rate of the heads (default: learning_rate)")


class EvaluatorTrainConfig(BaseModel):
    """A training config with an ``[evaluator]`` table (``configs/train-empathyeval.toml``)."""

    model_config = ConfigDict(extra="forbid")
    evaluator: dict[str, Any]
    data: EvaluatorDataConfig
    train: EvaluatorTrainSettings


@dataclass
class EvaluatorTrainResult:
    """What a run did: checkpoint, steps, logged losses, validation agreement, records left out."""

    output_dir: Path
    steps: int
    losses: list[dict[str, float]]
    validation: dict[str, Agreement] | None
    records: int
    validation_records: int
    skipped: list[str] = field(default_factory=list)
    resumed_from: str | None = None
    main_process: bool = True  # False on the other processes of a distributed run

    def format(self) -> str:
        """A short report for the terminal."""
        lines = [
            f"trained 'empathyeval' for {self.steps} steps on {self.records} records"
            + (f" (resumed from {self.resumed_from})" if self.resumed_from else "")
        ]
        if self.losses:
            a, b = self.losses[0], self.losses[-1]
            lines.append(
                f"loss: {a['loss']:.4f} -> {b['loss']:.4f} (lm {a['lm_loss']:.4f} -> {b['lm_loss']:.4f}, "
                f"score mse {a['score_loss']:.4f} -> {b['score_loss']:.4f})"
            )
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} bad record(s), first: {self.skipped[0]}")
        if self.validation:
            lines.append(f"validation on {self.validation_records} held-out records:")
            lines.append(format_agreement(self.validation))
        lines.append(f"checkpoint: {self.output_dir} (reempathy eval DIR --evaluator empathyeval --set checkpoint={self.output_dir})")
        return "\n".join(lines)


def parse_config(raw: dict[str, Any], where: str) -> EvaluatorTrainConfig:
    """Validate the whole config; one-line errors that name the key."""
    try:
        return EvaluatorTrainConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            section = loc.rsplit(".", 1)[0] if "." in loc else "config"
            model = {"data": EvaluatorDataConfig, "train": EvaluatorTrainSettings}.get(section, EvaluatorTrainConfig)
            raise ConfigError(f"{where}: unknown key {loc!r}; valid keys in [{section}]: {', '.join(sorted(model.model_fields))}") from None
        if err["type"] == "missing":
            raise ConfigError(f"{where}: key {loc!r} is required") from None
        raise ConfigError(f"{where}: {loc}: {err['msg']} (got {err.get('input')!r})") from None


def linear_targets(thinker: Any) -> list[str]:
    """Every ``nn.Linear`` of the thinker by full name, except the LM head and the vision tower.

    The paper's "all linear modules". Named in full rather than with peft's ``"all-linear"``,
    which matches by the last name component and so, in Qwen3-Omni, also hits whole encoder
    layers named like an ``nn.Sequential`` index (``layers.0``). The vision tower never sees
    input here, so adapting it would only add weights.
    """
    head = thinker.get_output_embeddings()
    return [
        name for name, m in thinker.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head and ".visual." not in f".{name}."
    ]


def _examples(omni: Any, records: list[Labelled], audio: AudioSource, progress: bool, what: str) -> list[Example]:
    from tqdm import tqdm

    out = []
    for rec in tqdm(records, desc=f"preparing {what}", disable=not progress, unit="record"):
        if rec.assessment is None and rec.scores is None:
            raise InputError(f"record {rec.item.id!r} (line {rec.line}) has neither an assessment text nor scores to learn")
        missing = [n for n in EMPATHY_SCORES if rec.scores and n not in rec.scores]
        if missing:
            raise InputError(f"record {rec.item.id!r} (line {rec.line}) lacks score(s) {', '.join(missing)}")
        scores = [float(rec.scores[n]) for n in EMPATHY_SCORES] if rec.scores else None
        out.append(make_example(omni, rec.item, audio, rec.assessment, scores))
    return out


def _split(records: list[Labelled], fraction: float, seed: int) -> tuple[list[Labelled], list[Labelled]]:
    if fraction <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(fraction * len(records))))
    val = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]


def validate(model: EmpathyEvalModel, omni: Any, examples: list[Example], device: Any) -> dict[str, Agreement]:
    """LCC / SRCC / MSE of the (clipped) predictions against the examples' scores, per dimension and overall."""
    scored = [ex for ex in examples if ex.scores is not None]
    preds, human = [], []
    for ex in scored:
        raw = predict(model, omni, [ex], device)[0]
        preds.append({n: clip_score(v) for n, v in zip(EMPATHY_SCORES, raw)})
        human.append(dict(zip(EMPATHY_SCORES, ex.scores or [])))
    return agreement_table(preds, human, EMPATHY_SCORES)


def train_empathyeval(raw: dict[str, Any], options: EmpathyEvalOptions, progress: bool = True, where: str = "training config") -> EvaluatorTrainResult:
    """Train EmpathyEval as ``raw`` (the TOML as a dict) says and write a complete checkpoint."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import set_seed

    cfg = parse_config(raw, where)
    t = cfg.train
    if not options.model:
        raise ConfigError(f"{where}: [evaluator] model is required for training (the base Qwen2.5-Omni / Qwen3-Omni-MoE directory)")
    if options.checkpoint:
        raise ConfigError(f"{where}: [evaluator] checkpoint is for scoring; to train, give model (the base) and output_dir")
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=t.gradient_accumulation_steps)
    out_dir = Path(t.output_dir)
    plan = None
    if accelerator.is_main_process:
        # Decided before any work (reading only): a refused output_dir has cost nothing and lost nothing.
        check_evaluator_output(out_dir, "[train] output_dir")
        info = {"evaluator": cfg.evaluator, "data": cfg.data.model_dump(), "lora": t.lora_rank, "seed": t.seed,
                "batch_size": t.batch_size}
        info = json.loads(json.dumps(info, default=str))
        # checkpoint-N folders are swapped into place whole (_save_resumable): any one found is complete
        plan = plan_run(out_dir, info, t.resume, t.overwrite, None, step_of=lambda p: int(p.name.split("-", 1)[1]))
    set_seed(t.seed)
    omni = load_omni(options.model, "cpu", options.dtype)
    audio = AudioSource(omni.sampling_rate, options.speech_decoder, options.seed)
    data = load_labelled(cfg.data.path, cfg.data.skip_bad)
    train_recs, val_recs = _split(data.records, cfg.data.validation_fraction, t.seed)
    skipped = list(data.skipped)
    if cfg.data.validation:
        held = load_labelled(cfg.data.validation, cfg.data.skip_bad)
        val_recs, skipped = held.records, skipped + held.skipped
    train_ex = _examples(omni, train_recs, audio, progress and accelerator.is_main_process, "training records")
    val_ex = _examples(omni, val_recs, audio, progress and accelerator.is_main_process, "validation records")

    lora = LoraConfig(
        r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, target_modules=linear_targets(omni.thinker)
    )
    thinker = get_peft_model(omni.thinker, lora)
    heads = ScoreHeads(omni.hidden_size, EMPATHY_SCORES)
    model = EmpathyEvalModel(thinker, heads, t.lm_weight, t.score_weight)
    model.train()
    groups = [
        {"params": [p for p in thinker.parameters() if p.requires_grad], "lr": t.learning_rate},
        {"params": list(heads.parameters()), "lr": t.heads_learning_rate or t.learning_rate},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)

    resume_from = None
    if plan is not None:
        resume_from = begin_run(plan, info)
    accelerator.wait_for_everyone()
    if t.resume and resume_from is None:
        found = checkpoint_dirs(out_dir)
        resume_from = str(found[-1]) if found else None

    model, optimizer = accelerator.prepare(model, optimizer)
    step = 0
    if resume_from:
        state = load_file(str(Path(resume_from) / TRAINABLE))
        accelerator.unwrap_model(model).load_state_dict(state, strict=False)
        optimizer.load_state_dict(torch.load(Path(resume_from) / OPTIMIZER, weights_only=True))
        step = int(json.loads((Path(resume_from) / "state.json").read_text())["step"])

    # One seeded order per epoch: resuming at step N replays the same batches from N on.
    per_step = t.batch_size * t.gradient_accumulation_steps * accelerator.num_processes

    def batches_from(first: int):
        epoch = first * per_step // max(1, len(train_ex))
        pos = first * per_step % max(1, len(train_ex))
        while True:
            order = list(range(len(train_ex)))
            random.Random(t.seed + epoch).shuffle(order)
            mine = order[accelerator.process_index :: accelerator.num_processes]
            for i in range(pos // accelerator.num_processes, len(mine), t.batch_size):
                yield [train_ex[j] for j in mine[i : i + t.batch_size]]
            epoch, pos = epoch + 1, 0

    from tqdm import tqdm

    losses: list[dict[str, float]] = []
    bar = tqdm(total=t.max_steps, initial=step, desc="training empathyeval", disable=not (progress and accelerator.is_main_process))
    stream = batches_from(step)
    while step < t.max_steps:
        logged = {"loss": 0.0, "lm_loss": 0.0, "score_loss": 0.0}
        for _ in range(t.gradient_accumulation_steps):
            batch = {k: v.to(accelerator.device) for k, v in collate(omni, next(stream)).items()}
            with accelerator.accumulate(model):
                out = model(**batch)
                accelerator.backward(out["loss"])
                optimizer.step()
                optimizer.zero_grad()
            for k in logged:
                logged[k] += float(out[k].detach()) / t.gradient_accumulation_steps
        step += 1
        bar.update(1)
        if step % t.logging_steps == 0 or step == 1 or step == t.max_steps:
            losses.append({"step": step, **logged})
            bar.set_postfix(loss=f"{logged['loss']:.3f}", mse=f"{logged['score_loss']:.3f}")
        if step % t.save_steps == 0 and step < t.max_steps and accelerator.is_main_process:
            _save_resumable(accelerator.unwrap_model(model), optimizer, out_dir, step, t.save_total_limit)
    bar.close()

    # Without accelerate's mixed-precision wrapper: validation scores as `reempathy eval` will (float32
    # unless dtype says otherwise), even when `accelerate launch --mixed_precision` trained under autocast.
    unwrapped: EmpathyEvalModel = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    unwrapped.eval()
    table = validate(unwrapped, omni, val_ex, accelerator.device) if any(ex.scores for ex in val_ex) else None
    manifest = EvaluatorManifest(
        evaluator="empathyeval",
        model=str(Path(options.model).resolve()),
        family=omni.family.name,
        score_names=list(EMPATHY_SCORES),
        lora={"rank": t.lora_rank, "alpha": t.lora_alpha, "dropout": t.lora_dropout, "target_modules": "all-linear"},
        steps=step,
        created=now_iso(),
        training={
            "data": cfg.data.path, "records": len(train_ex), "lm_weight": t.lm_weight, "score_weight": t.score_weight,
            "validation": cfg.data.validation, "validation_records": len(val_ex),
        },
        validation={k: v.to_json() for k, v in table.items()} if table else None,
    )
    if accelerator.is_main_process:
        write_evaluator_checkpoint(unwrapped.thinker, unwrapped.heads.state_dict(), out_dir, manifest)
    accelerator.wait_for_everyone()
    return EvaluatorTrainResult(
        out_dir, step, losses, table, len(train_ex), len(val_ex), skipped, resume_from, accelerator.is_main_process
    )


def _save_resumable(model: EmpathyEvalModel, optimizer: Any, out_dir: Path, step: int, keep: int | None) -> None:
    """``checkpoint-N``: trainable weights, optimizer state and the step, written beside and swapped in whole.

    :func:`reempathy.safe_write.replacing_dir` syncs every file before the rename and keeps an
    earlier ``checkpoint-N`` of the same step until the new one has replaced it.
    """
    from safetensors.torch import save_file

    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    with replacing_dir(out_dir / f"checkpoint-{step}") as tmp:
        save_file(trainable, str(tmp / TRAINABLE))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        (tmp / "state.json").write_text(json.dumps({"step": step}), encoding="utf-8")
    if keep:
        for old in checkpoint_dirs(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "EvaluatorTrainConfig", "EvaluatorTrainSettings", "EvaluatorDataConfig", "EvaluatorTrainResult",
    "train_empathyeval", "validate", "format_agreement",
]

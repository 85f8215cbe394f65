"""Training EmpathyEval: LoRA (r8/α32, all linear layers) on the thinker + heads, in one stage or in the paper's three.

The recipe, top to bottom: validate the config → read every stage's data (bad input fails here,
before any model is loaded) → load the base model → wrap the thinker with LoRA (the vision
tower left out: it never sees input here) → for each stage in order (``[[stages]]``: ``ser`` →
``caption`` → ``empathy``; without it, one ``empathy`` stage on ``[data]``): start from the
adapter the stage before wrote, turn its records into heard audio (WAV, or units through the
speech decoder), train its model (:mod:`reempathy.evaluation.empathyeval.stages`: a label head
under cross-entropy, the caption's LM loss, or ``lm_weight`` × LM loss on the assessment +
``score_weight`` × score MSE) with AdamW under ``accelerate`` (so ``accelerate launch`` spreads
it over devices), report its validation metric, write its adapter → the last (``empathy``) stage
writes the evaluator checkpoint, whose manifest records the chain of stages.

Where it decides:

- **where each stage goes**: stage ``i`` of a chain of several, if not the last, trains in
  ``output_dir/stages/i-KIND`` and writes its finished adapter (and head, and ``stage.json`` with
  its metric) to ``…/final``, swapped in whole; the last stage trains in ``output_dir`` itself
  and writes the evaluator checkpoint there, as a one-stage run does.
- **resuming** (``--resume``): a stage whose ``final`` is there is not trained again (its
  adapter starts the next); a stage that was cut short resumes from its last ``checkpoint-N``
  (every ``save_steps``: the trainable weights — adapter and head, never the frozen base — and
  the optimizer state), with the same data order. Without ``--resume`` an output directory with
  an earlier run's stages or checkpoints is refused (``overwrite = true`` starts over).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from reempathy.errors import CheckpointError, ConfigError, InputError
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
STAGES = "stages"  # output_dir/stages/INDEX-KIND: the stages before the last
FINAL = "final"  # a finished stage's adapter, head and stage.json
STAGE_FILE = "stage.json"
STAGE_SCHEMA = "reempathy.evaluator-stage/1"


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
    """A training config with an ``[evaluator]`` table (``configs/train-empathyeval.toml``): ``[data]`` or ``[[stages]]``."""

    model_config = ConfigDict(extra="forbid")
    evaluator: dict[str, Any]
    data: EvaluatorDataConfig | None = None
    stages: list[Any] | None = Field(None, description="the training stages in order (ser, caption, empathy)")
    train: EvaluatorTrainSettings

    @model_validator(mode="after")
    def _data_or_stages(self) -> "EvaluatorTrainConfig":
        if self.data is not None and self.stages is not None:
            raise ValueError("give [data] (one empathy stage) or [[stages]] (each with its own data), not both")
        if self.data is None and self.stages is None:
            raise ValueError("[data] is required (or [[stages]], each with its own data)")
        return self


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
    stages: list[dict[str, Any]] = field(default_factory=list)  # the chain, when there are several stages

    def format(self) -> str:
        """A short report for the terminal."""
        from reempathy.evaluation.empathyeval.stages import metric_line

        lines = []
        for st in self.stages[:-1]:
            how = "done before, not trained again" if st.get("reused") else f"{st['steps']} steps on {st['records']} records"
            lines.append(f"stage {st['stage']} {st['kind']}: {how}; {metric_line(st['kind'], st.get('validation'))}")
        lines.append(
            (f"stage {len(self.stages)} empathy: " if len(self.stages) > 1 else "")
            + f"trained 'empathyeval' for {self.steps} steps on {self.records} records"
            + (f" (resumed from {self.resumed_from})" if self.resumed_from else "")
        )
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
        if not loc and err["type"] == "value_error":
            raise ConfigError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None
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


def validate(model: EmpathyEvalModel, omni: Any, examples: list[Example], device: Any) -> dict[str, Agreement]:
    """LCC / SRCC / MSE of the (clipped) predictions against the examples' scores, per dimension and overall."""
    scored = [ex for ex in examples if ex.scores is not None]
    preds, human = [], []
    for ex in scored:
        raw = predict(model, omni, [ex], device)[0]
        preds.append({n: clip_score(v) for n, v in zip(EMPATHY_SCORES, raw)})
        human.append(dict(zip(EMPATHY_SCORES, ex.scores or [])))
    return agreement_table(preds, human, EMPATHY_SCORES)


def stage_chain(cfg: EvaluatorTrainConfig, where: str) -> list[Any]:
    """The stages to run: ``[[stages]]`` checked, or one ``empathy`` stage on ``[data]``."""
    from reempathy.evaluation.empathyeval.stages import StageConfig, parse_stages

    if cfg.stages is not None:
        return parse_stages(cfg.stages, where)
    d = cfg.data
    assert d is not None
    return [StageConfig(kind="empathy", data=d.path, validation=d.validation, validation_fraction=d.validation_fraction,
                        skip_bad=d.skip_bad)]


def stage_dir(out_dir: Path, index: int, kind: str) -> Path:
    """Where stage ``index`` (not the last) trains: ``output_dir/stages/INDEX-KIND``."""
    return out_dir / STAGES / f"{index}-{kind}"


@dataclass
class StageData:
    """One stage's records, read and checked before any model is loaded: training, validation, skipped lines."""

    train: list[Any]
    validation: list[Any]
    skipped: list[str]


def read_stage(stage: Any, seed: int) -> StageData:
    """The stage's records (clips for ser and caption, labelled dialogues for empathy), split for validation."""
    from reempathy.evaluation.empathyeval.stages import read_clips, split

    def read(path: str) -> tuple[list[Any], list[str]]:
        if stage.kind == "empathy":
            got = load_labelled(path, stage.skip_bad)
            return got.records, list(got.skipped)
        clips = read_clips(path, stage.kind, stage.labels, stage.skip_bad)
        return clips.clips, clips.skipped

    records, skipped = read(stage.data)
    train_recs, val_recs = split(records, stage.validation_fraction, seed)
    if stage.validation:
        val_recs, more = read(stage.validation)
        skipped += more
    return StageData(train_recs, val_recs, skipped)


def load_adapter(thinker: Any, directory: Path) -> None:
    """Put the LoRA weights saved in ``directory`` (peft's ``adapter_model.safetensors``) into ``thinker``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, so the stage before has no adapter to start from; train with overwrite = true")
    result = set_peft_model_state_dict(thinker, load_file(str(path)))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise CheckpointError(f"{path}: holds weights this LoRA does not have ({unexpected[0]}); train with overwrite = true")


def write_stage(directory: Path, thinker: Any, head: dict[str, Any] | None, doc: dict[str, Any]) -> None:
    """A finished stage: ``directory/final`` with the adapter, the head and ``stage.json``, swapped in whole."""
    from safetensors.torch import save_file

    with replacing_dir(directory / FINAL) as tmp:
        thinker.save_pretrained(str(tmp), safe_serialization=True)
        if head:
            save_file({k: v.detach().contiguous().cpu() for k, v in head.items()}, str(tmp / "head.safetensors"))
        (tmp / STAGE_FILE).write_text(json.dumps(doc, indent=2), encoding="utf-8")
    for old in checkpoint_dirs(directory):  # its resumable checkpoints are not needed once the stage is final
        shutil.rmtree(old, ignore_errors=True)


def finished_stage(directory: Path) -> dict[str, Any] | None:
    """The ``stage.json`` of a finished stage (``final`` is swapped in whole: there means complete), else None."""
    path = directory / FINAL / STAGE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def train_empathyeval(raw: dict[str, Any], options: EmpathyEvalOptions, progress: bool = True, where: str = "training config") -> EvaluatorTrainResult:
    """Train EmpathyEval as ``raw`` (the TOML as a dict) says — one stage or a chain — and write a complete checkpoint."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    cfg = parse_config(raw, where)
    t = cfg.train
    chain = stage_chain(cfg, where)
    if not options.model:
        raise ConfigError(f"{where}: [evaluator] model is required for training (the base Qwen2.5-Omni / Qwen3-Omni-MoE directory)")
    if options.checkpoint:
        raise ConfigError(f"{where}: [evaluator] checkpoint is for scoring; to train, give model (the base) and output_dir")
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=t.gradient_accumulation_steps)
    out_dir = Path(t.output_dir)
    chained = len(chain) > 1
    info: dict[str, Any] = {"evaluator": cfg.evaluator, "lora": t.lora_rank, "seed": t.seed, "batch_size": t.batch_size}
    if chained:
        info["stages"] = [s.model_dump(exclude={"max_steps"}) for s in chain]  # a resume may train longer
    else:
        info["data"] = cfg.data.model_dump()  # type: ignore[union-attr]
    info = json.loads(json.dumps(info, default=str))
    plan = None
    if accelerator.is_main_process:
        # Decided before any work (reading only): a refused output_dir has cost nothing and lost nothing.
        check_evaluator_output(out_dir, "[train] output_dir")
        earlier = out_dir / STAGES
        if chained and not t.resume and not t.overwrite and earlier.is_dir() and any(earlier.iterdir()):
            raise ConfigError(
                f"output_dir {str(out_dir)!r} holds the stages of an earlier run ({STAGES}/); pass --resume to continue it, "
                "set [train] overwrite = true to start over, or pick another output_dir"
            )
        # checkpoint-N folders are swapped into place whole (_save_resumable): any one found is complete
        plan = plan_run(out_dir, info, t.resume, t.overwrite, None, step_of=lambda p: int(p.name.split("-", 1)[1]))
        if t.overwrite and not t.resume and earlier.exists():
            plan.remove.append(earlier)
    # Every stage's data, read and checked before the model is loaded: bad input costs a second.
    data = [read_stage(stage, t.seed) for stage in chain]
    set_seed(t.seed)
    omni = load_omni(options.model, "cpu", options.dtype)
    audio = AudioSource(omni.sampling_rate, options.speech_decoder, options.seed)
    lora = LoraConfig(
        r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, target_modules=linear_targets(omni.thinker)
    )
    thinker = get_peft_model(omni.thinker, lora)  # one adapter, carried from stage to stage

    last_resume = None
    if plan is not None:
        last_resume = begin_run(plan, info)
    accelerator.wait_for_everyone()
    if t.resume and last_resume is None:
        found = checkpoint_dirs(out_dir)
        last_resume = str(found[-1]) if found else None

    show = progress and accelerator.is_main_process
    done: list[dict[str, Any]] = []
    start: Path | None = None  # the adapter the next stage starts from
    for index, (stage, stage_data) in enumerate(zip(chain, data), start=1):
        if index < len(chain):
            directory = stage_dir(out_dir, index, stage.kind)
            finished = finished_stage(directory) if t.resume else None
            if finished is not None:
                done.append(dict(finished, reused=True))
                start = directory / FINAL
                continue
            found = checkpoint_dirs(directory) if t.resume else []
            if start is not None:
                load_adapter(accelerator.unwrap_model(thinker), start)
            done.append(_train_clip_stage(accelerator, thinker, omni, audio, stage, stage_data, t, index, directory,
                                          str(found[-1]) if found else None, show))
            start = directory / FINAL
            continue
        if start is not None:
            load_adapter(accelerator.unwrap_model(thinker), start)
        return _train_empathy_stage(accelerator, thinker, omni, audio, stage, stage_data, t, index, out_dir, last_resume,
                                    show, options, done, chained)
    raise AssertionError("a chain ends with its empathy stage")  # parse_stages guarantees it


def _train_clip_stage(
    accelerator: Any, thinker: Any, omni: Any, audio: AudioSource, stage: Any, data: StageData, t: Any, index: int,
    directory: Path, resume_from: str | None, show: bool,
) -> dict[str, Any]:
    """Train a ser or caption stage from the adapter ``thinker`` holds; write its ``final``; its chain record."""
    from transformers import set_seed

    from reempathy.evaluation.empathyeval.stages import (
        CaptionModel, SerModel, caption_loss, clip_examples, collate_clips, ser_accuracy,
    )

    kind = stage.kind
    set_seed(t.seed + index)  # the head starts the same whether or not the run was interrupted before it
    model: Any = SerModel(thinker, omni.hidden_size, stage.labels) if kind == "ser" else CaptionModel(thinker)
    model.train()
    train_ex = clip_examples(omni, data.train, audio, kind, stage.labels, stage.task, show, f"stage {index} {kind} records")
    val_ex = clip_examples(omni, data.validation, audio, kind, stage.labels, stage.task, show, f"stage {index} {kind} validation")
    lr = stage.learning_rate or t.learning_rate
    groups = [{"params": [p for p in thinker.parameters() if p.requires_grad], "lr": lr}]
    if kind == "ser":
        groups.append({"params": list(model.classifier.parameters()), "lr": stage.heads_learning_rate or t.heads_learning_rate or lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    model, step, losses = fit(
        accelerator, model, optimizer, train_ex, lambda batch: collate_clips(omni, batch, kind), t, directory, resume_from,
        ("loss",), f"stage {index} {kind}", show, max_steps=stage.max_steps, batch_size=stage.batch_size,
        save_steps=stage.save_steps,
    )
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    unwrapped.eval()
    validation = None
    if val_ex:
        measure = ser_accuracy if kind == "ser" else caption_loss
        validation = measure(unwrapped, omni, val_ex, accelerator.device)
    unwrapped.train()
    doc = {
        "schema": STAGE_SCHEMA, "stage": index, "kind": kind, "data": stage.data, "validation_data": stage.validation,
        "records": len(train_ex), "validation_records": len(val_ex), "steps": step, "labels": stage.labels,
        "losses": losses[-1:] if losses else [], "validation": validation, "created": now_iso(),
        "directory": str(Path(STAGES) / directory.name / FINAL), "resumed_from": resume_from,
    }
    if accelerator.is_main_process:
        head = {f"classifier.{k}": v for k, v in unwrapped.classifier.state_dict().items()} if kind == "ser" else None
        write_stage(directory, unwrapped.thinker, head, doc)
    accelerator.wait_for_everyone()
    return doc


def _train_empathy_stage(
    accelerator: Any, thinker: Any, omni: Any, audio: AudioSource, stage: Any, data: StageData, t: Any, index: int,
    out_dir: Path, resume_from: str | None, show: bool, options: EmpathyEvalOptions, done: list[dict[str, Any]],
    chained: bool,
) -> EvaluatorTrainResult:
    """Train the empathy stage (four score heads, LM + MSE) and write the evaluator checkpoint in ``out_dir``."""
    from transformers import set_seed

    lm_weight = t.lm_weight if stage.lm_weight is None else stage.lm_weight
    score_weight = t.score_weight if stage.score_weight is None else stage.score_weight
    if chained:
        set_seed(t.seed + index)
    train_ex = _examples(omni, data.train, audio, show, "training records")
    val_ex = _examples(omni, data.validation, audio, show, "validation records")
    heads = ScoreHeads(omni.hidden_size, EMPATHY_SCORES)
    model = EmpathyEvalModel(thinker, heads, lm_weight, score_weight)
    model.train()
    lr = stage.learning_rate or t.learning_rate
    groups = [
        {"params": [p for p in thinker.parameters() if p.requires_grad], "lr": lr},
        {"params": list(heads.parameters()), "lr": stage.heads_learning_rate or t.heads_learning_rate or lr},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    model, step, losses = fit(
        accelerator, model, optimizer, train_ex, lambda batch: collate(omni, batch), t, out_dir, resume_from,
        ("loss", "lm_loss", "score_loss"), f"stage {index} empathy" if chained else "training empathyeval", show,
        max_steps=stage.max_steps, batch_size=stage.batch_size, save_steps=stage.save_steps,
        postfix=lambda logged: {"loss": f"{logged['loss']:.3f}", "mse": f"{logged['score_loss']:.3f}"},
    )

    # Without accelerate's mixed-precision wrapper: validation scores as `reempathy eval` will (float32
    # unless dtype says otherwise), even when `accelerate launch --mixed_precision` trained under autocast.
    unwrapped: EmpathyEvalModel = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    unwrapped.eval()
    table = validate(unwrapped, omni, val_ex, accelerator.device) if any(ex.scores for ex in val_ex) else None
    validation = {k: v.to_json() for k, v in table.items()} if table else None
    training: dict[str, Any] = {
        "data": stage.data, "records": len(train_ex), "lm_weight": lm_weight, "score_weight": score_weight,
        "validation": stage.validation, "validation_records": len(val_ex),
    }
    chain = done + [{"stage": index, "kind": "empathy", "data": stage.data, "validation_data": stage.validation,
                     "records": len(train_ex), "validation_records": len(val_ex), "steps": step,
                     "validation": validation, "directory": ".", "resumed_from": resume_from}]
    if chained:
        training["stages"] = [{k: v for k, v in st.items() if k not in ("schema", "losses", "reused")} for st in chain]
    manifest = EvaluatorManifest(
        evaluator="empathyeval",
        model=str(Path(options.model).resolve()),  # type: ignore[arg-type]
        family=omni.family.name,
        score_names=list(EMPATHY_SCORES),
        lora={"rank": t.lora_rank, "alpha": t.lora_alpha, "dropout": t.lora_dropout, "target_modules": "all-linear"},
        steps=step,
        created=now_iso(),
        training=training,
        validation=validation,
    )
    if accelerator.is_main_process:
        write_evaluator_checkpoint(unwrapped.thinker, unwrapped.heads.state_dict(), out_dir, manifest)
    accelerator.wait_for_everyone()
    return EvaluatorTrainResult(
        out_dir, step, losses, table, len(train_ex), len(val_ex), data.skipped, resume_from, accelerator.is_main_process,
        stages=chain if chained else [],
    )


def fit(
    accelerator: Any,
    model: Any,
    optimizer: Any,
    examples: list[Any],
    collate_fn: Any,
    t: Any,
    out_dir: Path,
    resume_from: str | None,
    log_keys: tuple[str, ...],
    desc: str,
    progress: bool,
    max_steps: int | None = None,
    batch_size: int | None = None,
    save_steps: int | None = None,
    postfix: Any = None,
) -> tuple[Any, int, list[dict[str, float]]]:
    """The training loop every EmpathyEval stage shares: ``(prepared model, steps, logged losses)``.

    ``model(**collate_fn(batch))`` returns a dict with ``loss`` and the ``log_keys``. One seeded
    order per epoch (``t.seed``), so resuming at step N (``resume_from``: a ``checkpoint-N`` of
    ``out_dir``) replays the same batches from N on; every ``save_steps`` a ``checkpoint-N``
    holds the trainable weights and the optimizer state. ``max_steps``, ``batch_size`` and
    ``save_steps`` default to ``t``'s (a stage may set its own).
    """
    from safetensors.torch import load_file
    from tqdm import tqdm

    max_steps = max_steps or t.max_steps
    batch_size = batch_size or t.batch_size
    save_steps = save_steps or t.save_steps
    model, optimizer = accelerator.prepare(model, optimizer)
    step = 0
    if resume_from:
        state = load_file(str(Path(resume_from) / TRAINABLE))
        accelerator.unwrap_model(model).load_state_dict(state, strict=False)
        optimizer.load_state_dict(torch.load(Path(resume_from) / OPTIMIZER, weights_only=True))
        step = int(json.loads((Path(resume_from) / "state.json").read_text())["step"])

    # One seeded order per epoch: resuming at step N replays the same batches from N on.
    per_step = batch_size * t.gradient_accumulation_steps * accelerator.num_processes

    def batches_from(first: int) -> Any:
        epoch = first * per_step // max(1, len(examples))
        pos = first * per_step % max(1, len(examples))
        while True:
            order = list(range(len(examples)))
            random.Random(t.seed + epoch).shuffle(order)
            mine = order[accelerator.process_index :: accelerator.num_processes]
            for i in range(pos // accelerator.num_processes, len(mine), batch_size):
                yield [examples[j] for j in mine[i : i + batch_size]]
            epoch, pos = epoch + 1, 0

    losses: list[dict[str, float]] = []
    bar = tqdm(total=max_steps, initial=step, desc=desc, disable=not (progress and accelerator.is_main_process))
    stream = batches_from(step)
    while step < max_steps:
        logged = dict.fromkeys(log_keys, 0.0)
        for _ in range(t.gradient_accumulation_steps):
            batch = {k: v.to(accelerator.device) for k, v in collate_fn(next(stream)).items()}
            with accelerator.accumulate(model):
                out = model(**batch)
                accelerator.backward(out["loss"])
                optimizer.step()
                optimizer.zero_grad()
            for k in logged:
                logged[k] += float(out[k].detach()) / t.gradient_accumulation_steps
        step += 1
        bar.update(1)
        if step % t.logging_steps == 0 or step == 1 or step == max_steps:
            losses.append({"step": step, **logged})
            if postfix is not None:
                bar.set_postfix(postfix(logged))
        if step % save_steps == 0 and step < max_steps and accelerator.is_main_process:
            _save_resumable(accelerator.unwrap_model(model), optimizer, out_dir, step, t.save_total_limit)
    bar.close()
    return model, step, losses


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
    "train_empathyeval", "validate", "format_agreement", "fit", "linear_targets", "stage_chain", "stage_dir",
    "read_stage", "load_adapter", "write_stage", "finished_stage", "StageData", "STAGES", "FINAL", "STAGE_FILE",
]

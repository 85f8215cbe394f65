"""Writing checkpoint directories: the LoRA adapter (safetensors) plus the ``reempathy.json`` manifest, written last.

A directory is complete only when its manifest is there. Where decisions are made:

- :func:`plan_run` decides, reading only, what a run will do with its ``output_dir``: refuse
  (an earlier run's checkpoints without ``--resume``, changed settings on resume, a last
  checkpoint past ``max_steps``), start fresh, resume from the last *complete* ``checkpoint-N``
  (an incomplete one, left by a run killed while Trainer saved it, is skipped and named),
  finish from a complete ``checkpoint-N`` at ``max_steps`` without training another step, or
  do nothing (the run is already finished). A refused run has touched nothing.
- :func:`begin_run` carries the plan out (removes what it named, records the run's settings).
- :func:`write_checkpoint` / :func:`install_adapter` replace the finished adapter: the old
  manifest goes first (the directory reads as incomplete from then on), each adapter file is
  synced and renamed into place, and the new manifest is written last through
  :mod:`reempathy.safe_write`. A previous complete checkpoint stays complete and untouched
  until the new adapter is ready to replace it.

Trainer's resumable ``checkpoint-N`` folders live inside the same directory. Reading a
checkpoint (the manifest, applying the adapter) lives in :mod:`reempathy.checkpoints`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from reempathy.checkpoints import (
    ADAPTER_FILES,
    MANIFEST,
    SCHEMA,
    ChunkLayoutRecord,
    Component,
    Manifest,
    apply_checkpoint,
    delimiter_ids,
    now_iso,
    read_manifest,
)
from pydantic import BaseModel, Field

from reempathy.errors import CheckpointError, ConfigError, ReempathyError
from reempathy.options import STRICT, TrainSeed
from reempathy.safe_write import check_output_dir, check_output_file, fsync_path, write_json

RUN_FILE = "reempathy-run.json"  # the settings of the run in progress, checked on resume
TRAINER_STATE = "trainer_state.json"  # Trainer writes it last into a checkpoint-N: its presence marks it complete
CHECKPOINT_FILES = (*ADAPTER_FILES, "optimizer.pt", "scheduler.pt", TRAINER_STATE)
_PARTIAL = ".adapter.partial"


class TrainSettings(BaseModel):
    """``[train]``: where checkpoints go and how long and how hard to train (LoRA rank 8, alpha 32 as in the paper)."""

    model_config = STRICT
    output_dir: str = Field(min_length=1)
    max_steps: int = Field(100, ge=1, lt=2**31)
    learning_rate: float = Field(2e-4, gt=0.0, le=10.0)
    batch_size: int = Field(4, ge=1, le=65536, description="sequences per device per step")
    gradient_accumulation_steps: int = Field(1, ge=1, le=65536)
    seed: TrainSeed = 0
    lora_rank: int = Field(8, ge=1, le=4096)
    lora_alpha: float = Field(32.0, gt=0.0, le=1e6)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    save_steps: int = Field(50, ge=1, lt=2**31, description="write a resumable checkpoint-N every this many steps")
    save_total_limit: int | None = Field(2, ge=1, lt=2**31, description="keep at most this many checkpoint-N folders")
    logging_steps: int = Field(1, ge=1, lt=2**31)
    resume: bool = Field(False, description="continue from the last checkpoint-N in output_dir")
    overwrite: bool = Field(False, description="delete an earlier run's checkpoints in output_dir and start over")


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Trainer's ``checkpoint-N`` folders in ``output_dir``, oldest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def checkpoint_step(path: Path) -> int | None:
    """The step of a complete ``checkpoint-N`` (its trainer state read back, every file there); None if incomplete."""
    if not all((path / name).is_file() for name in CHECKPOINT_FILES):
        return None
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        step = int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None  # a trainer state cut short by a kill
    return step if path.name == f"checkpoint-{step}" else None


def trainer_losses(path: Path) -> list[float]:
    """The logged losses in a complete ``checkpoint-N``'s trainer state."""
    state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    return [float(e["loss"]) for e in state.get("log_history", []) if "loss" in e]


@dataclass
class RunPlan:
    """What a training run will do with its output directory (see :func:`plan_run`)."""

    output_dir: Path
    resume_from: Path | None = None  # a complete checkpoint-N to continue training from
    finish_from: Path | None = None  # a complete checkpoint-N at max_steps: install its adapter, train nothing
    finished: Manifest | None = None  # the run is already complete: nothing to do
    remove: list[Path] = field(default_factory=list)  # deleted by begin_run, before training
    notes: list[str] = field(default_factory=list)  # what was decided, said to the user


def plan_run(
    output_dir: str | Path,
    run_info: dict[str, Any],
    resume: bool,
    overwrite: bool,
    max_steps: int | None,
    step_of: Callable[[Path], int | None] = checkpoint_step,
) -> RunPlan:
    """Decide what a run does with ``output_dir``; reads only, so a refusal (ConfigError) changes nothing.

    Without ``resume``, an earlier run's checkpoints (or finished checkpoint) are an error unless
    ``overwrite``, which removes the ``checkpoint-N`` folders before training; the earlier
    finished adapter and manifest stay in place until the new ones replace them. With
    ``resume``, the earlier run's settings must match, incomplete ``checkpoint-N`` folders are
    skipped (and removed), and a run that already reached ``max_steps`` trains no further step.
    ``step_of`` reads a ``checkpoint-N``'s step, None if it is incomplete (Trainer's format by
    default; a trainer with its own format passes its reader, and ``max_steps=None`` when it
    stops at ``max_steps`` by itself).
    """
    out = check_output_dir(output_dir, "[train] output_dir", ConfigError)
    plan = RunPlan(out)
    if not out.exists():
        return plan
    for name in (MANIFEST, RUN_FILE, *ADAPTER_FILES, "README.md"):
        check_output_file(out / name, "[train] output_dir file", ConfigError)
    previous = checkpoint_dirs(out)
    finished = _finished_manifest(out)
    if not resume:
        if (previous or finished is not None) and not overwrite:
            what = f"checkpoints of an earlier run ({previous[-1].name})" if previous else "a finished checkpoint"
            raise ConfigError(
                f"output_dir {str(out)!r} holds {what}; pass --resume to continue it, set [train] overwrite = true "
                "to start over, or pick another output_dir"
            )
        plan.remove = list(previous)
        return plan
    _check_same_settings(out, run_info)
    complete: list[tuple[Path, int]] = []
    for path in previous:
        step = step_of(path)
        if step is None:
            plan.remove.append(path)
            plan.notes.append(
                f"{path.name} in {str(out)!r} is incomplete (the run was stopped while saving it); skipped and removed"
            )
        else:
            complete.append((path, step))
    if complete:
        last, step = complete[-1]
        if max_steps is None:
            plan.resume_from = last
            return plan
        if step > max_steps:
            raise ConfigError(
                f"output_dir {str(out)!r}: its last checkpoint ({last.name}) is past max_steps = {max_steps}; "
                f"raise max_steps to at least {step} to continue, or set [train] overwrite = true to start over"
            )
        if step == max_steps:
            if finished is not None and finished.steps == max_steps:
                plan.finished = finished
                plan.notes.append(f"{str(out)!r} is already trained to max_steps = {max_steps}; nothing to do")
            else:
                plan.finish_from = last
                plan.notes.append(f"{last.name} reached max_steps = {max_steps}; writing its adapter, no more training")
        else:
            plan.resume_from = last
        return plan
    if finished is not None and max_steps is not None:
        if finished.steps == max_steps:
            plan.finished = finished
            plan.notes.append(f"{str(out)!r} is already trained to max_steps = {max_steps}; nothing to do")
            return plan
        raise ConfigError(
            f"output_dir {str(out)!r} holds a finished checkpoint of {finished.steps} steps but no checkpoint-N to "
            "continue from; set [train] overwrite = true to train again, or pick another output_dir"
        )
    return plan


def _finished_manifest(out: Path) -> Manifest | None:
    if not (out / MANIFEST).is_file():
        return None
    try:
        return read_manifest(out)
    except ReempathyError:
        return None  # damaged or incomplete: not a finished run to protect or to report


def _check_same_settings(out: Path, run_info: dict[str, Any]) -> None:
    run_file = out / RUN_FILE
    if not run_file.is_file():
        return
    try:
        before = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        before = None
    if isinstance(before, dict):
        changed = sorted(k for k in run_info if k in before and before[k] != _jsonable(run_info[k]))
        if changed:
            raise ConfigError(
                f"output_dir {str(out)!r}: cannot resume, the run's {', '.join(changed)} changed since it started; "
                "use the same config or another output_dir"
            )


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def remove_leftovers(output_dir: Path, keep: Path | None = None) -> None:
    """What a killed :func:`write_checkpoint` / :func:`install_adapter` left: the staging folder and half-copied files."""
    partial = output_dir / _PARTIAL
    if keep is None or partial.resolve() != Path(keep).resolve():
        shutil.rmtree(partial, ignore_errors=True)
    for leftover in output_dir.glob(".*.copy"):
        leftover.unlink(missing_ok=True)


def begin_run(plan: RunPlan, run_info: dict[str, Any]) -> str | None:
    """Carry out ``plan`` (remove what it names, record the run's settings); return the checkpoint to resume from."""
    out = plan.output_dir
    out.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    for path in plan.remove:
        shutil.rmtree(path, ignore_errors=True)
    write_json(out / RUN_FILE, run_info, "[train] output_dir file", ConfigError)
    return str(plan.resume_from) if plan.resume_from else None


def write_checkpoint(model: Any, output_dir: str | Path, manifest: Manifest) -> Path:
    """Save the adapter (peft ``save_pretrained``, safetensors) beside, then put it and the manifest in place."""
    out = Path(output_dir)
    partial = out / _PARTIAL
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial), safe_serialization=True)
    return install_adapter(partial, out, manifest, move=True)


def install_adapter(source: Path, output_dir: Path, manifest: Manifest, move: bool = False) -> Path:
    """Replace the adapter in ``output_dir`` with the one in ``source`` (a save or a ``checkpoint-N``), then the manifest.

    From the moment the old manifest is removed until the new one is written, the directory
    reads as incomplete; each file is synced before its rename, so a kill at any point leaves
    either the previous complete checkpoint or an incomplete one that ``--resume`` finishes.
    """
    missing = [name for name in ADAPTER_FILES if not (source / name).is_file()]
    if missing:
        raise CheckpointError(f"{source}: saving the adapter wrote no {missing[0]}; the checkpoint is incomplete")
    remove_leftovers(output_dir, keep=source)
    names = [p.name for p in source.iterdir() if p.is_file() and (move or p.name in (*ADAPTER_FILES, "README.md"))]
    for name in names:
        check_output_file(output_dir / name, "checkpoint file", CheckpointError)
    (output_dir / MANIFEST).unlink(missing_ok=True)
    fsync_path(output_dir)
    for name in names:
        src = source / name
        if move:
            fsync_path(src)
            os.replace(src, output_dir / name)
        else:
            tmp = output_dir / f".{name}.copy"
            shutil.copyfile(src, tmp)
            fsync_path(tmp)
            os.replace(tmp, output_dir / name)
    if move:
        shutil.rmtree(source, ignore_errors=True)
    fsync_path(output_dir)
    write_json(output_dir / MANIFEST, manifest.to_json(), "checkpoint manifest", CheckpointError)
    return output_dir


__all__ = [
    "TrainSettings",
    "Manifest",
    "Component",
    "ChunkLayoutRecord",
    "MANIFEST",
    "SCHEMA",
    "RUN_FILE",
    "RunPlan",
    "plan_run",
    "begin_run",
    "write_checkpoint",
    "install_adapter",
    "checkpoint_dirs",
    "checkpoint_step",
    "trainer_losses",
    "read_manifest",
    "apply_checkpoint",
    "delimiter_ids",
    "now_iso",
]

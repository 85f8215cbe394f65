"""EmpathyEval checkpoints: the LoRA adapter (peft, safetensors), ``heads.safetensors`` and ``evaluator.json``.

Where decisions are made:

- :func:`check_evaluator_output` checks, before any work, that every file a checkpoint puts in
  ``output_dir`` may be written there (a directory or a pipe in its place is refused).
- :func:`write_evaluator_checkpoint` saves the adapter and heads into a temporary sibling folder
  first; only when both are saved does the old manifest go (from then on the directory reads
  as incomplete), each file is synced and renamed into place, and the new manifest is written
  last by :mod:`reempathy.safe_write`. A crash while saving leaves the previous complete
  checkpoint as it was; a crash after that leaves a directory without a manifest, which
  reading refuses. A directory is complete only when its manifest is there.
- :func:`read_evaluator_checkpoint` checks every part and names the missing one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reempathy.checkpoints import ADAPTER_FILES, now_iso
from reempathy.errors import CheckpointError
from reempathy.safe_write import (
    check_output_dir,
    check_output_file,
    fsync_path,
    remove_stale,
    write_json,
)

MANIFEST = "evaluator.json"
HEADS = "heads.safetensors"
SCHEMA = "reempathy.evaluator-checkpoint/1"
_PARTIAL = "partial"  # the save folder beside the files: .evaluator.json.partial-PID-RANDOM


class EvaluatorManifest(BaseModel):
    """``evaluator.json``: which evaluator, on which base model, with which heads, and how it validated."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    schema_id: Literal["reempathy.evaluator-checkpoint/1"] = Field(SCHEMA, alias="schema")
    evaluator: str
    model: str = Field(description="the base model directory it was trained on")
    family: str
    score_names: list[str]
    lora: dict[str, Any]
    steps: int = Field(ge=0)
    created: str
    training: dict[str, Any] = Field(default_factory=dict)
    validation: dict[str, Any] | None = None
    directory: str | None = Field(None, exclude=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def check_evaluator_output(output_dir: str | Path, what: str = "evaluator checkpoint directory") -> Path:
    """``output_dir`` if a checkpoint may be written there (each of its files too); ``CheckpointError`` otherwise."""
    out = check_output_dir(output_dir, what, CheckpointError)
    if out.is_dir():
        for name in (*ADAPTER_FILES, HEADS, MANIFEST, "README.md"):
            check_output_file(out / name, f"{what} file", CheckpointError)
    return out


def write_evaluator_checkpoint(peft_model: Any, heads_state: dict[str, Any], output_dir: str | Path, manifest: EvaluatorManifest) -> Path:
    """Adapter (peft ``save_pretrained``) and heads saved beside, then moved into place; the manifest last."""
    from safetensors.torch import save_file

    out = check_evaluator_output(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    anchor = out / MANIFEST
    remove_stale(anchor, _PARTIAL)  # the save folder of a killed run
    partial = anchor.with_name(f".{MANIFEST}.{_PARTIAL}-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        peft_model.save_pretrained(str(partial), safe_serialization=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in heads_state.items()}, str(partial / HEADS))
        missing = [name for name in (*ADAPTER_FILES, HEADS) if not (partial / name).is_file()]
        if missing:
            raise CheckpointError(f"{out}: saving the evaluator wrote no {missing[0]}; the checkpoint is incomplete")
        names = sorted(p.name for p in partial.iterdir() if p.is_file())
        for name in names:
            check_output_file(out / name, "evaluator checkpoint file", CheckpointError)
            fsync_path(partial / name)
        (out / MANIFEST).unlink(missing_ok=True)  # from here until the new manifest the directory reads as incomplete
        fsync_path(out)
        for name in names:
            os.replace(partial / name, out / name)
        fsync_path(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    write_json(out / MANIFEST, manifest.to_json(), "evaluator checkpoint manifest", CheckpointError)
    return out


def read_evaluator_checkpoint(directory: str | Path) -> EvaluatorManifest:
    """The manifest of a complete evaluator checkpoint; ``CheckpointError`` naming the missing part otherwise."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(
            f"evaluator checkpoint {str(d)!r} not found; give a directory written by `reempathy train` with an [evaluator] config"
        )
    path = d / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, so {str(d)!r} is not a complete evaluator checkpoint (did its training finish?)")
    try:
        manifest = EvaluatorManifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc.msg}); the checkpoint is damaged") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        raise CheckpointError(f"{path}: invalid manifest, {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    for name in (*ADAPTER_FILES, HEADS):
        if not (d / name).is_file():
            what = "score heads" if name == HEADS else "LoRA adapter"
            raise CheckpointError(f"{d / name}: missing, so checkpoint {str(d)!r} has no {what}; train it again")
    manifest.directory = str(d)
    return manifest


__all__ = [
    "EvaluatorManifest", "MANIFEST", "HEADS", "SCHEMA", "check_evaluator_output", "write_evaluator_checkpoint",
    "read_evaluator_checkpoint", "now_iso",
]

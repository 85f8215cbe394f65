"""EmpathyEval checkpoints: the LoRA adapter (peft, safetensors), ``heads.safetensors`` and ``evaluator.json``.

The manifest is written last, through a temporary file and a rename: a directory is complete
only when it is there. Reading checks every part and names the missing one.
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

MANIFEST = "evaluator.json"
HEADS = "heads.safetensors"
SCHEMA = "reempathy.evaluator-checkpoint/1"


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


def write_evaluator_checkpoint(peft_model: Any, heads_state: dict[str, Any], output_dir: str | Path, manifest: EvaluatorManifest) -> Path:
    """Adapter (peft ``save_pretrained``), heads, then the manifest — each moved into place."""
    from safetensors.torch import save_file

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    partial = out / ".evaluator.partial"
    shutil.rmtree(partial, ignore_errors=True)
    peft_model.save_pretrained(str(partial), safe_serialization=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in heads_state.items()}, str(partial / HEADS))
    for item in partial.iterdir():
        os.replace(item, out / item.name)
    partial.rmdir()
    tmp = out / (MANIFEST + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(manifest.to_json(), fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out / MANIFEST)
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


__all__ = ["EvaluatorManifest", "MANIFEST", "HEADS", "SCHEMA", "write_evaluator_checkpoint", "read_evaluator_checkpoint", "now_iso"]

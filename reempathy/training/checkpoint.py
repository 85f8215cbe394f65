"""Checkpoint directories: the LoRA adapter (safetensors) plus the ``reempathy.json`` manifest, written last.

A directory is complete only when its manifest is there. A run removes an earlier manifest
before it trains and writes the new one only after the adapter is fully on disk (each file
moved into place, the manifest through a temporary file and an atomic rename), so a failed or
interrupted run never leaves a directory that looks complete. Trainer's resumable
``checkpoint-N`` folders live inside the same directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reempathy.backbones.base import DELIMITER_TOKENS, Backbone
from reempathy.errors import CheckpointError, ConfigError

MANIFEST = "reempathy.json"
SCHEMA = "reempathy.checkpoint/1"
RUN_FILE = "reempathy-run.json"  # the settings of the run in progress, checked on resume
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
_PARTIAL = ".adapter.partial"


class Component(BaseModel):
    """A plugin choice as recorded in the manifest: name and options."""

    model_config = ConfigDict(extra="forbid")
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class ChunkLayoutRecord(BaseModel):
    """The spoken-chunk layout a ``reempathy`` checkpoint was trained with."""

    model_config = ConfigDict(extra="forbid")
    text_tokens: int
    audio_tokens: int


class Manifest(BaseModel):
    """``reempathy.json``: what the adapter was trained for, so the decoder can check and configure itself."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    schema_id: Literal["reempathy.checkpoint/1"] = Field(SCHEMA, alias="schema")
    backbone: Component
    strategy: Component
    chunk_layout: ChunkLayoutRecord | None = None
    delimiters: dict[str, int]
    steps: int = Field(ge=0)
    created: str
    training: dict[str, Any] = Field(default_factory=dict, description="method, LoRA settings, data")
    directory: str | None = Field(None, exclude=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def now_iso() -> str:
    """The current UTC time, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def delimiter_ids(backbone: Backbone) -> dict[str, int]:
    """The backbone's ids of the strategy delimiters (those it has)."""
    return {name: backbone.layout.special[name] for name in DELIMITER_TOKENS if name in backbone.layout.special}


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Trainer's ``checkpoint-N`` folders in ``output_dir``, oldest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def begin_run(output_dir: str | Path, run_info: dict[str, Any], resume: bool, overwrite: bool) -> str | None:
    """Make ``output_dir`` ready for a run and return the checkpoint to resume from (or None).

    The manifest of an earlier run is removed first, so the directory reads as incomplete until
    this run finishes. Without ``resume``, earlier ``checkpoint-N`` folders are an error unless
    ``overwrite`` (which deletes them); with ``resume``, the earlier run's settings must match.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {str(out)!r} is a file; give a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(out / _PARTIAL, ignore_errors=True)
    previous = checkpoint_dirs(out)
    run_file = out / RUN_FILE
    if overwrite and not resume:
        for p in previous:
            shutil.rmtree(p)
        for name in ADAPTER_FILES:
            (out / name).unlink(missing_ok=True)
        previous = []
    if previous and not resume:
        raise ConfigError(
            f"output_dir {str(out)!r} holds checkpoints of an earlier run ({previous[-1].name}); "
            "pass --resume to continue it, set [train] overwrite = true to start over, or pick another output_dir"
        )
    if resume and previous and run_file.is_file():
        try:
            before = json.loads(run_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            before = None
        if isinstance(before, dict):
            changed = sorted(k for k in run_info if k in before and before[k] != run_info[k])
            if changed:
                raise ConfigError(
                    f"output_dir {str(out)!r}: cannot resume, the run's {', '.join(changed)} changed since it started; "
                    "use the same config or another output_dir"
                )
    tmp = run_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(run_info, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, run_file)
    return str(previous[-1]) if resume and previous else None


def write_checkpoint(model: Any, output_dir: str | Path, manifest: Manifest) -> Path:
    """Save the adapter (peft ``save_pretrained``, safetensors), then the manifest, atomically."""
    out = Path(output_dir)
    partial = out / _PARTIAL
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial), safe_serialization=True)
    for item in partial.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    partial.rmdir()
    missing = [name for name in ADAPTER_FILES if not (out / name).is_file()]
    if missing:
        raise CheckpointError(f"{out}: saving the adapter wrote no {missing[0]}; the checkpoint is incomplete")
    tmp = out / (MANIFEST + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(manifest.to_json(), fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out / MANIFEST)
    return out


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of a complete checkpoint; CheckpointError (one line, naming the file) otherwise."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {str(d)!r} not found; give a directory written by `reempathy train`")
    path = d / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing, so checkpoint {str(d)!r} is incomplete (its training did not finish); "
            "rerun it with --resume"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); the checkpoint is damaged") from None
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(manifest)"
        raise CheckpointError(f"{path}: invalid manifest, {loc}: {err['msg']}") from None
    missing = [name for name in ADAPTER_FILES if not (d / name).is_file()]
    if missing:
        raise CheckpointError(f"{d / missing[0]}: missing, so checkpoint {str(d)!r} is incomplete")
    manifest.directory = str(d)
    return manifest


def apply_checkpoint(backbone: Backbone, directory: str | Path, merge: bool = True) -> Backbone:
    """The backbone with the checkpoint's adapter loaded (and merged, by default) into its model.

    The backbone's model is changed in place; build a fresh backbone to decode without the
    adapter. Refuses a checkpoint trained on another backbone or with other delimiter ids.
    """
    from peft import PeftModel

    manifest = read_manifest(directory)
    where = Path(directory) / MANIFEST
    if manifest.backbone.name != backbone.name:
        raise CheckpointError(
            f"{where}: trained on backbone {manifest.backbone.name!r}, but the backbone is {backbone.name!r}"
        )
    have = delimiter_ids(backbone)
    for name, token in manifest.delimiters.items():
        if have.get(name) != token:
            raise CheckpointError(
                f"{where}: delimiter {name} is id {token} in the checkpoint but {have.get(name)} in backbone "
                f"{backbone.name!r}; the vocabularies differ"
            )
    try:
        model = PeftModel.from_pretrained(backbone.model, str(directory), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        reason = "its weight shapes differ" if "size mismatch" in str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{directory}: the adapter does not fit backbone {backbone.name!r} ({reason}); it was trained on "
            f"{manifest.backbone.name!r} with options {json.dumps(manifest.backbone.options, sort_keys=True)}"
        ) from None
    if merge:
        model = model.merge_and_unload()
    model.eval()
    info = dict(backbone.info, checkpoint=str(directory))
    return dataclasses.replace(backbone, model=model, info=info)


__all__ = [
    "Manifest",
    "Component",
    "ChunkLayoutRecord",
    "MANIFEST",
    "SCHEMA",
    "begin_run",
    "write_checkpoint",
    "read_manifest",
    "apply_checkpoint",
    "delimiter_ids",
    "now_iso",
]

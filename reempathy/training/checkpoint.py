"""Writing checkpoint directories: the LoRA adapter (safetensors) plus the ``reempathy.json`` manifest, written last.

A directory is complete only when its manifest is there. A run removes an earlier manifest
before it trains and writes the new one only after the adapter is fully on disk (each file
moved into place, the manifest through a temporary file and an atomic rename), so a failed or
interrupted run never leaves a directory that looks complete. Trainer's resumable
``checkpoint-N`` folders live inside the same directory. Reading a checkpoint (the manifest,
applying the adapter) lives in :mod:`reempathy.checkpoints`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

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
from reempathy.errors import CheckpointError, ConfigError

RUN_FILE = "reempathy-run.json"  # the settings of the run in progress, checked on resume
_PARTIAL = ".adapter.partial"


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

"""``convert_glm4voice``: rewrite a published glm-4-voice-9b directory as a native transformers checkpoint.

The result loads with plain ``AutoModelForCausalLM.from_pretrained(dst)`` and
``AutoTokenizer.from_pretrained(dst)``: ``config.json`` with ``model_type: glm``, safetensors
shards under native names (``model.safetensors.index.json`` as save_pretrained writes it),
``generation_config.json`` and a fast tokenizer (``tokenizer.json`` + ``tokenizer_config.json``)
that already holds the delimiter tokens. No Python file of the source is copied.

The weights are converted one source shard at a time and keep their dtype, so converting the
9B model needs memory for one shard, not the model. Everything is written into a temporary
sibling of DST and renamed at the end: a failed conversion leaves no DST behind.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from safetensors.torch import save_file
from transformers import GenerationConfig

from reempathy.backbones.glm4voice.checkpoint import OriginalCheckpoint, open_original
from reempathy.backbones.glm4voice.layout import stop_ids
from reempathy.backbones.glm4voice.loader import SAMPLING_DEFAULTS
from reempathy.backbones.glm4voice.weights import INDEX_NAME, SINGLE_NAME, iter_native_shards
from reempathy.errors import CheckpointError


def convert_glm4voice(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> Path:
    """Write the native form of the published checkpoint ``src`` into ``dst``; returns ``dst``."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    ck = open_original(src)
    if dst.exists():
        if not dst.is_dir():
            raise CheckpointError(f"{dst} exists and is a file; choose a directory path for the converted checkpoint")
        if dst.resolve() == src.resolve():
            raise CheckpointError(f"{dst} is the source directory; convert into a new directory")
        if any(dst.iterdir()) and not overwrite:
            raise CheckpointError(f"{dst} exists and is not empty; choose another directory or pass overwrite=True")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.converting-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        _write_native(ck, tmp)
        _swap_in(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write_native(ck: OriginalCheckpoint, out: Path) -> None:
    cfg = ck.config
    cfg.save_pretrained(out)
    GenerationConfig(
        eos_token_id=list(stop_ids(ck.added, cfg.eos_token_id)),
        pad_token_id=cfg.pad_token_id,
        do_sample=True,
        **SAMPLING_DEFAULTS,
    ).save_pretrained(out)

    count = len(ck.plan.shards)
    weight_map: dict[str, str] = {}
    total = 0
    for number, (_, tensors) in enumerate(iter_native_shards(ck.plan, cfg), start=1):
        name = SINGLE_NAME if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    ck.tokenizer.save_pretrained(out)


def _swap_in(tmp: Path, dst: Path) -> None:
    """Put ``tmp`` at ``dst``, replacing an existing (empty or overwritable) ``dst`` only at the very end."""
    if not dst.exists():
        os.replace(tmp, dst)
        return
    old = dst.parent / f".{dst.name}.replaced-{uuid.uuid4().hex[:8]}"
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)

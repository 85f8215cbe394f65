"""``convert_glm4voice``: rewrite a published glm-4-voice-9b directory as a native transformers checkpoint.

The result loads with plain ``AutoModelForCausalLM.from_pretrained(dst)`` and
``AutoTokenizer.from_pretrained(dst)``: ``config.json`` with ``model_type: glm``, safetensors
shards under native names (``model.safetensors.index.json`` as save_pretrained writes it),
``generation_config.json`` and a fast tokenizer (``tokenizer.json`` + ``tokenizer_config.json``)
that already holds the delimiter tokens. No Python file of the source is copied.

The weights are converted one source shard at a time and keep their dtype, so converting the
9B model needs memory for one shard, not the model. Everything is written into a temporary
sibling ``.DST.converting-PID-RANDOM`` and swapped in at the end
(:func:`reempathy.safe_write.replacing_dir`): a failed or killed conversion leaves no DST behind
and never a half-replaced one; the next conversion removes a killed one's temporary folder and
puts back a DST that a kill caught in the middle of the swap.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from transformers import GenerationConfig

from reempathy.backbones.glm4voice.checkpoint import OriginalCheckpoint, open_original
from reempathy.backbones.glm4voice.layout import stop_ids
from reempathy.backbones.glm4voice.loader import SAMPLING_DEFAULTS
from reempathy.backbones.glm4voice.weights import INDEX_NAME, SINGLE_NAME, iter_native_shards
from reempathy.errors import CheckpointError
from reempathy.paths import check_name, describe_kind, path_kind
from reempathy.safe_write import check_output_dir, replacing_dir, restore_interrupted_swap


def convert_glm4voice(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> Path:
    """Write the native form of the published checkpoint ``src`` into ``dst``; returns ``dst``."""
    src = check_name(Path(src).expanduser(), "SRC", CheckpointError)
    dst = check_name(Path(dst).expanduser(), "DST", CheckpointError)
    restore_interrupted_swap(dst)  # a DST a killed run had moved aside is put back before it is judged
    ck = open_original(src)
    kind = path_kind(dst, "DST", CheckpointError)
    if kind == "link":
        raise CheckpointError(f"DST {str(dst)!r} is a symbolic link; give the real directory path to write")
    if kind not in ("missing", "dir"):
        raise CheckpointError(f"DST {str(dst)!r} is {describe_kind(kind)}; choose a directory path for the converted checkpoint")
    check_output_dir(dst, "DST", CheckpointError)
    if kind == "dir":
        if dst.resolve() == src.resolve():
            raise CheckpointError(f"{dst} is the source directory; convert into a new directory")
        if any(dst.iterdir()) and not overwrite:
            raise CheckpointError(f"{dst} exists and is not empty; choose another directory or pass --overwrite")
    with replacing_dir(dst, label="converting") as tmp:
        _write_native(ck, tmp)
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
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")  # synced with the folder

    ck.tokenizer.save_pretrained(out)

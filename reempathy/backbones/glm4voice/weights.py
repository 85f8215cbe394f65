"""ChatGLM weight layout → native ``GlmForCausalLM`` names, read lazily shard by shard.

The whole checkpoint is validated from the safetensors headers (names, shapes) before a
single tensor is read, so an incomplete download fails fast with the file named. Tensors
are then produced one source shard at a time, which lets the loader assign them into a
model built on the meta device and the converter write them straight back to disk: a
9B model is never held twice.

Name mapping (``N`` = layer):

    transformer.embedding.word_embeddings             → model.embed_tokens
    transformer.encoder.layers.N.input_layernorm      → model.layers.N.input_layernorm
    transformer.encoder.layers.N.self_attention.query_key_value
        split [heads*hd, groups*hd, groups*hd]        → self_attn.q_proj / k_proj / v_proj (weight, bias)
    transformer.encoder.layers.N.self_attention.dense → self_attn.o_proj
    transformer.encoder.layers.N.post_attention_layernorm → post_attention_layernorm
    transformer.encoder.layers.N.mlp.dense_h_to_4h    → mlp.gate_up_proj  (same [gate; up] halves)
    transformer.encoder.layers.N.mlp.dense_4h_to_h    → mlp.down_proj
    transformer.encoder.final_layernorm               → model.norm
    transformer.output_layer                          → lm_head
    transformer.rotary_pos_emb.inv_freq               → dropped (recomputed from the config)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from transformers import GlmConfig

from reempathy.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DROPPED = ("transformer.rotary_pos_emb.inv_freq",)

_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")
_LAYER_PARTS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_TOP = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_VOCAB_ROWS = {"model.embed_tokens.weight", "lm_head.weight"}


@dataclass(frozen=True)
class ShardPlan:
    """Which tensor lives in which shard file, as the index (or the single file) says."""

    directory: Path
    index: Path | None
    shards: dict[str, list[str]]  # shard file name → tensor names, in index order

    def describe(self) -> str:
        return str(self.index or self.directory / SINGLE_NAME)


def expected_chatglm_shapes(raw: dict, cfg: GlmConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a ChatGLM checkpoint with this config must hold, with its shape."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    rows = int(raw.get("padded_vocab_size") or raw.get("vocab_size"))
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.embedding.word_embeddings.weight": (rows, h),
        "transformer.encoder.final_layernorm.weight": (h,),
        "transformer.output_layer.weight": (rows, h),
    }
    for n in range(cfg.num_hidden_layers):
        p = f"transformer.encoder.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attention.query_key_value.weight"] = (q + 2 * kv, h)
        if cfg.attention_bias:
            shapes[p + "self_attention.query_key_value.bias"] = (q + 2 * kv,)
        shapes[p + "self_attention.dense.weight"] = (h, q)
        shapes[p + "mlp.dense_h_to_4h.weight"] = (2 * cfg.intermediate_size, h)
        shapes[p + "mlp.dense_4h_to_h.weight"] = (h, cfg.intermediate_size)
    return shapes


def read_shard_plan(directory: Path) -> ShardPlan:
    """The shard layout of a checkpoint: ``model.safetensors.index.json`` or one ``model.safetensors``."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{index} is not a valid safetensors index ({e}); re-download the checkpoint"
            ) from None
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        for shard in shards:
            if not (directory / shard).is_file():
                raise CheckpointError(
                    f"{directory / shard} is missing but {index.name} names it; the download is incomplete, "
                    "fetch the missing shard"
                )
        return ShardPlan(directory, index, shards)
    single = directory / SINGLE_NAME
    if single.is_file():
        try:
            with safe_open(single, framework="pt") as f:
                return ShardPlan(directory, None, {SINGLE_NAME: list(f.keys())})
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{single} is not a readable safetensors file ({e}); re-download it") from None
    if any(directory.glob("*.bin")):
        raise CheckpointError(
            f"{directory} holds only PyTorch .bin weights; reempathy loads safetensors only, "
            "use the published safetensors release"
        )
    raise CheckpointError(f"{index} is missing (and there is no {SINGLE_NAME}); the checkpoint has no weights")


def validate(plan: ShardPlan, expected: dict[str, tuple[int, ...]]) -> None:
    """Check names and shapes against the shard headers; raise ``CheckpointError`` naming the file on any mismatch."""
    seen: set[str] = set()
    for shard, names in plan.shards.items():
        path = plan.directory / shard
        try:
            handle = safe_open(path, framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-download it") from None
        with handle as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(
                        f"{plan.describe()} says {name!r} is in {shard}, but {path} has no such tensor; "
                        "the index and shards do not match, re-download the checkpoint"
                    )
                if name in DROPPED:
                    continue
                if name not in expected:
                    raise CheckpointError(
                        f"{path} holds unexpected tensor {name!r} that the GLM architecture has no place for; "
                        "this is not a glm-4-voice-9b checkpoint or its config does not match its weights"
                    )
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has shape {list(shape)}, but config.json implies "
                        f"{list(expected[name])}; the config does not match the weights"
                    )
                seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(
            f"{plan.describe()} lacks tensors {', '.join(missing[:3])}{more}; "
            "the checkpoint is incomplete, re-download it"
        )


def native_tensors(name: str, tensor: torch.Tensor, cfg: GlmConfig) -> dict[str, torch.Tensor]:
    """The native tensor(s) for one ChatGLM tensor (empty for dropped buffers)."""
    if name in DROPPED:
        return {}
    if name in _TOP:
        return {_TOP[name]: tensor}
    m = _LAYER.fullmatch(name)
    if m is None:
        raise CheckpointError(f"tensor {name!r} has no native GLM counterpart")
    prefix = f"model.layers.{m.group(1)}."
    part = m.group(2)
    if part in _LAYER_PARTS:
        return {prefix + _LAYER_PARTS[part]: tensor}
    if part in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
        kind = part.rsplit(".", 1)[1]
        hd = cfg.head_dim
        sizes = [cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.num_key_value_heads * hd]
        q, k, v = torch.split(tensor, sizes, dim=0)
        return {
            f"{prefix}self_attn.q_proj.{kind}": q.contiguous(),
            f"{prefix}self_attn.k_proj.{kind}": k.contiguous(),
            f"{prefix}self_attn.v_proj.{kind}": v.contiguous(),
        }
    raise CheckpointError(f"tensor {name!r} has no native GLM counterpart")


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` grown to ``rows`` rows; new rows are the mean of the existing ones (a neutral start)."""
    if weight.shape[0] >= rows:
        return weight
    extra = weight.float().mean(dim=0, keepdim=True).to(weight.dtype).expand(rows - weight.shape[0], -1)
    return torch.cat([weight, extra], dim=0)


def iter_native_shards(
    plan: ShardPlan,
    cfg: GlmConfig,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """``(source shard name, native tensors)`` per shard, cast to ``dtype`` and moved to ``device``.

    Embedding and output rows are grown to ``cfg.vocab_size`` when tokens were added past the
    checkpoint's padded vocabulary.
    """
    for shard, names in plan.shards.items():
        out: dict[str, torch.Tensor] = {}
        with safe_open(plan.directory / shard, framework="pt", device="cpu") as f:
            for name in names:
                if name in DROPPED:
                    continue
                t = f.get_tensor(name)
                if dtype is not None and t.dtype != dtype:
                    t = t.to(dtype)
                for native, value in native_tensors(name, t, cfg).items():
                    if native in _VOCAB_ROWS:
                        value = pad_rows(value, cfg.vocab_size)
                    out[native] = value.to(device)
        yield shard, out

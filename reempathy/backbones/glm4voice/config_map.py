"""ChatGLM ``config.json`` (model_type ``chatglm``) → transformers' native ``GlmConfig``.

The published glm-4-voice-9b config describes the model in ChatGLM's own terms. Each key
that changes the computation is mapped; options ChatGLM has but the native architecture
does not (LayerNorm instead of RMSNorm, biases on the dense layers, prefix tuning, …) are
refused rather than silently dropped, since the converted model would compute something else.

Rotary embedding: ChatGLM builds ``RotaryEmbedding(kv_channels // 2)`` and rotates only the
first half of each head's dimensions, treating them as interleaved pairs ``(x[2i], x[2i+1])``
with frequency ``(10000 * rope_ratio) ** (-2i / (kv_channels / 2))``. Native ``GlmAttention``
does the same with ``partial_rotary_factor = 0.5``: its ``rotate_half`` works on interleaved
pairs and its cos/sin tables are ``repeat_interleave``-d, so no permutation of the q/k
weights is needed (the test suite checks this against a reference written from the ChatGLM
equations).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import GlmConfig

from reempathy.errors import CheckpointError

CHATGLM_MODEL_TYPE = "chatglm"
NATIVE_MODEL_TYPE = "glm"

# ChatGLM options whose non-default values the native architecture cannot express.
_REFUSED = {
    "rmsnorm": (True, "LayerNorm instead of RMSNorm"),
    "add_bias_linear": (False, "biases on the dense/MLP layers"),
    "apply_residual_connection_post_layernorm": (False, "residuals taken after the layer norm"),
    "post_layer_norm": (True, "no final layer norm"),
    "original_rope": (True, "the non-original rotary variant"),
    "pre_seq_len": (None, "prefix tuning (pre_seq_len)"),
    "rope_scaling": (None, "rope_scaling"),
}


def read_config_json(directory: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; point the path at the model directory that holds config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON ({e}); re-download the checkpoint") from None
    except RecursionError:
        raise CheckpointError(f"{path} cannot be read as JSON (nested too deeply); re-download the checkpoint") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; re-download the checkpoint")
    return raw


def _need(raw: dict[str, Any], key: str, path: Path) -> Any:
    if key not in raw or raw[key] is None:
        raise CheckpointError(
            f"{path} lacks {key!r}; this is not a complete ChatGLM config, re-download the checkpoint"
        )
    return raw[key]


def chatglm_to_glm_config(raw: dict[str, Any], path: Path, vocab_rows: int | None = None) -> GlmConfig:
    """Native config for a ChatGLM config dict; ``vocab_rows`` overrides the embedding rows (after adding tokens)."""
    if raw.get("model_type") != CHATGLM_MODEL_TYPE:
        raise CheckpointError(
            f"{path} has model_type {raw.get('model_type')!r}, expected {CHATGLM_MODEL_TYPE!r}; "
            "point the path at the published glm-4-voice-9b directory"
        )
    for key, (default, what) in _REFUSED.items():
        if key in raw and raw[key] != default:
            raise CheckpointError(
                f"{path} sets {key}={raw[key]!r} ({what}), which the native GLM architecture cannot represent; "
                "only GLM-4-style checkpoints can be loaded"
            )

    hidden = int(_need(raw, "hidden_size", path))
    heads = int(_need(raw, "num_attention_heads", path))
    layers = int(raw.get("num_layers") or _need(raw, "num_hidden_layers", path))
    head_dim = int(raw.get("kv_channels") or hidden // heads)
    kv_heads = int(_need(raw, "multi_query_group_num", path)) if raw.get("multi_query_attention") else heads
    if heads % kv_heads:
        raise CheckpointError(
            f"{path}: num_attention_heads={heads} is not a multiple of multi_query_group_num={kv_heads}; "
            "the config is inconsistent"
        )
    if head_dim % 4:
        raise CheckpointError(f"{path}: kv_channels={head_dim} must be divisible by 4 for half-head rotary pairs")
    padded_vocab = int(raw.get("padded_vocab_size") or _need(raw, "vocab_size", path))
    rope_ratio = float(raw.get("rope_ratio", 1) or 1)
    eos = raw.get("eos_token_id")
    dtype = raw.get("torch_dtype") or raw.get("dtype")

    return GlmConfig(
        vocab_size=int(vocab_rows or padded_vocab),
        hidden_size=hidden,
        intermediate_size=int(_need(raw, "ffn_hidden_size", path)),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        attention_dropout=0.0,
        max_position_embeddings=int(raw.get("seq_length") or 8192),
        rms_norm_eps=float(raw.get("layernorm_epsilon", 1e-5)),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * rope_ratio,
            "partial_rotary_factor": 0.5,
        },
        attention_bias=bool(raw.get("add_qkv_bias", False)),
        tie_word_embeddings=False,
        pad_token_id=raw.get("pad_token_id"),
        eos_token_id=eos,
        bos_token_id=None,
        dtype=dtype if isinstance(dtype, str) else None,
        architectures=["GlmForCausalLM"],
    )


def torch_dtype_of(name: str | None) -> torch.dtype | None:
    """``torch.float32`` for ``"float32"`` and so on; None for unknown names."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name or "")

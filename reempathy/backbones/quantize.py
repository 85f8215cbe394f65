"""Weight-only quantization of a backbone's language model (the ``quantize`` backbone option), through torchao.

For smaller GPUs: int8 halves the weight bytes a decode step reads, int4 quarters them (a 9B
model: about 19 GB in bf16, 10 GB in int8, 5 GB in int4 plus the unquantized parts). Only
weights are quantized; activations, the KV cache and the attention bias stay in the model's
dtype, so every strategy, attention reweighting and the static/compiled path work unchanged.

Where it decides: :func:`quantize_weights` picks the torchao config per kind and what is left
alone: every ``nn.Linear`` of the model except the output head (``lm_head``), whose logits pick
between text, audio and delimiter tokens, and the embeddings (not linear layers). torchao is an
optional extra (``pip install 'reempathy[quant]'``); without it, asking for a kind is a
:class:`NotAvailableError` naming the extra.

* ``int8``: ``Int8WeightOnlyConfig`` (per-channel int8 weights), on CPU and CUDA.
* ``int4``: ``Int4WeightOnlyConfig`` with groups of 128 and the tile-packed layout whose kernel
  (tinygemm) PyTorch ships for CUDA; CUDA and bfloat16 only, so it is refused elsewhere.

torchao's inductor settings (``set_inductor_config``) are left off: they switch on autotuning
that multiplies compile time, and the static path compiles once per shape anyway.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from reempathy.errors import ConfigError, NotAvailableError

Quantize = Literal["none", "int8", "int4"]
"""The ``quantize`` backbone option's values."""
QUANT_EXTRA = "quant"
INT4_GROUP_SIZE = 128


def _torchao() -> Any:
    try:
        import torchao.quantization as quantization
    except ImportError:
        raise NotAvailableError(
            f"weight quantization needs torchao, an optional extra: pip install 'reempathy[{QUANT_EXTRA}]' "
            '(or set the backbone option quantize = "none")'
        ) from None
    return quantization


def quantize_weights(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """Quantize ``model``'s linear weights in place (``lm_head`` excepted); ``"none"`` leaves it as it is."""
    if kind == "none":
        return model
    if kind not in ("int8", "int4"):
        raise ConfigError(f"backbone option quantize = {kind!r}: choose none, int8 or int4")
    quantization = _torchao()
    device = next(model.parameters()).device
    if kind == "int8":
        config = quantization.Int8WeightOnlyConfig(set_inductor_config=False)
    else:
        if device.type != "cuda":
            raise NotAvailableError(
                f"quantize = \"int4\" runs on CUDA only (its kernel, tinygemm, is CUDA's); the model is on {device.type}: "
                'use quantize = "int8" there'
            )
        dtype = next(model.parameters()).dtype
        if dtype != torch.bfloat16:
            raise ConfigError(f'quantize = "int4" needs bfloat16 weights, the model is {dtype}: set dtype = "bfloat16"')
        config = quantization.Int4WeightOnlyConfig(
            group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d", set_inductor_config=False
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    def chosen(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and module is not head

    quantization.quantize_(model, config, filter_fn=chosen)
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter as stored (quantized weights count their packed data and scales)."""
    total = 0
    for p in model.parameters():
        data = p.data if isinstance(p, torch.nn.Parameter) else p
        inner = getattr(data, "__tensor_flatten__", None)
        if inner is None:
            total += data.numel() * data.element_size()
            continue
        names, _ = inner()
        total += sum(getattr(data, n).numel() * getattr(data, n).element_size() for n in names)
    return total


__all__ = ["INT4_GROUP_SIZE", "QUANT_EXTRA", "Quantize", "quantize_weights", "weight_bytes"]

"""Additive attention bias toward chosen key spans, run inside PyTorch SDPA.

ReEmpathy strengthens attention toward selected keys: multiply their post-softmax weights by
``alpha`` and renormalise. Because ``softmax(s)_j * alpha / sum`` equals ``softmax(s + log(alpha)
at j)``, this is the same as adding ``log(alpha)`` to those keys' pre-softmax scores, which SDPA
accepts as a float ``attn_mask``.

How it plugs into transformers (5.x):

* ``register_attention()`` registers an attention function under :data:`ATTENTION_NAME` in
  ``transformers.AttentionInterface`` and transformers' own ``sdpa_mask`` under the same name in
  ``AttentionMaskInterface``. Without the mask entry, ``create_causal_mask`` returns ``None`` for
  unknown implementation names and the causal mask would silently disappear.
* :func:`biased_attention` switches a model to that implementation, attaches a
  :class:`BiasController` to the model's attention modules (so every model has its own plan) and
  restores everything on exit.
* For a layer without plan entries the attention function *is* transformers' ``sdpa`` path
  (``sdpa_attention_forward`` with the unchanged mask), so an empty plan gives bit-identical
  results. For a planned layer it builds one float mask (causal/padding part plus the bias
  columns) and hands it to the same ``sdpa_attention_forward``, which deals with GQA.

Key positions in :class:`KeyBias` are absolute indices into the key tensor, i.e. positions in the
KV cache (which keeps every position; sliding windows are not supported).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ATTENTION_NAME",
    "AttentionPlan",
    "BiasController",
    "KeyBias",
    "biased_attention",
    "register_attention",
]

ATTENTION_NAME = "reempathy_sdpa"

# Attribute set on attention modules while `biased_attention` is active.
_CONTROLLER_ATTR = "_reempathy_bias_controller"

# transformers' SDPA attention function, looked up once by `register_attention` (which runs before
# our attention function can be called) instead of imported on every layer call.
_sdpa_forward: Callable[..., Any] | None = None


@dataclass(frozen=True)
class KeyBias:
    """Add `bias` (a float, e.g. math.log(alpha)) to the attention scores of absolute key positions [start, end), for `heads` (None = all heads)."""

    start: int
    end: int
    bias: float
    heads: tuple[int, ...] | None = None


AttentionPlan = dict[int, list[KeyBias]]  # layer index -> biases


class BiasController:
    """The plan the attention function reads for one model.

    ``set_plan`` normalises the plan once (drops entries that cannot change anything, turns
    ``heads`` into tuples, shares equal per-layer lists) so that the per-layer read during a
    forward pass is a single dict lookup.
    """

    def __init__(self) -> None:
        self._plan: AttentionPlan = {}
        # layer index -> normalised, non-empty tuple of biases
        self._active: dict[int, tuple[KeyBias, ...]] = {}
        # layer index -> the bias row of its biases (layers with equal biases share one row)
        self._rows: dict[int, _BiasRow] = {}
        # Single-entry cache of the last combined mask, so layers sharing the same biases reuse
        # one mask within a forward pass. Identity-checked on the mask and bias objects.
        self._cache_key: tuple | None = None
        self._cache_mask_ref: torch.Tensor | None = None
        self._cache_value: torch.Tensor | None = None

    def set_plan(self, plan: AttentionPlan | None) -> None:
        """Replace the active plan (None/{} = no bias anywhere)."""
        plan = dict(plan or {})
        active: dict[int, tuple[KeyBias, ...]] = {}
        interned: dict[tuple[KeyBias, ...], tuple[KeyBias, ...]] = {}
        for layer, biases in plan.items():
            kept = []
            for kb in biases or ():
                if kb.heads is not None:
                    heads = tuple(int(h) for h in kb.heads)
                    if not heads:
                        continue
                    if heads != kb.heads:
                        kb = dataclasses.replace(kb, heads=heads)
                if kb.end <= kb.start or kb.end <= 0 or float(kb.bias) == 0.0:
                    continue
                kept.append(kb)
            if kept:
                entry = tuple(kept)
                active[int(layer)] = interned.setdefault(entry, entry)
        rows: dict[int, _BiasRow] = {}
        shared: dict[int, _BiasRow] = {}
        for layer, entry in active.items():
            rows[layer] = shared.get(id(entry)) or shared.setdefault(id(entry), _BiasRow(entry))
        self._plan = {layer: list(biases or ()) for layer, biases in plan.items()}
        self._active = active
        self._rows = rows
        self.clear_cache()

    @property
    def plan(self) -> AttentionPlan:
        """The plan last given to ``set_plan`` (a copy)."""
        return {layer: list(biases) for layer, biases in self._plan.items()}

    def clear_cache(self) -> None:
        self._cache_key = None
        self._cache_mask_ref = None
        self._cache_value = None

    def _biases_for(self, layer_idx: int | None) -> tuple[KeyBias, ...] | None:
        return self._active.get(layer_idx)


def _bias_columns(
    biases: tuple[KeyBias, ...], num_heads: int, kv_length: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Bias over key columns: ``[1, 1, 1, K]``, or ``[1, H, 1, K]`` when some bias selects heads."""
    per_head = any(kb.heads is not None for kb in biases)
    bias = torch.zeros(1, num_heads if per_head else 1, 1, kv_length, dtype=dtype, device=device)
    for kb in biases:
        start, end = max(int(kb.start), 0), min(int(kb.end), kv_length)
        if end <= start:
            continue
        if kb.heads is None:
            bias[..., start:end] += kb.bias
        else:
            for head in kb.heads:
                bias[:, head, :, start:end] += kb.bias
    return bias


class _BiasRow:
    """The bias columns of one tuple of biases, built once per plan and sliced to the current key length.

    Decoding adds a key every step; rebuilding the columns for every step and layer was most of
    what reweighting cost per token. The buffer grows (doubling) only when the keys outgrow it.
    """

    __slots__ = ("biases", "per_head", "_buffer", "_dtype", "_device", "_view", "_view_len")

    def __init__(self, biases: tuple[KeyBias, ...]) -> None:
        self.biases = biases
        self.per_head = any(kb.heads is not None for kb in biases)
        self._buffer: torch.Tensor | None = None
        self._dtype: torch.dtype | None = None
        self._device: torch.device | None = None
        # The last slice handed out: every planned layer of one forward pass asks for the same one.
        self._view: torch.Tensor | None = None
        self._view_len = -1

    def columns(self, num_heads: int, kv_length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``[1, 1, 1, kv_length]`` (or ``[1, H, 1, kv_length]``): a slice of the buffer, contiguous."""
        heads_ok = not self.per_head or self._view is None or self._view.shape[1] == num_heads
        if kv_length == self._view_len and dtype is self._dtype and device == self._device and heads_ok:
            return self._view  # type: ignore[return-value]
        buf = self._buffer
        if buf is None or buf.shape[-1] < kv_length or dtype is not self._dtype or device != self._device or not heads_ok:
            capacity = max(256, 2 * kv_length)
            buf = self._buffer = _bias_columns(self.biases, num_heads, capacity, dtype, device)
            self._dtype, self._device = dtype, device
        # A [1, 1, 1, K] slice is contiguous as it is; a per-head one is copied once per length.
        view = buf[..., :kv_length]
        self._view = view.contiguous() if self.per_head else view
        self._view_len = kv_length
        return self._view


def _combined_mask(
    biases: tuple[KeyBias, ...],
    attention_mask: torch.Tensor | None,
    causal: bool,
    query: torch.Tensor,
    key: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float additive mask = causal/padding part (0 or dtype min) + bias at the target key columns.

    ``bias`` is the precomputed bias columns (from a :class:`_BiasRow`); built here when None.
    """
    num_heads, q_length = query.shape[1], query.shape[2]
    kv_length = key.shape[2]
    dtype, device = query.dtype, query.device
    if bias is None:
        bias = _bias_columns(biases, num_heads, kv_length, dtype, device)
    min_value = torch.finfo(dtype).min

    if attention_mask is None:
        if causal and q_length > 1:
            # transformers only drops the mask when SDPA's `is_causal` (upper-left aligned) is right:
            # q_length == kv_length, or an empty static cache whose extra slots hold nothing yet.
            # Rebuild exactly that pattern (key j visible to query i iff j <= i).
            rows = torch.arange(q_length, device=device)[:, None]
            cols = torch.arange(kv_length, device=device)[None, :]
            allowed = (cols <= rows).view(1, 1, q_length, kv_length)
            mask = torch.where(allowed, bias, min_value)
        else:
            # A single query (or non-causal attention) sees every key.
            mask = bias
    else:
        if attention_mask.shape[-1] > kv_length:
            attention_mask = attention_mask[..., :kv_length]
        if attention_mask.dtype == torch.bool:
            mask = torch.where(attention_mask, bias, min_value)
        else:
            mask = (attention_mask + bias).to(dtype)
    return mask.contiguous()


# Keyword arguments only transformers' own SDPA path knows how to honour (or refuse).
_NEEDS_TRANSFORMERS = frozenset({"position_bias", "softcap", "output_attentions", "sliding_window", "s_aux"})


def _one_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    dropout: float,
    scaling: float | None,
) -> tuple[torch.Tensor, None]:
    """SDPA for one query with a float mask, called as transformers' ``sdpa_attention_forward`` calls it.

    Same kernel inputs (GQA folded into the query rows, the mask shared or split per KV group, the
    output unfolded), without that function's per-call checks, which cost more than the small
    attention itself on a small model: this runs once per planned layer per token.
    """
    batch, heads, _, dim = query.shape
    n_rep = heads // key.shape[1]
    if n_rep > 1:
        query = query.reshape(batch, heads // n_rep, n_rep, dim)
        if mask.shape[1] != 1:
            mask = mask.reshape(mask.shape[0], heads // n_rep, n_rep, mask.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    out = out.reshape(out.shape[0], -1, 1, value.shape[-1])
    return out.transpose(1, 2).contiguous(), None


def _reempathy_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    sdpa_attention_forward = _sdpa_forward
    controller = module.__dict__.get(_CONTROLLER_ATTR)
    row = None if controller is None else controller._rows.get(getattr(module, "layer_idx", None))
    if row is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if attention_mask is None and query.shape[2] == 1 and not any(kwargs.get(k) for k in _NEEDS_TRANSFORMERS):
        # One new token over a dynamic cache: it sees every key, so the bias columns are the whole mask.
        mask = row.columns(query.shape[1], key.shape[2], query.dtype, query.device)
        return _one_query_attention(query, key, value, mask, dropout, scaling)
    biases = row.biases

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    cache_key = (
        biases,
        attention_mask is None,
        bool(causal),
        query.shape[1],
        query.shape[2],
        key.shape[2],
        query.dtype,
        query.device,
    )
    cached = controller._cache_key
    if (
        cached is not None
        and cached[0] is biases
        and controller._cache_mask_ref is attention_mask
        and cached[1:] == cache_key[1:]
    ):
        mask = controller._cache_value
    else:
        bias = row.columns(query.shape[1], key.shape[2], query.dtype, query.device)
        mask = _combined_mask(biases, attention_mask, bool(causal), query, key, bias)
        controller._cache_key = cache_key
        controller._cache_mask_ref = attention_mask
        controller._cache_value = mask

    # With a mask present, sdpa_attention_forward never uses `is_causal`, and it repeats/packs
    # key-value heads for GQA exactly as for plain "sdpa".
    return sdpa_attention_forward(
        module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def register_attention() -> None:
    """Register the attention function and its mask function under ATTENTION_NAME (idempotent)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    global _sdpa_forward
    _sdpa_forward = sdpa_attention_forward
    AttentionInterface.register(ATTENTION_NAME, _reempathy_sdpa_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _snapshot_attn_implementations(model: torch.nn.Module) -> list[tuple[object, object]]:
    """Every config the model may read its attention implementation from, with its current value."""
    configs: list[object] = []
    seen: set[int] = set()
    pending = [getattr(model, "config", None)]
    pending += [getattr(m, "config", None) for m in model.modules() if hasattr(m, "set_attn_implementation")]
    while pending:
        config = pending.pop()
        if config is None or id(config) in seen or not hasattr(config, "_attn_implementation_internal"):
            continue
        seen.add(id(config))
        configs.append(config)
        for sub_key in getattr(config, "sub_configs", None) or {}:
            pending.append(getattr(config, sub_key, None))
    return [(config, config._attn_implementation_internal) for config in configs]


def _decoder_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that call the attention function with their `layer_idx`: those of the text decoder."""
    text_config = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        text_config = config.get_text_config(decoder=True)
    found = []
    for module in model.modules():
        if not isinstance(getattr(module, "layer_idx", None), int):
            continue
        module_config = getattr(module, "config", None)
        if module_config is not None and text_config is not None and module_config is not text_config:
            continue  # e.g. an audio encoder's layers: no bias there
        found.append(module)
    return found


@dataclass
class _Targets:
    """What :func:`biased_attention` changes on one model, found once per model.

    Walking the module tree (twice) and ``set_attn_implementation`` cost about as much as a few
    decode steps of a small model, once per answer; the second answer on a model replays the
    switch the first one made.
    """

    configs: list
    modules: list
    switch_from: tuple | None = None  # implementations before the last real switch
    switch_to: tuple | None = None  # what set_attn_implementation made of them


_TARGETS_ATTR = "_reempathy_attention_targets"


def _targets(model: torch.nn.Module) -> _Targets:
    targets = model.__dict__.get(_TARGETS_ATTR)
    if targets is None:
        configs = [config for config, _ in _snapshot_attn_implementations(model)]
        targets = model.__dict__[_TARGETS_ATTR] = _Targets(configs, _decoder_attention_modules(model))
    return targets


@contextlib.contextmanager
def biased_attention(model) -> Iterator[BiasController]:
    """Switch `model` to ATTENTION_NAME for the duration (and restore its previous attn implementation after, even on error); yield a controller whose plan the attention function reads."""
    register_attention()
    controller = BiasController()
    targets = _targets(model)
    before = tuple(config._attn_implementation_internal for config in targets.configs)
    snapshot = list(zip(targets.configs, before))
    modules = targets.modules
    previous = [(module, module.__dict__.get(_CONTROLLER_ATTR)) for module in modules]
    try:
        if before == targets.switch_from:
            for config, value in zip(targets.configs, targets.switch_to):  # type: ignore[arg-type]
                config._attn_implementation_internal = value
        else:
            model.set_attn_implementation(ATTENTION_NAME)
            targets.switch_from = before
            targets.switch_to = tuple(config._attn_implementation_internal for config in targets.configs)
        for module in modules:
            module.__dict__[_CONTROLLER_ATTR] = controller
        yield controller
    finally:
        for module, old in previous:
            if old is None:
                module.__dict__.pop(_CONTROLLER_ATTR, None)
            else:
                module.__dict__[_CONTROLLER_ATTR] = old
        for config, value in snapshot:
            config._attn_implementation_internal = value
        controller.clear_cache()

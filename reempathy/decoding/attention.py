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

Key positions in :class:`KeyBias` are positions of the row's own sequence. With one plan for
every row (:meth:`BiasController.set_plan`) they are KV-cache columns as they are; a batch gives
each row its plan and its column offset (:meth:`BiasController.set_rows`: the row's left padding),
and the bias of row ``r`` lands at ``offset_r + position``. The cache keeps every position;
sliding windows are not supported.

Where the bias lives: one buffer per *layer group* (layers that read equal entries in every row
share one), ``[rows, 1 or H, 1, capacity]``, written in place when a row's plan changes (only that
row), read by the attention function as a view. A later static-cache/CUDA-graph path reserves the
buffers at their final size (:meth:`BiasController.reserve`) and reads the same tensors on every
replay.
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
    "normalise_plan",
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


def normalise_plan(plan: AttentionPlan | None) -> dict[int, tuple[KeyBias, ...]]:
    """Drop entries that cannot change anything; ``heads`` as int tuples; equal per-layer tuples shared.

    An entry with no heads, an empty or negative span, or a zero bias is dropped; a layer left
    with no entry is dropped, so an empty result means "plain SDPA everywhere".
    """
    active: dict[int, tuple[KeyBias, ...]] = {}
    interned: dict[tuple[KeyBias, ...], tuple[KeyBias, ...]] = {}
    for layer, biases in (plan or {}).items():
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
    return active


class _BiasGroup:
    """The bias rows of a set of layers that read the same bias for every batch row.

    ``buffer`` is ``[rows, 1 or H, 1, capacity]``: row ``r`` holds its entries shifted by its
    column offset (where its position 0 sits in the KV cache). It is allocated once and written
    in place: a row whose entries or offset change is marked dirty and rewritten (only that row)
    before the next forward reads the buffer. It grows (doubling) only when the keys outgrow it,
    unless :meth:`BiasController.reserve` allocated it for the longest cache up front.
    """

    __slots__ = (
        "per_head", "entries", "offsets", "dirty", "buffer", "_heads", "_dtype", "_device", "_view", "_view_key",
    )

    def __init__(self, per_head: bool) -> None:
        self.per_head = per_head
        self.entries: list[tuple[KeyBias, ...] | None] = []
        self.offsets: list[int] = []
        self.dirty: set[int] = set()
        self.buffer: torch.Tensor | None = None
        self._heads = 0
        self._dtype: torch.dtype | None = None
        self._device: torch.device | None = None
        # The last view handed out: every layer of the group in one forward pass asks for the same one.
        self._view: torch.Tensor | None = None
        self._view_key: tuple | None = None

    def assign(self, entries: list[tuple[KeyBias, ...] | None], offsets: list[int]) -> None:
        """Set every row's entries and offset; rows that differ from before become dirty."""
        if len(entries) != len(self.entries):
            self.dirty = set(range(len(entries)))
        else:
            for r, (entry, offset) in enumerate(zip(entries, offsets)):
                if entry is not self.entries[r] or offset != self.offsets[r]:
                    self.dirty.add(r)
        self.entries = list(entries)
        self.offsets = list(offsets)
        if self.dirty:
            self._view_key = None

    def allocate(self, rows: int, num_heads: int, columns: int, dtype: torch.dtype, device: torch.device) -> None:
        """A fresh zero buffer of at least ``rows`` x ``columns``; every row is rewritten from its entries."""
        heads = num_heads if self.per_head else 1
        self.buffer = torch.zeros(rows, heads, 1, columns, dtype=dtype, device=device)
        self._heads, self._dtype, self._device = num_heads, dtype, device
        self.dirty = set(range(len(self.entries)))
        self._view_key = None

    def flush(self) -> None:
        """Write the dirty rows into the buffer, in place."""
        buf = self.buffer
        if buf is None or not self.dirty:
            return
        capacity = buf.shape[-1]
        for r in self.dirty:
            row = buf[r]
            row.zero_()
            offset = self.offsets[r]
            for kb in self.entries[r] or ():
                start, end = max(offset + int(kb.start), 0), min(offset + int(kb.end), capacity)
                if end <= start:
                    continue
                if kb.heads is None:
                    row[..., start:end] += kb.bias
                else:
                    for head in kb.heads:  # one by one, so a repeated head adds its bias twice, as written
                        row[head, :, start:end] += kb.bias
        self.dirty.clear()

    def columns(self, num_heads: int, kv_length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``[rows, 1 or H, 1, kv_length]`` for the current rows: a contiguous view (or copy) of the buffer."""
        key = (kv_length, dtype, device, num_heads)
        if key == self._view_key:
            return self._view  # type: ignore[return-value]
        rows = len(self.entries)
        buf = self.buffer
        if (
            buf is None
            or buf.shape[0] < rows
            or buf.shape[-1] < kv_length
            or dtype is not self._dtype
            or device != self._device
            or (self.per_head and num_heads != self._heads)
        ):
            capacity = max(256, 2 * kv_length, 0 if buf is None else buf.shape[-1])
            self.allocate(max(rows, 0 if buf is None else buf.shape[0]), num_heads, capacity, dtype, device)
        self.flush()
        view = self.buffer[:rows, ..., :kv_length]  # type: ignore[index]
        # One row of one head is contiguous as it is; other views are copied once per key length.
        self._view = view if rows == 1 and not self.per_head else view.contiguous()
        self._view_key = key
        return self._view


class BiasController:
    """The attention bias one model reads: per batch row a plan, per layer group one bias buffer.

    Two ways to set it. :meth:`set_plan` gives one plan for every row of whatever batch is
    forwarded (the single-row loop, and a plain ``model(...)`` call); :meth:`set_rows` and
    :meth:`set_row_plan` give each row of a batch its own plan and its column offset (its left
    padding), producing a bias of shape ``[B, 1, 1, K]`` (``[B, H, 1, K]`` where heads are
    selected).

    Layers are grouped by what they read: layers whose entries are equal for every row share one
    :class:`_BiasGroup` buffer (the built-in reweighting puts all its layers in one group). A plan
    change updates only the changed row of each group's buffer, in place; groups (and their
    buffers) are kept in a pool keyed by their layers, so a plan that touches the same layers again
    finds the same tensor. A static-cache/CUDA-graph path calls :meth:`reserve` once to allocate
    every buffer at its final size and :meth:`flush` before replaying a graph, which then reads
    the same tensors throughout.
    """

    def __init__(self) -> None:
        self._plans: list[AttentionPlan] = []  # as given, per row
        self._rows: list[dict[int, tuple[KeyBias, ...]]] = []  # normalised, per row
        self._offsets: list[int] = []
        # layer index -> its group; empty while paused or when no row has a bias
        self._groups: dict[int, _BiasGroup] = {}
        self._active: dict[int, _BiasGroup] = {}
        self._pool: dict[tuple[frozenset[int], bool], _BiasGroup] = {}
        self._reserved: tuple[int, int, int, torch.dtype, torch.device] | None = None
        self._paused = False
        # Single-entry cache of the last combined mask, so the layers of one group reuse one mask
        # within a forward pass. Identity-checked on the group and the attention mask object.
        self._cache_key: tuple | None = None
        self._cache_mask_ref: torch.Tensor | None = None
        self._cache_value: torch.Tensor | None = None

    # --- setting plans --------------------------------------------------------------------

    def set_plan(self, plan: AttentionPlan | None) -> None:
        """One plan for every row (None/{} = no bias anywhere); key positions are cache columns."""
        self.set_rows([plan], [0])

    def set_rows(self, plans: list[AttentionPlan | None], offsets: list[int]) -> None:
        """Each batch row's plan and the cache column of its position 0 (its left padding)."""
        if len(plans) != len(offsets):
            raise ValueError(f"{len(plans)} plans for {len(offsets)} offsets")
        self._plans = [dict(plan or {}) for plan in plans]
        self._rows = [normalise_plan(plan) for plan in plans]
        self._offsets = [int(o) for o in offsets]
        self._regroup()

    def set_row_plan(self, row: int, plan: AttentionPlan | None) -> None:
        """Replace one row's plan (its offset is kept); only that row of each buffer is rewritten."""
        self._plans[row] = dict(plan or {})
        self._rows[row] = normalise_plan(plan)
        self._regroup()

    @property
    def plan(self) -> AttentionPlan:
        """The plan of the first row (the one given to ``set_plan``), a copy."""
        return self.row_plan(0) if self._plans else {}

    def row_plan(self, row: int) -> AttentionPlan:
        """Row ``row``'s plan as given, a copy."""
        return {layer: list(biases or ()) for layer, biases in self._plans[row].items()}

    @property
    def groups(self) -> dict[int, _BiasGroup]:
        """Layer index -> the group whose buffer that layer reads (layers without bias are absent)."""
        return dict(self._groups)

    def reserve(self, rows: int, num_heads: int, columns: int, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate every group's buffer (now and later) for ``rows`` rows and ``columns`` keys, so none grows."""
        self._reserved = (rows, num_heads, columns, dtype, device)
        for group in self._pool.values():
            group.allocate(rows, num_heads, columns, dtype, device)
        self.flush()

    def flush(self) -> None:
        """Write every pending row change into the buffers now (a forward pass would do it on first read)."""
        for group in set(self._groups.values()):
            if group.buffer is not None:
                group.flush()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No bias anywhere inside (a new row's own prefill while the batch's plans are set)."""
        self._paused, self._active = True, {}
        self.clear_cache()
        try:
            yield
        finally:
            self._paused, self._active = False, self._groups
            self.clear_cache()

    def clear_cache(self) -> None:
        self._cache_key = None
        self._cache_mask_ref = None
        self._cache_value = None

    def _regroup(self) -> None:
        """Group layers by the tuple of their per-row entries; reuse pooled groups; mark changed rows."""
        rows, offsets = self._rows, self._offsets
        layers: set[int] = set()
        for entries in rows:
            layers.update(entries)
        by_signature: dict[tuple, list[int]] = {}
        for layer in sorted(layers):
            by_signature.setdefault(tuple(entries.get(layer) for entries in rows), []).append(layer)
        groups: dict[int, _BiasGroup] = {}
        for signature, members in by_signature.items():
            per_head = any(kb.heads is not None for entry in signature if entry for kb in entry)
            key = (frozenset(members), per_head)
            group = self._pool.get(key)
            if group is None:
                group = self._pool[key] = _BiasGroup(per_head)
                if self._reserved is not None:
                    r_rows, heads, columns, dtype, device = self._reserved
                    group.allocate(max(r_rows, len(rows)), heads, columns, dtype, device)
            group.assign(list(signature), offsets)
            for layer in members:
                groups[layer] = group
        self._groups = groups
        self._active = {} if self._paused else groups
        self.clear_cache()


def _bias_columns(
    biases: tuple[KeyBias, ...], num_heads: int, kv_length: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Bias over key columns of one row: ``[1, 1, 1, K]``, or ``[1, H, 1, K]`` when some bias selects heads."""
    group = _BiasGroup(any(kb.heads is not None for kb in biases))
    group.assign([biases], [0])
    group.allocate(1, num_heads, kv_length, dtype, device)
    group.flush()
    return group.buffer  # type: ignore[return-value]


def _combined_mask(
    biases: tuple[KeyBias, ...],
    attention_mask: torch.Tensor | None,
    causal: bool,
    query: torch.Tensor,
    key: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float additive mask = causal/padding part (0 or dtype min) + bias at the target key columns.

    ``bias`` is the precomputed bias columns (``[1 or B, 1 or H, 1, K]``, from a
    :class:`_BiasGroup`); built from ``biases`` here when None.
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
    group = None if controller is None else controller._active.get(getattr(module, "layer_idx", None))
    if group is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    one_query = query.shape[2] == 1 and not any(kwargs.get(k) for k in _NEEDS_TRANSFORMERS)
    if attention_mask is None and one_query:
        # One new token per row over a cache with no padding: it sees every key, so the bias
        # columns are the whole mask.
        mask = group.columns(query.shape[1], key.shape[2], query.dtype, query.device)
        return _one_query_attention(query, key, value, mask, dropout, scaling)

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    cache_key = (
        group,
        attention_mask is None,
        bool(causal),
        query.shape[0],
        query.shape[1],
        query.shape[2],
        key.shape[2],
        query.dtype,
        query.device,
    )
    cached = controller._cache_key
    if (
        cached is not None
        and cached[0] is group
        and controller._cache_mask_ref is attention_mask
        and cached[1:] == cache_key[1:]
    ):
        mask = controller._cache_value
    else:
        bias = group.columns(query.shape[1], key.shape[2], query.dtype, query.device)
        mask = _combined_mask((), attention_mask, bool(causal), query, key, bias)
        controller._cache_key = cache_key
        controller._cache_mask_ref = attention_mask
        controller._cache_value = mask
    if one_query:
        return _one_query_attention(query, key, value, mask, dropout, scaling)
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
def biased_attention(model, controller: BiasController | None = None) -> Iterator[BiasController]:
    """Switch `model` to ATTENTION_NAME for the duration (and restore its previous attn implementation after, even on error); yield a controller whose plan the attention function reads.

    Pass ``controller`` to attach an existing one again (its plans and buffers kept), e.g. when a
    generator leaves the context around each ``yield``.
    """
    register_attention()
    controller = controller if controller is not None else BiasController()
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

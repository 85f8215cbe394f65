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

Where the bias lives, in one of two layouts:

* **Grouped** (the eager path, the default): one buffer per *layer group* (layers that read equal
  entries in every row share one), ``[rows, 1 or H, 1, capacity]``, written in place when a row's
  plan changes (only that row), read by the attention function as a view. Which layers read
  which group changes with the plan, which costs nothing eagerly.
* **Fixed** (:meth:`BiasController.fix`, the static-cache/compiled path of
  :mod:`reempathy.decoding.static`): one preallocated tensor ``[layers, rows, H, 1, columns]``
  whose slot ``[layer]`` every decoder layer reads on every call, planned or not (a layer without
  a plan reads zeros). A plan change rewrites the changed row's slots in place, at once; nothing
  the attention function reads in Python (which layers are planned, groups, shapes) changes at a
  phase change, so a compiled graph never recompiles there and a CUDA graph replays reading the
  same tensor. Per head always, so that a plan that starts selecting heads changes no shape.
* **Ranges** (:meth:`BiasController.fix_ranges`, ``attention = "flex"`` on the static path): no
  dense bias at all. Per layer and row, up to ``E`` key ranges ``[start, end)`` (already shifted by
  the row's padding) and, per head, the value each range adds: ``spans [layers, rows, E, 2]``
  (int64) and ``values [layers, rows, H, E]`` (the model's dtype). Inside a compiled graph the
  attention runs in FlexAttention's fused kernel with a ``score_mod`` that adds, for key ``kv``,
  ``values[h, e]`` for every range ``e`` holding ``kv`` (and applies transformers' own mask), so
  no ``[rows, H, 1, columns]`` bias is ever read. Outside a graph (the prefill, an uncompiled
  static cache) the same ranges are expanded to bias columns and go through SDPA as in the fixed
  layout: eager FlexAttention materialises every score through ``vmap`` and costs 100-1000 times
  what SDPA does (docs/performance.md). A plan with more ranges in one layer than ``E`` grows the
  tensors (doubling), which compiles that graph once more; ``E`` starts at
  :data:`RANGE_CAPACITY`, which the built-in reweighting (one range per layer) never exceeds.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from reempathy.decoding.transfer import to_device
from reempathy.errors import NotAvailableError

__all__ = [
    "ATTENTION_KINDS",
    "ATTENTION_NAME",
    "AttentionPlan",
    "BiasController",
    "KeyBias",
    "biased_attention",
    "normalise_plan",
    "register_attention",
]

ATTENTION_NAME = "reempathy_sdpa"

ATTENTION_KINDS = ("sdpa-bias", "flex")
"""How the static path carries a plan: a dense bias in SDPA's mask (the reference), or key ranges in FlexAttention."""
RANGE_CAPACITY = 2
"""Key ranges per layer and row that the ranges layout holds before its tensors grow."""

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


def _fill_row(row: torch.Tensor, entries: tuple[KeyBias, ...] | None, offset: int) -> None:
    """Add ``entries`` to one row's bias ``[1 or H, 1, capacity]`` (zeroed by the caller), shifted by ``offset``."""
    capacity = row.shape[-1]
    for kb in entries or ():
        start, end = max(offset + int(kb.start), 0), min(offset + int(kb.end), capacity)
        if end <= start:
            continue
        if kb.heads is None:
            row[..., start:end] += kb.bias
        else:
            for head in kb.heads:  # one by one, so a repeated head adds its bias twice, as written
                row[head, :, start:end] += kb.bias


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
        for r in self.dirty:
            row = buf[r]
            row.zero_()
            _fill_row(row, self.entries[r], self.offsets[r])
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
        buf = self.buffer
        # One slice (not two) in the usual case, where every buffer row is a row of the batch.
        view = buf.narrow(-1, 0, kv_length) if buf.shape[0] == rows else buf[:rows, ..., :kv_length]  # type: ignore[union-attr,index]
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
    finds the same tensor. :meth:`reserve` allocates every group buffer at its final size up front.

    The static-cache/compiled path binds one fixed tensor instead (:meth:`fix`): every layer reads
    its own slot of it on every call, and plan changes are written into it at once, so what a
    compiled graph reads never changes in Python, only in the tensor's contents.
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
        # The fixed layout: [layers, rows, H, 1, columns], read by every layer (None: grouped layout).
        self._fixed: torch.Tensor | None = None
        # The ranges layout: spans [layers, rows, E, 2] and values [layers, rows, H, E] (None: another layout).
        self._spans: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        # ... with each row's first visible column [rows] and the write head (0-dim), both int64.
        self._first: torch.Tensor | None = None
        self._head: torch.Tensor | None = None
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
        if self._fixed is not None:
            self._write_fixed(range(self._fixed.shape[1]))
        elif self._spans is not None:
            self._write_ranges(range(self._spans.shape[1]))
        else:
            self._regroup()

    def set_row_plan(self, row: int, plan: AttentionPlan | None) -> None:
        """Replace one row's plan (its offset is kept); only that row of each buffer is rewritten."""
        self._plans[row] = dict(plan or {})
        self._rows[row] = normalise_plan(plan)
        if self._fixed is not None:
            self._write_fixed((row,))
        elif self._spans is not None:
            self._write_ranges((row,))
        else:
            self._regroup()

    # --- the fixed layout (static shapes, compiled graphs) -------------------------------------

    def fix(self, buffer: torch.Tensor) -> None:
        """Read the bias from ``buffer`` (``[layers, rows, heads, 1, columns]``) from now on: layer ``i`` reads ``buffer[i]``.

        The buffer is the caller's (preallocated once per static shape and reused); the current
        plans are written into it now, and every later plan change at once, in place. A batch
        forwarded must have exactly ``rows`` rows over exactly ``columns`` keys (a static cache).
        """
        if buffer.dim() != 5 or buffer.shape[3] != 1:
            raise ValueError(f"a fixed bias buffer is [layers, rows, heads, 1, columns], got {tuple(buffer.shape)}")
        self._fixed = buffer
        self._groups, self._active = {}, {}
        self.clear_cache()
        self._write_fixed(range(buffer.shape[1]))

    @property
    def fixed(self) -> torch.Tensor | None:
        """The fixed bias tensor every layer reads, or None in the grouped layout."""
        return self._fixed

    def _write_fixed(self, rows: Any) -> None:
        """Rewrite ``rows`` of the fixed tensor from their plans: zero every layer's slot, then add the entries."""
        fixed = self._fixed
        assert fixed is not None
        layers = fixed.shape[0]
        for r in rows:
            fixed[:, r].zero_()
            if r >= len(self._rows):
                continue
            # Layers with equal entries are written once, then copied: a plan usually repeats one
            # entry over many layers (the built-in reweighting: the middle half of the model).
            by_entry: dict[tuple[KeyBias, ...], list[int]] = {}
            for layer, entry in self._rows[r].items():
                if 0 <= layer < layers:
                    by_entry.setdefault(entry, []).append(layer)
            for entry, members in by_entry.items():
                first = fixed[members[0], r]
                _fill_row(first, entry, self._offsets[r])
                if len(members) > 1:
                    rest = members[1:]
                    if rest[-1] - rest[0] == len(rest) - 1:  # consecutive layers (the usual plan): a broadcast copy
                        fixed[rest[0] : rest[-1] + 1, r] = first
                    else:  # the index queued without a device round trip (transfer.py)
                        index = to_device(rest, fixed.device)
                        source = first.unsqueeze(0).expand(len(rest), *first.shape).clone()
                        fixed[:, r].index_copy_(0, index, source)

    # --- the ranges layout (attention = "flex") --------------------------------------------------

    def fix_ranges(self, spans: torch.Tensor, values: torch.Tensor) -> None:
        """Read the bias as key ranges from now on: ``spans [layers, rows, E, 2]`` (int64), ``values [layers, rows, H, E]``.

        As :meth:`fix`, the tensors are the caller's and are written in place at every plan change;
        a plan with more than ``E`` ranges in one layer replaces them with tensors of twice the
        capacity (read through :attr:`ranges`).
        """
        if spans.dim() != 4 or spans.shape[-1] != 2 or values.dim() != 4 or values.shape[:2] != spans.shape[:2]:
            raise ValueError(
                f"ranges are spans [layers, rows, E, 2] and values [layers, rows, heads, E], got "
                f"{tuple(spans.shape)} and {tuple(values.shape)}"
            )
        if values.shape[-1] != spans.shape[2]:
            raise ValueError(f"spans hold {spans.shape[2]} ranges per layer and row, values {values.shape[-1]}")
        self._spans, self._values = spans, values
        self._first = torch.zeros(spans.shape[1], dtype=torch.long, device=spans.device)
        self._head = torch.zeros((), dtype=torch.long, device=spans.device)
        for t in (self._first, self._head):
            torch._dynamo.mark_static_address(t)
        self._groups, self._active = {}, {}
        self.clear_cache()
        self._write_ranges(range(spans.shape[1]))

    def sync_head(self, cache: Any) -> None:
        """Copy the static ``cache``'s write head (its length, on the device) for the next compiled call; no host round trip.

        In the ranges layout a compiled graph computes which keys a row sees from this head and
        each row's first column (its offset) instead of reading a mask: call this before every
        compiled step. (The cache's own counter cannot be read inside the graph: the first layer
        advances it before its attention runs.)
        """
        if self._head is not None:
            self._head.copy_(cache.layers[0].cumulative_length)

    @property
    def ranges(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(spans, values)`` of the ranges layout, or None in another layout."""
        return None if self._spans is None else (self._spans, self._values)  # type: ignore[return-value]

    def _write_ranges(self, rows: Any) -> None:
        """Rewrite ``rows`` of the range tensors from their plans: one host-built row, one copy per tensor.

        A range is ``[offset + start, offset + end)`` clipped below at 0; a range on selected heads
        adds its bias to those heads' values only (a head listed twice adds it twice, as in the dense
        layouts). Entries that clip to nothing are left out.
        """
        spans, values = self._spans, self._values
        assert spans is not None and values is not None
        layers, heads = spans.shape[0], values.shape[2]
        rows = list(rows)
        need = 0
        per_row: list[dict[int, list[tuple[int, int, float, tuple[int, ...] | None]]]] = []
        for r in rows:
            kept: dict[int, list[tuple[int, int, float, tuple[int, ...] | None]]] = {}
            if r < len(self._rows):
                offset = self._offsets[r]
                for layer, entry in self._rows[r].items():
                    if not 0 <= layer < layers:
                        continue
                    ranges = []
                    for kb in entry:
                        start, end = max(offset + int(kb.start), 0), offset + int(kb.end)
                        if end > start:
                            ranges.append((start, end, float(kb.bias), kb.heads))
                    if ranges:
                        kept[layer] = ranges
                        need = max(need, len(ranges))
            per_row.append(kept)
        if need > spans.shape[2]:
            self._grow_ranges(need)
            self._write_ranges(range(self._spans.shape[1]))  # type: ignore[union-attr]
            return
        capacity = spans.shape[2]
        first = [self._offsets[r] if r < len(self._offsets) else 0 for r in rows]
        if rows == list(range(spans.shape[1])):
            self._first.copy_(_pinned(torch.tensor(first, dtype=torch.long), spans.device), non_blocking=True)  # type: ignore[union-attr]
        else:
            for r, offset in zip(rows, first):
                self._first[r] = offset  # type: ignore[index]
        for r, kept in zip(rows, per_row):
            host_spans = torch.zeros(layers, capacity, 2, dtype=spans.dtype)
            host_values = torch.zeros(layers, heads, capacity, dtype=torch.float64)
            for layer, ranges in kept.items():
                for e, (start, end, bias, selected) in enumerate(ranges):
                    host_spans[layer, e, 0], host_spans[layer, e, 1] = start, end
                    if selected is None:
                        host_values[layer, :, e] += bias
                    else:
                        for head in selected:
                            host_values[layer, head, e] += bias
            spans[:, r].copy_(_pinned(host_spans, spans.device), non_blocking=True)
            values[:, r].copy_(_pinned(host_values.to(values.dtype), values.device), non_blocking=True)

    def _grow_ranges(self, need: int) -> None:
        """Replace the range tensors by ones of at least ``need`` ranges (doubling); the rows are rewritten by the caller."""
        spans, values = self._spans, self._values
        assert spans is not None and values is not None
        capacity = spans.shape[2]
        while capacity < need:
            capacity *= 2
        layers, rows, heads = spans.shape[0], spans.shape[1], values.shape[2]
        self._spans = torch.zeros(layers, rows, capacity, 2, dtype=spans.dtype, device=spans.device)
        self._values = torch.zeros(layers, rows, heads, capacity, dtype=values.dtype, device=values.device)
        for t in (self._spans, self._values):
            torch._dynamo.mark_static_address(t)

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
        """Write every pending row change into the buffers now (a forward pass would do it on first read; the fixed layout is always written)."""
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


def _pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (on the host) in pinned memory for a CUDA ``device``, so that a ``non_blocking`` copy there queues without waiting."""
    return t.pin_memory() if device.type == "cuda" else t


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


def _plain(kwargs: dict[str, Any]) -> bool:
    """True when none of :data:`_NEEDS_TRANSFORMERS` is set (absent, or falsy) in an attention call's ``kwargs``."""
    return _NEEDS_TRANSFORMERS.isdisjoint(kwargs) or not any(kwargs.get(k) for k in _NEEDS_TRANSFORMERS)


def _one_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    dropout: float,
    scaling: float | None,
) -> tuple[torch.Tensor, None]:
    """SDPA for one query with a float mask, called as transformers' ``sdpa_attention_forward`` calls it.

    Same kernel inputs (GQA folded into the query rows, the mask shared or split per KV group),
    without that function's per-call checks, which cost more than the small attention itself on a
    small model: this runs once per planned layer per token. The output ``[B, KV heads, n_rep,
    D]`` already has the memory layout of ``[B, 1, heads, D]`` (one query), so a single view
    replaces transformers' reshape, transpose and ``contiguous``.
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
    return out.reshape(batch, 1, heads, value.shape[-1]), None


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
    # The order of the checks is the order of frequency: this runs for every layer of every step.
    sdpa_attention_forward = _sdpa_forward
    controller = module.__dict__.get(_CONTROLLER_ATTR)
    if controller is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    group = controller._active.get(module.layer_idx)  # empty while paused and in the fixed and ranges layouts
    if group is None:
        if not controller._paused:
            if controller._fixed is not None:
                return _fixed_bias_attention(
                    controller._fixed, module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
                )
            if controller._spans is not None:
                return _ranges_attention(
                    controller, module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
                )
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    one_query = query.shape[2] == 1 and _plain(kwargs)
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


def _fixed_bias_attention(
    fixed: torch.Tensor,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    is_causal: bool | None,
    **kwargs,
):
    """The fixed layout: this layer's slot of the fixed tensor joins the mask, planned or not (zeros then).

    Traced into a compiled graph as it stands: it reads only tensors (the slot is a view of the
    same tensor on every call) and shapes that a static cache keeps.
    """
    bias = fixed[module.layer_idx]
    if bias.shape[0] != query.shape[0] or bias.shape[-1] != key.shape[2]:
        raise RuntimeError(
            f"the fixed attention bias is for {bias.shape[0]} rows x {bias.shape[-1]} keys, the call has "
            f"{query.shape[0]} rows x {key.shape[2]} keys: the fixed layout needs the static cache it was made for"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = _combined_mask((), attention_mask, bool(causal), query, key, bias.to(query.dtype))
    if query.shape[2] == 1 and _plain(kwargs):
        return _one_query_attention(query, key, value, mask, dropout, scaling)
    return _sdpa_forward(  # type: ignore[misc]
        module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def _ranges_attention(
    controller: BiasController,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    is_causal: bool | None,
    **kwargs,
):
    """The ranges layout: FlexAttention with a ``score_mod`` inside a compiled graph, SDPA over the expanded ranges outside one.

    Every layer reads its own slot of the range tensors on every call (zeros: no range), so that,
    as in the fixed layout, nothing a graph was traced with changes at a phase change. Inside a
    graph the keys a row sees come from the controller (each row's first column, the write head
    that :meth:`BiasController.sync_head` copied from the cache before the call), not from
    transformers' mask.
    """
    layer = module.layer_idx
    spans, values = controller._spans[layer], controller._values[layer]  # type: ignore[index]
    if spans.shape[0] != query.shape[0]:
        raise RuntimeError(
            f"the attention ranges are for {spans.shape[0]} rows, the call has {query.shape[0]}: the ranges "
            "layout needs the static cache it was made for"
        )
    extra = [] if _plain(kwargs) else [k for k in _NEEDS_TRANSFORMERS if kwargs.get(k)]
    if extra or dropout:
        raise NotAvailableError(
            f"attention = \"flex\" cannot honour {', '.join(extra) or 'attention dropout'} in this model's attention; "
            'set decode.attention = "sdpa-bias"'
        )
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if torch.compiler.is_compiling():
        first, head = controller._first, controller._head
        return _flex_attention(query, key, value, spans, values, first, head, scaling)  # type: ignore[arg-type]
    bias = _range_columns(spans, values, key.shape[2]).to(query.dtype)
    mask = _combined_mask((), attention_mask, causal, query, key, bias)
    if query.shape[2] == 1:
        return _one_query_attention(query, key, value, mask, dropout, scaling)
    return _sdpa_forward(  # type: ignore[misc]
        module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def _range_columns(spans: torch.Tensor, values: torch.Tensor, kv_length: int) -> torch.Tensor:
    """The bias columns ``[rows, H, 1, K]`` that ranges ``spans [rows, E, 2]`` with ``values [rows, H, E]`` add."""
    columns = torch.arange(kv_length, device=spans.device)
    inside = (columns >= spans[..., :1]) & (columns < spans[..., 1:])  # [rows, E, K]
    return torch.matmul(values, inside.to(values.dtype)).unsqueeze(2)


def _flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spans: torch.Tensor,
    values: torch.Tensor,
    first: torch.Tensor,
    head: torch.Tensor,
    scaling: float | None,
) -> tuple[torch.Tensor, None]:
    """FlexAttention with the ranges and the static cache's visibility in one ``score_mod``: the fused kernel, no dense tensor.

    Row ``b`` sees the keys ``first[b] <= kv <= head + q`` (its own columns up to query ``q``'s,
    which sits ``q`` columns after the write head: a static cache's left-padded rows sharing one
    head, causal within a multi-token step): exactly the mask transformers builds for that cache,
    computed from indices rather than read, so the kernel reads nothing per score but the keys.
    (Reading transformers' mask, a tensor computed inside the graph, would also fail to build on
    CPU: inductor's C++ FlexAttention template accepts only graph inputs in a ``score_mod``.)
    """
    from torch.nn.attention.flex_attention import flex_attention

    ranges = spans.shape[1]
    hidden = float("-inf")

    def score_mod(score, b, h, q, kv):
        for e in range(ranges):
            inside = (kv >= spans[b, e, 0]) & (kv < spans[b, e, 1])
            score = score + torch.where(inside, values[b, h, e], 0.0)
        seen = (kv >= first[b]) & (kv <= head + q)
        return torch.where(seen, score, hidden)

    out = flex_attention(
        query, key, value, score_mod=score_mod, enable_gqa=query.shape[1] != key.shape[1], scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


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

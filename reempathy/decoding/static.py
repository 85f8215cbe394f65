"""The static-shape decode path: KV caches and bias tensors kept per shape, decode steps through compiled graphs.

Both loops take this path with ``cache = "static"`` (and ``compile = true`` for the compiled
steps). What it guarantees: every decode step of every answer, at a phase change as anywhere
else, runs on a graph compiled (and, on CUDA, captured) once per shape, and reads the attention
bias from a tensor updated in place. Nothing a graph reads in Python changes within a shape.

Where it decides:

* **Shapes** (:func:`columns_for`, :func:`rows_for`): the key columns of a cache are rounded up to a
  multiple of :data:`COLUMN_BUCKET` (an answer needs prompt + 2 × budget: forced tokens need room
  too), batch rows to a power of two (capped at the batch size). A test set whose prompts differ
  in length then shares a few shapes instead of compiling one graph per prompt length.
* **Step widths**: a step feeds one token per row, or two (the sampled token and a forced
  delimiter, in the single-row loop); more pending tokens go through in several steps. So there
  are at most two graphs per shape, and built-in strategies (which force one delimiter at a
  time) never pay an extra forward call for a phase change.
* **What is kept per model** (:class:`StaticEngine`, one per model, on the model): the compiled
  call; per shape a pool of :class:`StaticSlot` (a transformers ``StaticCache``, per attention
  kind a :class:`~reempathy.decoding.attention.BiasController` with its tensors — the fixed dense
  bias for ``"sdpa-bias"``, the key ranges for ``"flex"`` — and a batch's mask and positions). A slot is leased for one answer (or one batch) and reset, never reallocated, so a
  later answer of the same shape reads the same tensors: no recompile, and on CUDA the captured
  graphs replay as they are (their inputs keep their addresses).
* **How it compiles** (:meth:`StaticEngine.compiled`): ``torch.compile`` of the model's call with
  ``dynamic=False`` (one graph per shape, never a symbolic one that would guard on sizes), mode
  ``reduce-overhead`` (CUDA graphs) on CUDA and inductor's default elsewhere. The dynamo
  recompile limit is raised to :data:`RECOMPILE_LIMIT`: each shape, step width and attention
  variant is one cache entry of the same code object, and at the default limit of 8 dynamo would
  silently fall back to eager.

The prefill is never compiled (its length differs per prompt); it runs eagerly, into the static
cache (single row) or a row's own cache (batch, then copied in).

**The attention kind** (``LoopOptions.attention``, ``[decode] attention``): ``"sdpa-bias"`` (the
reference) adds the plan as a dense bias ``[layers, rows, heads, 1, columns]`` to SDPA's mask;
``"flex"`` keeps it as key ranges and runs the compiled steps' attention in FlexAttention's fused
kernel (:mod:`reempathy.decoding.attention`, the ranges layout). A flex step must be called
through :meth:`StaticEngine.stepper`, which copies the cache's write head for the graph first.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from reempathy.errors import NotAvailableError

COLUMN_BUCKET = 256
"""Cache columns are a multiple of this (or the model's whole context, if smaller)."""
STEP_WIDTHS = (1, 2)
"""Tokens per row one decode step may feed; more pending tokens are fed in several steps."""
RECOMPILE_LIMIT = 64
"""Graphs dynamo keeps per code object (shapes × step widths × attention variants × models) before giving up."""

_ENGINE_ATTR = "_reempathy_static_engine"


def columns_for(need: int, max_context: int) -> int:
    """Cache columns for ``need`` positions: rounded up to a multiple of :data:`COLUMN_BUCKET`, at most ``max_context``."""
    bucketed = -(-max(need, 1) // COLUMN_BUCKET) * COLUMN_BUCKET
    return max(min(bucketed, max_context), min(need, max_context))


def rows_for(rows: int, batch_size: int) -> int:
    """Batch rows for ``rows`` live rows: the next power of two, at most ``batch_size``."""
    bucket = 1
    while bucket < rows:
        bucket *= 2
    return max(min(bucket, batch_size), rows)


def split_widths(n: int) -> list[int]:
    """How ``n`` pending tokens go through the step graphs: widths from :data:`STEP_WIDTHS`, largest first."""
    widest = STEP_WIDTHS[-1]
    return [widest] * (n // widest) + ([n % widest] if n % widest else [])


@dataclass(eq=False)
class StaticSlot:
    """The tensors of one static shape, leased to one answer or batch at a time.

    ``cache`` is a transformers ``StaticCache`` of ``rows`` x ``columns``; ``controllers`` holds,
    per attention kind a planning answer leased the slot with, its bias controller (and tensors),
    and ``controller`` the one of the current lease (None when it plans nothing); ``mask``
    (``[rows, columns]`` bool, True where a row's keys are) and ``positions`` (``[rows, 1]``, each
    row's next position) are the batched loop's per-row padding and positions, updated in place.
    """

    rows: int
    columns: int
    cache: Any
    controller: Any = None
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    busy: bool = False
    controllers: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        """Empty the cache (its tensors kept) and clear every row's plan."""
        self.cache.reset()
        for controller in self.controllers.values():
            controller.set_rows([None] * self.rows, [0] * self.rows)

    def set_length(self, length: int) -> None:
        """Move the write head to ``length`` (in place: the graphs read these tensors)."""
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(length)


class StaticEngine:
    """One model's static path: its compiled call and a pool of slots per shape."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.backend = "inductor"
        """``torch.compile`` backend of the step graphs; set before the first compiled step (tests and smoke runs may use "eager")."""
        self._compiled: Any = None
        self._pool: dict[tuple[int, int], list[StaticSlot]] = {}

    def compiled(self) -> Any:
        """The model's call compiled for static shapes (built once per model)."""
        if self._compiled is None:
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 8 * RECOMPILE_LIMIT)
            cuda = self.model.device.type == "cuda"
            mode = "reduce-overhead" if cuda and self.backend == "inductor" else None
            self._compiled = torch.compile(self.model.__call__, backend=self.backend, mode=mode, dynamic=False)
        return self._compiled

    def acquire(self, rows: int, columns: int, bias: bool, attention: str = "sdpa-bias") -> StaticSlot:
        """A reset slot of ``rows`` x ``columns`` (with an ``attention``-kind bias controller when ``bias``); :meth:`release` it after."""
        slots = self._pool.setdefault((rows, columns), [])
        slot = next((s for s in slots if not s.busy), None)
        if slot is None:  # a new shape, or the same shape in use twice at once (interleaved generators)
            _check_full_attention(self.model)
            slot = StaticSlot(rows, columns, StaticCache(config=self.model.config, max_cache_len=columns))
            slots.append(slot)
        slot.busy = True
        slot.controller = None
        with torch.inference_mode():  # the slot's tensors are inference tensors (the loops decode in that mode)
            slot.reset()
            if bias:
                self.with_bias(slot, attention)
        return slot

    def release(self, slot: StaticSlot) -> None:
        """Give ``slot`` back to the pool (its tensors are kept for the next answer of its shape)."""
        slot.busy = False

    @contextlib.contextmanager
    def lease(self, rows: int, columns: int, bias: bool, attention: str = "sdpa-bias") -> Iterator[StaticSlot]:
        """:meth:`acquire` for the duration of a ``with`` block."""
        slot = self.acquire(rows, columns, bias, attention)
        try:
            yield slot
        finally:
            self.release(slot)

    def with_bias(self, slot: StaticSlot, attention: str = "sdpa-bias") -> Any:
        """``slot``'s bias controller of kind ``attention`` (made, all zeros, on first need), now its current one."""
        controller = slot.controllers.get(attention)
        if controller is None:
            controller = slot.controllers[attention] = self._controller(slot.rows, slot.columns, attention)
        slot.controller = controller
        return controller

    def stepper(self, slot: StaticSlot, compiled: bool) -> Callable[..., Any]:
        """What the loops call for ``slot``'s decode steps: the compiled call (or the model), after the head copy flex needs.

        In the ranges layout (``attention = "flex"``) the graph reads the cache's write head from
        the controller, so each call first copies it there (one device-side copy, no sync).
        """
        call = self.compiled() if compiled else self.model
        controller = slot.controller
        if controller is None or controller.ranges is None:
            return call

        def step(**kwargs: Any) -> Any:
            controller.sync_head(slot.cache)
            return call(**kwargs)

        return step

    def _controller(self, rows: int, columns: int, attention: str) -> Any:
        from reempathy.decoding.attention import RANGE_CAPACITY, BiasController

        config = self.model.config.get_text_config(decoder=True)
        layers, heads = int(config.num_hidden_layers), int(config.num_attention_heads)
        device, dtype = self.model.device, self.model.dtype
        controller = BiasController()
        if attention == "flex":
            spans = torch.zeros(layers, rows, RANGE_CAPACITY, 2, dtype=torch.long, device=device)
            values = torch.zeros(layers, rows, heads, RANGE_CAPACITY, dtype=dtype, device=device)
            for t in (spans, values):
                torch._dynamo.mark_static_address(t)
            controller.fix_ranges(spans, values)
            return controller
        buffer = torch.zeros(layers, rows, heads, 1, columns, dtype=dtype, device=device)
        # Read by every replay of the step graphs, never reallocated: CUDA graphs need not copy it in.
        torch._dynamo.mark_static_address(buffer)
        controller.fix(buffer)
        return controller


def engine(model: Any) -> StaticEngine:
    """The model's :class:`StaticEngine` (made on first use and kept on the model)."""
    found = model.__dict__.get(_ENGINE_ATTR)
    if found is None:
        found = model.__dict__[_ENGINE_ATTR] = StaticEngine(model)
    return found


def _check_full_attention(model: Any) -> None:
    """Refuse caches whose layers are not plain full attention (sliding windows, linear attention)."""
    probe = StaticCache(config=model.config, max_cache_len=1)
    for layer in probe.layers:
        if type(layer) is not StaticLayer:
            raise NotAvailableError(
                f"the static decode path needs full-attention KV cache layers; this model has "
                f"{type(layer).__name__} layers (sliding window or linear attention): set "
                'decode.cache = "dynamic" and decode.compile = false'
            )


__all__ = [
    "COLUMN_BUCKET",
    "RECOMPILE_LIMIT",
    "STEP_WIDTHS",
    "StaticEngine",
    "StaticSlot",
    "columns_for",
    "engine",
    "rows_for",
    "split_widths",
]

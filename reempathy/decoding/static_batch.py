"""The batched loop on a static cache: the rows of :mod:`reempathy.decoding.batch` in fixed shapes.

Everything about rows (their sessions, plugins, phases, plans, sampling, refilling slots as rows
finish) is the batched loop's own code; this subclass changes only where the keys live and what
a step feeds, so that every step runs on a graph compiled once per shape
(:mod:`reempathy.decoding.static`).

Where it decides:

* **The shape** (:meth:`_StaticBatchLoop._fit`): ``rows`` is the next power of two of the rows
  in flight (at most the batch size), ``columns`` covers the longest row's prompt + 2 × budget,
  rounded up to a bucket. A shape only ever grows during a call (a longer prompt comes in):
  never shrinking means that the tail of a test set, where rows run out, compiles nothing; its
  idle slots cost a little compute instead (a decode step is bound by reading the weights,
  whatever the batch).
* **How refilled rows enter** (:meth:`_StaticBatchLoop._recompose`): rows share one write head
  (every step writes one column for every row, at the cache's length), so each row's keys are
  right-aligned at the head and left-padded, as in the dynamic batch. New rows are prefilled
  eagerly on caches of their own, as in the dynamic batch (together, up to ``prefill_rows`` per
  call; a row alone exactly as the single-row prefill), and their keys are copied into their
  slots, ending at the head. When the head must move (a new prompt longer than the head, or
  the longest row left and its padding can go), the kept rows' keys are shifted in place by the
  same number of columns, inside the same tensors. The alternative, giving each row its own write
  position, would need a per-row cache update that transformers' ``StaticCache`` does not do; a
  shift costs one copy of the cache per refill, next to a prefill that costs far more.
* **Padding and positions** are tensors of the slot updated in place: ``mask`` (``[rows,
  columns]``, True from a row's first key on; an idle slot sees only its own column) and
  ``positions`` (each row's own token count), passed to every step, so the graph's inputs keep
  their shapes and addresses.
* **Step width**: one token per row per step, always (a forced delimiter is that row's next
  input); in a batch the width-two step of the single-row loop would help only when every row
  had a delimiter pending at once, and would cost a second graph per batch shape.

The attention bias is the slot's fixed tensor (``[layers, rows, heads, 1, columns]``), or with
``attention = "flex"`` its key ranges, each row at its padding offset; a row's phase change
rewrites that row in place.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from transformers import DynamicCache

from reempathy.backbones.base import Backbone
from reempathy.decoding import static
from reempathy.decoding.batch import RowRequest, _BatchLoop
from reempathy.decoding.loop import LoopOptions
from reempathy.decoding.result import DecodeResult
from reempathy.decoding.row import Row
from reempathy.decoding.transfer import to_device


class _StaticBatchLoop(_BatchLoop):
    """:class:`_BatchLoop` over a static cache slot, stepping through the compiled graph when ``compile``."""

    def __init__(self, backbone: Backbone, options: LoopOptions, batch_size: int, prefill_rows: int = 8) -> None:
        super().__init__(backbone, options, batch_size, prefill_rows)
        self.engine = static.engine(self.model)
        self.slot: static.StaticSlot | None = None
        self.compiled = options.compile
        self.step_call = self.engine.compiled() if options.compile else self.model
        self.wants_bias = False
        self._stack: contextlib.ExitStack | None = None
        self._pad_id = int(backbone.layout.stop_ids[0])  # an idle slot's input: any token, never read

    # --- the generator and the bias ------------------------------------------------------------

    def run(self, requests: Iterator[RowRequest]) -> Iterator[tuple[Any, DecodeResult]]:
        try:
            yield from super().run(requests)
        finally:
            if self.slot is not None:
                self.engine.release(self.slot)
                self.slot = None

    def _advance(self, requests: Iterator[RowRequest], stack: contextlib.ExitStack) -> list:
        self._stack = stack  # where a controller made during this round is attached
        return super()._advance(requests, stack)

    def _attach(self, stack: contextlib.ExitStack) -> None:
        from reempathy.decoding.attention import biased_attention

        self.wants_bias = True
        if self.slot is None:
            return  # attached by _fit once the slot exists; prefills run without bias anyway
        self.controller = self.engine.with_bias(self.slot, self.options.attention)
        stack.enter_context(biased_attention(self.model, self.controller))

    def context_limit(self, prompt_ids: list[int]) -> int | None:
        """Prompt + 2 × budget, as the single-row loop on a static cache (forced tokens need room too)."""
        budget = min(self.options.max_new_tokens, self.backbone.max_context - len(prompt_ids))
        return min(self.backbone.max_context, len(prompt_ids) + 2 * max(budget, 1))

    # --- rows in and out -------------------------------------------------------------------------

    def _recompose(self, kept: list[int], new: list[tuple[Row, DynamicCache]]) -> None:
        """Kept rows to the first slots and new rows after them, every row's keys ending at the new head."""
        rows = self._take_rows(kept, new)
        if not rows:
            self.length = 0
            return
        lengths = [row.session.forwarded for row in rows]
        length = max(lengths)
        old_slot, old_length = self.slot, self.length
        slot = self._fit(rows)
        cache = slot.cache
        if not cache.layers[0].is_initialized:
            sample = new[0][1].layers if new else old_slot.cache.layers  # type: ignore[union-attr]
            cache.early_initialization(
                batch_size=slot.rows,
                num_heads=[layer.keys.shape[1] for layer in sample],
                head_dim=[layer.keys.shape[-1] for layer in sample],
                dtype=sample[0].keys.dtype,
                device=sample[0].keys.device,
            )
        keep = min(old_length, length)
        index = to_device(kept, self.device) if kept else None
        for n, layer in enumerate(cache.layers):
            for name in ("keys", "values"):
                target = getattr(layer, name)
                if index is not None and keep:
                    source = getattr(old_slot.cache.layers[n], name)  # type: ignore[union-attr]
                    moved = source.index_select(0, index)[:, :, old_length - keep : old_length]
                    target[: len(kept), :, length - keep : length] = moved
                for j, (_, row_cache) in enumerate(new):
                    part = getattr(row_cache.layers[n], name)[0]
                    target[len(kept) + j, :, length - part.shape[-2] : length] = part
        if old_slot is not None and old_slot is not slot:
            self.engine.release(old_slot)
        slot.set_length(length)
        self.length = length
        idle = slot.rows - len(rows)
        pads = [length - n for n in lengths] + [length] * idle  # an idle slot sees only its own next column
        columns = torch.arange(slot.columns, device=self.device)
        slot.mask.copy_(columns[None, :] >= to_device(pads, self.device)[:, None])  # type: ignore[union-attr]
        slot.positions.copy_(to_device(lengths + [0] * idle, self.device)[:, None])  # type: ignore[union-attr]
        if self.controller is not None:
            self.controller.set_rows([self.plans.get(row) for row in rows] + [None] * idle, pads)

    def _fit(self, rows: list[Row]) -> static.StaticSlot:
        """The slot for ``rows``: the current one if it is large enough, else a larger shape (kept rows copied over by the caller)."""
        need_rows = static.rows_for(len(rows), self.batch_size)
        need_columns = static.columns_for(max(row.context_limit for row in rows), self.backbone.max_context)
        slot = self.slot
        if slot is not None and slot.rows >= need_rows and slot.columns >= need_columns:
            return slot
        if slot is not None:
            need_rows, need_columns = max(need_rows, slot.rows), max(need_columns, slot.columns)
        fresh = self.engine.acquire(need_rows, need_columns, self.wants_bias, self.options.attention)
        if fresh.mask is None:
            fresh.mask = torch.zeros(need_rows, need_columns, dtype=torch.bool, device=self.device)
            fresh.positions = torch.zeros(need_rows, 1, dtype=torch.long, device=self.device)
            torch._dynamo.mark_static_address(fresh.mask)
            torch._dynamo.mark_static_address(fresh.positions)
        self.slot = fresh
        if self.wants_bias:
            from reempathy.decoding.attention import biased_attention

            self.controller = fresh.controller
            assert self._stack is not None
            self._stack.enter_context(biased_attention(self.model, self.controller))
        return fresh

    # --- stepping ----------------------------------------------------------------------------------

    def _step(self) -> None:
        """One token of every row (and of every idle slot) through the step graph."""
        rows, slot = self.rows, self.slot
        assert slot is not None
        if self.length + 1 > slot.columns:  # the shapes are chosen so that this cannot happen
            raise RuntimeError(f"static batch cache full: head {self.length} of {slot.columns} columns")
        ids = [[row.session.ids[row.session.forwarded]] for row in rows]
        ids += [[self._pad_id]] * (slot.rows - len(rows))
        kwargs: dict[str, Any] = {self.cache_kw: slot.cache}
        if slot.rows > 1:
            kwargs.update(attention_mask=slot.mask, position_ids=slot.positions)
        # else one row, never padded (the head is its own length): exactly the single-row loop's
        # call on the same pooled slot, so a batch of one reuses that loop's one-token graph.
        if self.controller is not None and self.controller.ranges is not None:
            self.controller.sync_head(slot.cache)  # the flex graph's view of the write head (static.StaticEngine.stepper)
        inputs = to_device(ids, self.device)  # queued without a host-device round trip
        out = self.step_call(input_ids=inputs, use_cache=True, logits_to_keep=1, **kwargs)
        self.length += 1
        slot.positions.add_(1)  # type: ignore[union-attr]
        logits = out.logits[: len(rows), -1]
        if self.compiled:
            logits = logits.clone()  # a CUDA-graph replay overwrites its output
        if logits.dtype != torch.float32:
            logits = logits.float()
        ready = []
        for i, row in enumerate(rows):
            row.forwarded(1)
            if not row.pending:
                self.ready[row] = logits[i]
                ready.append(row)
        self._last = (logits, ready) if len(ready) == len(rows) else None


__all__: list[str] = []

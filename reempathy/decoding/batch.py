"""Many answers at once: the batched loop the experiment runner decodes a test set through.

Each row is one record's answer with its own strategy and processor objects (built per row from
the same factories, since a strategy keeps per-answer state), its own session and per-session
plugin manager, its own phase, forced tokens, attention plan, stop, and its own sampling
generator seeded from the run seed and the record id (:func:`row_seed`), so that a record's
answer depends neither on its neighbours nor on the batch size. What happens to a row's sampled
token is the single-row loop's own code (:class:`reempathy.decoding.row.Row`); this module only
decides what goes through the model when.

Where it decides:

* **Rows in and out** (:meth:`_BatchLoop._refill`): a finished row's slot is *refilled* with the
  next request at once, and dropped only when the requests run out. Refilling keeps the batch
  full for a test set of thousands (dropping alone would leave the last, longest answers of each
  batch running nearly alone); answers of different lengths then cost no idle rows. The rows
  that enter at one refill are prefilled together (:meth:`_BatchLoop._prefill`, groups from
  :func:`prefill_groups`: up to ``prefill_rows`` per forward call, right-padded so that the call
  stays plainly causal and each row's keys and logits are those of its own prefill); a row alone,
  or one with ``prefill_inputs``, gets exactly the single-row prefill. Each new row's KV cache is
  then merged into the batch's.
* **Layout of the batch cache** (:meth:`_BatchLoop._recompose`): rows are right-aligned (left
  padding) in one ``DynamicCache``; the cache is rebuilt only when rows come or go, and trimmed
  then so that the longest row has no padding. Row ``r``'s position ``p`` sits in cache column
  ``pad_r + p``; the attention mask hides each row's padding and the position ids are each row's
  own token count. With no padding (one row, or rows of one length) neither is passed, so a batch
  of one makes exactly the single-row loop's calls.
* **What each row feeds** (:meth:`_BatchLoop._step`): every step forwards ``q`` tokens of every
  row, ``q`` the smallest number of pending tokens over the rows — 1 whenever some row has only
  its sampled token pending. A row's forced tokens are simply its next inputs, so the batch stays
  rectangular and nothing is re-encoded; a row samples only from the logits of its last pending
  token, and its ``forwarded`` counter grows by exactly what it fed.
* **Attention plans**: each row's plan goes to its rows of one bias tensor per layer group
  (:class:`reempathy.decoding.attention.BiasController`, ``set_rows`` / ``set_row_plan``), shifted by
  the row's padding.

:func:`decode_batch` yields ``(key, result)`` as rows finish, not in the order the requests came
in; it reads ``requests`` lazily (at most ``batch_size`` ahead). The model's attention is switched
to the biased implementation only while the loop runs (never across a ``yield``). An error of one
row (``PluginFailure``, ``DecodeError``, ``InputError`` naming the record) ends the whole call;
results yielded before it stand.

**Continuous batching** (the server's scheduler, :mod:`reempathy.serve.scheduler`) uses three
additions that change nothing for a plain iterable of requests: a source may yield :data:`WAIT`
("nothing new right now": the running rows go on, and the source is asked again at the next step
boundary), and a :class:`BatchControl` passed to :func:`decode_batch` cancels rows at the next step
boundary (stop reason ``"cancelled"``), bounds the prompt tokens prefilled per boundary, and with
``isolate`` ends only the failing row on a ``ReempathyError`` (its key is yielded with the error
instead of a result). A request's ``options`` give that row its own greedy/budget/strategy name.

With ``cache = "static"`` (and ``compile``) the same rows run in fixed shapes on a static cache
through compiled step graphs: :mod:`reempathy.decoding.static_batch` (how refilled rows enter a
static cache is decided there). Not supported (``NotAvailableError``): caches with
sliding-window or linear-attention layers. Backbones whose decode positions are not the row's
token count (M-RoPE with rope deltas) need their positions supplied; this loop passes the token
count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from reempathy.backbones.base import Backbone
from reempathy.decoding.loop import LoopOptions, _cache_keyword
from reempathy.decoding.result import DecodeResult
from reempathy.decoding.row import Row, choose
from reempathy.decoding.transfer import to_device
from reempathy.errors import ConfigError, DecodeError, NotAvailableError, ReempathyError


@dataclass
class RowRequest:
    """One answer to decode: the caller's ``key`` (returned with the result), the prompt, this row's plugins and seed.

    ``prefill_inputs`` are extra keyword arguments of this row's prefill call (e.g. audio features).
    ``options`` are this row's own loop options (greedy, ``max_new_tokens``, strategy name; None: the
    loop's); ``cache``, ``compile`` and ``attention`` are always the loop's, and the seed is always ``seed``.
    """

    key: Any
    prompt_ids: list[int]
    strategy: object
    processors: Sequence[object] = field(default_factory=tuple)
    seed: int = 0
    prefill_inputs: dict[str, Any] | None = None
    options: LoopOptions | None = None


class _Wait:
    def __repr__(self) -> str:
        return "WAIT"


WAIT: Any = _Wait()
"""What a request source yields for "nothing new right now" (continuous batching).

The loop goes on with its running rows and asks the source again at the next step boundary. A
source must not yield it while no row is running (``BatchControl.rows == 0``): it should block
until it has a request, or end.
"""


class BatchControl:
    """A handle on a running :func:`decode_batch`, shared with other threads (the server's sessions).

    ``cancel(key)`` ends that row at the next step boundary: its result (stop reason
    ``"cancelled"``, the tokens so far, ``reempathy_decode_end`` called) is yielded like any other.
    ``prefill_tokens`` bounds the prompt tokens prefilled at one step boundary (at least one new
    row is always taken), so newcomers stall the running rows by about that many tokens of prefill
    at a time rather than all at once; one prompt is never split. ``isolate`` ends only the row
    whose plugin or logits fail (a ``ReempathyError``): ``(key, error)`` is yielded for it and the
    other rows go on. What the loop writes for watchers: ``steps`` (forward calls of the batch so
    far) and ``rows`` (rows running at the latest boundary).
    """

    def __init__(self, prefill_tokens: int | None = None, isolate: bool = False) -> None:
        if prefill_tokens is not None and (isinstance(prefill_tokens, bool) or prefill_tokens < 1):
            raise ConfigError(f"prefill_tokens must be a whole number of at least 1, got {prefill_tokens!r}")
        self.prefill_tokens = prefill_tokens
        self.isolate = isolate
        self.steps = 0
        self.rows = 0
        self._lock = threading.Lock()
        self._cancel: set[Any] = set()

    def cancel(self, key: Any) -> None:
        """End the row of ``key`` at the next step boundary (a key of no running row is forgotten there)."""
        with self._lock:
            self._cancel.add(key)

    def _take_cancelled(self) -> set[Any]:
        with self._lock:
            keys, self._cancel = self._cancel, set()
        return keys


def row_seed(run_seed: int, record_id: str) -> int:
    """The sampling seed of one record: a hash of the run seed and the record id, in ``[0, 2**63)``."""
    digest = hashlib.sha256(f"{run_seed}:{record_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def decode_batch(
    backbone: Backbone,
    requests: Iterable[RowRequest],
    options: LoopOptions | None = None,
    batch_size: int = 8,
    control: BatchControl | None = None,
    prefill_rows: int = 8,
) -> Iterator[tuple[Any, DecodeResult]]:
    """Decode every request, ``batch_size`` rows per forward call; yield ``(key, result)`` as each row finishes.

    ``options.seed`` is ignored: each row samples with its own ``RowRequest.seed``. ``control``
    (continuous batching): cancel rows, bound prefill per step, isolate failures (:class:`BatchControl`).
    Rows that enter together are prefilled together, up to ``prefill_rows`` per forward call (1:
    one at a time).
    """
    options = options or LoopOptions()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a whole number of at least 1, got {batch_size!r}")
    if isinstance(prefill_rows, bool) or not isinstance(prefill_rows, int) or prefill_rows < 1:
        raise ConfigError(f"prefill rows must be a whole number of at least 1, got {prefill_rows!r}")
    if options.compile and options.cache != "static":
        raise ConfigError(
            'decode.compile = true needs decode.cache = "static" (a dynamic cache would recompile every step)'
        )
    if options.cache == "static":
        from reempathy.decoding.static_batch import _StaticBatchLoop

        loop: _BatchLoop = _StaticBatchLoop(backbone, options, batch_size, prefill_rows)
    else:
        loop = _BatchLoop(backbone, options, batch_size, prefill_rows)
    loop.control = control
    return loop.run(iter(requests))


class _BatchLoop:
    """The state of one :func:`decode_batch` call: the rows, their shared cache, their plans."""

    def __init__(self, backbone: Backbone, options: LoopOptions, batch_size: int, prefill_rows: int = 8) -> None:
        self.backbone = backbone
        self.prefill_rows = prefill_rows
        self.model = backbone.model
        self.device = self.model.device
        self.options = options
        self.batch_size = batch_size
        self.cache_kw = _cache_keyword(self.model)
        self.rows: list[Row] = []  # in cache row order; a finished row stays until the next refill
        self.ready: dict[Row, torch.Tensor] = {}  # rows whose next act is a sample, with their scores
        self.plans: dict[Row, Any] = {}  # each planning row's current attention plan
        self.cache: DynamicCache | None = None
        self.length = 0  # columns of the batch cache
        self.pads: torch.Tensor | None = None  # [B, 1] left padding per row; None when there is none
        self.positions: torch.Tensor | None = None  # [B, 1] next position per row (with pads only)
        self.controller: Any = None
        self.exhausted = False
        self.control: BatchControl | None = None
        self._failed: list[tuple[Row | None, Any, ReempathyError]] = []  # isolated failures of this round
        self._mixed = False  # some row's own options choose greedy differently from the loop's
        self._columns = torch.arange(0, device=self.device)
        self._last: tuple[torch.Tensor, list[Row]] | None = None  # the last step's logits and rows

    # --- the generator ----------------------------------------------------------------------------

    def run(self, requests: Iterator[RowRequest]) -> Iterator[tuple[Any, DecodeResult]]:
        while True:
            with torch.inference_mode(), contextlib.ExitStack() as stack:
                if self.controller is not None:
                    self._attach(stack)
                finished = self._advance(requests, stack)
            for row, result in finished:
                yield row.key, result
            if not finished:
                return

    def _attach(self, stack: contextlib.ExitStack) -> None:
        from reempathy.decoding.attention import BiasController, biased_attention

        if self.controller is None:
            self.controller = BiasController()
        stack.enter_context(biased_attention(self.model, self.controller))

    def _advance(self, requests: Iterator[RowRequest], stack: contextlib.ExitStack) -> list[tuple[Any, Any]]:
        """Refill, sample and step until some row finishes; its results (none once everything is done)."""
        finished: list[tuple[Any, Any]] = []
        control = self.control
        while not finished:
            if control is not None:
                self._cancel(control, finished)
                if finished:
                    break  # their results go out before the source is asked again (it may block while nothing runs)
            self._refill(requests, stack)
            if self._failed:
                finished.extend((_Failed(key), error) for _, key, error in self._failed)
                self._failed.clear()
            if not self.rows:
                break
            self._sample(finished)
            if not finished:
                self._step()
                if control is not None:
                    control.steps += 1
        return finished

    def _cancel(self, control: BatchControl, finished: list[tuple[Any, Any]]) -> None:
        """Rows cancelled since the last boundary end now, before anything else runs for them."""
        keys = control._take_cancelled()
        if not keys:
            return
        for row in self.rows:
            if not row.done and row.key in keys:
                row.stop_reason = "cancelled"
                row.done = True
                self.ready.pop(row, None)
                finished.append((row, self._finish(row)))

    # --- rows in and out -------------------------------------------------------------------------

    def _refill(self, requests: Iterator[RowRequest], stack: contextlib.ExitStack) -> None:
        kept = [i for i, row in enumerate(self.rows) if not row.done]
        started: list[tuple[Row, list[int]]] = []
        control = self.control
        budget = control.prefill_tokens if control is not None else None
        spent = 0
        while len(kept) + len(started) < self.batch_size and not self.exhausted:
            if budget is not None and started and spent >= budget:
                break  # the rest wait for the next boundary: the running rows step first
            if control is not None:
                control.rows = len(kept) + len(started)
            request = next(requests, None)
            if request is None:
                self.exhausted = True
                break
            if request is WAIT:
                if not kept and not started:
                    raise RuntimeError("a request source yielded WAIT while no row was running; it must block instead")
                break
            spent += len(request.prompt_ids)
            if control is not None and control.isolate:
                try:
                    started.append(self._start(request, stack))
                except ReempathyError as exc:
                    self._failed.append((None, request.key, exc))
                    break  # its outcome is yielded before the source is asked again
            else:
                started.append(self._start(request, stack))
        new = self._prefill(started)
        if control is not None:
            control.rows = len(kept) + len(new)
        if new or len(kept) != len(self.rows):
            self._recompose(kept, new)

    def context_limit(self, prompt_ids: list[int]) -> int | None:
        """The most positions a row may hold (None: the backbone's context)."""
        return None

    def _start(self, request: RowRequest, stack: contextlib.ExitStack) -> tuple[Row, list[int]]:
        """A new row for ``request`` (its decode start hook run); the tokens of its prefill."""
        own = request.options
        if own is not None:
            loop = self.options
            own = dataclasses.replace(own, cache=loop.cache, compile=loop.compile, attention=loop.attention)
            self._mixed = self._mixed or own.greedy != self.options.greedy
        options = dataclasses.replace(own or self.options, seed=request.seed)
        row = Row(
            self.backbone,
            request.prompt_ids,
            request.strategy,
            request.processors,
            options,
            key=request.key,
            context_limit=self.context_limit(request.prompt_ids),
            prefill_inputs=request.prefill_inputs,
        )
        if row.wants_plan and self.controller is None:
            self._attach(stack)
        return row, row.begin()

    def _prefill(self, started: list[tuple[Row, list[int]]]) -> list[tuple[Row, DynamicCache]]:
        """Prefill the new rows, in groups of up to ``prefill_rows`` (:func:`prefill_groups`); each is then ready to sample."""
        new: list[tuple[Row, DynamicCache]] = []
        isolate = self.control is not None and self.control.isolate
        for group in prefill_groups([(row.prefill_inputs, len(ids)) for row, ids in started], self.prefill_rows):
            members = [started[i] for i in group]
            paused = self.controller.paused() if self.controller is not None else contextlib.nullcontext()
            try:
                with paused:
                    if len(members) == 1:
                        row, ids = members[0]
                        parts = [self._prefill_one(row, ids)]
                    else:
                        parts = self._prefill_together(members)
            except ReempathyError as exc:
                if not isolate:
                    raise
                self._failed.extend((row, row.key, exc) for row, _ in members)  # the rows of that call
                continue
            for (row, ids), (cache, logits) in zip(members, parts):
                row.prefilled(len(ids))
                try:
                    plan = row.plan() if row.wants_plan else None
                except ReempathyError as exc:
                    if not isolate:
                        raise
                    self._failed.append((row, row.key, exc))
                    continue
                self.ready[row] = logits.float() if logits.dtype != torch.float32 else logits
                if row.wants_plan:
                    self.plans[row] = plan
                new.append((row, cache))
        return new

    def _prefill_one(self, row: Row, ids: list[int]) -> tuple[DynamicCache, torch.Tensor]:
        """One row alone: exactly the single-row loop's prefill (with the row's ``prefill_inputs``)."""
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=to_device([ids], self.device),
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kw: cache},
            **row.prefill_inputs,
        )
        self._check_layers(cache)
        return cache, out.logits[0, -1]

    def _prefill_together(self, members: list[tuple[Row, list[int]]]) -> list[tuple[DynamicCache, torch.Tensor]]:
        """Several rows in one forward call, right-padded; each row's keys and logits as its own prefill's.

        Right padding keeps the call plainly causal: a row's tokens come first, so they never see a
        pad (no attention mask, positions 0.. for every row, as alone), and the pads after them
        change nothing they compute. Each row's keys are its first ``len(ids)`` columns, copied into
        a cache of its own; its logits are those of its last token, picked by ``logits_to_keep``
        (only the distinct last positions go through the output head).
        """
        longest = max(len(ids) for _, ids in members)
        pad = int(self.backbone.layout.stop_ids[0])  # never read: it comes after every real token of its row
        batch = [ids + [pad] * (longest - len(ids)) for _, ids in members]
        lasts = sorted({len(ids) - 1 for _, ids in members})
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=to_device(batch, self.device),
            use_cache=True,
            logits_to_keep=to_device(lasts, self.device),
            **{self.cache_kw: cache},
        )
        self._check_layers(cache)
        parts = []
        for j, (_, ids) in enumerate(members):
            own = DynamicCache(config=self.model.config)
            for n, layer in enumerate(cache.layers):
                own.update(layer.keys[j : j + 1, :, : len(ids)], layer.values[j : j + 1, :, : len(ids)], n)
            parts.append((own, out.logits[j, lasts.index(len(ids) - 1)]))
        return parts

    def _check_layers(self, cache: DynamicCache) -> None:
        for layer in cache.layers:
            if type(layer) is not DynamicLayer:
                raise NotAvailableError(
                    f"batched decoding needs full-attention KV cache layers; backbone {self.backbone.name!r} "
                    f"has {type(layer).__name__} layers (sliding window or linear attention): decode its "
                    "prompts one at a time with the single-row loop (`reempathy decode`)"
                )

    def _take_rows(self, kept: list[int], new: list[tuple[Row, DynamicCache]]) -> list[Row]:
        """The kept rows first, then the new ones, as ``self.rows``; finished rows' logits and plans are let go."""
        rows = [self.rows[i] for i in kept] + [row for row, _ in new]
        for row in self.rows:
            if row.done:
                self.ready.pop(row, None)
                self.plans.pop(row, None)
        self.rows = rows
        self._last = None
        return rows

    def _recompose(self, kept: list[int], new: list[tuple[Row, DynamicCache]]) -> None:
        """Rebuild the batch cache from the kept rows and the new rows' caches, right-aligned and trimmed."""
        rows = self._take_rows(kept, new)
        if not rows:
            self.cache, self.length, self.pads, self.positions = None, 0, None, None
            return
        lengths = [row.session.forwarded for row in rows]
        length = max(lengths)
        container = self.cache if self.cache is not None else new[0][1]
        old = self.length
        for n, layer in enumerate(container.layers):
            parts_k: list[torch.Tensor] = []
            parts_v: list[torch.Tensor] = []
            if kept and self.cache is not None:
                keys, values = self.cache.layers[n].keys, self.cache.layers[n].values
                if len(kept) != keys.shape[0]:
                    index = to_device(kept, self.device)
                    keys, values = keys.index_select(0, index), values.index_select(0, index)
                keep = min(old, length)
                parts_k.append(_left_pad(keys[:, :, old - keep :], length))
                parts_v.append(_left_pad(values[:, :, old - keep :], length))
            for _, cache in new:
                parts_k.append(_left_pad(cache.layers[n].keys, length))
                parts_v.append(_left_pad(cache.layers[n].values, length))
            layer.keys = parts_k[0] if len(parts_k) == 1 else torch.cat(parts_k, dim=0)
            layer.values = parts_v[0] if len(parts_v) == 1 else torch.cat(parts_v, dim=0)
        self.cache = container
        self.length = length
        pads = [length - n for n in lengths]
        if any(pads):
            self.pads = to_device(pads, self.device).unsqueeze(1)
            self.positions = to_device(lengths, self.device).unsqueeze(1)
        else:
            self.pads = self.positions = None
        if self.controller is not None:
            self.controller.set_rows([self.plans.get(row) for row in rows], pads)

    # --- sampling and stepping ---------------------------------------------------------------------

    def _sample(self, finished: list[tuple[Any, Any]]) -> None:
        """Every ready row samples (again, while a dropped token leaves it nothing to forward)."""
        isolate = self.control is not None and self.control.isolate
        while self.ready:
            rows = [row for row in self.rows if row in self.ready]
            last = self._last
            if last is not None and last[1] == rows:
                scores = last[0]  # every row sampled from the last step: its logits as they are
            elif len(rows) == 1:
                scores = self.ready[rows[0]].unsqueeze(0)
            else:
                scores = torch.stack([self.ready[row] for row in rows])
            self._last = None
            if isolate:
                rows, scores = self._isolated_logits(rows, scores, finished)
                if not rows:
                    continue
            else:
                for i, row in enumerate(rows):
                    row.logits(scores[i])
            tokens = self._choose(rows, scores, finished) if (isolate or self._mixed) else choose(rows, scores, self.options.greedy)
            for i, (row, token) in enumerate(zip(rows, tokens)):
                if token is None:
                    continue  # failed in _choose (isolated)
                if isolate:
                    try:
                        self._accept(row, token, scores[i], finished)
                    except ReempathyError as exc:
                        self._fail(row, exc, finished)
                else:
                    self._accept(row, token, scores[i], finished)

    def _accept(self, row: Row, token: int, score: torch.Tensor, finished: list[tuple[Any, Any]]) -> None:
        if row.accept(token) and row.wants_plan:
            plan = self.plans[row] = row.plan()
            if not row.done and self.controller is not None:
                self.controller.set_row_plan(self.rows.index(row), plan)
        if row.done:
            del self.ready[row]
            finished.append((row, self._finish(row)))
        elif row.pending:
            del self.ready[row]
        else:
            self.ready[row] = score

    def _finish(self, row: Row) -> Any:
        """The row's result; with ``isolate``, the ``ReempathyError`` of its ``reempathy_decode_end`` instead."""
        if self.control is not None and self.control.isolate:
            try:
                return row.finish()
            except ReempathyError as exc:
                return exc
        return row.finish()

    # --- continuous batching: per-row choices and isolated failures -------------------------------

    def _isolated_logits(
        self, rows: list[Row], scores: torch.Tensor, finished: list[tuple[Any, Any]]
    ) -> tuple[list[Row], torch.Tensor]:
        """Run each row's logits hooks; a row whose plugin fails leaves the batch (the others go on)."""
        ok: list[int] = []
        for i, row in enumerate(rows):
            try:
                row.logits(scores[i])
                ok.append(i)
            except ReempathyError as exc:
                self._fail(row, exc, finished)
        if len(ok) == len(rows):
            return rows, scores
        return [rows[i] for i in ok], scores[ok] if ok else scores[:0]

    def _choose(self, rows: list[Row], scores: torch.Tensor, finished: list[tuple[Any, Any]]) -> list[Any]:
        """:func:`choose` per greedy setting (rows may have their own), and with ``isolate`` per failing row.

        A token of None marks a row that failed here (its error is in ``finished``).
        """
        isolate = self.control is not None and self.control.isolate
        groups: dict[bool, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.options.greedy, []).append(i)
        tokens: list[Any] = [None] * len(rows)
        for greedy, index in groups.items():
            part_rows = [rows[i] for i in index]
            part = scores if len(index) == len(rows) else scores[index]
            try:
                picked = choose(part_rows, part, greedy)
            except DecodeError:
                if not isolate:
                    raise
                picked = []
                for j, row in enumerate(part_rows):  # rare: find the rows whose logits hold no token
                    try:
                        picked.extend(choose([row], part[j : j + 1], greedy))
                    except DecodeError as exc:
                        self._fail(row, exc, finished)
                        picked.append(None)
            for i, token in zip(index, picked):
                tokens[i] = token
        return tokens

    def _fail(self, row: Row, error: ReempathyError, finished: list[tuple[Any, Any]]) -> None:
        """End ``row`` with ``error`` (``isolate``): it leaves at the next boundary; its key is yielded with the error."""
        row.stop_reason = "error"
        row.done = True
        self.ready.pop(row, None)
        finished.append((row, error))

    def _step(self) -> None:
        """One forward call: ``q`` pending tokens of every row; rows left with nothing pending become ready."""
        rows = self.rows
        q = min(row.pending for row in rows)
        if q == 1:
            ids = [[row.session.ids[row.session.forwarded]] for row in rows]
        else:
            ids = [row.session.ids[row.session.forwarded : row.session.forwarded + q] for row in rows]
        kwargs: dict[str, Any] = {self.cache_kw: self.cache}
        if self.pads is not None:
            width = self.length + q
            if self._columns.shape[0] < width:
                self._columns = torch.arange(max(2 * width, 256), device=self.device)
            kwargs["attention_mask"] = self._columns[:width].unsqueeze(0) >= self.pads
            positions = self.positions
            if q > 1:
                positions = positions + torch.arange(q, device=self.device)  # type: ignore[operator]
            kwargs["position_ids"] = positions
        out = self.model(
            input_ids=to_device(ids, self.device), use_cache=True, logits_to_keep=1, **kwargs
        )
        self.length += q
        if self.positions is not None:
            self.positions += q
        logits = out.logits[:, -1]
        if logits.dtype != torch.float32:
            logits = logits.float()
        ready = []
        for i, row in enumerate(rows):
            row.forwarded(q)
            if not row.pending:
                self.ready[row] = logits[i]
                ready.append(row)
        self._last = (logits, ready) if len(ready) == len(rows) else None


@dataclass
class _Failed:
    """Stands for a request that failed before it had a row (``isolate``): only its key is yielded."""

    key: Any


PREFILL_TOKENS = 8192
"""The most token positions (rows × longest prompt) one batched prefill call holds."""


def prefill_groups(rows: list[tuple[dict[str, Any], int]], most: int) -> list[list[int]]:
    """Which new rows (given as ``(prefill_inputs, prompt tokens)``) are prefilled together: indices, in order.

    Consecutive rows join a group of at most ``most`` rows and :data:`PREFILL_TOKENS` padded
    positions. A row with ``prefill_inputs`` (audio features and the like, whose shapes differ
    per row) is prefilled alone, as is every row when ``most`` is 1.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, (extra, length) in enumerate(rows):
        if extra:
            if current:
                groups.append(current)
            groups.append([i])
            current, longest = [], 0
            continue
        if current and (len(current) >= most or (len(current) + 1) * max(longest, length) > PREFILL_TOKENS):
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    if current:
        groups.append(current)
    return groups


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t`` (``[rows, heads, n, dim]``) with zero columns on the left up to ``length``."""
    missing = length - t.shape[-2]
    return F.pad(t, (0, 0, missing, 0)) if missing > 0 else t


__all__ = ["BatchControl", "RowRequest", "WAIT", "row_seed", "decode_batch"]

"""Continuous batching: one thread owns the model and runs every session's answer as a row of one batch.

Where it decides:

* **Admission** (:meth:`Scheduler.submit`): a job is refused (:class:`ServerBusy`) once
  ``capacity`` jobs are in flight (waiting or running), never queued without bound. The server
  sets ``capacity`` to the rows of the batch, so a job waits only for the prefill budget below.
* **Joining** (:meth:`Scheduler._source`): the batched loop (:func:`reempathy.decoding.batch.decode_batch`)
  asks this source for requests at every step boundary; it hands over waiting jobs, answers
  :data:`~reempathy.decoding.batch.WAIT` when none wait and rows are running, and blocks the
  thread (no busy loop) when nothing runs at all. The loop bounds the prompt tokens prefilled per
  boundary (``prefill_tokens``), so newcomers delay the running rows by about that much prefill
  at a time.
* **Leaving** (:meth:`Scheduler.cancel`): a waiting job is dropped at once; a running row is ended
  by the loop at its next step boundary (stop reason ``cancelled``), so a cancel or a disconnect
  frees its row within one step. ``freed`` records, per cancelled row, how many steps that took.
* **Failures**: the loop runs with ``isolate``: a row whose plugin fails ends alone, its job gets
  the error. A failure of the shared forward call (out of memory, a bug) fails every row in flight;
  the loop then starts again with the jobs that come next, and the server stays up.

A job's ``done`` is called in the scheduler thread with a ``DecodeResult``, a ``ReempathyError``
(that row failed), another exception (the batch failed) or :data:`CANCELLED` (dropped before it
had a row); it must return at once (the server's hands the outcome to the session's event loop).
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from reempathy.backbones.base import Backbone
from reempathy.decoding.batch import WAIT, BatchControl, RowRequest, decode_batch
from reempathy.decoding.loop import LoopOptions
from reempathy.errors import ReempathyError

log = logging.getLogger("reempathy.serve")


class ServerBusy(ReempathyError):
    """Every row of the batch is taken: the request is refused (HTTP 429 / a realtime ``error``), not queued."""


class _Cancelled:
    def __repr__(self) -> str:
        return "CANCELLED"


CANCELLED: Any = _Cancelled()
"""What a job's ``done`` receives when it was cancelled before it had a row."""


@dataclass
class Job:
    """One answer to decode: the loop's request and the callback that receives its outcome."""

    request: RowRequest
    done: Callable[[Any], None]
    cancel_step: int | None = field(default=None, repr=False)


class Scheduler:
    """The one owner of the model: a thread running the batched loop over jobs that come and go."""

    def __init__(
        self,
        backbone: Backbone,
        options: LoopOptions,
        rows: int,
        prefill_tokens: int | None = None,
        capacity: int | None = None,
    ) -> None:
        self.backbone = backbone
        self.options = options
        self.rows = rows
        self.capacity = rows if capacity is None else capacity
        self.control = BatchControl(prefill_tokens=prefill_tokens, isolate=True)
        self.freed: collections.deque[tuple[Any, int]] = collections.deque(maxlen=1024)  # (key, steps to free)
        self.failures = 0  # batch-wide failures survived
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: dict[Any, Job] = {}
        self._closed = False
        self._thread: threading.Thread | None = None

    # --- what other threads call -----------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler thread."""
        self._thread = threading.Thread(target=self._run, name="reempathy-scheduler", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job`` for the next step boundary; :class:`ServerBusy` when ``capacity`` jobs are in flight."""
        with self._cond:
            if self._closed:
                raise ServerBusy("the server is shutting down; try another replica")
            if len(self._waiting) + len(self._running) >= self.capacity:
                raise ServerBusy(
                    f"all {self.capacity} rows of the batch are busy; try again when a response has finished"
                )
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, key: Any) -> None:
        """Drop the job of ``key`` if it waits, or end its row at the next step boundary (no-op if gone)."""
        dropped: Job | None = None
        with self._cond:
            for job in self._waiting:
                if job.request.key == key:
                    dropped = job
                    break
            if dropped is not None:
                self._waiting.remove(dropped)
            elif key in self._running:
                self._running[key].cancel_step = self.control.steps
                self.control.cancel(key)
        if dropped is not None:
            dropped.done(CANCELLED)

    def stop(self, timeout: float | None = 30.0) -> None:
        """End every job (waiting: cancelled; running: at the next step) and the thread."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            for key in self._running:
                self.control.cancel(key)
            self._cond.notify_all()
        for job in waiting:
            job.done(CANCELLED)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> int:
        """Jobs with a row in the batch."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Jobs waiting for the next step boundary."""
        return len(self._waiting)

    @property
    def steps(self) -> int:
        """Forward calls of the batch so far."""
        return self.control.steps

    @property
    def alive(self) -> bool:
        """True while the scheduler thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # --- the scheduler thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                for key, outcome in decode_batch(
                    self.backbone, self._source(), self.options, batch_size=self.rows, control=self.control
                ):
                    self._finish(key, outcome)
                return  # the source ended: the server is stopping
            except Exception as exc:  # the shared forward failed: every row in flight fails, the server stays up
                log.exception("the batch failed; every response in flight ends with an error")
                with self._cond:
                    jobs, self._running = list(self._running.values()), {}
                    self.control.rows = 0
                    self.failures += 1
                for job in jobs:
                    job.done(exc)
                with self._cond:
                    if self._closed:
                        return

    def _finish(self, key: Any, outcome: Any) -> None:
        with self._cond:
            job = self._running.pop(key, None)
        if job is None:
            return
        if job.cancel_step is not None and getattr(outcome, "stop_reason", None) == "cancelled":
            self.freed.append((key, self.control.steps - job.cancel_step))
        job.done(outcome)

    def _source(self) -> Iterator[Any]:
        """The loop's requests: a waiting job, WAIT while rows run and none wait, or block while nothing runs."""
        control = self.control
        while True:
            with self._cond:
                while not self._waiting and not self._closed and control.rows == 0:
                    self._cond.wait()
                if self._waiting:
                    job = self._waiting.popleft()
                    self._running[job.request.key] = job
                elif self._closed:
                    return
                else:
                    job = None
            yield job.request if job is not None else WAIT


__all__ = ["CANCELLED", "Job", "Scheduler", "ServerBusy"]

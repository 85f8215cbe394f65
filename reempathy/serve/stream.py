"""One response: a row in the scheduler's batch, its tokens crossing into the session's event loop as events.

Where it decides:

* **Crossing threads** (:class:`Outbox`): the row's observer (:class:`RowObserver`, a plugin on the
  row's ``reempathy_token_appended``, ``reempathy_phase_change`` and ``reempathy_decode_end``)
  runs in the scheduler thread; it appends each token event to the response's outbox and wakes
  the session's event loop with ``loop.call_soon_threadsafe`` — at most one wake-up pending per
  response, so a fast batch does not flood the loop with callbacks. The observer never raises
  and never waits.
* **Speech** (:meth:`ResponseRun.stream`): the events go through the speech pipeline's own
  :class:`~reempathy.streaming.SpokenStream` (text as it completes, audio per block of units
  as soon as the block is full, reflections never synthesised); when audio is asked for, that runs
  in the server's speech threads, so synthesis never blocks the event loop or the model's thread.
* **Ending**: the row's outcome (result, error, ``CANCELLED``) is the outbox's last item; the task
  running this response being cancelled (the client went away) cancels the row, which leaves the
  batch at the next step boundary.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from reempathy.backbones.base import Backbone
from reempathy.decoding.batch import RowRequest
from reempathy.decoding.loop import LoopOptions
from reempathy.decoding.result import DecodeResult
from reempathy.errors import ReempathyError
from reempathy.hooks import hookimpl
from reempathy.serve.scheduler import CANCELLED, Job, Scheduler
from reempathy.speech.decoder.streaming import BLOCK_SIZES
from reempathy.streaming import AudioEvent, SpeechEvent, SpokenStream, TokenEvents

_keys = itertools.count(1)


class Outbox:
    """Items put from any thread, taken in order by one coroutine of ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: collections.deque[Any] = collections.deque()
        self._event = asyncio.Event()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, item: Any) -> None:
        """Append ``item`` and wake the taker (from any thread; never raises)."""
        self.items.append(item)
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody takes
            pass

    def _wake(self) -> None:
        with self._lock:
            self._scheduled = False
        self._event.set()

    async def take(self) -> list[Any]:
        """Every item put so far (waits for at least one)."""
        while True:
            if self.items:
                out = []
                while self.items:
                    out.append(self.items.popleft())
                return out
            self._event.clear()
            if self.items:
                continue
            await self._event.wait()


class RowObserver(TokenEvents):
    """The row's plugin that hands its tokens to the session (read-only; counts generated tokens)."""

    def __init__(self, outbox: Outbox, backbone: Backbone, count: Callable[[], None]) -> None:
        super().__init__(lambda kind, payload: outbox.put((kind, payload)), backbone)
        self.count = count
        self.first_token: float | None = None

    @hookimpl
    def reempathy_token_appended(self, session: Any, token_id: int, kind: str) -> None:
        if kind == "sampled":
            self.count()
            if self.first_token is None:
                self.first_token = time.perf_counter()
        self.scan(session, finished=False)

    @hookimpl
    def reempathy_phase_change(self, session: Any, old: str | None, new: str) -> None:
        if self.seen is not None:  # the first phase begins before the prompt is read
            self.scan(session, finished=False)

    @hookimpl
    def reempathy_decode_end(self, session: Any, result: DecodeResult) -> None:
        self.scan(session, finished=True)


@dataclass
class ResponseSpec:
    """What one response decodes: the prompt, the row's plugins and options, and what to stream."""

    prompt_ids: list[int]
    strategy: object
    processors: list[object]
    options: LoopOptions
    seed: int
    prefill_inputs: dict[str, Any] = field(default_factory=dict)
    audio: bool = True
    hidden_text: bool = False
    block_sizes: tuple[int, ...] = BLOCK_SIZES


@dataclass
class Outcome:
    """How a response ended: ``status`` (completed, incomplete, cancelled, failed) and what it holds."""

    status: str
    result: DecodeResult | None = None
    error: BaseException | None = None
    first_audio_s: float | None = None
    first_token_s: float | None = None
    audio_samples: int = 0


class ResponseRun:
    """One response as a row of the scheduler's batch: :meth:`start` it, then :meth:`stream` its events.

    :meth:`start` raises ``ServerBusy`` when the batch is full (nothing started). :meth:`cancel`
    ends the row at the next step boundary; so does cancelling the task that runs :meth:`stream`.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        backbone: Backbone,
        decoder: Any,
        spec: ResponseSpec,
        speech_pool: Executor,
        count: Callable[[], None],
        started: float | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.backbone = backbone
        self.spec = spec
        self.speech_pool = speech_pool
        self.started = time.perf_counter() if started is None else started
        self.key = next(_keys)
        self.outbox = Outbox(asyncio.get_running_loop())
        self.observer = RowObserver(self.outbox, backbone, count)
        self.stream_ = SpokenStream(
            backbone, decoder if spec.audio else None, block_sizes=spec.block_sizes, started=self.started, hidden_text=spec.hidden_text
        )

    def start(self) -> None:
        """Queue the row for the next step boundary (``ServerBusy`` when the batch is full)."""
        spec = self.spec
        request = RowRequest(
            self.key, spec.prompt_ids, spec.strategy, [*spec.processors, self.observer], spec.seed,
            spec.prefill_inputs or None, spec.options,
        )
        outbox = self.outbox
        self.scheduler.submit(Job(request, done=lambda outcome: outbox.put(("done", outcome))))

    def cancel(self) -> None:
        """End the row at the next step boundary (its outcome is then ``cancelled``)."""
        self.scheduler.cancel(self.key)

    async def stream(self, emit: Callable[[SpeechEvent], Awaitable[None]]) -> Outcome:
        """``emit`` every speech event of the response as it comes; the outcome once the row has ended."""
        loop = asyncio.get_running_loop()
        stream = self.stream_
        synthesizes = stream.synth is not None
        samples = 0
        final: Any = None
        try:
            finished = False
            while not finished:
                items = await self.outbox.take()
                batch = []
                for kind, payload in items:
                    if kind == "done":
                        final, finished = payload, True
                        break
                    batch.append((kind, payload))
                if batch:
                    if synthesizes:
                        events = await loop.run_in_executor(self.speech_pool, _feed_all, stream, batch)
                    else:
                        events = _feed_all(stream, batch)
                    for event in events:
                        samples += event.samples.shape[0] if isinstance(event, AudioEvent) else 0
                        await emit(event)
            if isinstance(final, DecodeResult) and final.stop_reason != "cancelled":
                tail = await loop.run_in_executor(self.speech_pool, stream.end) if synthesizes else stream.end()
                for event in tail:
                    samples += event.samples.shape[0] if isinstance(event, AudioEvent) else 0
                    await emit(event)
        except asyncio.CancelledError:
            self.cancel()  # the client is gone: its row leaves the batch at the next step boundary
            raise
        first = self.observer.first_token
        first_token = first - self.started if first is not None else None
        if final is CANCELLED:
            return Outcome("cancelled", first_token_s=first_token)
        if isinstance(final, DecodeResult):
            reason = final.stop_reason
            if reason == "cancelled":
                status = "cancelled"
            elif reason.startswith("max_"):  # a budget or the context (max_new_tokens, max_context, max_spoken_tokens, …)
                status = "incomplete"
            else:
                status = "completed"
            return Outcome(status, final, None, stream.first_audio, first_token, samples)
        error = final if isinstance(final, BaseException) else RuntimeError(f"unexpected outcome {final!r}")
        return Outcome("failed", None, error, stream.first_audio, first_token, samples)


def _feed_all(stream: SpokenStream, batch: list[tuple[str, Any]]) -> list[SpeechEvent]:
    out: list[SpeechEvent] = []
    for kind, payload in batch:
        out.extend(stream.feed(kind, payload))
    return out


def describe_failure(error: BaseException) -> tuple[str, str]:
    """``(code, message)`` of a failed response: a plugin's or the input's error, or the server's own."""
    if isinstance(error, ReempathyError):
        return type(error).__name__.lower(), str(error)
    return "server_error", f"the batch failed ({type(error).__name__}); the response was lost, try again"


__all__ = ["Outbox", "Outcome", "ResponseRun", "ResponseSpec", "RowObserver", "describe_failure"]

"""The request engine: chat requests to one back end, several at a time, retried with backoff, under a rate limit.

``llm-judge`` (scores, A/B, reflections) and ``reempathy make-data`` (scenarios, dialogues,
assessments) send their requests through one :class:`RequestEngine`, so both get the same
concurrency, retries and rate limit, and a fix to one is a fix to both.

Where it decides:

- **retries** (:meth:`RequestEngine.ask`): a request that fails (``BackendError``: a timeout, a
  refused connection, an HTTP error, a body that is no chat completion) is tried again after
  ``backoff_s`` (doubling each time, at most :data:`MAX_WAIT_S`); a reply that ``parse`` refuses
  (``ParseError``) is asked again at once. After ``retries`` more attempts the request is a
  :class:`Reply` with the last error and the last raw text — never an answer.
- **concurrency** (:meth:`RequestEngine.map`): at most ``concurrency`` requests are in flight,
  on a thread pool; results come back in the order of the inputs. With ``concurrency = 1`` no
  thread is started and the requests run one after another in the caller's thread, exactly as
  before the engine existed.
- **rate limit** (:class:`RateLimit`): request starts are spaced at least ``1 / rate`` seconds
  apart over all threads (retries count as requests); unset, they start as soon as a slot is free.

Each back end opens a fresh connection per request (see ``backends``), so threads share no socket.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from reempathy.evaluation.judge.backends import BackendError, ChatBackend
from reempathy.evaluation.judge.parsing import ParseError

T = TypeVar("T")
R = TypeVar("R")

MAX_WAIT_S = 600.0
"""The longest wait before a retry: ``backoff_s`` doubles per failed request, up to this."""


@dataclass
class Reply:
    """One request's outcome: ``value`` (what ``parse`` made of the reply) or ``error``; ``raw`` is the last reply text.

    ``attempts`` counts the requests sent for it (1 + the retries used).
    """

    value: Any = None
    error: str | None = None
    raw: str | None = None
    attempts: int = 0

    @property
    def ok(self) -> bool:
        """True when the reply parsed."""
        return self.error is None


class RateLimit:
    """Request starts spaced ``1 / per_second`` apart over every thread (None: no limit).

    ``clock`` and ``sleep`` are injectable so that a test can check the spacing without waiting.
    """

    def __init__(
        self,
        per_second: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.interval = 0.0 if not per_second else 1.0 / per_second
        self.clock = clock
        self.sleep = sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        """Block until this thread may start a request (each caller gets its own slot)."""
        if self.interval <= 0:
            return
        with self._lock:
            now = self.clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            (self.sleep or time.sleep)(start - now)


class RequestEngine:
    """Chat requests to ``backend``: ``concurrency`` at a time, ``retries`` extra attempts, a rate limit (module docstring)."""

    def __init__(
        self,
        backend: ChatBackend,
        *,
        concurrency: int = 1,
        retries: int = 2,
        backoff_s: float = 1.0,
        rate_limit_per_s: float | None = None,
        rate: RateLimit | None = None,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be a whole number of at least 1, got {concurrency!r}")
        self.backend = backend
        self.concurrency = concurrency
        self.retries = retries
        self.backoff_s = backoff_s
        self.rate = rate or RateLimit(rate_limit_per_s)

    def ask(self, messages: list[dict[str, str]], parse: Callable[[str], Any]) -> Reply:
        """Send ``messages`` until ``parse`` accepts a reply or the attempts run out (module docstring)."""
        error, raw = "no attempt", None
        attempts = 0
        for attempt in range(self.retries + 1):
            self.rate.wait()
            attempts += 1
            try:
                raw = self.backend.complete(messages)
            except BackendError as exc:
                error, raw = str(exc), None
                if attempt < self.retries and self.backoff_s > 0:
                    time.sleep(min(self.backoff_s * 2**attempt, MAX_WAIT_S))
                continue
            try:
                return Reply(parse(raw), None, raw, attempts)
            except ParseError as exc:
                error = f"unusable reply: {exc}"
        tries = self.retries + 1
        return Reply(None, f"{error} (after {tries} tr{'y' if tries == 1 else 'ies'})", raw, attempts)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[fn(item) for item in items]`` with at most ``concurrency`` calls at once, in the order of ``items``.

        ``fn`` is expected to send its requests through :meth:`ask`; an exception it raises is
        raised here (after the calls in flight have ended).
        """
        results: dict[int, R] = {}
        for (index, _), result in self.as_completed(lambda pair: fn(pair[1]), list(enumerate(items))):
            results[index] = result
        return [results[i] for i in range(len(items))]

    def as_completed(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[T, R]]:
        """``(item, fn(item))`` as each call ends, at most ``concurrency`` in flight; ``items`` is read lazily.

        With ``concurrency = 1`` the calls run one after another in the caller's thread, in order.
        A caller that stops reading waits only for the calls in flight.
        """
        if self.concurrency == 1:
            for item in items:
                yield item, fn(item)
            return
        source = iter(items)
        running: dict[Future[R], T] = {}
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="reempathy-request") as pool:

            def fill() -> None:
                while len(running) < self.concurrency:
                    item = next(source, _END)
                    if item is _END:
                        return
                    running[pool.submit(fn, item)] = item  # type: ignore[arg-type]

            fill()
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    item = running.pop(future)
                    yield item, future.result()
                fill()


_END: Any = object()


__all__ = ["RequestEngine", "RateLimit", "Reply", "MAX_WAIT_S"]

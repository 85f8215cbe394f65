"""What ``/metrics`` shows (Prometheus text format, through ``prometheus_client``).

One registry per server (not the process-wide default), so that servers started in one process
(the tests) do not share counters. Gauges that mirror live state (sessions, rows, queue, steps,
tokens per second) are read when scraped; counters and histograms are updated as things happen.
``reempathy_tokens_per_second`` is the rate since a scrape at least ``WINDOW_S`` seconds back, for a glance;
``rate(reempathy_generated_tokens_total[1m])`` is the Prometheus way.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

WINDOW_S = 10.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The server's counters, histograms and live gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.generated = 0  # tokens sampled for every response; written by the scheduler thread only
        r.register(_GeneratedTokens(self))
        self.responses = Counter(
            "reempathy_responses", "Responses finished, by status", ["status"], registry=r
        )
        self.refused = Counter("reempathy_refused", "Requests refused because the server was full", registry=r)
        self.ttfa = Histogram(
            "reempathy_time_to_first_audio_seconds",
            "From response.create (or the HTTP request) to the first audio sent",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0),
            registry=r,
        )
        self.ttft = Histogram(
            "reempathy_time_to_first_token_seconds",
            "From response.create (or the HTTP request) to the first generated token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
            registry=r,
        )
        self.cancel_steps = Histogram(
            "reempathy_cancel_steps",
            "Decode steps between a cancel (or disconnect) and its row leaving the batch",
            buckets=(0, 1, 2, 4, 8),
            registry=r,
        )
        self._samples: collections.deque[tuple[float, float]] = collections.deque()
        self._lock = threading.Lock()

    def watch(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge whose value is ``read()`` at scrape time."""
        Gauge(name, doc, registry=self.registry).set_function(read)

    def tokens_per_second(self) -> float:
        """Generated tokens per second since the newest scrape at least ``WINDOW_S`` seconds ago (0 at the first scrape)."""
        now = time.monotonic()
        total = float(self.generated)
        with self._lock:
            self._samples.append((now, total))
            # keep the newest sample older than the window: the rate covers at least WINDOW_S (or since the first scrape)
            while len(self._samples) > 2 and now - self._samples[1][0] >= WINDOW_S:
                self._samples.popleft()
            t0, n0 = self._samples[0]
        return (total - n0) / (now - t0) if now > t0 else 0.0

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _GeneratedTokens:
    """``reempathy_generated_tokens_total``, read from the plain counter the scheduler thread bumps per token."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list:
        return [CounterMetricFamily("reempathy_generated_tokens", "Tokens generated (sampled) for all responses")]

    def collect(self) -> list:
        return [
            CounterMetricFamily(
                "reempathy_generated_tokens", "Tokens generated (sampled) for all responses", value=self.metrics.generated
            )
        ]


__all__ = ["CONTENT_TYPE", "Metrics"]

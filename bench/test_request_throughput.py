"""llm-judge and make-data against a slow endpoint (bench/llm_throughput.py): concurrency 8 against 1, side by side.

In one benchmark group per command, so the table shows the ratio; the figures in bench/README.md
("LLM requests") come from running the script. With ``--benchmark-disable`` (the CI smoke run)
each runs once on a few items with a short delay.
"""

from __future__ import annotations

import pytest

import llm_throughput


@pytest.fixture(scope="module")
def server(disabled):
    with llm_throughput.SlowServer(0.02 if disabled else 0.2) as s:
        llm_throughput.judge_seconds(s.url, 1, 1)  # warm-up
        yield s


@pytest.mark.parametrize("concurrency", [1, 8])
def test_judge_throughput(benchmark, server, disabled, concurrency):
    benchmark.group = "llm-judge, endpoint 200 ms"
    benchmark.pedantic(llm_throughput.judge_seconds, args=(server.url, 8 if disabled else 32, concurrency),
                       rounds=1 if disabled else 3, iterations=1)


@pytest.mark.parametrize("concurrency", [1, 8])
def test_make_data_throughput(benchmark, server, disabled, concurrency):
    benchmark.group = "make-data, endpoint 200 ms"
    benchmark.pedantic(llm_throughput.make_data_seconds, args=(server.url, 4 if disabled else 16, concurrency),
                       rounds=1 if disabled else 3, iterations=1)

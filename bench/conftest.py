"""Fixtures of the latency suite: model shapes, token counts, cache kind and device.

``pytest bench/ --benchmark-disable`` runs every benchmark once with a few tokens (a smoke test
that CI runs); without it each benchmark runs its rounds with the full token count.
"""

from __future__ import annotations

import pytest

import harness

SMOKE_TOKENS = 4
BENCH_TOKENS = 64


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("reempathy bench")
    group.addoption("--bench-device", default="cpu", help="device of the benchmark models (cpu, cuda)")
    group.addoption("--bench-cache", default="dynamic", choices=["dynamic", "static"], help="KV cache kind")
    group.addoption("--bench-compile", action="store_true", help="torch.compile the decode steps (needs static cache)")
    group.addoption("--bench-tokens", type=int, default=None, help=f"new tokens per run (default {BENCH_TOKENS})")
    group.addoption("--bench-threads", type=int, default=None, help="torch CPU threads (1 is steadier on a shared machine)")


def pytest_configure(config: pytest.Config) -> None:
    threads = config.getoption("bench_threads", None)
    if threads:
        import torch

        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def disabled(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("benchmark_disable"))


@pytest.fixture(scope="session")
def n_tokens(request: pytest.FixtureRequest, disabled: bool) -> int:
    """New tokens per run: few when benchmarks are disabled, so the smoke test takes seconds."""
    given = request.config.getoption("bench_tokens")
    return given or (SMOKE_TOKENS if disabled else BENCH_TOKENS)


@pytest.fixture(scope="session")
def rounds(disabled: bool) -> int:
    return 1 if disabled else 15


@pytest.fixture(scope="session")
def loop_kwargs(request: pytest.FixtureRequest) -> dict:
    return {"cache": request.config.getoption("bench_cache"), "compile": request.config.getoption("bench_compile")}


@pytest.fixture(scope="session", params=list(harness.MODELS))
def model(request: pytest.FixtureRequest) -> str:
    """The model shape's name (its backbone is built once per session)."""
    harness.backbone(request.param, request.config.getoption("bench_device"))
    return request.param


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("bench_device")

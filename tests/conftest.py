"""Shared fixtures: a tiny backbone built once per test session, and a fresh plugin discovery."""

from __future__ import annotations

import pytest

from reempathy.backbones.base import Turn
from reempathy.backbones.tiny import TinyOptions, load_tiny


@pytest.fixture(scope="session")
def tiny():
    """The default tiny backbone (seed 0). Tests must not modify its weights."""
    return load_tiny(TinyOptions())


@pytest.fixture(scope="session")
def tiny_prompt(tiny):
    return tiny.build_prompt([Turn("user", text="I lost my keys and missed the bus.")])


@pytest.fixture()
def fresh_discovery(monkeypatch):
    """Clear the process-wide discovery cache before and after a test that changes plugins."""
    from reempathy.decoding.registry import default_discovery

    default_discovery.cache_clear()
    yield
    default_discovery.cache_clear()


def pytest_terminal_summary(terminalreporter):
    """Print how many generated inputs each hypothesis property of tests/test_fuzz.py tried (issue 16)."""
    from fuzz_support import COUNTS, EXITS

    if COUNTS:
        terminalreporter.write_sep("-", "fuzz: generated inputs tried per property")
        for name, count in sorted(COUNTS.items()):
            exits = ", ".join(f"exit {code}: {n}" for code, n in sorted(EXITS.get(name, {}).items()))
            terminalreporter.write_line(f"{name}: {count} ({exits})")
        terminalreporter.write_line(f"total: {sum(COUNTS.values())}")

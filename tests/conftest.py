"""Shared fixtures: a tiny backbone built once per test session, and a fresh plugin discovery.

The shipped pytest plugin ``reempathy.testing`` (entry point ``pytest11``) provides
``reempathy_tiny`` and the plugin-author fixtures; ``tiny`` is the same backbone.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from reempathy.backbones.base import Turn

if not any(ep.value == "reempathy.testing" for ep in entry_points(group="pytest11")):
    pytest_plugins = ["reempathy.testing"]  # an install from before the entry point existed


@pytest.fixture(scope="session")
def tiny(reempathy_tiny):
    """The default tiny backbone (seed 0). Tests must not modify its weights."""
    return reempathy_tiny


@pytest.fixture(scope="session")
def tiny_prompt(tiny):
    return tiny.build_prompt([Turn("user", text="I lost my keys and missed the bus.")])


@pytest.fixture()
def fresh_discovery(monkeypatch):
    """Clear the process-wide discovery cache before and after a test that changes plugins."""
    from reempathy.registry import default_discovery

    default_discovery.cache_clear()
    yield
    default_discovery.cache_clear()


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    """A tiny Qwen2.5-Omni checkpoint in the published on-disk format (tests/qwen25omni_fixture.py)."""
    from qwen25omni_fixture import make_tiny_qwen25omni_dir

    return make_tiny_qwen25omni_dir(tmp_path_factory.mktemp("qwen25omni") / "ckpt")


@pytest.fixture(scope="session")
def qwen(qwen_dir):
    """The ``qwen2.5-omni`` backbone on the tiny checkpoint, talker on (greedy, short). Tests must not modify it."""
    from qwen25omni_fixture import QWEN_TEST_OPTIONS

    from reempathy.backbones.qwen25omni import Qwen25OmniOptions, load_qwen25omni

    return load_qwen25omni(Qwen25OmniOptions(path=str(qwen_dir), **QWEN_TEST_OPTIONS))


@pytest.fixture(scope="session")
def qwen_prompt(qwen):
    return qwen.build_prompt([Turn("user", text="I hear you. That sounds really hard.")])


def pytest_terminal_summary(terminalreporter):
    """Print the fuzz counts of tests/test_fuzz.py and the crash-safety kill points with their seed (issue 16)."""
    _crash_summary(terminalreporter)
    _fuzz_summary(terminalreporter)


def _crash_summary(terminalreporter):
    import sys

    module = sys.modules.get("crash_points")
    if module is None or not module.DRAWN:
        return
    terminalreporter.write_sep(
        "-", f"crash safety: kill points from REEMPATHY_CRASH_SEED={module.SEED} (set it to repeat them)"
    )
    for label, (points, count) in module.DRAWN.items():
        terminalreporter.write_line(f"{label}: {points} of {count} points")


def _fuzz_summary(terminalreporter):
    from fuzz_support import COUNTS, EXITS

    if COUNTS:
        terminalreporter.write_sep("-", "fuzz: generated inputs tried per property")
        for name, count in sorted(COUNTS.items()):
            exits = ", ".join(f"exit {code}: {n}" for code, n in sorted(EXITS.get(name, {}).items()))
            terminalreporter.write_line(f"{name}: {count} ({exits})")
        terminalreporter.write_line(f"total: {sum(COUNTS.values())}")

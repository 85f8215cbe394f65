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
    from reempathy.decoding.registry import default_discovery

    default_discovery.cache_clear()
    yield
    default_discovery.cache_clear()

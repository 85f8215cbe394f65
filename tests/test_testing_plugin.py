"""``reempathy.testing``, the pytest plugin shipped for plugin authors: its fixtures and helpers."""

from __future__ import annotations

import contextlib
import io
import json
import types

import pytest
from pydantic import BaseModel, ConfigDict

from reempathy.api import Stop, hookimpl
from reempathy.testing import assert_spans


class LimitOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int = 3


class Limit:
    def __init__(self, options, backbone):
        self.limit = options.limit

    @hookimpl
    def reempathy_token(self, session, token_id):
        if session.generated + 1 >= self.limit:
            return Stop("limit", keep_token=True)


def _plugin() -> types.ModuleType:
    mod = types.ModuleType("limit_plugin")

    @hookimpl
    def reempathy_register_strategies(register):
        register("limit", Limit, LimitOptions, "stops at a limit")

    mod.reempathy_register_strategies = reempathy_register_strategies
    return mod


def test_pytest_loads_the_plugin_through_its_entry_point(request):
    assert request.config.pluginmanager.hasplugin("reempathy.testing") or request.config.pluginmanager.hasplugin("reempathy")


def test_reempathy_plugins_is_isolated_from_installed_and_directory_plugins(reempathy_plugins, monkeypatch, tmp_path):
    (tmp_path / "other.py").write_text(
        "from reempathy.api import hookimpl\n@hookimpl\ndef reempathy_register_strategies(register):\n    pass\n"
    )
    monkeypatch.setenv("REEMPATHY_PLUGINS_DIR", str(tmp_path))
    disc = reempathy_plugins(_plugin())
    names = [p.name for p in disc.plugins]
    from reempathy.registry import BUILTIN_PLUGINS

    assert names == list(BUILTIN_PLUGINS) + ["limit_plugin"]


def test_reempathy_decode_runs_the_plugin_and_sees_every_token(reempathy_plugins, reempathy_decode):
    reempathy_plugins(_plugin())
    run = reempathy_decode("limit", {"limit": 4}, ban_stop=True)
    assert run.result.strategy == "limit" and run.result.stop_reason == "limit"
    assert run.appended == run.result.ids and len(run.appended) == 4
    assert sum(n for _, n in run.span_runs()) == 4


def test_the_cli_in_process_uses_the_isolated_discovery(reempathy_plugins):
    from reempathy.cli import main

    reempathy_plugins(_plugin())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["decode", "--strategy", "limit", "--prompt", "hi", "--greedy", "--json"])
    assert code == 0
    assert json.loads(out.getvalue())["stop_reason"] == "limit"


def test_assert_spans_compares_labels_lengths_and_prefixes(reempathy_decode):
    run = reempathy_decode("reempathy", {"text_tokens": 2, "audio_tokens": 3, "max_reflection_tokens": 2}, max_new_tokens=12, ban_stop=True)
    runs = run.span_runs()
    run.assert_spans([label for label, _ in runs])
    run.assert_spans(runs[:3], prefix=True)
    assert ("control", 1) in runs and ("reflection", 2) in runs
    with pytest.raises(AssertionError, match="spans differ"):
        assert_spans(run.result, ["reflection"], prefix=True)

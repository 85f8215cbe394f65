"""Discovery through real entry points: a third-party plugin package installed into a temporary location."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
[backbone]
name = "{backbone}"

[strategy]
name = "{strategy}"
{strategy_options}

[sampling]
greedy = true

[decode]
max_new_tokens = 20
prompt = "I had a rough day."
"""

GOOD_PLUGIN = '''
"""A third-party plugin: a strategy, a processor and a backbone."""
from pydantic import BaseModel, ConfigDict
from reempathy.decoding.directives import Stop
from reempathy.hooks import hookimpl


class ShortOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int = 4


class Short:
    def __init__(self, options, backbone):
        self.limit = options.limit

    @hookimpl
    def reempathy_token(self, session, token_id):
        if session.generated + 1 >= self.limit:
            return Stop("short-limit", keep_token=True)


class NoOpOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NoOp:
    def __init__(self, options, backbone):
        pass

    @hookimpl
    def reempathy_logits(self, session, logits):
        pass


@hookimpl
def reempathy_register_strategies(register):
    register("short", Short, ShortOptions, "stop after a few tokens")


@hookimpl
def reempathy_register_processors(register):
    register("noop", NoOp, NoOpOptions, "does nothing")


@hookimpl
def reempathy_register_backbones(register):
    from reempathy.backbones.tiny import TinyOptions, load_tiny

    def load(options):
        backbone = load_tiny(options)
        backbone.name = "tiny-from-plugin"
        return backbone

    register("tiny-plugin", load, TinyOptions, "the tiny backbone, registered by a plugin")
'''

BROKEN_PLUGIN = '''
raise ImportError("this plugin is broken on purpose")
'''


def _install(tmp_path: Path, dist: str, module: str, source: str) -> Path:
    """Build and install a one-module distribution with a `reempathy` entry point into a target dir."""
    src = tmp_path / f"src-{dist}"
    src.mkdir()
    (src / f"{module}.py").write_text(source)
    (src / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{dist}"
            version = "1.2.3"

            [project.entry-points.reempathy]
            {module} = "{module}"

            [tool.setuptools]
            py-modules = ["{module}"]
            """
        )
    )
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(src)],
        check=True,
        capture_output=True,
    )
    return target


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plugins")
    site = _install(tmp, "reempathy-short", "reempathy_short", GOOD_PLUGIN)
    _install(tmp, "reempathy-broken", "reempathy_broken", BROKEN_PLUGIN)
    return site


def _cli(site: Path, *args: str, env: dict | None = None, cwd: Path | None = None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("REEMPATHY_")}
    full_env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "reempathy.cli", *args], capture_output=True, text=True, env=full_env, cwd=cwd
    )


def test_third_party_strategy_is_selected_by_name_from_a_toml_config(plugin_site, tmp_path):
    cfg = tmp_path / "short.toml"
    cfg.write_text(CONFIG.format(backbone="tiny", strategy="short", strategy_options="limit = 3"))
    proc = _cli(plugin_site, "decode", "--config", str(cfg), "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    result = json.loads(proc.stdout)
    assert result["strategy"] == "short"
    assert result["stop_reason"] == "short-limit" and result["counts"]["generated"] == 3


def test_broken_plugin_is_listed_as_broken_and_the_rest_keeps_working(plugin_site, tmp_path):
    proc = _cli(plugin_site, "plugins")
    assert proc.returncode == 0, proc.stderr
    assert "reempathy_broken  [broken]" in proc.stdout
    assert "this plugin is broken on purpose" in proc.stdout
    assert "reempathy_short  [entry point]  version 1.2.3" in proc.stdout
    cfg = tmp_path / "sft.toml"
    cfg.write_text(CONFIG.format(backbone="tiny", strategy="sft", strategy_options=""))
    decode = _cli(plugin_site, "decode", "--config", str(cfg))
    assert decode.returncode == 0, decode.stderr
    assert "spoken text" in decode.stdout
    assert "failed to load" in decode.stderr  # a warning, not a failure


def test_strict_plugins_turns_a_broken_plugin_into_a_clear_error(plugin_site, tmp_path):
    cfg = tmp_path / "sft.toml"
    cfg.write_text(CONFIG.format(backbone="tiny", strategy="sft", strategy_options=""))
    proc = _cli(plugin_site, "decode", "--config", str(cfg), env={"REEMPATHY_STRICT_PLUGINS": "1"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("reempathy: error: plugin 'reempathy_broken' failed to load")
    assert "Traceback" not in proc.stderr


def test_reempathy_plugins_env_limits_which_external_plugins_load(plugin_site, monkeypatch, fresh_discovery):
    from reempathy.decoding.registry import discover

    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.setenv("REEMPATHY_PLUGINS", "reempathy_short")
    names = {p.name: p.source for p in discover().plugins}
    assert names.get("reempathy_short") == "entry point"
    assert "reempathy_broken" not in names


def test_plugin_registers_processor_and_backbone_through_discovery_hooks(plugin_site, monkeypatch, fresh_discovery, tmp_path):
    from reempathy.config import load_config
    from reempathy.decoding.registry import discover
    from reempathy.runner import run_decode

    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.setenv("REEMPATHY_PLUGINS", "reempathy_short")
    disc = discover()
    assert "noop" in disc.registry.names("processor")
    assert "tiny-plugin" in disc.registry.names("backbone")
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        CONFIG.format(backbone="tiny-plugin", strategy="sft", strategy_options="") + '\n[[processors]]\nname = "noop"\n'
    )
    result = run_decode(load_config(cfg, registry=disc.registry), disc.registry)
    assert result.backbone == "tiny-from-plugin"


def test_plugin_whose_registration_raises_is_broken_not_fatal(monkeypatch, fresh_discovery):
    import types

    from reempathy.decoding.registry import discover
    from reempathy.hooks import hookimpl

    bad = types.ModuleType("bad_plugin")

    @hookimpl
    def reempathy_register_strategies(register):
        raise RuntimeError("boom")

    bad.reempathy_register_strategies = reempathy_register_strategies
    with pytest.warns(UserWarning, match="boom"):
        disc = discover(extra_plugins=[("bad", bad)])
    assert {p.name: p.source for p in disc.plugins}["bad"] == "broken"
    assert "sft" in disc.registry.names("strategy")

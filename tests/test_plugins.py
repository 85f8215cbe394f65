"""Discovery through real entry points: a third-party plugin package installed into a temporary location."""

from __future__ import annotations

import os
import re
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
    assert "reempathy_broken  [entry point]  reempathy-broken 1.2.3  BROKEN" in proc.stdout
    assert "error: ImportError: this plugin is broken on purpose" in proc.stdout
    assert "reempathy_short  [entry point]  reempathy-short 1.2.3" in proc.stdout
    cfg = tmp_path / "sft.toml"
    cfg.write_text(CONFIG.format(backbone="tiny", strategy="sft", strategy_options=""))
    decode = _cli(plugin_site, "decode", "--config", str(cfg))
    assert decode.returncode == 0, decode.stderr
    assert "spoken text" in decode.stdout
    # a warning, not a failure: one clean line, no warnings-module noise
    about = [line for line in decode.stderr.splitlines() if "reempathy_broken" in line]
    assert len(about) == 1 and about[0].startswith("reempathy: warning: plugin 'reempathy_broken' failed to load")
    assert "UserWarning" not in decode.stderr and "Traceback" not in decode.stderr


def test_strict_plugins_turns_a_broken_plugin_into_a_clear_error(plugin_site, tmp_path):
    cfg = tmp_path / "sft.toml"
    cfg.write_text(CONFIG.format(backbone="tiny", strategy="sft", strategy_options=""))
    proc = _cli(plugin_site, "decode", "--config", str(cfg), env={"REEMPATHY_STRICT_PLUGINS": "1"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("reempathy: error: plugin 'reempathy_broken' failed to load")
    assert "Traceback" not in proc.stderr


def test_reempathy_plugins_env_limits_which_external_plugins_load(plugin_site, monkeypatch, fresh_discovery):
    from reempathy.registry import discover

    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.setenv("REEMPATHY_PLUGINS", "reempathy_short")
    names = {p.name: p.source for p in discover().plugins}
    assert names.get("reempathy_short") == "entry point"
    assert "reempathy_broken" not in names


def test_plugin_registers_processor_and_backbone_through_discovery_hooks(plugin_site, monkeypatch, fresh_discovery, tmp_path):
    from reempathy.config import load_config
    from reempathy.registry import discover
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

    from reempathy.registry import discover
    from reempathy.hooks import hookimpl

    bad = types.ModuleType("bad_plugin")

    @hookimpl
    def reempathy_register_strategies(register):
        raise RuntimeError("boom")

    bad.reempathy_register_strategies = reempathy_register_strategies
    disc = discover(extra_plugins=[("bad", bad)])
    assert disc.plugin("bad").broken and "RuntimeError: boom" in disc.plugin("bad").error
    assert "sft" in disc.registry.names("strategy")


# --- discovery rules ---------------------------------------------------------------------------

SINGLE_FILE = """
from pydantic import BaseModel, ConfigDict
from reempathy.api import Stop, hookimpl


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int = 3


class Shorty:
    def __init__(self, options, backbone):
        self.limit = options.limit

    @hookimpl
    def reempathy_token(self, session, token_id):
        if session.generated + 1 >= self.limit:
            return Stop("shorty", keep_token=True)


@hookimpl
def reempathy_register_strategies(register):
    register("shorty", Shorty, Options, "stops after a few tokens")
"""

CLASHING = """
from pydantic import BaseModel
from reempathy.api import hookimpl


class Options(BaseModel):
    pass


@hookimpl
def reempathy_register_strategies(register):
    register("sft", lambda options, backbone: None, Options, "an impostor")
    register("mine", lambda options, backbone: None, Options, "kept")
"""

MODULE_RUN_HOOK = """
from reempathy.api import hookimpl

SEEN = []


@hookimpl
def reempathy_token_appended(session, token_id, kind):
    SEEN.append(token_id)
"""


def _plugins_dir(tmp_path, **files):
    d = tmp_path / "plugins"
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        (d / f"{name}.py").write_text(text)
    return d


def test_plugins_dir_loads_single_file_plugins_through_the_cli(tmp_path):
    d = _plugins_dir(tmp_path, shorty=SINGLE_FILE)
    proc = _cli(tmp_path, "decode", "--plugins-dir", str(d), "--strategy", "shorty", "--prompt", "hi", "--greedy", "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    result = json.loads(proc.stdout)
    assert result["strategy"] == "shorty" and result["stop_reason"] == "shorty" and result["counts"]["generated"] == 3


def test_plugins_dir_environment_variable_loads_single_file_plugins(tmp_path, monkeypatch):
    from reempathy.registry import discover

    monkeypatch.setenv("REEMPATHY_PLUGINS_DIR", str(_plugins_dir(tmp_path, shorty=SINGLE_FILE)))
    disc = discover()
    row = disc.plugin("shorty")
    assert row.source == "plugins dir" and row.location.endswith("shorty.py")
    assert disc.registry.get("strategy", "shorty").description == "stops after a few tokens"


def test_plugin_calling_sys_exit_at_import_is_broken_not_fatal(tmp_path):
    from reempathy.registry import discover

    disc = discover(plugins_dirs=[_plugins_dir(tmp_path, exiter="import sys\nsys.exit(3)\n")])
    assert disc.plugin("exiter").error == "SystemExit(3) at import"
    assert "sft" in disc.registry.names("strategy")


def test_registration_that_lost_a_clash_is_listed_as_lost_not_provided(tmp_path):
    from reempathy.registry import discover

    disc = discover(plugins_dirs=[_plugins_dir(tmp_path, clashing=CLASHING)])
    row = disc.plugin("clashing")
    assert row.provides == ["strategy:mine"]
    assert row.lost == ["strategy:sft (kept from 'reempathy.plugins.strategies')"]
    assert disc.registry.get("strategy", "sft").plugin == "reempathy.plugins.strategies"


def test_strict_mode_makes_a_clash_an_error(tmp_path, monkeypatch):
    from reempathy.registry import discover
    from reempathy.errors import PluginError

    monkeypatch.setenv("REEMPATHY_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="plugin 'clashing' registers strategy 'sft'"):
        discover(plugins_dirs=[_plugins_dir(tmp_path, clashing=CLASHING)])


def test_hook_with_a_wrong_argument_name_is_one_line_in_strict_mode(tmp_path, monkeypatch):
    from reempathy.registry import discover
    from reempathy.errors import PluginError

    bad = "from reempathy.api import hookimpl\n@hookimpl\ndef reempathy_register_strategies(reg):\n    pass\n"
    monkeypatch.setenv("REEMPATHY_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError) as err:
        discover(plugins_dirs=[_plugins_dir(tmp_path, badsig=bad)])
    message = str(err.value)
    assert "\n" not in message
    assert "argument 'reg' is not in the hookspec reempathy_register_strategies(register)" in message


def test_module_level_run_hook_is_refused_and_not_listed_as_a_hook(tmp_path):
    from reempathy.registry import discover

    row = discover(plugins_dirs=[_plugins_dir(tmp_path, watcher=MODULE_RUN_HOOK)]).plugin("watcher")
    assert not row.broken
    assert row.hooks == []
    assert row.refused == ["reempathy_token_appended (a module-level run hook is never called)"]


def test_hook_defined_without_hookimpl_makes_the_plugin_broken(tmp_path):
    from reempathy.registry import discover

    text = "def reempathy_register_strategies(register):\n    pass\n"
    row = discover(plugins_dirs=[_plugins_dir(tmp_path, unmarked=text)]).plugin("unmarked")
    assert row.broken and "defined without @hookimpl" in row.error


def test_problems_warn_once_per_plugin_per_process_on_one_clean_line(tmp_path):
    d = _plugins_dir(tmp_path, clashing=CLASHING, watcher=MODULE_RUN_HOOK, exiter="raise SystemExit('bye')\n")
    code = f"from reempathy.registry import discover\nfor _ in range(3): discover(plugins_dirs=[{str(d)!r}])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3, proc.stderr
    assert all(line.startswith("reempathy: warning: plugin '") for line in lines)
    assert {line.split("'")[1] for line in lines} == {"clashing", "watcher", "exiter"}


def test_extra_plugin_that_is_also_installed_replaces_it_instead_of_failing(plugin_site, monkeypatch):
    import importlib

    from reempathy.registry import discover

    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.setenv("REEMPATHY_PLUGINS", "reempathy_short")
    module = importlib.import_module("reempathy_short")
    disc = discover(extra_plugins=[("mine", module)])
    names = [p.name for p in disc.plugins]
    assert "mine" in names and "reempathy_short" not in names
    assert disc.registry.get("strategy", "short").plugin == "mine"


def test_plugins_listing_shows_distribution_descriptions_options_and_lost_clashes(plugin_site, tmp_path):
    d = _plugins_dir(tmp_path, clashing=CLASHING)
    proc = _cli(plugin_site, "plugins", "--options", "--plugins-dir", str(d), env={"REEMPATHY_PLUGINS": "reempathy_short,clashing"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "reempathy_short  [entry point]  reempathy-short 1.2.3" in out
    assert re.search(r"^    strategy short +stop after a few tokens$", out, re.M)
    assert "limit: int = 4" in out
    assert "reempathy: warning" not in out
    assert "lost clash: strategy:sft (kept from 'reempathy.plugins.strategies')" in out
    proc = _cli(plugin_site, "plugins", "--json", env={"REEMPATHY_PLUGINS": "reempathy_short"})
    import json

    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    short = rows["reempathy_short"]
    assert short["distribution"] == "reempathy-short" and short["version"] == "1.2.3"
    (component,) = [c for c in short["components"] if c["name"] == "short"]
    assert component["options"] == [
        {"name": "limit", "type": "int", "required": False, "default": 4, "constraints": [], "description": ""}
    ]


def test_a_factory_that_raises_is_a_plugin_failure_naming_plugin_and_factory(fresh_discovery):
    import types

    from pydantic import BaseModel

    from reempathy.registry import discover
    from reempathy.errors import PluginFailure
    from reempathy.hooks import hookimpl

    class Options(BaseModel):
        pass

    def factory(options):
        raise ValueError("cannot open the model")

    mod = types.ModuleType("flaky")

    @hookimpl
    def reempathy_register_backbones(register):
        register("flaky", factory, Options)

    mod.reempathy_register_backbones = reempathy_register_backbones
    registry = discover([("flaky", mod)], installed=False).registry
    with pytest.raises(PluginFailure) as err:
        registry.create("backbone", "flaky", {})
    assert err.value.exit_code == 1
    assert str(err.value) == "plugin 'flaky' failed in the backbone factory of 'flaky': ValueError: cannot open the model"


def test_a_session_object_with_a_misnamed_hook_argument_is_refused_before_decoding(tiny):
    import types

    from pydantic import BaseModel

    from reempathy.registry import discover
    from reempathy.errors import PluginError
    from reempathy.hooks import hookimpl

    class Options(BaseModel):
        pass

    class Typo:
        def __init__(self, options, backbone):
            pass

        @hookimpl
        def reempathy_token(self, session, token):
            return None

    mod = types.ModuleType("typo")

    @hookimpl
    def reempathy_register_strategies(register):
        register("typo", Typo, Options)

    mod.reempathy_register_strategies = reempathy_register_strategies
    registry = discover([("typo", mod)], installed=False).registry
    with pytest.raises(PluginError, match=r"strategy 'typo' of plugin 'typo': hook reempathy_token\(session, token\): "
                       r"argument 'token' is not in the hookspec reempathy_token\(session, token_id\)"):
        registry.create("strategy", "typo", {}, tiny)


def test_a_backbone_that_breaks_the_contract_is_refused_with_one_line(tiny):
    import dataclasses
    import types

    from pydantic import BaseModel

    from reempathy.registry import discover
    from reempathy.errors import PluginError
    from reempathy.hooks import hookimpl

    class Options(BaseModel):
        pass

    def factory(options):
        return dataclasses.replace(tiny, layout=dataclasses.replace(tiny.layout, vocab_size=tiny.layout.vocab_size - 8))

    mod = types.ModuleType("wrong")

    @hookimpl
    def reempathy_register_backbones(register):
        register("wrong", factory, Options)

    mod.reempathy_register_backbones = reempathy_register_backbones
    registry = discover([("wrong", mod)], installed=False).registry
    with pytest.raises(PluginError, match="backbone 'wrong' of plugin 'wrong' breaks the backbone contract: .*logits have"):
        registry.create("backbone", "wrong", {})

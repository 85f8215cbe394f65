"""``reempathy plugin new``: each kind's generated package installs and passes its own tests, on the public API only."""

from __future__ import annotations

import ast
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reempathy.cli import main
from reempathy.plugin_template import KINDS, render

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """One package per kind, written by the command and installed (no index, no deps) into a target folder."""
    tmp = tmp_path_factory.mktemp("templates")
    packages = []
    for kind in KINDS:
        code, out, err = run_cli("plugin", "new", f"my-{kind}", "--kind", kind, "--dir", str(tmp))
        assert code == 0, err
        packages.append(tmp / f"my-{kind}")
    site = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), *map(str, packages)],
        check=True, capture_output=True,
    )
    return tmp, site, packages


def test_generated_packages_pass_their_own_tests(generated):
    tmp, site, packages = generated
    env = {k: v for k, v in os.environ.items() if not k.startswith("REEMPATHY_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib", "--rootdir", str(tmp),
         *[str(p / "tests") for p in packages]],
        capture_output=True, text=True, env=env, cwd=tmp,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_generated_package_has_pyproject_entry_point_plugin_test_and_readme(tmp_path, kind):
    code, out, err = run_cli("plugin", "new", f"my-{kind}", "--kind", kind, "--dir", str(tmp_path))
    assert code == 0, err
    package = tmp_path / f"my-{kind}"
    module = f"my_{kind}"
    assert sorted(p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()) == [
        "README.md", "pyproject.toml", f"src/{module}/__init__.py", f"tests/test_{module}.py",
    ]
    assert f'[project.entry-points.reempathy]\n{module} = "{module}"' in (package / "pyproject.toml").read_text()


@pytest.mark.parametrize("kind", KINDS)
def test_templates_use_only_the_public_api(kind):
    for path, text in render(f"my-{kind}", kind).items():
        if not path.endswith(".py"):
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("reempathy"):
                assert node.module in ("reempathy.api", "reempathy.testing"), (path, node.module)
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("reempathy"), (path, alias.name)


def test_plugin_new_refuses_an_existing_folder_and_leaves_it_untouched(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    code, _, err = run_cli("plugin", "new", "taken", "--kind", "strategy", "--dir", str(tmp_path))
    assert code == 2 and err.startswith("reempathy: error: ") and "already exists" in err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_plugin_new_refuses_a_name_that_is_not_a_package_name(tmp_path):
    code, _, err = run_cli("plugin", "new", "My Plugin!", "--kind", "observer", "--dir", str(tmp_path))
    assert code == 2 and "plugin name 'My Plugin!'" in err and len(err.strip().splitlines()) == 1


def _plugin_module(kind: str, tmp_path: Path):
    """The generated plugin module of ``kind``, imported from its rendered text."""
    import importlib.util

    text = render(f"my-{kind}", kind)[f"src/my_{kind}/__init__.py"]
    path = tmp_path / f"my_{kind}_plugin.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"my_{kind}_plugin", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the postponed annotations through it
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


@pytest.mark.parametrize(("kind", "option"), [("strategy", "spoken"), ("processor", "audio_bias"), ("backbone", "max_context")])
def test_template_options_are_strict_like_the_built_ins(tmp_path, kind, option):
    """``true`` is not 1 in a scaffolded plugin's options either: they derive from reempathy.api.PluginOptions."""
    from pydantic import ValidationError

    from reempathy.api import PluginOptions

    options = _plugin_module(kind, tmp_path).Options
    assert issubclass(options, PluginOptions) or options.model_config == PluginOptions.model_config
    with pytest.raises(ValidationError, match="valid"):
        options.model_validate({"path": "/m", option: True})
    with pytest.raises(ValidationError, match="Extra inputs"):
        options.model_validate({"path": "/m", "no_such_option": 1})


def test_observer_template_options_refuse_any_option(tmp_path):
    from pydantic import ValidationError

    from reempathy.api import PluginOptions

    options = _plugin_module("observer", tmp_path).Options
    assert issubclass(options, PluginOptions)
    with pytest.raises(ValidationError):
        options.model_validate({"verbose": True})

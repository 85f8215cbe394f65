"""The public API: every name importable and documented, and the docs site built from the docstrings without warnings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import reempathy.api as api

ROOT = Path(__file__).resolve().parents[1]


def _griffe_api():
    import griffe

    loader = griffe.GriffeLoader(search_paths=[str(ROOT)])
    package = loader.load("reempathy")
    loader.resolve_aliases(implicit=False, external=False)
    return package["api"]


def test_every_public_name_exists_and_has_a_docstring():
    module = _griffe_api()
    missing = []
    for name in api.__all__:
        assert hasattr(api, name), name
        obj = module[name]
        target = obj.final_target if obj.is_alias else obj
        if not (target.docstring and target.docstring.value.strip()):
            missing.append(name)
        if target.is_class:
            for member_name, member in target.members.items():
                if member_name.startswith("_"):
                    continue
                member = member.final_target if member.is_alias else member
                is_callable = member.is_function or "property" in member.labels
                if is_callable and not (member.docstring and member.docstring.value.strip()):
                    missing.append(f"{name}.{member_name}")
    assert missing == [], f"public names without a docstring: {missing}"


def test_api_version_is_major_minor():
    major, minor = api.API_VERSION.split(".")
    assert major.isdigit() and minor.isdigit()


def test_docs_site_builds_strict_without_warnings(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-3000:]
    reference = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in api.__all__:
        assert f'id="reempathy.api.{name}"' in reference, f"{name} is missing from the API reference page"
    assert 'id="reempathy.decoding.hookspecs.reempathy_token_appended"' in reference


def test_every_testing_helper_has_a_docstring():
    """reempathy.testing is under the API promise too: each exported helper and fixture is documented."""
    import inspect

    import reempathy.testing as testing

    undocumented = [n for n in testing.__all__ if not (inspect.getdoc(getattr(testing, n)) or "").strip()]
    assert testing.__all__ and undocumented == []

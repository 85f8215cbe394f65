"""The layers hold (issue 21): imports go down only, no module imports itself in a circle, and the docs say so.

The layer contract is ``[tool.importlinter]`` in pyproject.toml, checked here by import-linter
itself; the cycle check reads the same import graph (grimp, which import-linter is built on).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Module cycles that are there on purpose, each with its reason. Nothing else may import in a circle.
JUSTIFIED_CYCLES = {
    # decode_batch() hands a static-cache batch to the static loop, imported when asked for; the static
    # loop subclasses the dynamic one. Two modules of one loop, split so that the static path's
    # shapes and graphs read on their own.
    frozenset({"reempathy.decoding.batch", "reempathy.decoding.static_batch"}),
}


def _lint_imports() -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("lint-imports")
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]
    return subprocess.run([*command, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_layer_contract_holds():
    proc = _lint_imports()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _cycles(package: str = "reempathy") -> list[frozenset[str]]:
    """Strongly connected components of more than one module in ``package``'s import graph."""
    import grimp

    graph = grimp.build_graph(package, exclude_type_checking_imports=True)
    adjacency = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    counter = 0
    # Tarjan's algorithm, iteratively (the graph is a few hundred modules deep at most).
    for root in sorted(adjacency):
        if root in index:
            continue
        work = [(root, iter(adjacency[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(adjacency.get(child, []))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def test_no_module_imports_itself_in_a_circle_except_the_justified_ones():
    cycles = set(_cycles())
    assert cycles - JUSTIFIED_CYCLES == set(), f"import cycles: {[sorted(c) for c in cycles - JUSTIFIED_CYCLES]}"


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    # Guards the test above: a package with a circle in it is reported.
    pkg = tmp_path / "circle"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from circle import b\n")
    (pkg / "b.py").write_text("def f():\n    from circle import a\n")
    (pkg / "c.py").write_text("from circle import a\n")  # imports into the circle, not part of it
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _cycles("circle") == [frozenset({"circle.a", "circle.b"})]


@pytest.mark.parametrize("layer", [
    "reempathy.commands", "reempathy.experiments", "reempathy.serve", "reempathy.training", "reempathy.evaluation",
    "reempathy.jobs", "reempathy.data", "reempathy.runner", "reempathy.registry", "reempathy.plugins",
    "reempathy.decoding", "reempathy.backbones", "reempathy.speech",
])
def test_docs_architecture_names_every_layer_and_the_contract_lists_it(layer):
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert f"`{layer}`" in text
    contract = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(rf'"[^"\n]*{re.escape(layer)}\b[^"\n]*"', contract)

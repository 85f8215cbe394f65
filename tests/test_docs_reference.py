"""Docs an author reads without building the site (issue 25): the rendered API reference is current, the
examples of docs/plugins.md use only ``reempathy.api``, and the result schema names both spellings."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from reempathy.tools import apidoc

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_api_reference_is_current():
    committed = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    assert committed == apidoc.render(), "docs/reference.md is stale: run `python -m reempathy.tools.apidoc` and commit it"


def test_the_check_mode_fails_on_a_stale_page(tmp_path, capsys):
    page = tmp_path / "reference.md"
    page.write_text("# an old reference\n")
    assert apidoc.main(["--check", "--out", str(page)]) == 1
    assert "stale" in capsys.readouterr().err
    assert apidoc.main(["--out", str(page)]) == 0 and apidoc.main(["--check", "--out", str(page)]) == 0


def _section(page: str, name: str) -> str:
    start = page.index(f"### `{name}`")
    end = page.find("\n### ", start + 1)
    return page[start:end]


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("DecodeResult", ["spoken_text", "audio_units", "chunks", "hidden", "spans", "stop_reason", "counts", "timings"]),
        ("SpokenChunk", ["index", "text", "text_ids", "audio_units"]),
        ("HiddenSegment", ["kind", "index", "text", "ids", "start", "end"]),
        ("Turn", ["role", "text", "units", "audio"]),
        ("Switch", ["phase", "forced", "hidden", "keep_token", "prefix"]),
        ("Stop", ["reason", "keep_token"]),
        ("Backbone", ["name", "model", "tokenizer", "layout", "stream", "max_context", "encode_text", "decode_text"]),
        ("PluginOptions", []),
    ],
)
def test_the_reference_lists_each_class_with_its_fields(name, fields):
    section = _section(apidoc.render(), name)
    for field in fields:
        assert re.search(rf"`{field}[`(]", section), f"{name}.{field} is missing from docs/reference.md"


def test_the_reference_holds_every_public_name_and_hook():
    import reempathy.api as api
    from reempathy import hookspecs

    page = apidoc.render()
    for name in api.__all__ + list(hookspecs.RUN_HOOKS + hookspecs.DISCOVERY_HOOKS):
        assert f"### `{name}" in page, name
    assert " at 0x" not in page  # nothing that changes from run to run


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


def test_the_plugin_examples_import_only_from_the_public_api():
    blocks = _python_blocks(ROOT / "docs" / "plugins.md")
    assert blocks
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("reempathy"):
                assert node.module == "reempathy.api", (node.module, block[:200])
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("reempathy") for a in node.names), block[:200]


def test_the_evaluator_example_runs_against_the_api():
    block = next(b for b in _python_blocks(ROOT / "docs" / "plugins.md") if "reempathy_register_evaluators" in b)
    namespace: dict = {}
    exec(compile(block, "docs/plugins.md", "exec"), namespace)
    from reempathy.api import EvalItem

    length = namespace["Length"](namespace["LengthOptions"]())
    [evaluation] = length.evaluate([EvalItem("r1", [], "four")])
    assert evaluation.scores == {"length": 4.0} and evaluation.ok


def test_the_result_schema_names_the_json_and_the_python_spelling():
    text = (ROOT / "docs" / "result-schema.md").read_text(encoding="utf-8")
    assert "spoken.chunks" in text and "result.chunks" in text
    assert "result.spoken_text" in text and "result.audio_units" in text


@pytest.mark.parametrize("declared", [(3, 6), (13, 26), (4, 8)])
def test_the_default_chunk_is_the_strategys_whatever_interleave_the_backbone_declares(tiny, tiny_prompt, declared):
    """What the README says (Backbones): 5 + 10 on every backbone with audio, GLM-4-Voice's 13 + 26 included."""
    import dataclasses

    from reempathy.api import LoopOptions, StreamPolicy, decode, default_discovery

    backbone = dataclasses.replace(tiny, stream=StreamPolicy(*declared))
    strategy = default_discovery().registry.create("strategy", "reempathy", {}, backbone)
    result = decode(backbone, tiny_prompt, strategy, [], LoopOptions(max_new_tokens=4, greedy=True))
    assert result.extra["chunk_layout"] == {"text_tokens": 5, "audio_tokens": 10}
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "5 text + 10 audio by default (the paper's) on\nevery backbone" in readme
    assert "a backbone declaring 3 + 6 chunks\n5 + 10 too" in readme

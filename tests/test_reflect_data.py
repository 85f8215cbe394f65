"""``reempathy reflect-data``: per-chunk reflections asked of an evaluator prefix by prefix (issue 12 §3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_evaluators import Scripted, ScriptedPlugin
from reempathy.cli import main
from reempathy import registry as registry_module
from reempathy.decoding.chunking import ChunkLayout, split_spoken

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "empathy_dialogues.jsonl"


@pytest.fixture()
def scripted(monkeypatch, fresh_discovery):
    disc = registry_module.discover(extra_plugins=[("scripted-evaluators", ScriptedPlugin())])
    monkeypatch.setattr(registry_module, "default_discovery", lambda: disc)
    Scripted.reset()
    yield Scripted
    Scripted.reset()


def example_lines(n: int) -> list[str]:
    """The first ``n`` example records, without any reflections they carry (the command writes its own)."""
    out = []
    for line in EXAMPLES.read_text(encoding="utf-8").splitlines()[:n]:
        doc = json.loads(line)
        doc.pop("reflections", None)
        doc.pop("reflections_layout", None)
        out.append(json.dumps(doc))
    return out


def write_data(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def reflect(data: Path, out: Path, *extra: str) -> int:
    return main(["reflect-data", "--data", str(data), "--evaluator", "scripted", "--out", str(out), "--quiet", *extra])


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def full_chunks(backbone, record: dict, layout: ChunkLayout) -> list[list[int]]:
    """The answer's full spoken chunks, computed here from the tokenizer and the shared chunk walk."""
    answer = record["messages"][-1]
    text = backbone.tokenizer.encode(answer["text"], add_special_tokens=False)
    audio = [backbone.layout.unit_to_token(u) for u in answer["units"]]
    return [c for c in split_spoken(text, audio, layout) if len(c) == layout.size]


def prefix_units(backbone, chunks: list[list[int]], k: int) -> list[int]:
    return [backbone.layout.token_to_unit(t) for c in chunks[:k] for t in c if backbone.layout.is_audio(t)]


def test_each_record_gets_a_reflection_per_full_chunk_asked_on_its_prefix(scripted, tiny, tmp_path, capsys):
    data = write_data(tmp_path / "train.jsonl", example_lines(3))
    out = tmp_path / "train.reflect.jsonl"
    assert reflect(data, out) == 0
    written = records(out)
    given = [json.loads(line) for line in data.read_text().splitlines()]
    layout = ChunkLayout(5, 10)
    for n, (before, after) in enumerate(zip(given, written), start=1):
        chunks = full_chunks(tiny, before, layout)
        assert len(chunks) >= 2
        items = [i for i in scripted.items if i.id.startswith(f"{n}#")]
        # One question per full chunk k: the dialogue before the answer, the answer up to chunk k.
        assert [i.id for i in items] == [f"{n}#{k}" for k in range(1, len(chunks) + 1)]
        for k, item in enumerate(items, start=1):
            assert item.answer_units == prefix_units(tiny, chunks, k)
            assert item.messages[0]["text"] == before["messages"][0]["text"] and len(item.messages) == 1
            assert f"spoken chunk {k}" in item.instruction
        # The record as it was, plus the reflections in chunk order and the layout they belong to.
        assert after == {**before, "reflections": [f"reflection on {len(i.answer_units)} units and "
                                                   f"{len(i.answer_text.split())} words" for i in items],
                         "reflections_layout": "5+10"}
    assert scripted.calls == [[f"{n}#{k}" for k in range(1, len(full_chunks(tiny, g, layout)) + 1)]
                              for n, g in enumerate(given, start=1)]  # one evaluator call per record
    assert not Path(f"{out}.partial").exists() and not Path(f"{out}.partial.json").exists()
    assert "3 records given" in capsys.readouterr().out


def test_the_layout_comes_from_the_flag_then_the_config(scripted, tiny, tmp_path):
    data = write_data(tmp_path / "train.jsonl", example_lines(1))
    config = tmp_path / "train-reempathy.toml"
    config.write_text('[backbone]\nname = "tiny"\n[strategy]\nname = "reempathy"\ntext_tokens = 7\naudio_tokens = 14\n'
                      '[data]\npath = "x.jsonl"\n[train]\noutput_dir = "runs/x"\n')
    assert reflect(data, tmp_path / "a.jsonl", "--config", str(config)) == 0
    assert reflect(data, tmp_path / "b.jsonl", "--config", str(config), "--layout", "3+6") == 0
    record = json.loads(data.read_text())
    for name, layout in (("a.jsonl", ChunkLayout(7, 14)), ("b.jsonl", ChunkLayout(3, 6))):
        (doc,) = records(tmp_path / name)
        assert doc["reflections_layout"] == f"{layout.text_tokens}+{layout.audio_tokens}"
        assert len(doc["reflections"]) == len(full_chunks(tiny, record, layout))


def test_an_answer_shorter_than_one_chunk_gets_no_reflection_and_no_question(scripted, tmp_path):
    doc = json.loads(example_lines(1)[0])
    doc["messages"][-1] = {"role": "assistant", "text": "Oh.", "units": [5, 6, 7]}
    data = write_data(tmp_path / "train.jsonl", [json.dumps(doc)])
    assert reflect(data, tmp_path / "out.jsonl") == 0
    assert records(tmp_path / "out.jsonl") == [{**doc, "reflections": [], "reflections_layout": "5+10"}]
    assert scripted.calls == []


def bad_data(tmp_path: Path) -> Path:
    good = example_lines(2)
    unlaid = json.loads(good[1])
    unlaid["messages"][-1]["units"] = unlaid["messages"][-1]["units"][:3]  # far too few units for its text
    return write_data(tmp_path / "train.jsonl", [good[0], '{"messages": [', json.dumps(unlaid), good[1]])


def test_a_bad_record_names_its_line_and_nothing_is_written(scripted, tmp_path, capsys):
    data = bad_data(tmp_path)
    out = tmp_path / "out.jsonl"
    assert reflect(data, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{data}:2: malformed JSON" in err and f"{data}:3: the answer cannot be laid out in 5+10 chunks" in err
    assert "--skip-bad" in err
    assert list(tmp_path.iterdir()) == [data] and scripted.calls == []


def test_skip_bad_leaves_bad_records_out_and_counts_them(scripted, tmp_path, capsys):
    data = bad_data(tmp_path)
    out = tmp_path / "out.jsonl"
    assert reflect(data, out, "--skip-bad") == 0
    lines = data.read_text().splitlines()
    assert [r["messages"] for r in records(out)] == [json.loads(lines[0])["messages"], json.loads(lines[3])["messages"]]
    assert f"skipped 2 bad records (first: {data}:2: malformed JSON" in capsys.readouterr().out


def test_a_prefix_the_evaluator_fails_on_leaves_its_record_out_reported_and_retried(scripted, tmp_path, capsys):
    data = write_data(tmp_path / "train.jsonl", example_lines(3))
    out = tmp_path / "out.jsonl"
    scripted.fail = {"2#3"}
    assert reflect(data, out) == 1
    err = capsys.readouterr().err
    assert f"first: {data}:2: reflection 3: the evaluator failed: scripted failure" in err and "rerun" in err
    assert not out.exists()  # never a record with a hole, never an unfinished file at OUT
    assert [e["id"] for e in records(Path(f"{out}.partial"))] == ["1", "3"]
    scripted.fail, scripted.calls = set(), []
    assert reflect(data, out) == 0
    assert [c[0].split("#")[0] for c in scripted.calls] == ["2"]  # only the failed record is asked again
    assert [len(r["reflections"]) for r in records(out)] == [len(c) for c in _questions(scripted, 3)]


def _questions(scripted, n: int) -> list[list[str]]:
    """Item ids per record over every call so far (each record once)."""
    seen: dict[str, list[str]] = {}
    for item in scripted.items:
        seen.setdefault(item.id.split("#")[0], [])
        if item.id not in seen[item.id.split("#")[0]]:
            seen[item.id.split("#")[0]].append(item.id)
    return [seen[str(k)] for k in range(1, n + 1)]


def test_skip_bad_finishes_without_the_records_the_evaluator_failed_on(scripted, tmp_path, capsys):
    data = write_data(tmp_path / "train.jsonl", example_lines(3))
    scripted.fail = {"2#1"}
    assert reflect(data, tmp_path / "out.jsonl", "--skip-bad") == 0
    assert len(records(tmp_path / "out.jsonl")) == 2
    assert f"left out 1 the evaluator failed on (first: {data}:2: reflection 1" in capsys.readouterr().out


def test_an_interrupted_run_resumes_without_duplicates_or_torn_lines(scripted, tmp_path):
    data = write_data(tmp_path / "train.jsonl", example_lines(4))
    whole = tmp_path / "whole.jsonl"
    assert reflect(data, whole) == 0
    out = tmp_path / "out.jsonl"
    scripted.reset()
    scripted.crash_on_call = 3  # the evaluator's own code fails while asked about record 3
    assert reflect(data, out) != 0  # the evaluator's own failure (PluginFailure)
    partial = Path(f"{out}.partial")
    assert [e["id"] for e in records(partial)] == ["1", "2"] and not out.exists()
    with partial.open("a") as fh:  # and the process died in the middle of writing record 3's line
        fh.write('{"id": "3", "line": 3, "record": {"messa')
    scripted.reset()
    assert reflect(data, out) == 0
    assert [c[0].split("#")[0] for c in scripted.calls] == ["3", "4"]  # records done are not asked again
    assert out.read_bytes() == whole.read_bytes()  # each record once, in data order, as an uninterrupted run


KILLER_PLUGIN = '''
import os, signal
from pydantic import BaseModel
from reempathy.evaluation.base import Evaluation
from reempathy.hooks import hookimpl

class Options(BaseModel):
    pass

class Killer:
    score_names = ()
    calls = 0

    def __init__(self, options):
        pass

    def evaluate(self, items):
        Killer.calls += 1
        if Killer.calls == int(os.environ["KILL_ON_CALL"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return [Evaluation(i.id, {}, f"reflection {i.id}") for i in items]

@hookimpl
def reempathy_register_evaluators(register):
    register("killer", Killer, Options, "dies mid-run (tests)")
'''


def test_sigkill_loses_only_the_record_in_flight(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "killer.py").write_text(KILLER_PLUGIN)
    data = write_data(tmp_path / "train.jsonl", example_lines(4))
    out = tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "reempathy", "--plugins-dir", str(plugins), "reflect-data", "--data", str(data),
            "--evaluator", "killer", "--out", str(out), "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", KILL_ON_CALL="3")
    killed = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    partial = Path(f"{out}.partial").read_bytes()
    assert partial.endswith(b"\n") and [json.loads(x)["id"] for x in partial.splitlines()] == ["1", "2"]
    assert not out.exists()
    rerun = subprocess.run(args, cwd=ROOT, env=dict(env, KILL_ON_CALL="0"), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    written = records(out)
    assert len(written) == 4 and all(r["reflections"][0] == f"reflection {n}#1" for n, r in enumerate(written, 1))


def test_a_rerun_with_other_settings_is_refused_naming_the_difference(scripted, tmp_path, capsys):
    data = write_data(tmp_path / "train.jsonl", example_lines(2))
    out = tmp_path / "out.jsonl"
    scripted.crash_on_call = 2
    assert reflect(data, out) != 0
    capsys.readouterr()
    assert reflect(data, out, "--layout", "3+6") == 2
    err = capsys.readouterr().err
    assert 'layout: "5+10" there, "3+6" now' in err and "--force" in err
    assert reflect(data, out, "--set", "label=other") == 2
    assert 'evaluator.options.label: "scripted" there, "other" now' in capsys.readouterr().err
    scripted.reset()
    assert reflect(data, out, "--layout", "3+6", "--force") == 0
    assert {r["reflections_layout"] for r in records(out)} == {"3+6"}


def test_a_finished_output_is_kept_unless_forced(scripted, tmp_path, capsys):
    data = write_data(tmp_path / "train.jsonl", example_lines(1))
    out = tmp_path / "out.jsonl"
    assert reflect(data, out) == 0
    before = out.read_bytes()
    assert reflect(data, out) == 2
    assert "exists and is finished" in capsys.readouterr().err and out.read_bytes() == before


def test_a_template_with_an_unknown_placeholder_is_refused_before_anything_runs(scripted, tmp_path, capsys):
    data = write_data(tmp_path / "train.jsonl", example_lines(1))
    template = tmp_path / "template.txt"
    template.write_text("Reflect on chunk {k} of {total}.")
    assert reflect(data, tmp_path / "out.jsonl", "--template", str(template)) == 2
    err = capsys.readouterr().err
    assert "unknown placeholder {total}" in err and "{answer_so_far}" in err and scripted.calls == []


def test_the_template_is_rendered_for_each_prefix(scripted, tmp_path):
    data = write_data(tmp_path / "train.jsonl", example_lines(1))
    template = tmp_path / "template.txt"
    template.write_text("Chunk {k} of {chunks}. So far: {answer_so_far} | latest: {latest} | user: {user} {{literal}}")
    assert reflect(data, tmp_path / "out.jsonl", "--template", str(template)) == 0
    first, second = scripted.items[:2]
    user = json.loads(data.read_text())["messages"][0]["text"]
    n = len(scripted.items)
    assert first.instruction == f"Chunk 1 of {n}. So far: {first.answer_text} | latest: {first.answer_text} | user: {user} {{literal}}"
    assert second.instruction.startswith(f"Chunk 2 of {n}. So far: {second.answer_text} | latest: ")
    assert second.answer_text.startswith(first.answer_text)


def test_reflect_data_output_trains_the_reempathy_strategy(scripted, tiny, tmp_path):
    data = write_data(tmp_path / "train.jsonl", example_lines(2))
    out = tmp_path / "train.reflect.jsonl"
    assert reflect(data, out) == 0
    config = tmp_path / "train.toml"
    config.write_text(f'[backbone]\nname = "tiny"\n[strategy]\nname = "reempathy"\ntext_tokens = 5\naudio_tokens = 10\n'
                      f'[data]\npath = "{out}"\n[train]\noutput_dir = "{tmp_path / "ckpt"}"\nmax_steps = 1\n'
                      f'batch_size = 2\nsave_steps = 100\n')
    assert main(["train", "--config", str(config), "--quiet"]) == 0
    assert json.loads((tmp_path / "ckpt" / "reempathy.json").read_text())["training"]["records"] == 2


def test_the_reempathy_builder_places_each_written_reflection_after_its_chunk(scripted, tiny, tmp_path):
    from reempathy.training.builders import REFLECTION, ReempathyBuild, build_reempathy
    from reempathy.data.records import load_records

    data = write_data(tmp_path / "train.jsonl", example_lines(2))
    out = tmp_path / "train.reflect.jsonl"
    assert reflect(data, out) == 0
    for sr, doc in zip(load_records(out).records, records(out)):
        seq = build_reempathy(sr, tiny, ReempathyBuild(text_tokens=5, audio_tokens=10))
        spans, ids = seq.spans, seq.input_ids
        runs, current = [], []
        for i, label in enumerate(spans):  # the reflection spans in order, each a run of positions
            if label == REFLECTION:
                current.append(ids[i])
            elif current:
                runs.append(current)
                current = []
        assert [tiny.tokenizer.decode(r) for r in runs] == doc["reflections"]


def test_llm_judge_on_an_endpoint_writes_the_reflections(tmp_path):
    from evaluation_helpers import ChatServer, user_text

    data = write_data(tmp_path / "train.jsonl", example_lines(1))
    out = tmp_path / "out.jsonl"
    with ChatServer(lambda body: (200, "  Names the hurt;\n next, offer hope. ")) as server:
        assert main(["reflect-data", "--data", str(data), "--evaluator", "llm-judge", "--out", str(out), "--quiet",
                     "--set", f"endpoint={server.url}", "--set", "model=m", "--set", "retries=0"]) == 0
    (doc,) = records(out)
    assert doc["reflections"] == ["Names the hurt; next, offer hope."] * len(server.requests)
    first, second = (user_text(r) for r in server.requests[:2])
    assert "spoken chunk 1" in first and "spoken chunk 2" in second and "Reply with the note only" in first
    answer = json.loads(data.read_text())["messages"][-1]["text"]
    said = lambda text: text.split("The assistant's spoken answer:\n")[1].split("\n\n")[0]  # noqa: E731
    assert answer.startswith(said(first)) and answer.startswith(said(second)) and len(said(second)) > len(said(first))

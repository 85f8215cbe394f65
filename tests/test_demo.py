"""``reempathy demo``: a tiny base, four checkpoints trained on it, cached, and compared on one prompt."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from reempathy.cli import main
from reempathy.decoding.result import HiddenSegment, SpokenChunk
from reempathy.training.cli import add_demo_parser
from reempathy.training.demo import DemoRow, cache_key, format_rows, project_root, run_demo, units_path
from reempathy.training.demo_base import BASE_SETTINGS


def test_demo_trains_a_base_and_each_strategy_then_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative cache folder, as the CLI's default .cache/demo is
    lines: list[str] = []
    rows = run_demo("cache", say=lines.append, max_steps=1, base_steps=1)
    assert [r.name for r in rows] == ["sft", "cotbs", "reempathy", "dpo"]
    assert [r.strategy for r in rows] == ["sft", "cotbs", "reempathy", "sft"]
    assert all(r.result is not None and not r.cached for r in rows), [r.error for r in rows]
    assert any(line.lstrip().startswith("base ") and "1 steps" in line for line in lines)
    report = lines[-1]
    assert "prompt of the first training record" in report and "ms/token" in report
    assert "'I failed my driving test today and I feel so stupid.'" in report
    # The checkpoints name their base by an absolute path: a sweep or decode from another folder finds it.
    (manifest,) = (tmp_path / "cache").glob("*/sft/reempathy.json")
    base_path = json.loads(manifest.read_text())["backbone"]["options"]["path"]
    assert Path(base_path).is_absolute() and Path(base_path).is_dir()
    again: list[str] = []
    rows = run_demo("cache", say=again.append, max_steps=1, base_steps=1)
    assert all(r.cached for r in rows)
    assert sum("cached in" in line for line in again) == 5  # the base and four checkpoints


class _Result:
    """What format_rows reads of a DecodeResult: one spoken chunk, its reflection, the next chunk."""

    def __init__(self):
        self.chunks = [SpokenChunk(1, "I'm sorry", [1, 2], [5] * 10, 10, 25), SpokenChunk(2, ", that", [3], [6] * 10, 30, 45)]
        self.hidden = [HiddenSegment("reflection", 1, "Starts warm.", [7, 8], 26, 29)]
        self.spoken_text, self.spoken_text_ids, self.audio_units = "I'm sorry, that", [1, 2, 3], [5] * 10 + [6] * 10
        self.stop_reason = "stop_token"

        class T:
            prefill_s, total_s, time_to_first_audio_s = 0.01, 0.1, 0.02

        class C:
            generated = 20

        self.timings, self.counts = T(), C()


def test_each_reflection_is_shown_right_after_the_chunk_it_follows():
    text = format_rows("hi", [DemoRow(name="reempathy", strategy="reempathy", result=_Result())])
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if "spoken  1: \"I'm sorry\"" in line)
    assert "reflection 1: 'Starts warm.'" in lines[first + 1]
    assert "spoken  2: ', that'" in lines[first + 2]


def test_demo_parser_takes_cache_force_and_heldout():
    parser = argparse.ArgumentParser()
    add_demo_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--cache", "somewhere", "--force", "--heldout"])
    assert (args.cache, args.force, args.heldout, args.command) == ("somewhere", True, True, "demo")


@pytest.mark.parametrize("kind, message", [("directory", "is a directory"), ("fifo", "is a named pipe")])
def test_a_units_path_that_is_not_a_file_is_refused_before_any_training(tmp_path, capsys, kind, message):
    directory = tmp_path / cache_key(project_root(), None, BASE_SETTINGS)
    directory.mkdir()
    units = units_path(directory)
    units.mkdir() if kind == "directory" else os.mkfifo(units)
    assert main(["demo", "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "units file" in err and message in err
    assert os.listdir(directory) == [units.name]  # no base, no checkpoint trained


def test_a_cache_path_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "cache").write_text("a file")
    assert main(["demo", "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "demo cache directory" in err

"""``reempathy demo``: four tiny checkpoints trained, cached, and compared on a held-out prompt."""

from __future__ import annotations

import argparse

from reempathy.training.cli import add_demo_parser
from reempathy.training.demo import run_demo


def test_demo_trains_each_strategy_then_reuses_the_cache(tmp_path):
    lines: list[str] = []
    rows = run_demo(tmp_path, say=lines.append, max_steps=1)
    assert [r.name for r in rows] == ["sft", "cotbs", "reempathy", "dpo"]
    assert [r.strategy for r in rows] == ["sft", "cotbs", "reempathy", "sft"]
    assert all(r.result is not None and not r.cached for r in rows), [r.error for r in rows]
    report = lines[-1]
    assert "held-out prompt" in report and "ms/token" in report
    again: list[str] = []
    rows = run_demo(tmp_path, say=again.append, max_steps=1)
    assert all(r.cached for r in rows)
    assert sum("cached in" in line for line in again) == 4


def test_demo_parser_takes_cache_and_force():
    parser = argparse.ArgumentParser()
    add_demo_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--cache", "somewhere", "--force"])
    assert (args.cache, args.force, args.command) == ("somewhere", True, "demo")

"""``reempathy bench``: every figure for every strategy in --json, a PNG from --plot, one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from reempathy.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/reempathy.toml")
STRATEGIES = ("sft", "cotbs", "reempathy")
FIELDS = {
    "time_to_first_token_s",
    "time_to_first_audio_s",
    "inter_token_latency_s",
    "tokens_per_s",
    "hidden_per_spoken",
    "realtime_margin",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One small bench of three strategies (tiny backbone, 24 tokens, one timed run) with --json and --plot."""
    out = tmp_path_factory.mktemp("bench")
    code, stdout, stderr = run(
        "bench", "--config", CONFIG, "--strategies", ",".join(STRATEGIES), "--runs", "1",
        "--max-new-tokens", "24", "--ignore-stop", "--json", str(out / "bench.json"), "--plot", str(out / "bench.png"),
    )
    return code, stdout, stderr, out


def test_json_has_every_field_for_every_strategy(bench_run):
    code, _, _, out = bench_run
    assert code == 0
    doc = json.loads((out / "bench.json").read_text())
    assert doc["schema"] == "reempathy.bench/1"
    assert list(doc["strategies"]) == list(STRATEGIES)
    assert doc["audio_rate_hz"] == 12.5 and doc["runs"] == 1
    for name, s in doc["strategies"].items():
        assert FIELDS <= set(s), name
        assert set(s["inter_token_latency_s"]) == {"p50", "p90", "p99"}
        assert s["time_to_first_token_s"] > 0 and s["tokens_per_s"] > 0
        assert s["inter_token_latency_s"]["p50"] <= s["inter_token_latency_s"]["p99"]
        (run_,) = s["runs"]
        assert run_["generated_tokens"] == 24 and len(run_["token_latencies_s"]) == 24
    reempathy = doc["strategies"]["reempathy"]
    assert reempathy["hidden_per_spoken"] > 0 and reempathy["realtime_margin"] > 0
    assert doc["strategies"]["sft"]["hidden_per_spoken"] == 0


def test_hidden_steps_map_latency_indices_to_reflections(bench_run):
    # configs/reempathy.toml speaks 5 + 10 tokens, then reflects: steps 15.. of the 24 are reflection 1.
    doc = json.loads((bench_run[3] / "bench.json").read_text())
    reempathy = doc["strategies"]["reempathy"]
    assert reempathy["trace_matches"]
    assert reempathy["hidden_steps"] == [{"kind": "reflection", "index": 1, "start": 15, "end": 24}]
    assert doc["strategies"]["sft"]["hidden_steps"] == []


def test_cotbs_without_audio_in_budget_reports_null_time_to_first_audio(bench_run):
    # 24 tokens are all spent thinking (the thought runs to 64): no audio, so no audio timing.
    doc = json.loads((bench_run[3] / "bench.json").read_text())
    cotbs = doc["strategies"]["cotbs"]
    assert cotbs["time_to_first_audio_s"] is None and cotbs["realtime_margin"] == 0


def test_plot_writes_a_png(bench_run):
    png = (bench_run[3] / "bench.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


def test_outputs_are_written_without_leftover_temporary_files(bench_run):
    assert sorted(p.name for p in bench_run[3].iterdir()) == ["bench.json", "bench.png"]


def test_table_on_stdout_names_every_strategy(bench_run):
    stdout = bench_run[1]
    assert "TTFT" in stdout and "RT margin" in stdout
    for name in STRATEGIES:
        assert any(line.startswith(name) for line in stdout.splitlines())


def test_unknown_strategy_exits_2_with_a_one_line_error(tmp_path):
    code, stdout, stderr = run("bench", "--config", CONFIG, "--strategies", "sft,nope", "--json", str(tmp_path / "b.json"))
    assert code == 2
    assert stderr.count("\n") == 1 and "unknown strategy 'nope'" in stderr
    assert not (tmp_path / "b.json").exists()


def test_unwritable_output_path_exits_2_with_a_one_line_error(tmp_path):
    target = tmp_path / "missing" / "b.json"
    code, _, stderr = run("bench", "--config", CONFIG, "--json", str(target))
    assert code == 2
    assert stderr.count("\n") == 1 and "--json" in stderr and "does not exist" in stderr


def test_table_columns_stay_aligned_with_long_strategy_names_and_large_figures():
    from reempathy.bench import format_table

    def summary(name, ms):
        return {
            "strategy": name, "time_to_first_token_s": ms / 1e3, "time_to_first_audio_s": None,
            "inter_token_latency_s": {"p50": ms / 1e3, "p90": ms / 1e3, "p99": ms / 1e3},
            "tokens_per_s": 12.5, "hidden_per_spoken": None, "realtime_margin": 1.5, "generated_tokens": 24,
        }

    doc = {
        "environment": {"gpu": None, "cpu": "cpu"}, "backbone": "tiny", "device": "cpu", "cache": "dynamic",
        "compile": False, "timer": "perf_counter", "runs": 1, "max_new_tokens": 24, "ignore_stop": False,
        "audio_rate_hz": 12.5,
        "strategies": {"sft": summary("sft", 1.0), "x": summary("reempathy-with-a-very-long-name", 123456.78)},
    }
    lines = format_table(doc).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("strategy"))
    table = lines[header : header + 3]
    assert len({len(line) for line in table}) == 1  # every right-aligned column ends at the same place
    ends = [[m.end() for m in re.finditer(r"\S+", line)] for line in table]
    assert ends[1][1:] == ends[2][1:]  # numbers line up under each other (header words may contain spaces)
    assert "123456.78" in table[2] and table[2].startswith("reempathy-with-a-very-long-name  ")

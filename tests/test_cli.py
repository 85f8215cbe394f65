"""The CLI: decoding from the shipped configs, and one-line errors with exit status 2 for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reempathy.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_decode_sft_config_prints_json_with_the_documented_fields(capsys):
    code, out, _ = run(capsys, "decode", "--config", str(ROOT / "configs/sft.toml"), "--json", "--max-new-tokens", "12")
    assert code == 0
    data = json.loads(out)
    assert data["schema"] == "reempathy.result/1"
    assert set(data) >= {"strategy", "backbone", "spoken", "hidden", "spans", "stop_reason", "counts", "timings"}
    assert set(data["spoken"]) == {"text", "text_ids", "audio_units", "chunks"}
    assert len(data["timings"]["token_latencies_s"]) == data["counts"]["generated"]


def test_decode_human_output_shows_answer_and_timings(capsys):
    code, out, _ = run(capsys, "decode", "--config", str(ROOT / "configs/sft.toml"), "--max-new-tokens", "5")
    assert code == 0
    assert "spoken text:" in out and "timings:" in out


def test_seed_flag_makes_two_runs_identical(capsys):
    args = ("decode", "--config", str(ROOT / "configs/sft.toml"), "--json", "--seed", "5", "--max-new-tokens", "10")
    a = json.loads(run(capsys, *args)[1])["ids"]
    b = json.loads(run(capsys, *args)[1])["ids"]
    assert a == b


def test_units_file_is_accepted_as_the_prompt(capsys, tmp_path):
    units = tmp_path / "u.json"
    units.write_text("[1, 2, 3, 500, 1023]")
    code, out, _ = run(capsys, "decode", "--units", str(units), "--json", "--max-new-tokens", "4")
    assert code == 0, out
    assert json.loads(out)["counts"]["generated"] >= 1


def test_plugins_lists_builtins_with_hooks_and_versions(capsys):
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    assert "reempathy.plugins.strategies  [built-in]  reempathy " in out
    assert "strategy sft" in out and "hooks: reempathy_register_strategies" in out


def _one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("reempathy: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_config_file_is_a_one_line_error(capsys):
    code, _, err = run(capsys, "decode", "--config", "nope/missing.toml")
    _one_line_error(code, err, "missing.toml", "not found")


def test_unknown_top_level_key_is_named(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[strategy]\nname = "sft"\n[bogus]\nx = 1\n')
    code, _, err = run(capsys, "decode", "--config", str(cfg))
    _one_line_error(code, err, "'bogus'", "valid keys")


def test_unknown_key_in_a_section_is_named(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[sampling]\ntemprature = 0.5\n")
    code, _, err = run(capsys, "decode", "--config", str(cfg), "--prompt", "hi")
    _one_line_error(code, err, "temprature", "temperature")


def test_unknown_strategy_lists_the_available_ones(capsys):
    code, _, err = run(capsys, "decode", "--strategy", "nosuch", "--prompt", "hi")
    _one_line_error(code, err, "unknown strategy 'nosuch'", "available:", "sft")


def test_unknown_strategy_option_is_named(capsys):
    code, _, err = run(capsys, "decode", "--set", "strategy.bogus=1", "--prompt", "hi")
    _one_line_error(code, err, "'bogus'", "strategy 'sft'")


def test_empty_prompt_is_refused(capsys):
    code, _, err = run(capsys, "decode", "--prompt", "   ")
    _one_line_error(code, err, "prompt is empty")


def test_prompt_longer_than_the_context_is_refused(capsys):
    code, _, err = run(capsys, "decode", "--set", "backbone.max_context=64", "--prompt", "so tired " * 40)
    _one_line_error(code, err, "longer than the backbone's context of 64")


def test_unit_ids_outside_the_audio_range_are_refused(capsys, tmp_path):
    units = tmp_path / "u.txt"
    units.write_text("1 2 99999")
    code, _, err = run(capsys, "decode", "--units", str(units))
    _one_line_error(code, err, "99999", "outside the audio range 0..1023")


def test_bad_override_value_names_the_option(capsys):
    code, _, err = run(capsys, "decode", "--set", "sampling.top_p=2.5", "--prompt", "hi")
    _one_line_error(code, err, "sampling.top_p")


@pytest.mark.parametrize("content", ["", "1 two 3"])
def test_bad_units_files_are_refused(capsys, tmp_path, content):
    units = tmp_path / "u.txt"
    units.write_text(content)
    code, _, err = run(capsys, "decode", "--units", str(units))
    _one_line_error(code, err, str(units))

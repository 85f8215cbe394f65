"""Prompts, units files and training records: what is not valid is named, never half read (issue 16 items 12, 13, 21)."""

from __future__ import annotations

import json

import pytest

from reempathy.cli import main
from reempathy.errors import InputError
from reempathy.runner import read_units
from reempathy.data.records import load_records

GOOD = {"messages": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "hello", "units": [1, 2]}]}


def error_line(capsys, *args) -> str:
    code = main(list(args))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_a_prompt_that_is_not_utf8_on_the_command_line_is_named(capsys):
    # What Python makes of the bytes $'\xff\xfe hello' in argv: lone surrogates.
    line = error_line(capsys, "decode", "--prompt", "\udcff\udcfe hello", "--max-new-tokens", "2")
    assert "the prompt is not valid Unicode at character 1" in line


def test_a_system_prompt_with_a_lone_surrogate_is_named(capsys):
    assert "decode.system_prompt" in error_line(capsys, "decode", "--prompt", "hi", "--set", 'decode.system_prompt="a\udcff"')


def test_a_units_file_mixing_tokens_and_words_is_refused(tmp_path):
    units = tmp_path / "u.txt"
    units.write_text("hello <|audio_3|> 5 6")
    with pytest.raises(InputError, match="mixes <|audio_N|> tokens with other text"):
        read_units(units)


@pytest.mark.parametrize("text", ["1 2 x", "1.5 2", "1_000", "[1, true]", "[[1]]", '{"a": 1}'])
def test_a_units_file_with_anything_but_integers_is_refused(tmp_path, text):
    units = tmp_path / "u.txt"
    units.write_text(text)
    with pytest.raises(InputError, match="units file"):
        read_units(units)


def test_a_deeply_nested_units_file_is_one_error(tmp_path):
    units = tmp_path / "u.json"
    units.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(InputError, match="not a valid JSON list"):
        read_units(units)


def test_a_units_path_that_is_a_folder_says_folder(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        read_units(tmp_path)


def test_units_in_all_three_forms_still_read(tmp_path):
    for text in ("[1, 2, 3]", "1 2\n3", "1,2,3", "<|audio_1|><|audio_2|> <|audio_3|>"):
        (tmp_path / "u").write_text(text)
        assert read_units(tmp_path / "u") == [1, 2, 3]


def write_jsonl(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_a_training_line_that_is_not_utf8_is_a_bad_record_not_replacement_characters(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD).encode(), json.dumps(GOOD).encode().replace(b"hello", b"h\xffllo")])
    with pytest.raises(InputError, match=r"d.jsonl:2: not UTF-8 text"):
        load_records(data)
    assert len(load_records(data, skip_bad=True)) == 1


def test_a_training_text_with_a_lone_surrogate_escape_is_named(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD).encode().replace(b"hello", b"h\\ud800llo")])
    with pytest.raises(InputError, match=r"d.jsonl:1: .*lone surrogate"):
        load_records(data)


@pytest.mark.parametrize("skip_bad", [False, True])
def test_a_training_line_nested_5000_deep_is_a_bad_record(tmp_path, skip_bad):
    data = write_jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD).encode(), b"[" * 5000 + b"]" * 5000])
    if skip_bad:
        result = load_records(data, skip_bad=True)
        assert len(result) == 1 and "d.jsonl:2" in str(result.skipped[0])
    else:
        with pytest.raises(InputError, match=r"d.jsonl:2: JSON nested too deeply"):
            load_records(data)


@pytest.mark.parametrize("score", ["true", '"4"', "NaN"])
def test_a_score_must_be_a_number(tmp_path, score):
    record = dict(GOOD, assessment={"text": "ok", "scores": {
        "need_support": 4, "wording_appropriateness": 4, "emotion_understanding": 4, "emotional_support": 4}})
    line = json.dumps(record).replace('"need_support": 4', f'"need_support": {score}')
    data = write_jsonl(tmp_path / "d.jsonl", [line.encode()])
    with pytest.raises(InputError, match="need_support"):
        load_records(data)

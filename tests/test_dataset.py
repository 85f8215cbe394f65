"""The training dataset: OpenS2S-style records, validated line by line with FILE:LINE errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reempathy.errors import InputError
from reempathy.data.records import load_records

ROOT = Path(__file__).resolve().parents[1]
SCORES = {"need_support": 4, "wording_appropriateness": 3, "emotion_understanding": 5, "emotional_support": 4}


def record(**changes):
    r = {
        "messages": [
            {"role": "user", "text": "I lost my job.", "units": [1, 2, 3]},
            {"role": "assistant", "text": "I'm sorry.", "units": [4, 5, 6, 7]},
        ],
        "assessment": {"text": "Warm but short.", "scores": dict(SCORES)},
    }
    r.update(changes)
    return r


def write(tmp_path: Path, lines: list) -> Path:
    p = tmp_path / "data.jsonl"
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return p


def test_valid_records_load_with_their_line_numbers(tmp_path):
    p = write(tmp_path, [record(), "", record()])
    rs = load_records(p, audio_count=1024)
    assert [r.where for r in rs.records] == [f"{p}:1", f"{p}:3"]
    assert rs.records[0].record.assessment.scores.total() == 16


def test_units_may_be_a_string_of_audio_tokens(tmp_path):
    r = record()
    r["messages"][1]["units"] = "<|audio_12|><|audio_7|> <|audio_0|>"
    rs = load_records(write(tmp_path, [r]), audio_count=1024)
    assert rs.records[0].record.messages[1].units == [12, 7, 0]


def test_keys_the_schema_does_not_name_are_ignored(tmp_path):
    r = record(id="abc", source="opens2s")
    r["messages"][0]["audio"] = "clip.wav"
    assert len(load_records(write(tmp_path, [r]), audio_count=1024)) == 1


def test_malformed_json_line_is_named_by_file_and_line(tmp_path):
    p = write(tmp_path, [record(), '{"messages": [', record()])
    with pytest.raises(InputError, match=rf"{p}:2: malformed JSON"):
        load_records(p, audio_count=1024)


def test_missing_field_is_named_with_file_and_line(tmp_path):
    p = write(tmp_path, [record(), {"assessment": record()["assessment"]}])
    with pytest.raises(InputError, match=rf"{p}:2: missing field 'messages'"):
        load_records(p, audio_count=1024)


def test_missing_role_is_named_with_its_path(tmp_path):
    r = record()
    del r["messages"][1]["role"]
    p = write(tmp_path, [r])
    with pytest.raises(InputError, match=rf"{p}:1: missing field 'messages.1.role'"):
        load_records(p, audio_count=1024)


def test_audio_unit_out_of_the_backbones_range_is_named(tmp_path):
    r = record()
    r["messages"][1]["units"] = [4, 1024]
    p = write(tmp_path, [record(), r])
    with pytest.raises(InputError, match=rf"{p}:2: messages.1.units: audio unit 1024 is outside the backbone's range 0..1023"):
        load_records(p, audio_count=1024)


def test_score_outside_one_to_five_is_named(tmp_path):
    r = record()
    r["assessment"]["scores"]["emotional_support"] = 7
    p = write(tmp_path, [r])
    with pytest.raises(InputError, match=rf"{p}:1: assessment.scores.emotional_support"):
        load_records(p, audio_count=1024)


def test_message_without_text_or_units_is_refused(tmp_path):
    r = record()
    r["messages"][0] = {"role": "user", "text": None, "units": None}
    with pytest.raises(InputError, match=r":1: .*needs text or units"):
        load_records(write(tmp_path, [r]), audio_count=1024)


def test_one_error_lists_the_first_bad_lines_and_counts_the_rest(tmp_path):
    bad = "not json"
    p = write(tmp_path, [bad, record(), bad, bad, bad, bad])
    with pytest.raises(InputError) as info:
        load_records(p, audio_count=1024)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"5 bad records in {p}: {p}:1: malformed JSON")
    assert f"{p}:3:" in message and f"{p}:4:" in message
    assert "and 2 more bad lines" in message
    assert "skip_bad" in message


def test_skip_bad_keeps_the_good_records_and_counts_the_bad(tmp_path):
    r = record()
    r["messages"][1]["units"] = [5000]
    p = write(tmp_path, [record(), "{", r, record()])
    rs = load_records(p, audio_count=1024, skip_bad=True)
    assert len(rs) == 2
    assert [b.where for b in rs.skipped] == [f"{p}:2", f"{p}:3"]


def test_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_records(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("name", ["empathy_dialogues.jsonl", "heldout.jsonl"])
def test_the_example_data_is_valid_for_the_tiny_backbone(name):
    rs = load_records(ROOT / "examples" / name, audio_count=1024)
    assert len(rs) >= 2 and not rs.skipped
    assert all(r.record.assessment and r.record.assessment.scores for r in rs.records)

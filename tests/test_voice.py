"""``reempathy voice``: units for every turn that lacks them, from the backbone (read-aloud) or a TTS plugin."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reempathy import registry as registry_module
from reempathy.cli import main
from reempathy.data.records import SourcedRecord
from reempathy.data.schema import Record
from reempathy.decoding.batch import row_seed
from reempathy.hooks import hookimpl
from reempathy.options import PluginOptions
from reempathy.speech.tts import Speech
from reempathy.training.builders import build_dpo, build_sft

RECORDS = [
    {"id": "a", "topic": "keys",
     "messages": [{"role": "system", "text": "Be kind."},
                  {"role": "user", "text": "I lost my keys."},
                  {"role": "assistant", "text": "Oh no, that is stressful."}],
     "assessment": {"text": "Warm.", "scores": {"need_support": 4, "wording_appropriateness": 4,
                                                "emotion_understanding": 4, "emotional_support": 4}},
     "rejected": {"text": "Buy new ones.", "assessment": {"text": "Cold."}}},
    {"id": "b",
     "messages": [{"role": "user", "text": "My dog is sick.", "units": [5, 6, 7]},
                  {"role": "assistant", "text": "I am sorry. I hear you."}]},
]
TINY_TTS = ["--set", "max_tail_audio_tokens=3", "--set", "greedy=true"]


def write_data(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


class FakeOptions(PluginOptions):
    units: int = 60  # units per turn
    wave: bool = False  # give a waveform instead of units


class FakeTts:
    """Units 1, 2, 3 … for each turn (or a waveform), remembering every request; ``fail`` texts get an error."""

    requests: list = []
    fail: set[str] = set()

    def __init__(self, options, backbone):
        self.options = options

    def speak(self, requests):
        for req in requests:
            FakeTts.requests.append(req)
            if req.text in FakeTts.fail:
                yield req.key, Speech(error="the fake tts cannot say that")
            elif self.options.wave:
                yield req.key, Speech(wave=torch.zeros(2205), sample_rate=22050)
            else:
                yield req.key, Speech(units=[(i % 50) + 1 for i in range(self.options.units)])


class FakeTtsPlugin:
    @hookimpl
    def reempathy_register_tts(self, register):
        register("fake", FakeTts, FakeOptions, "a scripted tts (tests)")


@pytest.fixture()
def fake(monkeypatch, fresh_discovery):
    disc = registry_module.discover(extra_plugins=[("fake-tts", FakeTtsPlugin())], installed=False)
    monkeypatch.setattr(registry_module, "default_discovery", lambda: disc)
    FakeTts.requests, FakeTts.fail = [], set()
    yield FakeTts
    FakeTts.requests, FakeTts.fail = [], set()


def test_read_aloud_fills_the_units_of_every_turn_that_lacks_them_and_keeps_the_rest(tiny, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl", RECORDS)
    out = tmp_path / "voiced.jsonl"
    assert main(["voice", str(data), "--out", str(out), "--quiet", *TINY_TTS]) == 0
    a, b = read_jsonl(out)
    assert a["topic"] == "keys" and a["assessment"] == RECORDS[0]["assessment"]  # everything else as it was
    assert "units" not in a["messages"][0]  # a system turn is never spoken
    assert all(m["units"] for m in a["messages"][1:]) and a["rejected"]["units"]
    assert b["messages"][0]["units"] == [5, 6, 7]  # units already there are kept
    for doc in (a, b):  # each answer trains as written
        assert build_sft(SourcedRecord("x:1", Record.model_validate(doc)), tiny).input_ids
    assert build_dpo(SourcedRecord("x:1", Record.model_validate(a)), tiny) is not None
    assert "voice: 2 records given units for 4 turns" in capsys.readouterr().out
    assert not Path(f"{out}.partial").exists()


def test_the_units_are_what_read_aloud_speaks_with_the_turns_own_seed(tiny, tmp_path):
    from reempathy.backbones.base import Turn
    from reempathy.decoding.loop import LoopOptions, decode
    from reempathy.plugins.strategies.read_aloud import ReadAloudOptions, ReadAloudStrategy, read_aloud_budget
    from reempathy.plugins.tts import DEFAULT_INSTRUCTION

    data = write_data(tmp_path / "d.jsonl", RECORDS[1:])
    out = tmp_path / "voiced.jsonl"
    assert main(["voice", str(data), "--out", str(out), "--quiet", "--seed", "7", "--set", "max_tail_audio_tokens=3"]) == 0
    [doc] = read_jsonl(out)
    text = RECORDS[1]["messages"][1]["text"]
    strategy = ReadAloudStrategy(ReadAloudOptions(text=text, max_tail_audio_tokens=3), tiny)
    prompt = tiny.build_prompt([Turn("user", text=DEFAULT_INSTRUCTION.format(text=text))])
    budget = read_aloud_budget(len(strategy.text_ids), tiny, 3)
    alone = decode(tiny, prompt, strategy, [], LoopOptions(max_new_tokens=budget, seed=row_seed(7, "b#m1")))
    assert doc["messages"][1]["units"] == alone.audio_units


def test_wav_writes_each_voiced_turn_through_the_speech_decoder(tmp_path):
    from reempathy.speech.audio import read_wav
    from reempathy.speech.tiny import make_tiny_decoder_dir

    decoder = make_tiny_decoder_dir(tmp_path / "decoder")
    data = write_data(tmp_path / "d.jsonl", RECORDS[1:])
    out = tmp_path / "out" / "voiced.jsonl"
    out.parent.mkdir()
    assert main(["voice", str(data), "--out", str(out), "--wav", str(tmp_path / "out" / "wav"), "--decoder", str(decoder),
                 "--quiet", *TINY_TTS]) == 0
    [doc] = read_jsonl(out)
    assert "audio" not in doc["messages"][0]  # the user turn had its units: nothing voiced, no WAV
    answer = doc["messages"][1]
    assert answer["audio"] == "wav/b-m1.wav"  # relative to the output file's folder
    audio = read_wav(out.parent / answer["audio"])
    assert audio.sample_rate == 22050 and audio.samples.shape[-1] > 0


def test_a_user_tts_speaks_the_user_turns_in_another_voice(fake, tmp_path):
    data = write_data(tmp_path / "d.jsonl", RECORDS[:1])
    out = tmp_path / "voiced.jsonl"
    assert main(["voice", str(data), "--out", str(out), "--user-tts", "fake", "--set", "user_tts.units=9", "--quiet",
                 *TINY_TTS]) == 0
    [doc] = read_jsonl(out)
    assert [r.role for r in fake.requests] == ["user"] and [r.text for r in fake.requests] == ["I lost my keys."]
    assert doc["messages"][1]["units"] == list(range(1, 10))
    assert len(doc["messages"][2]["units"]) > 9  # the answer: read aloud by the backbone


def test_a_turn_the_tts_cannot_speak_fails_its_record_alone_and_a_rerun_voices_only_that_one(fake, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl", RECORDS)
    out = tmp_path / "voiced.jsonl"
    fake.fail = {"I am sorry. I hear you."}
    assert main(["voice", str(data), "--out", str(out), "--tts", "fake", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "the tts failed on 1 record" in err and "d.jsonl:2: m1 (assistant)" in err and err.count("\n") == 1
    assert not out.exists() and len(read_jsonl(Path(f"{out}.partial"))) == 1  # record a is kept
    fake.fail, fake.requests = set(), []
    assert main(["voice", str(data), "--out", str(out), "--tts", "fake", "--quiet"]) == 0
    assert [r.text for r in fake.requests] == ["I am sorry. I hear you."]  # only the failed record again
    assert [d["id"] for d in read_jsonl(out)] == ["a", "b"]


def test_skip_bad_finishes_without_the_failed_record(fake, tmp_path):
    data = write_data(tmp_path / "d.jsonl", RECORDS)
    out = tmp_path / "voiced.jsonl"
    fake.fail = {"I am sorry. I hear you."}
    assert main(["voice", str(data), "--out", str(out), "--tts", "fake", "--skip-bad", "--quiet"]) == 0
    assert [d["id"] for d in read_jsonl(out)] == ["a"]


def test_units_too_few_for_the_answer_are_that_records_failure(fake, tmp_path, capsys):
    long = "That sounds really hard, and it makes sense that you feel tired. I am here, and we can take this slowly."
    data = write_data(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "text": "Hi."}, {"role": "assistant", "text": long}]}])
    out = tmp_path / "voiced.jsonl"
    assert main(["voice", str(data), "--out", str(out), "--tts", "fake", "--set", "units=2", "--quiet"]) == 1
    assert "cannot be laid out" in capsys.readouterr().err


def test_a_waveform_without_a_speech_tokenizer_is_a_one_line_config_error(fake, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl", RECORDS[1:])
    assert main(["voice", str(data), "--out", str(tmp_path / "o.jsonl"), "--tts", "fake", "--set", "wave=true", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "has no speech tokenizer" in err and err.count("\n") == 1


def test_a_waveform_becomes_units_through_the_backbones_speech_tokenizer(fake, tmp_path):
    from reempathy.speech.tiny import make_tiny_tokenizer_dir
    from reempathy.speech.tokenizer import load_speech_tokenizer
    from reempathy.training.voice import VoiceItem, Voicer

    backbone = registry_module.default_discovery().registry.create("backbone", "tiny", {})
    backbone.speech_tokenizer = load_speech_tokenizer(make_tiny_tokenizer_dir(tmp_path / "tok"), device="cpu")
    wave = torch.from_numpy((0.3 * np.sin(np.linspace(0, 800, 22050 * 2))).astype(np.float32))

    class Waves:
        def speak(self, requests):
            for req in requests:
                yield req.key, Speech(wave=wave, sample_rate=22050)

    record = {"messages": [{"role": "user", "text": "Hi."}, {"role": "assistant", "units": [1, 2]}]}
    voicer = Voicer(backbone, Waves(), "waves", out_dir=tmp_path)
    [(_, doc, turns)] = list(voicer.voice([VoiceItem("1", "d:1", record, Record.model_validate(record), 1)]))
    assert turns == 1 and len(doc["messages"][0]["units"]) == 25  # 2 s at 12.5 units per second
    assert not list(tmp_path.glob(".voice-*"))  # the temporary WAV is gone


def test_a_bad_data_line_is_a_one_line_error_before_anything_is_spoken(fake, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(RECORDS[1]) + "\n{not json\n")
    assert main(["voice", str(data), "--out", str(tmp_path / "o.jsonl"), "--tts", "fake", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "d.jsonl:2: malformed JSON" in err and err.count("\n") == 1 and not fake.requests


def test_an_unknown_tts_is_refused_with_the_ones_there_are(tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl", RECORDS[1:])
    assert main(["voice", str(data), "--out", str(tmp_path / "o.jsonl"), "--tts", "nope"]) == 2
    assert "unknown tts 'nope'; available: read-aloud" in capsys.readouterr().err


def test_a_finished_output_is_not_made_again_without_force(fake, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl", RECORDS[1:])
    out = tmp_path / "voiced.jsonl"
    assert main(["voice", str(data), "--out", str(out), "--tts", "fake", "--quiet"]) == 0
    assert main(["voice", str(data), "--out", str(out), "--tts", "fake", "--quiet"]) == 2
    assert "is finished" in capsys.readouterr().err
    assert main(["voice", str(data), "--out", str(out), "--tts", "fake", "--quiet", "--force"]) == 0


def test_other_settings_are_refused_on_a_half_made_output(fake, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl", RECORDS)
    out = tmp_path / "voiced.jsonl"
    fake.fail = {"I am sorry. I hear you."}
    assert main(["voice", str(data), "--out", str(out), "--tts", "fake", "--quiet"]) == 1
    assert main(["voice", str(data), "--out", str(out), "--tts", "fake", "--set", "units=61", "--quiet"]) == 2
    assert "half made with other settings" in capsys.readouterr().err


def test_plugins_lists_the_tts_kind(capsys):
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    rows = rows["plugins"] if isinstance(rows, dict) else rows
    assert any("tts:read-aloud" in row["provides"] for row in rows)

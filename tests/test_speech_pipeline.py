"""A spoken turn: WAV → units → any strategy → spoken units only → WAV; streaming events; the glm-4-voice loader."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch
from glm4voice_fixture import make_tiny_glm4voice_dir

from reempathy.backbones.glm4voice import Glm4VoiceOptions, load_glm4voice
from reempathy.config import load_config
from reempathy.registry import default_discovery
from reempathy.errors import CheckpointError, ConfigError, InputError
from reempathy.runner import load_backbone, run_decode
from reempathy.speech.audio import read_wav, write_wav
from reempathy.speech.decoder import GlmSpeechDecoder, load_speech_decoder
from reempathy.speech.decoder.flow import mel_frames
from reempathy.streaming import (
    AudioEvent,
    DoneEvent,
    ReflectionEvent,
    TextEvent,
    run_spoken_turn,
    stream_spoken_turn,
)
from reempathy.speech.tiny import make_tiny_decoder_dir, make_tiny_tokenizer_dir
from reempathy.speech.tokenizer import GlmSpeechTokenizer, load_speech_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def speech_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("speech")
    return make_tiny_tokenizer_dir(root / "tokenizer"), make_tiny_decoder_dir(root / "decoder")


@pytest.fixture(scope="module")
def registry():
    return default_discovery().registry


@pytest.fixture(scope="module")
def user_wav(tmp_path_factory) -> Path:
    t = torch.arange(32000, dtype=torch.float64) / 16000
    return write_wav(
        tmp_path_factory.mktemp("in") / "user.wav", (0.3 * torch.sin(2 * math.pi * 220 * t * (1 + t))).float(), 16000
    )


def config(registry, name: str, tokens: int = 100):
    return load_config(ROOT / "configs" / f"{name}.toml", [f"decode.max_new_tokens={tokens}"], None, registry)


@pytest.fixture(scope="module")
def backbones(registry, speech_dirs):
    """The tiny backbone with the tiny speech tokenizer and decoder attached, per strategy config."""
    tok = load_speech_tokenizer(speech_dirs[0], device="cpu")
    dec = load_speech_decoder(speech_dirs[1], device="cpu")
    out = {}
    for name in ("sft", "reempathy"):
        bb = load_backbone(config(registry, name), registry)
        bb.speech_tokenizer, bb.speech_decoder = tok, dec
        out[name] = bb
    return out


class Recording:
    """Wraps a decoder and records the units it is asked to synthesise."""

    def __init__(self, inner: GlmSpeechDecoder):
        self.inner = inner
        self.calls: list[list[int]] = []
        self.sample_rate = inner.sample_rate

    def synthesize(self, units, seed=42):
        self.calls.append(list(units))
        return self.inner.synthesize(units, seed=seed)


# --- run_spoken_turn ------------------------------------------------------------------------------


def test_spoken_turn_writes_the_answer_s_audio(registry, backbones, user_wav, tmp_path):
    out = tmp_path / "answer.wav"
    result = run_spoken_turn(config(registry, "sft"), registry, str(user_wav), str(out), backbone=backbones["sft"])
    audio = read_wav(out)
    assert audio.sample_rate == 22050
    assert audio.samples.shape[1] == 256 * mel_frames(len(result.audio_units), 12.5)
    speech = result.extra["speech"]
    assert speech["input_units"] == 25 and speech["output_units"] == len(result.audio_units) > 0
    assert speech["audio_s"] == pytest.approx(audio.seconds) and speech["out"] == str(out)
    assert not list(tmp_path.glob(".*.tmp"))


def test_only_spoken_units_are_synthesised_never_reflections(registry, backbones, user_wav, tmp_path):
    bb = backbones["reempathy"]
    recording = Recording(bb.speech_decoder)
    bb.speech_decoder = recording
    try:
        result = run_spoken_turn(
            config(registry, "reempathy"), registry, str(user_wav), str(tmp_path / "a.wav"), backbone=bb
        )
    finally:
        bb.speech_decoder = recording.inner
    assert result.hidden, "the reempathy strategy should have reflected"
    assert recording.calls == [result.audio_units]
    assert result.audio_units == [u for chunk in result.chunks for u in chunk.audio_units]
    hidden_positions = {i for h in result.hidden for i in range(h.start, h.end)}
    spoken_audio = [s for s in result.spans if s["label"] == "spoken_audio"]
    assert not any(i in hidden_positions for s in spoken_audio for i in range(s["start"], s["end"]))


def test_without_an_output_file_the_turn_is_decoded_but_not_synthesised(registry, backbones, user_wav):
    bb = backbones["sft"]
    dec, bb.speech_decoder = bb.speech_decoder, None
    try:
        result = run_spoken_turn(config(registry, "sft", tokens=20), registry, str(user_wav), backbone=bb)
    finally:
        bb.speech_decoder = dec
    assert result.extra["speech"]["input_units"] == 25 and "audio_s" not in result.extra["speech"]


def test_the_same_turn_twice_gives_the_same_wav(registry, backbones, user_wav, tmp_path):
    cfg = config(registry, "sft", tokens=40)
    run_spoken_turn(cfg, registry, str(user_wav), str(tmp_path / "1.wav"), backbone=backbones["sft"])
    run_spoken_turn(cfg, registry, str(user_wav), str(tmp_path / "2.wav"), backbone=backbones["sft"])
    assert (tmp_path / "1.wav").read_bytes() == (tmp_path / "2.wav").read_bytes()


def test_run_decode_takes_units_like_a_units_file(registry, backbones, tmp_path):
    cfg = config(registry, "sft", tokens=20)
    units = [5, 9, 12, 40]
    (tmp_path / "u.txt").write_text(" ".join(map(str, units)))
    a = run_decode(cfg, registry, units=units, backbone=backbones["sft"])
    b = run_decode(cfg, registry, units_file=str(tmp_path / "u.txt"), backbone=backbones["sft"])
    assert a.ids == b.ids
    with pytest.raises(ConfigError, match="not both"):
        run_decode(cfg, registry, prompt="hi", units=units, backbone=backbones["sft"])


def test_backbone_without_speech_parts_is_a_config_error(registry, user_wav, tmp_path):
    cfg = config(registry, "sft")
    with pytest.raises(ConfigError, match="tokenizer_path"):
        run_spoken_turn(cfg, registry, str(user_wav), str(tmp_path / "x.wav"))


def test_missing_output_directory_is_found_before_decoding(registry, backbones, user_wav, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        run_spoken_turn(config(registry, "sft"), registry, str(user_wav), str(tmp_path / "no" / "x.wav"),
                        backbone=backbones["sft"])  # fmt: skip


# --- streaming ------------------------------------------------------------------------------------


def test_stream_yields_text_audio_then_done_and_writes_what_it_played(registry, backbones, user_wav, tmp_path):
    out = tmp_path / "s.wav"
    events = list(stream_spoken_turn(config(registry, "sft"), registry, str(user_wav), out_path=str(out),
                                     backbone=backbones["sft"]))  # fmt: skip
    assert isinstance(events[-1], DoneEvent) and not any(isinstance(e, DoneEvent) for e in events[:-1])
    result = events[-1].result
    audio = [e for e in events if isinstance(e, AudioEvent)]
    assert [e.index for e in audio] == list(range(len(audio)))
    played = torch.cat([e.samples for e in audio])
    torch.testing.assert_close(torch.from_numpy(read_wav(out).samples[0]), played, atol=0.5 / 32768 + 1e-7, rtol=0)
    assert "".join(e.text for e in events if isinstance(e, TextEvent)) == result.spoken_text
    speech = result.extra["speech"]
    assert speech["streamed"] and speech["chunks"][0] == 25 and sum(speech["chunks"]) == len(result.audio_units)
    assert 0 < speech["first_audio_s"] == audio[0].elapsed_s
    assert result.timings.time_to_first_speech_s == speech["first_audio_s"]


def test_stream_reports_reflections_and_never_plays_them(registry, backbones, user_wav):
    events = list(
        stream_spoken_turn(config(registry, "reempathy"), registry, str(user_wav), backbone=backbones["reempathy"])
    )
    result = events[-1].result
    reflections = [e for e in events if isinstance(e, ReflectionEvent)]
    assert [(e.kind, e.index, e.text) for e in reflections] == [(h.kind, h.index, h.text) for h in result.hidden]
    assert sum(result.extra["speech"]["chunks"]) == len(result.audio_units)


def test_stream_from_units_without_a_tokenizer(registry, backbones):
    bb = backbones["sft"]
    tok, bb.speech_tokenizer = bb.speech_tokenizer, None
    try:
        events = list(stream_spoken_turn(config(registry, "sft", tokens=30), registry, units=[1, 2, 3], backbone=bb))
    finally:
        bb.speech_tokenizer = tok
    assert events[-1].result.extra["speech"]["input_units"] == 3


def test_closing_the_stream_early_stops_decoding(registry, backbones, user_wav):
    threads = threading.active_count()
    stream = stream_spoken_turn(config(registry, "sft", tokens=400), registry, str(user_wav), backbone=backbones["sft"])
    first = next(stream)
    assert isinstance(first, (TextEvent, AudioEvent))
    stream.close()
    assert threading.active_count() == threads


# --- the glm-4-voice loader ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory) -> Path:
    return make_tiny_glm4voice_dir(tmp_path_factory.mktemp("glm4voice") / "published")


def test_glm4voice_attaches_the_speech_tokenizer_and_decoder(glm_dir, speech_dirs):
    bb = load_glm4voice(Glm4VoiceOptions(path=str(glm_dir), tokenizer_path=str(speech_dirs[0]),
                                         decoder_path=str(speech_dirs[1]), device="cpu"))  # fmt: skip
    assert isinstance(bb.speech_tokenizer, GlmSpeechTokenizer)
    assert isinstance(bb.speech_decoder, GlmSpeechDecoder)
    assert load_glm4voice(Glm4VoiceOptions(path=str(glm_dir), device="cpu")).speech_decoder is None


def test_glm4voice_refuses_a_missing_speech_directory(glm_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_glm4voice(Glm4VoiceOptions(path=str(glm_dir), tokenizer_path=str(tmp_path / "nope"), device="cpu"))


def test_glm4voice_refuses_a_tokenizer_with_more_units_than_the_model(glm_dir, tmp_path):
    big = make_tiny_tokenizer_dir(tmp_path / "big", quantize_vocab_size=65)
    with pytest.raises(CheckpointError, match="makes units 0..64"):
        load_glm4voice(Glm4VoiceOptions(path=str(glm_dir), tokenizer_path=str(big), device="cpu"))


def test_glm4voice_refuses_a_decoder_with_fewer_units_than_the_model(glm_dir, tmp_path):
    small = make_tiny_decoder_dir(tmp_path / "small", vocab_size=32)
    with pytest.raises(CheckpointError, match="reads units 0..31"):
        load_glm4voice(Glm4VoiceOptions(path=str(glm_dir), decoder_path=str(small), device="cpu"))

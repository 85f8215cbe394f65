"""Speech quality (issue 20 §4): ``audio-stats`` on known waveforms and real run WAVs, ``asr-wer`` with a tiny random Whisper."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch

from evaluation_helpers import run_speech, run_tiny
from reempathy.cli import main
from reempathy.evaluation.base import EvalItem
from reempathy.evaluation.speech.answer import NO_WAV
from reempathy.evaluation.speech.options import AsrWerOptions, AudioStatsOptions
from reempathy.evaluation.speech.stats import audio_stats
from reempathy.speech.audio import read_wav, resample, write_wav

RATE = 16000


def sine(amplitude: float, seconds: float = 1.0, hz: float = 400.0, rate: int = RATE) -> np.ndarray:
    """A sine of whole periods per 20 ms frame at 400 Hz and 16 kHz (8 periods), so every frame has the same RMS."""
    t = np.arange(round(seconds * rate)) / rate
    return amplitude * np.sin(2 * math.pi * hz * t)


@pytest.fixture(scope="module")
def speech_run(tmp_path_factory):
    """A real run with WAV answers (tiny GLM-4-Voice + tiny speech decoder, `reempathy run --speech`)."""
    return run_speech(tmp_path_factory.mktemp("speech"), ["I lost my keys.", "My exam is tomorrow."])


@pytest.fixture(scope="module")
def silent_run(tmp_path_factory):
    """A real run on the tiny backbone without --speech: no record has a WAV."""
    return run_tiny(tmp_path_factory.mktemp("tiny"), ["I lost my keys.", "My dog is sick."])


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    from reempathy.evaluation.speech.tiny import make_tiny_whisper_dir

    return make_tiny_whisper_dir(tmp_path_factory.mktemp("whisper") / "tiny-whisper")


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def records(run):
    return lines(run / "results.jsonl")


def copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def fails(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# --- audio-stats: the measures on waveforms with known answers ----------------------------------


def test_a_sine_of_known_amplitude_has_its_rms_level_in_dbfs():
    stats = audio_stats(sine(0.5), RATE)
    assert stats.loudness_dbfs == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=1e-6)  # -9.03 dBFS
    assert stats.duration_s == 1.0 and stats.silence_share == 0.0 and stats.clipping_share == 0.0


def test_half_silence_is_a_silence_share_of_one_half_and_leaves_the_loudness_alone():
    stats = audio_stats(np.concatenate([sine(0.5, 0.5), np.zeros(RATE // 2)]), RATE)
    assert stats.silence_share == 0.5
    assert stats.loudness_dbfs == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=1e-6)


def test_a_frame_is_silent_below_the_threshold_and_heard_above_it():
    quiet = sine(math.sqrt(2) * 10 ** (-45 / 20))  # RMS -45 dBFS
    assert audio_stats(quiet, RATE, AudioStatsOptions(silence_threshold_dbfs=-40)).silence_share == 1.0
    heard = audio_stats(quiet, RATE, AudioStatsOptions(silence_threshold_dbfs=-50))
    assert heard.silence_share == 0.0 and heard.loudness_dbfs == pytest.approx(-45.0, abs=1e-6)


def test_an_answer_silent_throughout_has_no_loudness_score():
    stats = audio_stats(np.zeros(RATE), RATE)
    assert stats.silence_share == 1.0 and stats.loudness_dbfs is None
    assert "loudness_dbfs" not in stats.scores()


def test_the_last_shorter_frame_counts_by_its_length():
    stats = audio_stats(np.concatenate([sine(0.5), np.zeros(160)]), RATE)  # 1 s, then 10 ms of silence
    assert stats.silence_share == pytest.approx(160 / (RATE + 160))


def test_samples_at_or_above_the_clip_level_are_counted_in_every_channel():
    left, right = np.full(1000, 0.1), np.full(1000, 0.1)
    left[:5], right[10:13] = 1.0, -0.9995  # 5 + 3 clipped samples of 2000
    assert audio_stats(np.stack([left, right]), RATE).clipping_share == 8 / 2000
    assert audio_stats(np.stack([left, right]), RATE, AudioStatsOptions(clip_level=1.0)).clipping_share == 5 / 2000


def test_full_scale_16_bit_samples_count_as_clipped(tmp_path):
    x = sine(0.5)
    x[:100] = 1.0  # written as 32767, read back as 32767 / 32768
    audio = read_wav(write_wav(tmp_path / "clip.wav", x.astype(np.float32), RATE))
    assert audio_stats(audio.samples, audio.sample_rate).clipping_share == 100 / RATE


# --- audio-stats through `reempathy eval` ----------------------------------------------------------


def test_audio_stats_measures_every_answer_wav_of_a_speech_run(speech_run, tmp_path):
    run = copy(speech_run, tmp_path)
    assert main(["eval", str(run), "--evaluator", "audio-stats", "--quiet"]) == 0
    rows, docs = lines(run / "scores" / "audio-stats.jsonl"), records(run)
    assert [r["id"] for r in rows] == [d["id"] for d in docs] and all(d["wav"] for d in docs)
    for row, doc in zip(rows, docs):
        with wave.open(str(run / doc["wav"])) as w:  # the standard library's reader, not ours
            assert row["scores"]["duration_s"] == w.getnframes() / w.getframerate()
        assert row["scores"]["duration_s"] == doc["result"]["extra"]["speech"]["audio_s"]
        audio = read_wav(run / doc["wav"])
        assert row["scores"] == audio_stats(audio.samples, audio.sample_rate).scores()
        assert row["error"] is None and "s," in row["text"]
    summary = json.loads((run / "scores" / "audio-stats.summary.json").read_text())
    assert summary["scored"] == 2 and summary["scores"]["duration_s"]["n"] == 2


def test_audio_stats_fails_a_record_without_a_wav_and_never_scores_it(silent_run, tmp_path, capsys):
    run = copy(silent_run, tmp_path)
    assert main(["eval", str(run), "--evaluator", "audio-stats", "--quiet"]) == 0
    rows = lines(run / "scores" / "audio-stats.jsonl")
    assert [(r["scores"], r["error"]) for r in rows] == [({}, NO_WAV)] * 2
    assert "no WAV: run with --speech" in NO_WAV
    assert "failures: 2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "setting, named",
    [("silence_threshold_dbfs=5", "silence_threshold_dbfs"), ("frame_ms=1", "frame_ms"), ("clip_level=1.5", "clip_level"),
     ('frame_ms="20"', "frame_ms"), ("loudness=true", "loudness")],
)
def test_audio_stats_options_are_strict_and_bounded(silent_run, tmp_path, capsys, setting, named):
    run = copy(silent_run, tmp_path)
    err = fails(capsys, ["eval", str(run), "--evaluator", "audio-stats", "--set", setting, "--quiet"])
    assert named in err
    assert not (run / "scores").exists()


# --- asr-wer -------------------------------------------------------------------------------------


def jiwer_rates(reference: str, hypothesis: str) -> tuple[float, float]:
    """WER and CER as jiwer gives them under the documented normalisation (written out here, not imported)."""
    import jiwer

    common = [jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(), jiwer.Strip()]
    w = jiwer.Compose([*common, jiwer.ReduceToListOfListOfWords()])
    c = jiwer.Compose([*common, jiwer.ReduceToListOfListOfChars()])
    return (jiwer.wer(reference, hypothesis, reference_transform=w, hypothesis_transform=w),
            jiwer.cer(reference, hypothesis, reference_transform=c, hypothesis_transform=c))


def greedy_transcripts(whisper_dir, wavs, max_new_tokens):
    """What transformers' own Whisper classes transcribe greedily from these WAVs, as one batch."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(whisper_dir)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    waves = []
    for path in wavs:
        audio = read_wav(path)
        waves.append(resample(torch.from_numpy(audio.samples.mean(axis=0)), audio.sample_rate, 16000).numpy())
    feats = processor.feature_extractor(waves, sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
    with torch.no_grad():
        ids = model.generate(feats.input_features, attention_mask=feats.attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, task="transcribe")
    return [t.strip() for t in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def test_wer_and_cer_ignore_case_punctuation_and_spacing():
    from reempathy.evaluation.speech.asr import error_rates

    assert error_rates("Hello, World!", "hello   world") == (0.0, 0.0)
    assert error_rates("I'm here for you.", "im here for you") == (0.0, 0.0)
    assert error_rates("one two three four", "one two four") == (0.25, pytest.approx(jiwer_rates("one two three four", "one two four")[1]))


def test_asr_wer_reports_jiwer_rates_of_the_transcript_transformers_generates(speech_run, whisper_dir, tmp_path):
    run = copy(speech_run, tmp_path)
    assert main(["eval", str(run), "--evaluator", "asr-wer", "--set", f"path={whisper_dir}",
                 "--set", "max_new_tokens=12", "--quiet"]) == 0
    rows, docs = lines(run / "scores" / "asr-wer.jsonl"), records(run)
    expected = greedy_transcripts(whisper_dir, [run / d["wav"] for d in docs], 12)
    assert [r["text"] for r in rows] == expected
    assert all(t for t in expected)  # the random model writes something; the rates are not of an empty guess
    for row, doc in zip(rows, docs):
        wer, cer = jiwer_rates(doc["result"]["spoken"]["text"], row["text"])
        assert row["scores"] == {"wer": pytest.approx(wer), "cer": pytest.approx(cer)} and row["error"] is None
    summary = json.loads((run / "scores" / "asr-wer.summary.json").read_text())
    assert summary["scores"]["wer"]["n"] == 2


def test_asr_wer_fails_a_record_without_a_wav(silent_run, whisper_dir, tmp_path):
    run = copy(silent_run, tmp_path)
    assert main(["eval", str(run), "--evaluator", "asr-wer", "--set", f"path={whisper_dir}",
                 "--set", "max_new_tokens=12", "--quiet"]) == 0
    assert [(r["scores"], r["error"]) for r in lines(run / "scores" / "asr-wer.jsonl")] == [({}, NO_WAV)] * 2


def test_asr_wer_fails_an_answer_without_spoken_words_and_one_longer_than_a_window(whisper_dir, tmp_path):
    from reempathy.evaluation.speech.asr import AsrWer

    short = write_wav(tmp_path / "short.wav", sine(0.3).astype(np.float32), RATE)
    long = write_wav(tmp_path / "long.wav", sine(0.3, 31.0).astype(np.float32), RATE)
    evaluator = AsrWer(AsrWerOptions(path=str(whisper_dir), max_new_tokens=8))
    empty, cut, fine = evaluator.evaluate([
        EvalItem("empty", [], " ... ", answer_wav=str(short)),
        EvalItem("long", [], "hello there", answer_wav=str(long)),
        EvalItem("fine", [], "hello there", answer_wav=str(short)),
    ])
    assert empty.scores == {} and empty.error.startswith("empty reference text")
    assert cut.scores == {} and "31.0 s" in cut.error and "30 s" in cut.error
    assert fine.ok and set(fine.scores) == {"wer", "cer"}


def test_asr_wer_needs_a_path(silent_run, tmp_path, capsys):
    err = fails(capsys, ["eval", str(copy(silent_run, tmp_path)), "--evaluator", "asr-wer", "--quiet"])
    assert "path" in err


def test_asr_wer_refuses_weights_that_are_not_safetensors(silent_run, whisper_dir, tmp_path, capsys):
    model = shutil.copytree(whisper_dir, tmp_path / "whisper")
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    err = fails(capsys, ["eval", str(copy(silent_run, tmp_path)), "--evaluator", "asr-wer", "--set", f"path={model}",
                         "--set", "max_new_tokens=8", "--quiet"])
    assert "safetensors" in err


def test_asr_wer_refuses_glm_4_voice_s_speech_tokenizer(silent_run, tmp_path, capsys):
    from reempathy.speech.tiny import make_tiny_tokenizer_dir

    tok = make_tiny_tokenizer_dir(tmp_path / "tok")
    err = fails(capsys, ["eval", str(copy(silent_run, tmp_path)), "--evaluator", "asr-wer", "--set", f"path={tok}", "--quiet"])
    assert "WhisperVQForConditionalGeneration" in err and "WhisperForConditionalGeneration" in err


def test_asr_wer_refuses_more_new_tokens_than_the_decoder_holds(silent_run, whisper_dir, tmp_path, capsys):
    err = fails(capsys, ["eval", str(copy(silent_run, tmp_path)), "--evaluator", "asr-wer", "--set", f"path={whisper_dir}",
                         "--set", "max_new_tokens=61", "--quiet"])
    assert "max_new_tokens = 61" in err and "at most 60" in err


def test_asr_wer_takes_a_language_by_code_or_name_and_refuses_one_the_model_lacks(whisper_dir):
    from reempathy.errors import ConfigError
    from reempathy.evaluation.speech.asr import load_whisper

    for given in ("en", "English", "<|en|>"):
        kwargs = load_whisper(AsrWerOptions(path=str(whisper_dir), language=given, max_new_tokens=8)).generate_kwargs
        assert kwargs["language"] == "en" and kwargs["task"] == "transcribe"
    with pytest.raises(ConfigError, match="'fr' is not a language of"):
        load_whisper(AsrWerOptions(path=str(whisper_dir), language="fr", max_new_tokens=8))


def test_plugins_lists_the_speech_evaluators(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "evaluator audio-stats" in out and "evaluator asr-wer" in out


def test_registering_the_evaluators_loads_neither_whisper_nor_jiwer():
    code = ("import sys; from reempathy.registry import default_discovery; default_discovery(); "
            "print(sorted(m for m in sys.modules if m.startswith(('jiwer', 'transformers.models.whisper', "
            "'reempathy.evaluation.speech.asr', 'reempathy.evaluation.speech.stats'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_option_has_a_description_and_a_row_in_the_docs():
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text(encoding="utf-8")
    for model in (AudioStatsOptions, AsrWerOptions):
        for name, field in model.model_fields.items():
            assert field.description, (model.__name__, name)
            assert f"| `{name}` |" in docs, (model.__name__, name)


def test_an_english_only_model_is_not_given_a_task_and_refuses_a_language(whisper_dir, tmp_path):
    from reempathy.errors import ConfigError
    from reempathy.evaluation.speech.asr import load_whisper

    english = shutil.copytree(whisper_dir, tmp_path / "whisper-en")
    config = json.loads((english / "generation_config.json").read_text())
    (english / "generation_config.json").write_text(json.dumps(dict(config, is_multilingual=False)))
    assert load_whisper(AsrWerOptions(path=str(english), max_new_tokens=8)).generate_kwargs == {"max_new_tokens": 8}
    with pytest.raises(ConfigError, match="English-only"):
        load_whisper(AsrWerOptions(path=str(english), language="en", max_new_tokens=8))

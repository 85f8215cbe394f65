"""Audio in and out: bounded reading and resampling, damaged headers named, outputs checked before the work (issue 16)."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from reempathy.cli import main
from reempathy.errors import InputError
from reempathy.speech.audio import MAX_RATIO_TERM, MAX_WAV_BYTES, read_wav, resample, resample_ratio, write_wav
from reempathy.speech.tiny import make_tiny_decoder_dir, make_tiny_tokenizer_dir


def wav_bytes(rate: int, samples: np.ndarray, channels: int = 1, declared: int | None = None) -> bytes:
    body = samples.astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, channels, rate, (rate * 2 * channels) % 2**32, (2 * channels) % 2**16, 16)
    size = len(body) if declared is None else declared
    riff = b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", size) + body
    return b"RIFF" + struct.pack("<I", 4 + len(riff)) + b"WAVE" + riff


def tone(rate: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (8000 * np.sin(2 * math.pi * 220 * t)).astype(np.int16)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return make_tiny_tokenizer_dir(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 24000, 32000, 44100, 48000, 88200, 96000])
def test_common_rates_resample_at_their_exact_ratio(rate):
    orig, new = resample_ratio(rate, 16000)
    assert orig * 16000 == new * rate


@pytest.mark.parametrize("rate", [44101, 96001, 4001, 191999, 16001])
def test_odd_rates_resample_at_a_nearby_ratio_with_small_terms(rate):
    orig, new = resample_ratio(rate, 16000)
    assert orig <= MAX_RATIO_TERM and new <= MAX_RATIO_TERM
    assert abs(orig / new - rate / 16000) / (rate / 16000) < 3e-4


def test_resample_keeps_the_length_of_the_target_rate_at_an_odd_rate():
    # 44101:16000 would be a torchaudio kernel of about 10 GB; the nearby 441:160 is kilobytes.
    wave = resample(torch.from_numpy(tone(44101, 0.5).astype(np.float32)), 44101, 16000)
    assert abs(wave.shape[-1] - 8000) <= 1


def test_empathyeval_hears_a_wav_at_an_odd_rate_through_the_bounded_resampler(tmp_path):
    from reempathy.evaluation.empathyeval.audio import AudioSource

    wav = tmp_path / "odd.wav"
    wav.write_bytes(wav_bytes(44101, tone(44101, 0.5)))
    wave = AudioSource(target_rate=16000).from_wav(str(wav))
    assert wave.dtype == np.float32 and abs(wave.shape[0] - 8000) <= 1


@pytest.mark.parametrize("rate", [44101, 96001])
def test_tokenizing_one_second_at_an_odd_rate_gives_12_or_13_units(tmp_path, tok_dir, capsys, rate):
    wav = tmp_path / "odd.wav"
    wav.write_bytes(wav_bytes(rate, tone(rate)))
    code = main(["speech", "tokenize", "--tokenizer", str(tok_dir), "--device", "cpu", str(wav), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    import json

    assert len(json.loads(out)["files"][0]["units"]) in (12, 13)


def test_a_device_as_audio_input_is_refused_without_reading_it():
    with pytest.raises(InputError, match="a device or socket"):
        read_wav("/dev/zero")


def test_an_audio_file_over_the_size_cap_is_refused_from_its_size(tmp_path):
    big = tmp_path / "big.wav"
    with big.open("wb") as fh:
        fh.truncate(MAX_WAV_BYTES + 1)  # sparse: nothing is written or read
    with pytest.raises(InputError, match="at most 512 MiB"):
        read_wav(big)


def test_a_wav_whose_data_chunk_is_cut_short_is_refused(tmp_path):
    samples = tone(16000, 0.5)
    wav = tmp_path / "cut.wav"
    wav.write_bytes(wav_bytes(16000, samples, declared=len(samples) * 2 + 1000))
    with pytest.raises(InputError, match="cut short: its data chunk declares"):
        read_wav(wav)


def test_a_streaming_wav_with_an_open_data_size_is_still_read(tmp_path):
    samples = tone(16000, 0.5)
    wav = tmp_path / "stream.wav"
    wav.write_bytes(wav_bytes(16000, samples, declared=0xFFFFFFFF))
    assert read_wav(wav).samples.shape == (1, len(samples))


@pytest.mark.parametrize("rate", [1, 3999, 192001, 4_000_000_000])
def test_sample_rates_outside_4k_to_192k_are_refused(tmp_path, rate):
    wav = tmp_path / "rate.wav"
    wav.write_bytes(wav_bytes(rate, tone(16000, 0.1)))
    with pytest.raises(InputError, match="sample rate"):
        read_wav(wav)


def test_a_header_with_absurd_channels_is_refused(tmp_path):
    wav = tmp_path / "ch.wav"
    wav.write_bytes(wav_bytes(16000, tone(16000, 0.1), channels=1000))
    with pytest.raises(InputError, match="channels"):
        read_wav(wav)


def test_a_file_longer_than_the_limit_is_refused_from_its_header(tmp_path):
    wav = tmp_path / "long.wav"
    wav.write_bytes(wav_bytes(8000, np.zeros(8000 * 3, dtype=np.int16)))
    with pytest.raises(InputError, match="3.0 s long; the limit is 2 s"):
        read_wav(wav, max_seconds=2)


def test_a_units_path_that_is_a_folder_says_folder(tmp_path, capsys):
    code = main(["speech", "synthesize", "--decoder", str(tmp_path), "--units", str(tmp_path), "--out", str(tmp_path / "o.wav")])
    err = capsys.readouterr().err
    assert code == 2 and "is a directory" in err and "not found" not in err


@pytest.mark.parametrize("kind", ["fifo", "symlink", "device", "inside-a-file"])
def test_synthesize_refuses_an_output_that_is_not_a_regular_file_before_any_work(tmp_path, capsys, kind):
    units = tmp_path / "u.txt"
    units.write_text("1 2 3")
    target = tmp_path / "target.wav"
    target.write_bytes(b"keep")
    out = {"fifo": tmp_path / "pipe", "symlink": tmp_path / "link.wav", "device": Path("/dev/null"),
           "inside-a-file": target / "x.wav"}[kind]
    if kind == "fifo":
        os.mkfifo(out)
    if kind == "symlink":
        out.symlink_to(target)
    # The decoder directory does not exist: an error about it would mean the work started first.
    code = main(["speech", "synthesize", "--decoder", str(tmp_path / "nodecoder"), "--units", str(units), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--out" in err and "nodecoder" not in err
    assert target.read_bytes() == b"keep"
    assert kind != "fifo" or out.is_fifo()


def test_synthesize_refuses_an_over_long_out_name_before_the_work(tmp_path, capsys):
    units = tmp_path / "u.txt"
    units.write_text("1 2 3")
    code = main(["speech", "synthesize", "--decoder", str(tmp_path / "nodecoder"), "--units", str(units),
                 "--out", str(tmp_path / ("x" * 300 + ".wav"))])
    assert code == 2 and "255-byte limit" in capsys.readouterr().err


def test_synthesize_writes_a_wav_with_no_temporary_left(tmp_path, capsys):
    dec = make_tiny_decoder_dir(tmp_path / "decoder")
    units = tmp_path / "u.txt"
    units.write_text("1 2 3 4")
    out = tmp_path / "out.wav"
    out.write_bytes(b"previous")
    assert main(["speech", "synthesize", "--decoder", str(dec), "--units", str(units), "--out", str(out), "--device", "cpu"]) == 0
    assert read_wav(out).sample_rate == 22050
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder", "out.wav", "u.txt"]


def test_write_wav_round_trips(tmp_path):
    x = torch.linspace(-0.5, 0.5, 100)
    out = write_wav(tmp_path / "x.wav", x, 16000)
    assert np.allclose(read_wav(out).samples[0], x.numpy(), atol=1 / 32768)

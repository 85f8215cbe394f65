"""The GLM-4-Voice speech tokenizer: 12.5 units per second, the published masks, pooling and quantizer, input checks."""

from __future__ import annotations

import argparse
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio

from reempathy.errors import CheckpointError, InputError
from reempathy.speech.audio import read_wav, write_wav
from reempathy.speech.cli import add_speech_parser
from reempathy.speech.tiny import make_tiny_tokenizer_dir
from reempathy.speech.tokenizer import load_speech_tokenizer
from reempathy.speech.tokenizer.model import block_causal_allowed, nearest_codes, pool_frames

# Ids the published extract_speech_token (GLM-4-Voice speech_tokenizer/utils.py, transformers 4.44.1)
# gave for chirp(16000, 2.5) on make_tiny_tokenizer_dir(seed=0), run once on CPU.
PUBLISHED_CHIRP_IDS = [12, 17, 17, 17, 17, 17, 17, 17, 49, 49, 56, 56, 56, 36, 36, 26, 26, 26, 26, 26, 26,
                       12, 17, 17, 49, 49, 49, 49, 49, 49, 49, 17]  # fmt: skip


def chirp(rate: int, seconds: float) -> torch.Tensor:
    t = torch.arange(int(rate * seconds), dtype=torch.float64) / rate
    return (0.3 * torch.sin(2 * math.pi * 220 * t * (1 + t)) + 0.1 * torch.sin(2 * math.pi * 1234 * t)).float()


def pcm16(path: Path, samples: np.ndarray, rate: int) -> Path:
    """A 16-bit WAV with ``samples`` ``(channels, frames)``, written without our writer."""
    frames = np.round(np.clip(samples.T, -1, 1) * 32767).astype("<i2").tobytes()
    ch = samples.shape[0]
    fmt = struct.pack("<HHIIHH", 1, ch, rate, rate * ch * 2, ch * 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(frames)) + frames
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: one thread avoids contention with other processes on a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return make_tiny_tokenizer_dir(tmp_path_factory.mktemp("tokenizer") / "glm-4-voice-tokenizer")


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return load_speech_tokenizer(tok_dir, device="cpu")


# --- the unit rate -------------------------------------------------------------------------------


def test_two_seconds_of_audio_give_25_units(tokenizer):
    assert len(tokenizer.units(chirp(16000, 2.0), 16000)) == 25
    assert tokenizer.units_per_second == 12.5


@pytest.mark.parametrize("samples", [1, 1279, 1280, 1281, 16000 * 7 + 5])
def test_every_started_80ms_stride_gives_one_unit(tokenizer, samples):
    assert len(tokenizer.units(chirp(16000, 8.0)[:samples], 16000)) == math.ceil(samples / 1280)


def test_audio_longer_than_30_seconds_is_cut_into_segments_as_published(tokenizer):
    wave = chirp(16000, 31.0)
    units = tokenizer.units(wave, 16000)
    assert len(units) == 375 + 13
    assert units[:375] == tokenizer.units(wave[: 30 * 16000], 16000)
    assert units[375:] == tokenizer.units(wave[30 * 16000 :], 16000)


def test_ids_match_the_published_implementation_on_tiny_weights(tokenizer):
    assert tokenizer.units(chirp(16000, 2.5), 16000) == PUBLISHED_CHIRP_IDS


def test_ids_lie_in_the_codebook(tokenizer):
    units = tokenizer.units(chirp(16000, 3.0), 16000)
    assert all(0 <= u < tokenizer.vocab_size for u in units)
    assert len(set(units)) > 1


# --- masks, pooling, quantizer against slow references --------------------------------------------


def slow_block_causal(valid: list[list[int]], block: int) -> torch.Tensor:
    b, t = len(valid), len(valid[0])
    out = torch.zeros(b, t, t, dtype=torch.bool)
    for n in range(b):
        for i in range(t):
            for j in range(t):
                out[n, i, j] = bool(valid[n][j]) and (j <= i or i // block == j // block)
    return out


@pytest.mark.parametrize("block", [1, 3, 4, 50])
def test_block_causal_mask_matches_a_slow_reference(block):
    valid = [[1] * 11, [1] * 7 + [0] * 4]
    got = block_causal_allowed(torch.tensor(valid), block)
    assert torch.equal(got, slow_block_causal(valid, block))


def test_block_causal_mask_lets_a_frame_see_the_rest_of_its_block_but_not_the_next():
    allowed = block_causal_allowed(torch.ones(1, 8, dtype=torch.long), 4)[0]
    assert allowed[0, 3] and not allowed[0, 4] and allowed[5, 7] and allowed[7, 0]


@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("frames", [8, 10])
def test_pooling_matches_a_slow_reference(kind, frames):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, frames, 3, generator=g)
    valid = torch.ones(2, frames, dtype=torch.long)
    valid[1, 6:] = 0
    module = torch.nn.AvgPool1d(4) if kind == "avg" else torch.nn.MaxPool1d(4)
    pooled, pooled_valid = pool_frames(h, valid, module, 4)
    groups = math.ceil(frames / 4)
    ref = torch.zeros(2, groups, 3)
    for n in range(2):
        for k in range(groups):
            rows = [h[n, i] if i < frames else torch.zeros(3) for i in range(4 * k, 4 * k + 4)]  # zero-padded end
            stack = torch.stack(rows)
            ref[n, k] = stack.mean(0) if kind == "avg" else stack.max(0).values
    torch.testing.assert_close(pooled, ref)
    assert pooled_valid.tolist() == [[1] * groups, [1, 1, 0][:groups]]


def test_nearest_codebook_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    codebook = torch.randn(300, 8, generator=g, dtype=torch.float64)
    x = torch.randn(3, 50, 8, generator=g, dtype=torch.float64)
    brute = torch.tensor(
        [[min(range(300), key=lambda c: float(((v - codebook[c]) ** 2).sum())) for v in row] for row in x]
    )
    assert torch.equal(nearest_codes(x, codebook), brute)


def test_a_codebook_row_quantizes_to_itself():
    codebook = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    assert nearest_codes(codebook[[5, 0, 63]], codebook).tolist() == [5, 0, 63]


# --- audio files -----------------------------------------------------------------------------------


def test_tokenize_reads_a_wav_file(tokenizer, tmp_path):
    wave = chirp(16000, 2.0)
    path = pcm16(tmp_path / "a.wav", wave[None].numpy(), 16000)
    expected = tokenizer.units(torch.from_numpy(read_wav(path).samples[0]), 16000)
    assert tokenizer.tokenize(str(path)) == expected
    assert len(expected) == 25


def test_other_sample_rates_are_resampled_to_16khz_with_torchaudio(tokenizer, tmp_path):
    wave = chirp(44100, 2.0)
    path = pcm16(tmp_path / "b.wav", wave[None].numpy(), 44100)
    samples = torch.from_numpy(read_wav(path).samples[0])
    at16k = torchaudio.transforms.Resample(44100, 16000)(samples)
    units = tokenizer.tokenize(str(path))
    assert units == tokenizer.units(at16k, 16000)
    assert len(units) == 25


def test_only_the_first_channel_is_used(tokenizer, tmp_path):
    wave = chirp(16000, 1.0).numpy()
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, wave.shape).astype(np.float32)
    stereo = pcm16(tmp_path / "stereo.wav", np.stack([wave, noise, -wave]), 16000)
    mono = pcm16(tmp_path / "mono.wav", wave[None], 16000)
    assert tokenizer.tokenize(str(stereo)) == tokenizer.tokenize(str(mono))


@pytest.mark.parametrize("kind", ["u8", "i24", "i32", "f32", "f64"])
def test_wav_sample_formats_are_scaled_like_torchaudio(tmp_path, kind):
    x = np.array([0.0, 0.5, -0.5, -1.0, 0.25], dtype=np.float64)
    if kind == "u8":
        raw, tag, width = np.round(x * 128 + 128).clip(0, 255).astype(np.uint8).tobytes(), 1, 1
    elif kind == "i24":
        v = np.round(x * (1 << 23)).clip(-(1 << 23), (1 << 23) - 1).astype(np.int32)
        raw, tag, width = b"".join(int(i).to_bytes(3, "little", signed=True) for i in v), 1, 3
    elif kind == "i32":
        raw, tag, width = np.round(x * (1 << 31)).clip(-(1 << 31), (1 << 31) - 1).astype("<i4").tobytes(), 1, 4
    else:
        width = 4 if kind == "f32" else 8
        raw, tag = x.astype("<f4" if width == 4 else "<f8").tobytes(), 3
    fmt = struct.pack("<HHIIHH", tag, 1, 8000, 8000 * width, width, 8 * width)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(raw)) + raw
    (tmp_path / "x.wav").write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    audio = read_wav(tmp_path / "x.wav")
    assert audio.sample_rate == 8000 and audio.samples.shape == (1, 5)
    np.testing.assert_allclose(audio.samples[0], x, atol=1 / 128 if kind == "u8" else 1e-6)


def test_written_wav_reads_back(tmp_path):
    wave = chirp(22050, 0.5)
    for as_float, tol in ((False, 0.5 / 32768 + 1e-7), (True, 0.0)):
        out = write_wav(tmp_path / "o.wav", wave, 22050, float32=as_float)
        back = read_wav(out)
        assert back.sample_rate == 22050
        np.testing.assert_allclose(back.samples[0], wave.numpy(), atol=tol)
    assert not list(tmp_path.glob(".o.wav.*"))  # no temporary file left behind


# --- input errors: one line, naming the file --------------------------------------------------------


def one_line(exc: pytest.ExceptionInfo, path: Path | str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_file_is_an_input_error(tokenizer, tmp_path):
    with pytest.raises(InputError) as e:
        tokenizer.tokenize(str(tmp_path / "nope.wav"))
    assert "not found" in one_line(e, tmp_path / "nope.wav")


def test_directory_is_an_input_error(tokenizer, tmp_path):
    with pytest.raises(InputError) as e:
        tokenizer.tokenize(str(tmp_path))
    assert "directory" in one_line(e, tmp_path)


def test_unreadable_file_is_an_input_error(tokenizer, tmp_path, monkeypatch):
    path = pcm16(tmp_path / "locked.wav", chirp(16000, 0.2)[None].numpy(), 16000)

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(InputError) as e:
        tokenizer.tokenize(str(path))
    assert "cannot be read" in one_line(e, path)


def test_empty_file_is_an_input_error(tokenizer, tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(InputError) as e:
        tokenizer.tokenize(str(path))
    assert "empty" in one_line(e, path)


def test_wav_without_samples_is_an_input_error(tokenizer, tmp_path):
    path = pcm16(tmp_path / "nosamples.wav", np.zeros((1, 0)), 16000)
    with pytest.raises(InputError) as e:
        tokenizer.tokenize(str(path))
    assert "no audio samples" in one_line(e, path)


def test_silent_file_is_a_clear_error(tokenizer, tmp_path):
    path = pcm16(tmp_path / "silence.wav", np.zeros((1, 16000)), 16000)
    with pytest.raises(InputError) as e:
        tokenizer.tokenize(str(path))
    assert "silent" in one_line(e, path)


def test_over_long_file_is_refused_with_the_limit(tok_dir, tmp_path):
    short_limit = load_speech_tokenizer(tok_dir, device="cpu", max_seconds=2.0)
    path = pcm16(tmp_path / "long.wav", chirp(8000, 3.0)[None].numpy(), 8000)
    with pytest.raises(InputError) as e:
        short_limit.tokenize(str(path))
    assert "limit is 2 s" in one_line(e, path)


def test_text_file_is_not_audio(tokenizer, tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("these are my notes, not a recording\n")
    with pytest.raises(InputError) as e:
        tokenizer.tokenize(str(path))
    assert "not a WAV file" in one_line(e, path)


def test_flac_is_recognised_and_conversion_is_suggested(tokenizer, tmp_path):
    path = tmp_path / "speech.flac"
    path.write_bytes(b"fLaC" + bytes(64))
    with pytest.raises(InputError) as e:
        tokenizer.tokenize(str(path))
    assert "FLAC" in one_line(e, path) and "ffmpeg" in str(e.value)


def test_truncated_header_is_an_input_error(tokenizer, tmp_path):
    path = tmp_path / "cut.wav"
    path.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00")
    with pytest.raises(InputError) as e:
        tokenizer.tokenize(str(path))
    one_line(e, path)


def test_unsupported_wav_encoding_is_an_input_error(tokenizer, tmp_path):
    fmt = struct.pack("<HHIIHH", 6, 1, 8000, 8000, 1, 8)  # A-law
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", 4) + bytes(4)
    path = tmp_path / "alaw.wav"
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    with pytest.raises(InputError) as e:
        tokenizer.tokenize(str(path))
    assert "16-bit PCM" in one_line(e, path)


def test_zero_sample_rate_is_an_input_error(tokenizer, tmp_path):
    path = pcm16(tmp_path / "rate0.wav", chirp(16000, 0.1)[None].numpy(), 0)
    with pytest.raises(InputError) as e:
        tokenizer.tokenize(str(path))
    assert "sample rate of 0 Hz" in one_line(e, path)


# --- the checkpoint directory -------------------------------------------------------------------------


def test_missing_directory_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_speech_tokenizer(tmp_path / "absent", device="cpu")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    directory = make_tiny_tokenizer_dir(tmp_path / "t")
    cfg = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**cfg, "quantize_vocab_size": 65}))
    with pytest.raises(CheckpointError, match="codebook.weight"):
        load_speech_tokenizer(directory, device="cpu")


def test_config_without_a_quantizer_is_refused(tmp_path):
    directory = make_tiny_tokenizer_dir(tmp_path / "t")
    cfg = json.loads((directory / "config.json").read_text())
    del cfg["quantize_vocab_size"]
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantize_vocab_size"):
        load_speech_tokenizer(directory, device="cpu")


# --- the command -------------------------------------------------------------------------------------


def speech_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="reempathy")
    add_speech_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_tokenize_command_prints_units_per_file(tok_dir, tmp_path, capsys):
    a = pcm16(tmp_path / "a.wav", chirp(16000, 2.0)[None].numpy(), 16000)
    b = pcm16(tmp_path / "b.wav", chirp(16000, 0.5)[None].numpy(), 16000)
    assert speech_command(["speech", "tokenize", "--tokenizer", str(tok_dir), str(a), str(b), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(a), str(b)]
    assert [len(line.split("\t")[1].split()) for line in lines] == [25, 7]


def test_tokenize_command_json(tok_dir, tmp_path, capsys):
    a = pcm16(tmp_path / "a.wav", chirp(16000, 2.0)[None].numpy(), 16000)
    speech_command(["speech", "tokenize", "--tokenizer", str(tok_dir), str(a), "--json", "--device", "cpu"])
    data = json.loads(capsys.readouterr().out)
    assert data["files"][0]["path"] == str(a) and len(data["files"][0]["units"]) == 25
    assert data["files"][0]["seconds"] == 2.0


def test_tokenize_command_stops_with_an_input_error_for_a_bad_file(tok_dir, tmp_path):
    with pytest.raises(InputError, match="not found"):
        speech_command(["speech", "tokenize", "--tokenizer", str(tok_dir), str(tmp_path / "x.wav"), "--device", "cpu"])

"""`reempathy decode --audio IN.wav --out OUT.wav` end to end on tiny GLM-4-Voice, tokenizer and decoder directories."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from glm4voice_fixture import make_tiny_glm4voice_dir

from reempathy.cli import main
from reempathy.speech.audio import read_wav, write_wav
from reempathy.speech.tiny import make_tiny_decoder_dir, make_tiny_tokenizer_dir


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("spoken")
    model = make_tiny_glm4voice_dir(root / "glm")
    tok = make_tiny_tokenizer_dir(root / "tokenizer")
    dec = make_tiny_decoder_dir(root / "decoder")
    t = torch.arange(24000, dtype=torch.float64) / 16000
    wav = write_wav(root / "user.wav", (0.3 * torch.sin(2 * math.pi * 200 * t)).float(), 16000)
    return model, tok, dec, wav


def _config(tmp_path: Path, dirs, strategy: str) -> Path:
    model, tok, dec, _ = dirs
    cfg = tmp_path / f"{strategy}.toml"
    cfg.write_text(
        f"""
[backbone]
name = "glm-4-voice"
path = {json.dumps(str(model))}
tokenizer_path = {json.dumps(str(tok))}
decoder_path = {json.dumps(str(dec))}
device = "cpu"

[strategy]
name = "{strategy}"
{"max_thought_tokens = 8" if strategy == "cotbs" else ""}

[decode]
max_new_tokens = 60
"""
    )
    return cfg


@pytest.mark.parametrize("strategy", ["sft", "cotbs", "reempathy"])
def test_decode_audio_writes_the_spoken_answer_for_every_strategy(tmp_path, dirs, strategy, capsys):
    out = tmp_path / "answer.wav"
    code = main(["decode", "--config", str(_config(tmp_path, dirs, strategy)), "--audio", str(dirs[3]),
                 "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    assert data["strategy"] == strategy
    units = data["spoken"]["audio_units"]
    assert units, "the tiny model should speak some audio in 60 tokens"
    wav = read_wav(out)
    assert wav.sample_rate == 22050
    # 12.5 units per second at 22.05 kHz: 1764 samples per unit
    assert wav.samples.shape[-1] == pytest.approx(len(units) * 1764, rel=0.1)
    assert not list(tmp_path.glob("*.tmp*")), "no temporary file left behind"


def test_decode_out_without_audio_is_a_one_line_error(capsys, tmp_path):
    code = main(["decode", "--prompt", "hi", "--out", str(tmp_path / "a.wav")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--audio" in err[0]


def test_decode_audio_that_is_not_audio_is_a_one_line_error(tmp_path, dirs, capsys):
    bad = tmp_path / "notes.wav"
    bad.write_text("this is not a wave file")
    code = main(["decode", "--config", str(_config(tmp_path, dirs, "sft")), "--audio", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "notes.wav" in err[0]

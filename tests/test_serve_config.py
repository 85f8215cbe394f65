"""`reempathy serve`'s command line and config: what is refused before anything loads, and the wire audio helpers."""

from __future__ import annotations

import base64

import pytest
import torch
from serve_helpers import ROOT, registry, write_configs

from reempathy.cli import main
from reempathy.errors import ConfigError, InputError
from reempathy.serve.audio import StreamResampler, decode_base64, encode_pcm16, pcm16_to_float
from reempathy.serve.config import is_loopback, load_serve_config
from reempathy.speech.audio import resample


def test_the_shipped_serve_config_loads_with_its_three_strategies():
    cfg = load_serve_config(ROOT / "configs" / "serve.toml", registry())
    assert list(cfg.models) == ["sft", "cotbs", "reempathy"]
    assert cfg.default_model == "reempathy"
    assert {m.cfg.strategy.name for m in cfg.models.values()} == {"sft", "cotbs", "reempathy"}


def test_flags_override_the_serve_table_and_device_reaches_every_backbone(tmp_path):
    cfg = load_serve_config(write_configs(tmp_path), registry(), {"max_sessions": 3}, device="cpu")
    assert cfg.settings.max_sessions == 3
    assert {m.cfg.backbone.options["device"] for m in cfg.models.values()} == {"cpu"}


def test_models_on_different_backbones_are_refused(tmp_path):
    path = write_configs(tmp_path)
    (tmp_path / "cotbs.toml").write_text((tmp_path / "cotbs.toml").read_text().replace("seed = 0\n", "seed = 1\n", 1))
    with pytest.raises(ConfigError, match="one set of weights"):
        load_serve_config(path, registry())


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("[serve]", "[served]"), "one \\[serve\\] table"),
    (lambda t: t.replace("max_sessions = 16", "max_sessions = 0"), "max_sessions"),
    (lambda t: t.replace("max_sessions = 16", "max_sesions = 16"), "unknown key 'max_sesions'"),
    (lambda t: t.replace('default_model = "sft"', 'default_model = "gpt"'), "default_model 'gpt'"),
    (lambda t: t.replace('name = "cotbs"', 'name = "sft"'), "listed twice"),
    (lambda t: t.replace('name = "cotbs"', 'name = "a b"'), "model name 'a b'"),
])
def test_a_bad_serve_config_is_one_config_error_naming_the_key(tmp_path, edit, message):
    path = write_configs(tmp_path)
    path.write_text(edit(path.read_text()))
    with pytest.raises(ConfigError, match=message):
        load_serve_config(path, registry())


def test_binding_beyond_loopback_without_an_api_key_is_refused_before_anything_loads(capsys, monkeypatch):
    monkeypatch.delenv("REEMPATHY_API_KEY", raising=False)
    code = main(["serve", "--config", str(ROOT / "configs" / "serve.toml"), "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert code == 2 and "needs an API key" in err and err.count("\n") == 1


def test_a_short_api_key_is_refused(capsys):
    code = main(["serve", "--config", str(ROOT / "configs" / "serve.toml"), "--api-key", "abc"])
    assert code == 2 and "at least 8" in capsys.readouterr().err


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.1.2.3", True),
                                            ("0.0.0.0", False), ("10.0.0.5", False), ("example.org", False)])
def test_only_loopback_hosts_count_as_local(host, loopback):
    assert is_loopback(host) is loopback


def test_serve_is_listed_in_the_help(capsys):
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--host", "--port", "--max-sessions", "--api-key", "--device"):
        assert flag in out


def test_streamed_resampling_equals_one_resampling_of_the_whole(tmp_path):
    torch.manual_seed(0)
    wave = torch.randn(22050) * 0.3
    resampler = StreamResampler(22050, 24000)
    pieces, start = [], 0
    for n in (1000, 37, 5000, 147, 294, 8000, 7572):
        pieces.append(resampler.push(wave[start : start + n]))
        start += n
    pieces.append(resampler.finish())
    streamed = torch.cat(pieces)
    whole = resample(wave.unsqueeze(0), 22050, 24000)[0]
    assert streamed.shape == whole.shape
    assert torch.allclose(streamed, whole, atol=1e-6)


def test_pcm16_round_trips_through_base64():
    samples = torch.tensor([0.0, 0.5, -0.5, 0.999, -1.0])
    back = pcm16_to_float(decode_base64(encode_pcm16(samples), "audio"))
    assert torch.allclose(back, samples, atol=1 / 16384)


@pytest.mark.parametrize("data", [5, "%%%", "AAA"])
def test_bad_base64_is_an_input_error(data):
    with pytest.raises(InputError):
        decode_base64(data, "audio")


def test_an_odd_number_of_pcm_bytes_is_an_input_error():
    with pytest.raises(InputError, match="even"):
        pcm16_to_float(base64.b64decode("AAAA"))


def test_the_page_ships_in_the_wheel(tmp_path):
    """The page is package data: a wheel built from the sources holds it (no network: no build isolation)."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"
    shutil.copytree(ROOT / "reempathy", src / "reempathy", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("index.html", "app.js", "capture.js", "style.css"):
        assert f"reempathy/serve/static/{name}" in names

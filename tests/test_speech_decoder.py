"""The GLM-4-Voice speech decoder: mel length rule, 256 samples per frame, the solver's schedule, seeding, loading."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from reempathy.errors import CheckpointError, InputError
from reempathy.speech.audio import read_wav
from reempathy.speech.cli import add_speech_parser
from reempathy.speech.decoder import DEFAULT_SEED, convert_decoder_weights, load_speech_decoder
from reempathy.speech.decoder.cfm import solve_euler, time_schedule
from reempathy.speech.decoder.conformer import block_causal_grid
from reempathy.speech.decoder.flow import mel_frames
from reempathy.speech.decoder.weights import fold_weight_norm
from reempathy.speech.tiny import TINY_DECODER_YAML, make_tiny_decoder_dir

UNITS = [
    3,
    14,
    15,
    92,
    65,
    35,
    89,
    79,
    323,
    846,
    264,
    338,
    327,
    950,
    288,
    419,
    716,
    939,
    937,
    510,
    582,
    97,
    494,
    459,
    230,
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: one thread avoids contention with other processes on a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dec_dir(tmp_path_factory) -> Path:
    return make_tiny_decoder_dir(tmp_path_factory.mktemp("decoder") / "glm-4-voice-decoder")


@pytest.fixture(scope="module")
def decoder(dec_dir):
    return load_speech_decoder(dec_dir, device="cpu")


# --- lengths ---------------------------------------------------------------------------------------


def test_waveform_has_256_samples_per_mel_frame_at_22050_hz(decoder):
    out = decoder.synthesize_full(UNITS)
    assert decoder.sample_rate == 22050 and out.sample_rate == 22050
    assert out.mel.shape == (80, mel_frames(len(UNITS), 12.5))
    assert out.waveform.shape == (out.mel.shape[1] * 256,)


@pytest.mark.parametrize("units, frames", [(1, 6), (25, 172), (26, 179), (100, 689)])
def test_mel_length_follows_the_published_rule(units, frames):
    assert mel_frames(units, 12.5) == frames == int(units / 12.5 * 22050 / 256)


def test_waveform_is_finite_and_within_the_audio_limit(decoder):
    wave = decoder.synthesize(UNITS[:7])
    assert torch.isfinite(wave).all() and wave.abs().max() <= 0.99


# --- the flow solver --------------------------------------------------------------------------------


def slow_cosine_schedule(n: int) -> list[float]:
    return [1 - math.cos(k / n * 0.5 * math.pi) for k in range(n + 1)]


def test_time_schedule_is_the_published_cosine_schedule():
    got = time_schedule(10, "cosine").tolist()
    assert got == pytest.approx(slow_cosine_schedule(10), abs=1e-6)
    assert got[0] == 0.0 and got[-1] == pytest.approx(1.0)
    steps = np.diff(got)
    assert (np.diff(steps) > 0).all()  # small steps first


def test_linear_schedule_for_other_schedulers():
    assert time_schedule(4, "linear").tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1])


class RecordingEstimator:
    """Velocity ``mu + t`` per element; records the times it is asked about."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, x, mask, mu, t, spks, cond):
        self.times.append(float(t))
        return (mu + t) * mask


def test_euler_solver_matches_a_slow_reference_with_guidance():
    est = RecordingEstimator()
    noise = torch.tensor([[[0.5, -1.0, 2.0]]])
    mu = torch.tensor([[[1.0, 2.0, -3.0]]])
    mask, spks, cond = torch.ones(1, 1, 3), torch.zeros(1, 1), torch.zeros(1, 1, 3)
    t_span = time_schedule(10, "cosine")
    got = solve_euler(est, noise, t_span, mu, mask, spks, cond, cfg_rate=0.7)
    ts = slow_cosine_schedule(10)
    x = [0.5, -1.0, 2.0]
    for k in range(10):
        dt = ts[k + 1] - ts[k]
        # conditional (mu + t) and unconditional (0 + t), mixed 1.7 / -0.7
        x = [xi + dt * (1.7 * (m + ts[k]) - 0.7 * ts[k]) for xi, m in zip(x, [1.0, 2.0, -3.0], strict=False)]
    assert got.flatten().tolist() == pytest.approx(x, abs=1e-5)
    assert est.times == pytest.approx(ts[:10], abs=1e-6)  # one batched (cond + uncond) call per step


# --- randomness -------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_waveform(decoder):
    a = decoder.synthesize(UNITS, seed=7)
    b = decoder.synthesize(UNITS, seed=7)
    assert torch.equal(a, b)


def test_different_seeds_give_different_waveforms(decoder):
    assert not torch.equal(decoder.synthesize(UNITS, seed=1), decoder.synthesize(UNITS, seed=2))


def test_default_seed_is_the_published_42(decoder):
    assert DEFAULT_SEED == 42
    assert torch.equal(decoder.synthesize(UNITS), decoder.synthesize(UNITS, seed=42))


def test_global_rng_is_untouched_and_irrelevant(decoder):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = decoder.synthesize(UNITS[:9])
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    assert torch.equal(decoder.synthesize(UNITS[:9]), a)


def test_modules_are_in_eval_mode(decoder):
    assert not decoder.flow.training and not decoder.hift.training
    assert not any(m.training for m in decoder.flow.modules())


# --- pieces against slow references -------------------------------------------------------------------


def test_flow_encoder_block_mask_matches_a_slow_reference():
    got = block_causal_grid(23, 10)
    ref = torch.tensor([[j <= i or i // 10 == j // 10 for j in range(23)] for i in range(23)])
    assert torch.equal(got, ref)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
@pytest.mark.parametrize("style", ["weight_g/weight_v", "parametrizations"])
def test_weight_norm_folds_to_what_torch_computes(style):
    norm = torch.nn.utils.weight_norm if style == "weight_g/weight_v" else torch.nn.utils.parametrizations.weight_norm
    conv = norm(torch.nn.ConvTranspose1d(4, 3, 5))
    state = {k: v.detach().clone() for k, v in conv.state_dict().items()}
    g_key = next(k for k in state if k.endswith(("weight_g", "original0")))
    state[g_key] = state[g_key] * (torch.rand_like(state[g_key]) + 0.5)
    conv.load_state_dict(state)
    folded = fold_weight_norm(state)
    assert set(folded) == {"weight", "bias"}
    x = torch.randn(1, 4, 9)
    plain = torch.nn.ConvTranspose1d(4, 3, 5)
    plain.load_state_dict(folded)
    torch.testing.assert_close(plain(x), conv(x))


# --- config.yaml and weights ----------------------------------------------------------------------------


def test_yaml_tags_are_read_as_data_never_run(tmp_path):
    marker = tmp_path / "ran"
    directory = make_tiny_decoder_dir(tmp_path / "d")
    text = (directory / "config.yaml").read_text()
    evil = f'__evil: !apply:os.system ["touch {marker}"]\n__evil2: !new:pathlib.Path ["{marker}"]\n'
    (directory / "config.yaml").write_text(evil + text)
    load_speech_decoder(directory, device="cpu")
    assert not marker.exists()


def test_a_dangling_reference_is_a_checkpoint_error(tmp_path):
    directory = make_tiny_decoder_dir(tmp_path / "d")
    text = (
        (directory / "config.yaml")
        .read_text()
        .replace("sampling_rate: !ref <sample_rate>", "sampling_rate: !ref <rate>")
    )
    (directory / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match="<rate>"):
        load_speech_decoder(directory, device="cpu")


def test_another_flow_class_is_refused(tmp_path):
    directory = make_tiny_decoder_dir(tmp_path / "d")
    text = (
        (directory / "config.yaml")
        .read_text()
        .replace("flow.flow.MaskedDiffWithXvec", "flow.flow.CausalMaskedDiffWithXvec")
    )
    (directory / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match="MaskedDiffWithXvec"):
        load_speech_decoder(directory, device="cpu")


def test_unsupported_encoder_option_is_refused(tmp_path):
    directory = make_tiny_decoder_dir(tmp_path / "d")
    text = (
        (directory / "config.yaml")
        .read_text()
        .replace(
            "use_cnn_module: False\n        macaron_style: False\n    length",
            "use_cnn_module: True\n        macaron_style: False\n    length",
        )
    )
    (directory / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match="use_cnn_module"):
        load_speech_decoder(directory, device="cpu")


def test_missing_weight_file_is_a_checkpoint_error(tmp_path):
    directory = make_tiny_decoder_dir(tmp_path / "d")
    (directory / "hift.pt").unlink()
    with pytest.raises(CheckpointError, match="hift.pt is missing"):
        load_speech_decoder(directory, device="cpu")


def test_pickled_objects_are_not_loaded(tmp_path):
    directory = make_tiny_decoder_dir(tmp_path / "d")
    torch.save({"weights": argparse.Namespace(x=1)}, directory / "flow.pt")
    with pytest.raises(CheckpointError, match="flow.pt cannot be read"):
        load_speech_decoder(directory, device="cpu")


def test_weights_of_another_size_are_refused(tmp_path):
    directory = make_tiny_decoder_dir(tmp_path / "d")
    (directory / "config.yaml").write_text(
        TINY_DECODER_YAML.format(vocab_size=1024).replace("cond_channels: 16", "cond_channels: 24")
    )
    with pytest.raises(CheckpointError, match="hift.pt"):
        load_speech_decoder(directory, device="cpu")


def test_safetensors_conversion_gives_the_same_waveform(tmp_path, decoder):
    directory = make_tiny_decoder_dir(tmp_path / "d")
    written = convert_decoder_weights(directory)
    assert [p.name for p in written] == ["flow.safetensors", "hift.safetensors"]
    (directory / "flow.pt").unlink()
    (directory / "hift.pt").unlink()
    converted = load_speech_decoder(directory, device="cpu")
    assert torch.equal(converted.synthesize(UNITS[:5]), decoder.synthesize(UNITS[:5]))
    with pytest.raises(CheckpointError, match="flow.pt is missing"):
        convert_decoder_weights(directory)


def test_units_outside_the_vocabulary_are_an_input_error(decoder):
    with pytest.raises(InputError, match="outside the decoder's range 0..1023"):
        decoder.synthesize([1, 2, 5000])
    with pytest.raises(InputError, match="no speech units"):
        decoder.synthesize([])


# --- the command ---------------------------------------------------------------------------------------


def speech_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="reempathy")
    add_speech_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_synthesize_command_writes_16_bit_pcm_and_the_mel(dec_dir, tmp_path, capsys, decoder):
    units = tmp_path / "u.txt"
    units.write_text(" ".join(map(str, UNITS)))
    out, mel = tmp_path / "out.wav", tmp_path / "mel.npy"
    code = speech_command(["speech", "synthesize", "--decoder", str(dec_dir), "--units", str(units), "--out", str(out),
                           "--save-mel", str(mel), "--device", "cpu"])  # fmt: skip
    assert code == 0 and "wrote" in capsys.readouterr().out
    data = out.read_bytes()
    assert data[20:22] == b"\x01\x00" and data[34:36] == b"\x10\x00"  # PCM, 16 bits
    audio = read_wav(out)
    expected = decoder.synthesize_full(UNITS)
    assert audio.sample_rate == 22050 and audio.samples.shape == (1, expected.waveform.shape[0])
    np.testing.assert_allclose(audio.samples[0], expected.waveform.numpy(), atol=0.5 / 32768 + 1e-7)
    np.testing.assert_array_equal(np.load(mel), expected.mel.numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mel.npy", "out.wav", "u.txt"]  # no temporary files


def test_synthesize_command_float_output_and_seed(dec_dir, tmp_path, decoder):
    units = tmp_path / "u.json"
    units.write_text(str(UNITS[:10]))
    out = tmp_path / "f.wav"
    speech_command(["speech", "synthesize", "--decoder", str(dec_dir), "--units", str(units), "--out", str(out),
                    "--float", "--seed", "3", "--device", "cpu"])  # fmt: skip
    assert out.read_bytes()[20:22] == b"\x03\x00"  # IEEE float
    np.testing.assert_array_equal(read_wav(out).samples[0], decoder.synthesize(UNITS[:10], seed=3).numpy())


def test_synthesize_command_checks_the_output_directory_first(dec_dir, tmp_path):
    units = tmp_path / "u.txt"
    units.write_text("1 2 3")
    with pytest.raises(InputError, match="does not exist"):
        speech_command(["speech", "synthesize", "--decoder", str(dec_dir), "--units", str(units),
                        "--out", str(tmp_path / "no" / "x.wav"), "--device", "cpu"])  # fmt: skip


def test_convert_decoder_command(tmp_path, capsys):
    directory = make_tiny_decoder_dir(tmp_path / "d")
    assert speech_command(["speech", "convert-decoder", str(directory)]) == 0
    assert (directory / "flow.safetensors").is_file() and "hift.safetensors" in capsys.readouterr().out

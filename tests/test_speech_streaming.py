"""Chunked synthesis as the published web demo does it: growing blocks, one-token lag, overlap, cache, flush."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reempathy.errors import ConfigError
from reempathy.speech.decoder import load_speech_decoder
from reempathy.speech.decoder.flow import mel_frames
from reempathy.speech.decoder.streaming import BLOCK_SIZES, StreamingSynthesizer, cross_fade, hamming
from reempathy.speech.tiny import make_tiny_decoder_dir

UNITS = [(37 * i + 11) % 1024 for i in range(200)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return load_speech_decoder(make_tiny_decoder_dir(tmp_path_factory.mktemp("dec") / "d"), device="cpu")


def run(decoder, units, **kw) -> tuple[StreamingSynthesizer, list[torch.Tensor]]:
    synth = StreamingSynthesizer(decoder, **kw)
    pieces = synth.push(units)
    last = synth.finish()
    return synth, pieces + ([last] if last is not None else [])


def test_block_sizes_are_the_published_demo_s():
    assert BLOCK_SIZES == (25, 50, 100, 150, 200)


def test_blocks_grow_and_the_rest_is_the_final_chunk(decoder):
    synth, pieces = run(decoder, UNITS[:80])
    assert synth.chunk_sizes == [25, 50, 5]
    assert len(pieces) == 3


def test_a_full_block_waits_for_the_next_token(decoder):
    synth = StreamingSynthesizer(decoder)
    assert synth.push(UNITS[:25]) == []  # the 25th unit filled the block; nothing has come after it yet
    assert len(synth.tick()) == 1 and synth.chunk_sizes == [25]


def test_a_block_that_ends_the_answer_is_synthesised_as_the_last_chunk(decoder):
    synth, pieces = run(decoder, UNITS[:25])
    assert synth.chunk_sizes == [25] and len(pieces) == 1
    assert pieces[0].shape[0] == mel_frames(25, 12.5) * 256  # nothing held back
    assert torch.equal(pieces[0], decoder.synthesize(UNITS[:25]))  # one chunk is the offline synthesis


@pytest.mark.parametrize("n", [30, 80, 176])
def test_total_length_is_the_published_streaming_length(decoder, n):
    synth, pieces = run(decoder, UNITS[:n])
    nonfinal = len(synth.chunk_sizes) - 1
    # The prompt mel carries the cached frame, so each chunk after the second starts one frame later (as published).
    assert sum(p.shape[0] for p in pieces) == 256 * (mel_frames(n, 12.5) + 1 - nonfinal)


def test_first_piece_holds_back_the_overlap_and_the_cached_frame(decoder):
    synth = StreamingSynthesizer(decoder)
    first = synth.push(UNITS[:26])[0]
    assert synth.overlap_frames == 34  # int(5 / 12.5 * 22050 / 256)
    assert first.shape[0] == (mel_frames(25, 12.5) - 34 - 1) * 256


def test_held_back_frames_are_vocoded_when_a_text_token_came_last(decoder):
    synth = StreamingSynthesizer(decoder)
    pieces = synth.push(UNITS[:25]) + synth.tick()  # a text token arrives after the full block
    tail = synth.finish()
    assert synth.chunk_sizes == [25] and tail is not None
    assert sum(p.shape[0] for p in pieces) + tail.shape[0] == mel_frames(25, 12.5) * 256


def test_streaming_is_deterministic_and_follows_the_seed(decoder):
    a = torch.cat(run(decoder, UNITS[:60])[1])
    b = torch.cat(run(decoder, UNITS[:60])[1])
    c = torch.cat(run(decoder, UNITS[:60], seed=5)[1])
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_custom_block_sizes(decoder):
    synth, _ = run(decoder, UNITS[:20], block_sizes=(6, 8))
    assert synth.chunk_sizes == [6, 8, 6]


def test_blocks_no_longer_than_the_overlap_are_refused(decoder):
    with pytest.raises(ConfigError, match="too small"):
        StreamingSynthesizer(decoder, block_sizes=(5, 50))


def test_hamming_window_is_numpy_s():
    np.testing.assert_allclose(hamming(68).numpy(), np.hamming(68), rtol=0, atol=1e-15)


def test_cross_fade_blends_only_the_overlap():
    new, old = torch.ones(1, 2, 10), torch.full((1, 2, 6), 3.0)
    window = hamming(8)
    out = cross_fade(new, old, window)
    expected = window[:4] + 3.0 * window[4:]
    torch.testing.assert_close(out[0, 0, :4], expected.float())
    assert torch.equal(out[..., 4:], new[..., 4:])


def test_finished_synthesizer_refuses_more_units(decoder):
    synth, _ = run(decoder, UNITS[:5])
    with pytest.raises(RuntimeError, match="finished"):
        synth.push([1])


def test_global_rng_is_untouched(decoder):
    torch.manual_seed(3)
    state = torch.get_rng_state()
    run(decoder, UNITS[:30])
    assert torch.equal(torch.get_rng_state(), state)


def test_tiny_decoder_dir_is_reusable(tmp_path: Path):
    assert (make_tiny_decoder_dir(tmp_path / "x") / "config.yaml").is_file()

"""VocabLayout.allowed_mask: the one way strategies build their per-slot masks."""

from __future__ import annotations

import torch

from reempathy.backbones.base import VocabLayout

LAYOUT = VocabLayout(vocab_size=20, text_end=8, audio_offset=12, audio_count=6, special={"<s>": 8, "<u>": 9}, stop_ids=(9,))
TEXT_ONLY = VocabLayout(vocab_size=12, text_end=8, audio_offset=12, audio_count=0, special={"<s>": 8}, stop_ids=(8,))


def ids(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


def test_allowed_mask_unites_the_kinds_asked_for():
    assert ids(LAYOUT.allowed_mask(text=True)) == list(range(8))
    assert ids(LAYOUT.allowed_mask(audio=True, stop=True)) == [9, *range(12, 18)]
    assert ids(LAYOUT.allowed_mask(text=True, audio=True, stop=True)) == [*range(8), 9, *range(12, 18)]
    assert ids(LAYOUT.allowed_mask(text=True, extra_ids=(10,))) == [*range(8), 10]
    assert ids(LAYOUT.allowed_mask()) == []


def test_a_text_only_layout_allows_no_audio_ids():
    assert ids(TEXT_ONLY.allowed_mask(audio=True)) == []
    assert ids(TEXT_ONLY.allowed_mask(text=True, audio=True, stop=True)) == [*range(8), 8]
    assert not any(TEXT_ONLY.is_audio(i) for i in range(TEXT_ONLY.vocab_size))

"""The sampling processors give the same scores as transformers' own logits processors."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from reempathy.config import load_config
from reempathy.plugins.processors.sampling import (
    RepetitionPenalty,
    RepetitionPenaltyOptions,
    Temperature,
    TemperatureOptions,
    TopK,
    TopKOptions,
    TopP,
    TopPOptions,
)
from reempathy.runner import sampling_chain


class _Session:
    def __init__(self, ids):
        self.ids = ids


def _logits(seed=0, n=300):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 3


@pytest.mark.parametrize("t", [0.2, 0.7, 1.5])
def test_temperature_matches_transformers(t):
    ours = _logits()
    Temperature(TemperatureOptions(value=t), None).reempathy_logits(_Session([]), ours)
    ref = TemperatureLogitsWarper(t)(torch.zeros(1, 1, dtype=torch.long), _logits()[None])[0]
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k_matches_transformers(k):
    ours = _logits(1)
    TopK(TopKOptions(k=k), None).reempathy_logits(_Session([]), ours)
    ref = TopKLogitsWarper(k)(torch.zeros(1, 1, dtype=torch.long), _logits(1)[None])[0]
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8, 0.95])
def test_top_p_matches_transformers(p):
    ours = _logits(2)
    TopP(TopPOptions(p=p), None).reempathy_logits(_Session([]), ours)
    ref = TopPLogitsWarper(p)(torch.zeros(1, 1, dtype=torch.long), _logits(2)[None])[0]
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))


@pytest.mark.parametrize("penalty", [0.8, 1.3])
def test_repetition_penalty_matches_transformers(penalty):
    ids = [3, 7, 7, 42, 150]
    ours = _logits(3)
    RepetitionPenalty(RepetitionPenaltyOptions(penalty=penalty), None).reempathy_logits(_Session(ids), ours)
    ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids]), _logits(3)[None])[0]
    torch.testing.assert_close(ours, ref)


def test_sampling_table_becomes_processors_in_transformers_order(tiny):
    cfg = load_config(None, ["sampling.top_p=0.9", "sampling.temperature=0.5", "sampling.repetition_penalty=1.2", "sampling.top_k=20"])
    assert [name for name, _ in sampling_chain(cfg, tiny)] == ["repetition-penalty", "temperature", "top-k", "top-p"]


def test_greedy_ignores_the_sampling_chain(tiny):
    cfg = load_config(None, ["sampling.greedy=true", "sampling.temperature=0.5"])
    assert sampling_chain(cfg, tiny) == []


def test_backbone_sampling_defaults_fill_unset_keys(tiny, monkeypatch):
    monkeypatch.setattr(tiny, "sampling_defaults", {"temperature": 0.2, "top_p": 0.8})
    cfg = load_config(None, ["sampling.top_p=0.5"])
    assert sampling_chain(cfg, tiny) == [("temperature", {"value": 0.2}), ("top-p", {"p": 0.5})]

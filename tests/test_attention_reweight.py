"""Processor attention-reweight: the target rule, α = 1 identity, and a whole decode against a slow reference."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface

from reempathy.decoding.loop import LoopOptions, decode
from reempathy.hooks import hookimpl

from helpers import NoStop
from reempathy.errors import ConfigError
from reempathy.plugins.processors.attention_reweight import AttentionReweight, AttentionReweightOptions, middle_layers, parse_layers
from reempathy.plugins.strategies.cotbs import CotbsOptions, CotbsStrategy
from reempathy.plugins.strategies.reempathy import ReEmpathyOptions, ReEmpathyStrategy
from reempathy.plugins.strategies.sft import SftOptions, SftStrategy




class PlanSpy(AttentionReweight):
    """The real processor, recording each plan with the first query position it applies to."""

    def __init__(self, options, backbone):
        super().__init__(options, backbone)
        self.plans = []
        self.logits = []

    @hookimpl
    def reempathy_attention_plan(self, session):
        plan = super().reempathy_attention_plan(session)
        # the plan holds from the next forward call, whose first query is position `forwarded`
        self.plans.append((session.forwarded, session.phase, plan))
        return plan

    @hookimpl
    def reempathy_logits(self, session, logits):
        self.logits.append((len(session.ids) - 1, logits.clone()))


def _reweight(tiny, **opts):
    return AttentionReweight(AttentionReweightOptions(**opts), tiny)


@pytest.mark.parametrize("strategy", ["reempathy", "cotbs"])
def test_factor_one_gives_token_identical_output_to_no_processor(tiny, tiny_prompt, strategy):
    def make():
        if strategy == "reempathy":
            return ReEmpathyStrategy(ReEmpathyOptions(max_reflection_tokens=5), tiny)
        return CotbsStrategy(CotbsOptions(max_thought_tokens=6), tiny)

    opts = LoopOptions(max_new_tokens=70, seed=11)
    plain = decode(tiny, tiny_prompt, make(), [NoStop(tiny)], opts)
    same = decode(tiny, tiny_prompt, make(), [NoStop(tiny), _reweight(tiny, factor=1.0, layers="0-1")], opts)
    other = decode(tiny, tiny_prompt, make(), [NoStop(tiny), _reweight(tiny, factor=3.0, layers="0-1")], opts)
    assert same.ids == plain.ids
    assert other.ids != plain.ids  # the processor does act when α ≠ 1


def test_targets_follow_the_rule_previous_spoken_chunk_then_latest_reflection(tiny, tiny_prompt):
    spy = PlanSpy(AttentionReweightOptions(factor=1.5, layers=[1]), tiny)
    strategy = ReEmpathyStrategy(ReEmpathyOptions(max_reflection_tokens=4), tiny)
    r = decode(tiny, tiny_prompt, strategy, [NoStop(tiny), spy], LoopOptions(max_new_tokens=60, seed=2))
    spoken = [(s["start"], s["end"]) for s in r.spans if s["label"] in ("spoken_text", "spoken_audio")]
    reflections = [(h.start, h.end) for h in r.hidden]
    assert spy.plans[0][2] is None  # first spoken chunk: nothing to look back at
    for _, phase, plan in spy.plans[1:]:
        (bias,) = plan[1]
        assert set(plan) == {1} and math.isclose(bias.bias, math.log(1.5))
        if phase == "reflection":
            # the whole spoken chunk just before this reflection
            chunk = [p for p in spoken if p[1] <= bias.end]
            assert bias.end == chunk[-1][1] and bias.end - bias.start == 15
        else:
            assert (bias.start, bias.end) in reflections


def test_cotbs_speaking_targets_the_thought(tiny, tiny_prompt):
    spy = PlanSpy(AttentionReweightOptions(factor=1.2, layers="0-1"), tiny)
    r = decode(tiny, tiny_prompt, CotbsStrategy(CotbsOptions(max_thought_tokens=5), tiny),
               [NoStop(tiny), spy], LoopOptions(max_new_tokens=20, seed=0))
    thought = r.hidden[0]
    assert spy.plans[0][1] == "thought" and spy.plans[0][2] is None
    _, phase, plan = spy.plans[1]
    assert phase == "speak"
    assert {(b.start, b.end) for biases in plan.values() for b in biases} == {(thought.start, thought.end)}


def test_sft_has_no_hidden_segment_and_so_no_bias(tiny, tiny_prompt):
    spy = PlanSpy(AttentionReweightOptions(factor=1.5, layers="0-1"), tiny)
    decode(tiny, tiny_prompt, SftStrategy(SftOptions(), tiny), [spy], LoopOptions(max_new_tokens=5, greedy=True))
    assert [p for _, _, p in spy.plans] == [None]


def test_default_layers_are_the_middle_half(tiny):
    assert _reweight(tiny).layers == [0, 1]


def test_default_layers_of_a_40_layer_model_are_the_papers_10_to_30_inclusive():
    assert middle_layers(40) == parse_layers("10-30", 40) == list(range(10, 31))


@pytest.mark.parametrize("depth", range(1, 81))
def test_relative_ranges_mean_the_same_on_every_depth(depth):
    assert parse_layers("0.25-0.75", depth) == parse_layers("middle", depth) == middle_layers(depth)
    assert parse_layers("0.0-1.0", depth) == parse_layers("all", depth) == list(range(depth))
    lo, hi = parse_layers("0.25-0.5", depth)[0], parse_layers("0.25-0.5", depth)[-1]
    assert 0 <= lo <= hi < depth


def test_the_papers_table_9_ranges_are_10_20_and_10_30_of_glm_4_voices_40_layers():
    assert parse_layers("0.25-0.5", 40) == list(range(10, 21))
    assert parse_layers("0.25-0.75", 40) == list(range(10, 31))
    assert parse_layers("0.25-0.75", 2) == [0, 1]  # the tiny model: both layers


@pytest.mark.parametrize("spec", ["0.5-0.25", "0.2-1.5", "1.0-1.0"])
def test_a_relative_range_outside_0_1_is_an_error_naming_it(spec):
    with pytest.raises(ConfigError, match=rf"relative range '{spec}' must run upwards within 0-1"):
        parse_layers(spec, 40)


def test_an_absolute_range_beyond_the_depth_names_the_depth(tiny):
    with pytest.raises(ConfigError, match=r"layer 30 is beyond the model's depth \(2 layers, 0..1\)"):
        AttentionReweight(AttentionReweightOptions(layers="10-30"), tiny)


# --- a whole decode against the slow reference ------------------------------------------

_ROW_TARGETS: dict[int, list[tuple[int, int, int, float, tuple[int, ...] | None]]] = {}
REF = "reempathy_test_row_reference"


def _row_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager softmax; each query row's target keys multiplied by α; renormalised."""
    n_rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)
    value = value.repeat_interleave(n_rep, dim=1)
    scores = (query @ key.transpose(-1, -2)) * scaling
    q_len, k_len = scores.shape[-2:]
    visible = torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None]
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    for row, layer, start, end, alpha, heads in _ROW_TARGETS.get(module.layer_idx, []):
        h = slice(None) if heads is None else list(heads)
        weights[:, h, row, start:end] *= alpha
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights @ value).transpose(1, 2).contiguous(), weights


AttentionInterface.register(REF, _row_reference)


@pytest.mark.parametrize("heads", [None, [1, 3]])
def test_whole_reempathy_decode_matches_eager_reference_in_float32(tiny, tiny_prompt, heads):
    alpha = 1.6
    spy = PlanSpy(AttentionReweightOptions(factor=alpha, layers=[1], heads=heads), tiny)
    strategy = ReEmpathyStrategy(ReEmpathyOptions(max_reflection_tokens=4), tiny)
    r = decode(tiny, tiny_prompt, strategy, [NoStop(tiny), spy], LoopOptions(max_new_tokens=50, seed=4))
    seq = tiny_prompt + r.ids
    # Which plan holds for each query row: the last one set before the row was forwarded.
    _ROW_TARGETS.clear()
    for row in range(len(seq)):
        active = [p for start, _, p in spy.plans if start <= row]
        plan = active[-1] if active else None
        for layer, biases in (plan or {}).items():
            for b in biases:
                _ROW_TARGETS.setdefault(layer, []).append(
                    (row, layer, b.start, b.end, math.exp(b.bias), b.heads)
                )
    assert _ROW_TARGETS, "the decode should have planned biases"
    model = tiny.model
    before = model.config._attn_implementation
    model.set_attn_implementation(REF)
    try:
        with torch.inference_mode():
            ref = model(torch.tensor([seq])).logits[0].float()
    finally:
        model.set_attn_implementation(before)
    # One cached decode against one full-sequence forward: their float32 summation orders differ,
    # which alone gives ~2.4e-5 on this model's logits (|logit| up to ~8) with no bias at all. The
    # layer-level checks in test_attention_bias.py hold 1e-5; here 5e-5, far below the bias's effect.
    for pos, logits in spy.logits:
        finite = torch.isfinite(logits)  # our logits are after strategy masking
        torch.testing.assert_close(logits[finite], ref[pos][finite], atol=5e-5, rtol=0)
    # and the reference differs from an unbiased run in those rows: the bias mattered
    _ROW_TARGETS.clear()
    model.set_attn_implementation(REF)
    try:
        with torch.inference_mode():
            plain = model(torch.tensor([seq])).logits[0].float()
    finally:
        model.set_attn_implementation(before)
    assert (plain[len(tiny_prompt) :] - ref[len(tiny_prompt) :]).abs().max() > 1e-2

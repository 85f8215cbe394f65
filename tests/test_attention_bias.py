"""The additive attention bias (reempathy.decoding.attention) against plain SDPA and a slow reference.

The reference is an eager attention function written here: softmax(QK^T * scale + causal), the
target keys' weights multiplied by alpha, rows renormalised, then @ V. It builds its own causal
mask from the shapes (queries are the last q_len positions of the keys), so it does not depend on
transformers' mask code.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from transformers import AttentionInterface, DynamicCache, GlmConfig, GlmForCausalLM, LlamaConfig, LlamaForCausalLM

from reempathy.decoding.attention import ATTENTION_NAME, KeyBias, biased_attention, register_attention

VOCAB = 300
REF_NAME = "reempathy_test_reference"

# (layer, start, end, alpha, heads) entries the reference applies; set by `reference_logits`.
_REF_SPEC: list[tuple[int, int, int, float, tuple[int, ...] | None]] = []


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    n_rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)
    value = value.repeat_interleave(n_rep, dim=1)
    scores = (query @ key.transpose(-1, -2)) * scaling
    q_len, k_len = scores.shape[-2:]
    visible = torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len)
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    for layer, start, end, alpha, heads in _REF_SPEC:
        if layer == module.layer_idx:
            head_index = list(range(weights.shape[1])) if heads is None else list(heads)
            weights[:, head_index, :, start:end] *= alpha
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights @ value).transpose(1, 2).contiguous(), weights


AttentionInterface.register(REF_NAME, _reference_attention)


def make_glm(seed: int = 0) -> GlmForCausalLM:
    torch.manual_seed(seed)
    config = GlmConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=VOCAB,
        partial_rotary_factor=0.5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    return GlmForCausalLM(config).to(torch.float32).eval()


def make_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=VOCAB,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).to(torch.float32).eval()


def token_ids(length: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def new_cache(model) -> DynamicCache:
    return DynamicCache(config=model.config)


def run(model, ids, cache=None, **kwargs):
    """Forward with a cache under whichever keyword this transformers version uses."""
    if cache is not None:
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        kwargs[name] = cache
        kwargs["use_cache"] = True
    with torch.no_grad():
        return model(ids, **kwargs)


def plan_from(spec) -> dict[int, list[KeyBias]]:
    plan: dict[int, list[KeyBias]] = {}
    for layer, start, end, alpha, heads in spec:
        plan.setdefault(layer, []).append(KeyBias(start, end, math.log(alpha), heads))
    return plan


def reference_logits(model, ids, spec) -> torch.Tensor:
    """Full-sequence logits (no cache) from the slow reference attention."""
    previous = model.config._attn_implementation
    _REF_SPEC[:] = list(spec)
    try:
        model.set_attn_implementation(REF_NAME)
        return run(model, ids).logits
    finally:
        model.set_attn_implementation(previous)
        _REF_SPEC.clear()


def biased_prefill_and_decode(model, ids, plan, prefill: int, steps: list[int]) -> list[torch.Tensor]:
    """Logits of a cached run: a prefill of `prefill` tokens, then chunks of `steps` tokens."""
    cache = new_cache(model)
    outputs = []
    with biased_attention(model) as controller:
        controller.set_plan(plan)
        position = prefill
        outputs.append(run(model, ids[:, :prefill], cache=cache).logits)
        for size in steps:
            outputs.append(run(model, ids[:, position : position + size], cache=cache).logits)
            position += size
    return outputs


def assert_matches_reference_cached(model, spec, prefill=9, steps=(1, 3, 1)):
    ids = token_ids(prefill + sum(steps))
    expected = reference_logits(model, ids, spec)
    outputs = biased_prefill_and_decode(model, ids, plan_from(spec), prefill, list(steps))
    position = 0
    for logits in outputs:
        size = logits.shape[1]
        torch.testing.assert_close(logits, expected[:, position : position + size], atol=1e-5, rtol=0)
        position += size


# --- 1. an empty plan is exactly plain SDPA ---------------------------------------------------


@pytest.mark.parametrize("plan", [None, {}, {1: []}, {2: [KeyBias(0, 4, 0.5, heads=())]}])
def test_empty_plan_is_bit_identical_to_sdpa_prefill_and_cached_decode(plan):
    model = make_glm()
    ids = token_ids(14)
    cache = new_cache(model)
    expected = [
        run(model, ids[:, :9], cache=cache).logits,
        run(model, ids[:, 9:10], cache=cache).logits,
        run(model, ids[:, 10:14], cache=cache).logits,
    ]
    outputs = biased_prefill_and_decode(model, ids, plan, 9, [1, 4])
    for got, want in zip(outputs, expected):
        assert torch.equal(got, want)


# --- 2. the bias equals multiplying attention weights by alpha --------------------------------


def test_bias_matches_reference_during_prefill():
    model = make_glm()
    ids = token_ids(12)
    spec = [(1, 2, 6, 1.5, None), (2, 0, 3, 0.7, None), (2, 5, 9, 1.5, None)]
    expected = reference_logits(model, ids, spec)
    with biased_attention(model) as controller:
        controller.set_plan(plan_from(spec))
        got = run(model, ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - run(model, ids).logits).abs().max() > 1e-3  # the bias does something


def test_bias_matches_reference_during_cached_decode_single_and_multi_token():
    spec = [(1, 2, 6, 1.5, None), (2, 4, 12, 0.7, None)]
    assert_matches_reference_cached(make_glm(), spec)


def test_bias_on_keys_generated_later_applies_once_they_exist():
    # Span [10, 13) lies beyond the 9-token prefill: it starts to matter during decoding.
    spec = [(1, 10, 13, 1.5, None), (3, 0, 100, 0.7, None)]
    assert_matches_reference_cached(make_glm(), spec)


def test_layers_not_in_plan_are_unchanged():
    model = make_glm()
    ids = token_ids(10)
    plain = run(model, ids, output_hidden_states=True).hidden_states
    with biased_attention(model) as controller:
        controller.set_plan({3: [KeyBias(1, 6, math.log(1.5))]})
        biased = run(model, ids, output_hidden_states=True).hidden_states
    # hidden_states[i] is the input of layer i: everything up to layer 3 is untouched.
    for index in range(4):
        assert torch.equal(biased[index], plain[index])
    assert not torch.equal(biased[-1], plain[-1])


# --- 3. head selection ------------------------------------------------------------------------


def test_head_selection_matches_reference_scaling_only_those_heads():
    spec = [(1, 1, 7, 1.5, (0, 2)), (2, 3, 11, 0.7, (1,)), (2, 0, 4, 1.5, None)]
    assert_matches_reference_cached(make_glm(), spec)


# --- 4. the causal mask is kept ---------------------------------------------------------------


def test_future_tokens_do_not_change_earlier_logits_with_bias_active():
    model = make_glm()
    ids = token_ids(12)
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 7) % VOCAB
    plan = {layer: [KeyBias(0, 12, math.log(1.5)), KeyBias(9, 12, math.log(0.5), heads=(1,))] for layer in range(4)}
    results = []
    for sequence in (ids, changed):
        with biased_attention(model) as controller:
            controller.set_plan(plan)
            full = run(model, sequence).logits
            cache = new_cache(model)
            run(model, sequence[:, :6], cache=cache)
            chunk = run(model, sequence[:, 6:12], cache=cache).logits  # several queries over a cache
        results.append((full, chunk))
    (full_a, chunk_a), (full_b, chunk_b) = results
    torch.testing.assert_close(full_a[:, :8], full_b[:, :8], atol=1e-6, rtol=0)
    torch.testing.assert_close(chunk_a[:, :2], chunk_b[:, :2], atol=1e-6, rtol=0)
    assert not torch.allclose(full_a[:, 8:], full_b[:, 8:])


def test_padding_mask_is_kept_with_bias_active():
    # Left padding shifts absolute positions; RoPE is relative, so the padded row must give the
    # same logits as the unpadded sequence with the bias span shifted by the padding.
    model = make_glm()
    ids = token_ids(8)
    pad = 3
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)
    batch = torch.cat([padded, token_ids(8 + pad, seed=5)], dim=0)
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    with biased_attention(model) as controller:
        controller.set_plan({1: [KeyBias(2, 5, math.log(1.5))], 2: [KeyBias(0, 3, math.log(0.7), heads=(3,))]})
        single = run(model, ids).logits
        controller.set_plan(
            {1: [KeyBias(2 + pad, 5 + pad, math.log(1.5))], 2: [KeyBias(pad, 3 + pad, math.log(0.7), heads=(3,))]}
        )
        batched = run(model, batch, attention_mask=mask).logits
    torch.testing.assert_close(batched[0, pad:], single[0], atol=1e-5, rtol=0)


def test_float_mask_from_caller_is_combined_with_bias():
    model = make_glm()
    ids = token_ids(10)
    spec = [(1, 2, 7, 1.5, (1,)), (2, 0, 4, 0.7, None)]
    expected = reference_logits(model, ids, spec)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    float_mask = torch.zeros(1, 1, 10, 10).masked_fill(~causal, torch.finfo(torch.float32).min)
    with biased_attention(model) as controller:
        controller.set_plan(plan_from(spec))
        got = run(model, ids, attention_mask=float_mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_bias_mask_is_per_head_only_when_heads_are_selected():
    from reempathy.decoding.attention import _combined_mask

    query, key = torch.zeros(2, 4, 1, 16), torch.zeros(2, 2, 7, 16)
    all_heads = (KeyBias(1, 3, 0.4),)
    some_heads = (KeyBias(1, 3, 0.4, heads=(2,)),)
    assert _combined_mask(all_heads, None, True, query, key).shape == (1, 1, 1, 7)
    assert _combined_mask(some_heads, None, True, query, key).shape == (1, 4, 1, 7)
    bool_mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    assert _combined_mask(all_heads, bool_mask, True, query, key).shape == (2, 1, 1, 7)
    prefill = _combined_mask(all_heads, None, True, torch.zeros(1, 4, 3, 16), torch.zeros(1, 2, 3, 16))
    assert prefill.shape == (1, 1, 3, 3)
    assert prefill[0, 0, 0, 1] == torch.finfo(torch.float32).min and prefill[0, 0, 2, 1] == 0.4


# --- 5. restoration -----------------------------------------------------------------------------


@pytest.mark.parametrize("initial", ["sdpa", "eager"])
def test_attention_implementation_is_restored_on_exit_and_on_error(initial):
    model = make_glm()
    model.set_attn_implementation(initial)
    with biased_attention(model):
        assert model.config._attn_implementation == ATTENTION_NAME
        assert model.model.config._attn_implementation == ATTENTION_NAME
    assert model.config._attn_implementation == initial
    with pytest.raises(RuntimeError, match="boom"):
        with biased_attention(model) as controller:
            controller.set_plan({0: [KeyBias(0, 3, 1.0)]})
            raise RuntimeError("boom")
    assert model.config._attn_implementation == initial
    assert not any("_reempathy_bias_controller" in vars(module) for module in model.modules())


# --- 6. per-model state -------------------------------------------------------------------------


def test_two_models_with_different_plans_do_not_interfere():
    model_a, model_b = make_glm(seed=0), make_glm(seed=0)
    ids = token_ids(10)
    plan_a = {1: [KeyBias(0, 5, math.log(1.5))]}
    plan_b = {2: [KeyBias(3, 9, math.log(0.7), heads=(1, 3))]}
    alone = {}
    for name, model, plan in (("a", model_a, plan_a), ("b", model_b, plan_b)):
        with biased_attention(model) as controller:
            controller.set_plan(plan)
            alone[name] = run(model, ids).logits
    with biased_attention(model_a) as controller_a, biased_attention(model_b) as controller_b:
        controller_a.set_plan(plan_a)
        controller_b.set_plan(plan_b)
        got_b = run(model_b, ids).logits
        got_a = run(model_a, ids).logits
        assert controller_a.plan == plan_a and controller_b.plan == plan_b
    assert torch.equal(got_a, alone["a"])
    assert torch.equal(got_b, alone["b"])
    assert not torch.allclose(got_a, got_b)


# --- other backbones and housekeeping -----------------------------------------------------------


def test_llama_style_model_matches_reference():
    spec = [(0, 1, 5, 1.5, None), (2, 2, 10, 0.7, (0, 3))]
    assert_matches_reference_cached(make_llama(), spec)


def test_register_attention_is_idempotent():
    from transformers.masking_utils import AttentionMaskInterface

    register_attention()
    register_attention()
    assert ATTENTION_NAME in AttentionInterface()
    assert ATTENTION_NAME in AttentionMaskInterface()


# --- 7. per-row plans in one batch (the batched loop) -------------------------------------------


def _row_alone(model, ids, plan):
    with biased_attention(model) as controller:
        controller.set_plan(plan)
        return run(model, ids).logits


def test_each_row_of_a_padded_batch_gets_its_own_plan_shifted_by_its_padding():
    model = make_glm()
    lengths = (9, 6, 11)
    rows = [token_ids(n, seed=10 + i) for i, n in enumerate(lengths)]
    plans = [
        {1: [KeyBias(2, 5, math.log(1.5))]},
        None,  # this row has no bias at all
        {1: [KeyBias(0, 4, math.log(1.8), heads=(0, 3))], 2: [KeyBias(6, 9, math.log(0.6))]},
    ]
    width = max(lengths)
    pads = [width - n for n in lengths]
    batch = torch.cat([torch.cat([torch.zeros(1, p, dtype=torch.long), r], dim=1) for p, r in zip(pads, rows)])
    mask = (torch.arange(width)[None, :] >= torch.tensor(pads)[:, None]).long()
    positions = (torch.arange(width)[None, :] - torch.tensor(pads)[:, None]).clamp(min=0)
    with biased_attention(model) as controller:
        controller.set_rows(plans, pads)
        batched = run(model, batch, attention_mask=mask, position_ids=positions).logits
        assert controller.groups[1].columns(4, width, torch.float32, torch.device("cpu")).shape == (3, 4, 1, width)
        assert controller.groups[2].columns(4, width, torch.float32, torch.device("cpu")).shape == (3, 1, 1, width)
    for row, pad, plan in zip(range(3), pads, plans):
        alone = _row_alone(model, rows[row], plan)
        torch.testing.assert_close(batched[row, pad:], alone[0], atol=1e-5, rtol=0)
    # and the plans mattered: row 0 without its bias differs
    assert not torch.allclose(_row_alone(model, rows[0], None), batched[0:1, pads[0]:], atol=1e-3)


def test_a_row_plan_change_rewrites_that_row_in_place_and_leaves_the_others():
    controller_plans = [{1: [KeyBias(0, 3, 0.5)], 2: [KeyBias(0, 3, 0.5)]}, {1: [KeyBias(2, 6, 0.5)], 2: [KeyBias(2, 6, 0.5)]}]
    from reempathy.decoding.attention import BiasController

    controller = BiasController()
    controller.set_rows(controller_plans, [0, 2])
    group = controller.groups[1]
    assert controller.groups[2] is group  # layers with equal entries share one buffer
    before = group.columns(4, 12, torch.float32, torch.device("cpu")).clone()
    pointer = group.buffer.data_ptr()
    controller.set_row_plan(1, {1: [KeyBias(5, 7, 0.25)], 2: [KeyBias(5, 7, 0.25)]})
    after = controller.groups[1].columns(4, 12, torch.float32, torch.device("cpu"))
    assert controller.groups[1] is group and group.buffer.data_ptr() == pointer
    assert torch.equal(after[0], before[0])
    expected = torch.zeros(12)
    expected[7:9] = 0.25  # positions 5..6 of a row padded by 2
    assert torch.equal(after[1, 0, 0], expected)


def test_reserved_buffers_are_never_reallocated_by_plans_or_forwards():
    from reempathy.decoding.attention import BiasController

    model = make_glm()
    ids = token_ids(10)
    controller = BiasController()
    controller.reserve(rows=1, num_heads=4, columns=64, dtype=torch.float32, device=torch.device("cpu"))
    with biased_attention(model, controller):
        controller.set_plan({1: [KeyBias(0, 4, 0.4)], 3: [KeyBias(0, 4, 0.4)]})
        pointer = controller.groups[1].buffer.data_ptr()
        cache = new_cache(model)
        run(model, ids[:, :6], cache=cache)
        controller.set_plan({1: [KeyBias(2, 8, 0.3)], 3: [KeyBias(2, 8, 0.3)]})
        for step in range(6, 10):
            run(model, ids[:, step : step + 1], cache=cache)
        assert controller.groups[1].buffer.data_ptr() == pointer
        assert controller.groups[1].buffer.shape == (1, 1, 1, 64)


def test_paused_controller_is_plain_sdpa():
    model = make_glm()
    ids = token_ids(9)
    plain = run(model, ids).logits
    with biased_attention(model) as controller:
        controller.set_rows([{1: [KeyBias(0, 5, 0.7)]}, None], [0, 0])
        with controller.paused():
            paused = run(model, ids).logits
        biased = run(model, ids.repeat(2, 1)).logits
    assert torch.equal(paused, plain)
    assert not torch.allclose(biased[0], plain[0], atol=1e-3)
    torch.testing.assert_close(biased[1], plain[0], atol=1e-5, rtol=0)  # the row without a plan

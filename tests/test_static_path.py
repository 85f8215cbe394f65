"""The static-shape path without compiling: shape buckets, slots reused across answers, the fixed bias layout, batches.

What the compiled path relies on, checked eagerly (fast): an answer's static cache and bias tensor
are the ones the previous answer of its shape used; the fixed bias layout (every layer reads its
own slot of one tensor) gives the grouped layout's logits and is rewritten in place, one row at a
time; the batched loop on a static cache (rows shifted in place as slots refill) decodes what the
single-row loop does.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import StaticCache

from reempathy.backbones.base import Turn
from reempathy.decoding import static
from reempathy.decoding.attention import BiasController, KeyBias, biased_attention
from reempathy.decoding.batch import RowRequest, decode_batch
from reempathy.decoding.loop import LoopOptions, decode
from reempathy.errors import ConfigError
from reempathy.hooks import hookimpl
from reempathy.plugins.processors.attention_reweight import AttentionReweight, AttentionReweightOptions
from reempathy.plugins.strategies.reempathy import ReEmpathyOptions, ReEmpathyStrategy

from helpers import NoStop
from test_attention_bias import make_glm, token_ids


def test_cache_columns_round_up_to_a_bucket_within_the_context():
    assert static.columns_for(1, 2048) == 256
    assert static.columns_for(256, 2048) == 256
    assert static.columns_for(257, 2048) == 512
    assert static.columns_for(300, 280) == 280  # never beyond the model's context


def test_batch_rows_round_up_to_a_power_of_two_within_the_batch_size():
    assert [static.rows_for(n, 32) for n in (1, 2, 3, 5, 9, 32)] == [1, 2, 4, 8, 16, 32]
    assert static.rows_for(5, 6) == 6


def test_pending_tokens_go_through_one_and_two_token_steps():
    assert static.split_widths(1) == [1]
    assert static.split_widths(2) == [2]
    assert static.split_widths(5) == [2, 2, 1]


def _reempathy(tiny):
    strategy = ReEmpathyStrategy(ReEmpathyOptions(text_tokens=3, audio_tokens=4, max_reflection_tokens=4), tiny)
    return strategy, [AttentionReweight(AttentionReweightOptions(factor=1.5, layers="0-1"), tiny), NoStop(tiny)]


def test_the_next_answer_of_a_shape_reuses_its_static_cache_and_bias_tensor(tiny):
    seen = []
    handle = tiny.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("cache", kwargs.get("past_key_values"))), with_kwargs=True
    )
    try:
        for text in ("Hi.", "I lost my keys and missed the bus today."):  # two prompt lengths, one bucket
            prompt = tiny.build_prompt([Turn("user", text=text)])
            decode(tiny, prompt, *_reempathy(tiny), LoopOptions(max_new_tokens=12, greedy=True, cache="static"))
    finally:
        handle.remove()
    caches = {id(c) for c in seen}
    assert len(caches) == 1 and isinstance(seen[0], StaticCache)
    slot = static.engine(tiny.model).acquire(1, seen[0].layers[0].max_cache_len, bias=True)
    try:
        assert slot.cache is seen[0] and slot.controller.fixed is not None
    finally:
        static.engine(tiny.model).release(slot)


def test_a_busy_slot_is_not_handed_out_twice(tiny):
    engine = static.engine(tiny.model)
    first = engine.acquire(1, 256, bias=False)
    try:
        second = engine.acquire(1, 256, bias=False)
        assert second is not first
        engine.release(second)
    finally:
        engine.release(first)
    again = engine.acquire(1, 256, bias=False)
    engine.release(again)
    assert again in (first, second)


def _fixed_buffer(model, rows, columns):
    c = model.config
    return torch.zeros(c.num_hidden_layers, rows, c.num_attention_heads, 1, columns)


def _run_static(model, ids, controller, plan_at):
    """Prefill ``ids[:plan_at]``, set the plan, then decode the rest one token at a time over a static cache."""
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.inference_mode(), biased_attention(model, controller):
        model(input_ids=ids[:, :plan_at], cache=cache, use_cache=True)
        controller.set_plan({1: [KeyBias(2, 7, math.log(1.7), heads=(0, 2))], 3: [KeyBias(0, 5, math.log(0.6))]})
        return torch.cat([model(input_ids=ids[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(plan_at, ids.shape[1])], 1)


def test_the_fixed_layout_gives_the_grouped_layouts_logits():
    model = make_glm()
    ids = token_ids(14)
    grouped = _run_static(model, ids, BiasController(), 8)
    controller = BiasController()
    controller.fix(_fixed_buffer(model, 1, 64))
    fixed = _run_static(model, ids, controller, 8)
    torch.testing.assert_close(fixed, grouped, atol=1e-5, rtol=0)
    plain = _run_static(model, ids, _NoPlan(), 8)
    assert not torch.allclose(fixed, plain, atol=1e-3)  # the bias mattered


class _NoPlan(BiasController):
    def set_plan(self, plan):
        super().set_plan(None)


def test_the_fixed_layout_rewrites_only_the_changed_row_in_place():
    buffer = _fixed_buffer(make_glm(), 2, 16)
    controller = BiasController()
    controller.fix(buffer)
    pointer = buffer.data_ptr()
    controller.set_rows([{1: [KeyBias(0, 3, 0.5)], 2: [KeyBias(0, 3, 0.5)]}, {1: [KeyBias(2, 6, 0.25)]}], [0, 2])
    row0 = buffer[:, 0].clone()
    controller.set_row_plan(1, {3: [KeyBias(5, 7, 0.75, heads=(1,))]})
    assert controller.fixed is buffer and buffer.data_ptr() == pointer
    assert torch.equal(buffer[:, 0], row0)
    assert torch.equal(buffer[1, 0, :, 0, :3], torch.full((4, 3), 0.5)) and buffer[0].abs().sum() == 0
    expected = torch.zeros(4, 16)
    expected[1, 7:9] = 0.75  # positions 5..6 of a row padded by 2, head 1 only
    assert torch.equal(buffer[3, 1, :, 0], expected)
    assert buffer[1, 1].abs().sum() == 0  # the row's old plan is gone from every layer


def _prompts(tiny):
    words = "I lost my keys and missed the bus today so I feel tired and sad about everything".split()
    # Short rows first, then a longer one: refills shift the kept rows right, and left once it ends.
    return [tiny.build_prompt([Turn("user", text=" ".join(words[:n]))]) for n in (2, 3, 1, 14, 5, 9)]


@pytest.mark.parametrize("batch_size", [3, 4])
def test_a_static_batch_decodes_what_the_single_row_loop_does(tiny, batch_size):
    prompts = _prompts(tiny)
    budgets = [10, 18, 7, 14, 20, 9]  # rows end at different steps: slots refill, the head moves both ways

    def plugins(i):
        strategy = ReEmpathyStrategy(ReEmpathyOptions(text_tokens=2 + i % 3, audio_tokens=3, max_reflection_tokens=3), tiny)
        heads = {"heads": [1, 3]} if i % 2 else {}
        return strategy, [AttentionReweight(AttentionReweightOptions(factor=1.6, layers="0-1", **heads), tiny), NoStop(tiny)]

    single = []
    for i, p in enumerate(prompts):
        single.append(decode(tiny, p, *plugins(i), LoopOptions(max_new_tokens=budgets[i], greedy=True)))
    requests = [RowRequest(i, p, *plugins(i)) for i, p in enumerate(prompts)]
    # One budget per call, so each row ends by its own processor after its budget (no stop token kept).
    options = LoopOptions(max_new_tokens=max(budgets), greedy=True, cache="static")
    for request, budget in zip(requests, budgets):
        request.processors = [*request.processors, _EndAt(tiny, budget)]
    batched = dict(decode_batch(tiny, requests, options, batch_size))
    for i, expected in enumerate(single):
        got = batched[i]
        assert got.ids == expected.ids, f"row {i}"
        assert [h.ids for h in got.hidden] == [h.ids for h in expected.hidden]


class _EndAt:
    """The stop token is the only choice after ``n`` tokens."""

    def __init__(self, backbone, n):
        self.n, self.stop = n, backbone.layout.stop_ids[0]

    @hookimpl(trylast=True)
    def reempathy_logits(self, session, logits):
        if session.generated == self.n:
            logits.fill_(float("-inf"))
            logits[self.stop] = 0.0


def test_compile_without_a_static_cache_is_refused_for_batches(tiny):
    with pytest.raises(ConfigError, match='needs decode.cache = "static"'):
        decode_batch(tiny, [], LoopOptions(compile=True), 2)

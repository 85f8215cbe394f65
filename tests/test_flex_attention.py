"""``attention = "flex"`` (issue 26): the plan as key ranges in FlexAttention, against the SDPA-bias reference.

The bar: on the static path, the ranges layout (no dense bias; inside a compiled graph
FlexAttention with a ``score_mod`` that adds each range's value and computes which keys a row
sees from its first column and the write head) gives the SDPA-bias path's logits (within 1e-4)
and greedy tokens, for every strategy with attention reweighting on all heads and on selected
heads and layers, single rows and batches; the processor's targets are the same plans whichever
kernel carries them; α = 1 leaves the tokens of no processor.

Compile time on 2 cores: the decode-level tests compile with ``torch.compile``'s "eager" backend
on a backbone of their own (dynamo captures the same graph, FlexAttention included, and runs
FlexAttention's reference implementation, which materialises the scores: the ``score_mod`` is
what is tested). One test compiles one graph with inductor, which builds the fused C++
FlexAttention kernel on CPU (about a minute), so that a ``score_mod`` the CPU template cannot
build is caught here and not on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import StaticCache

from reempathy.backbones.base import Turn
from reempathy.backbones.tiny import TinyOptions, load_tiny
from reempathy.config import DecodeSettings
from reempathy.decoding import static
from reempathy.decoding.attention import RANGE_CAPACITY, BiasController, KeyBias, biased_attention
from reempathy.decoding.batch import RowRequest, decode_batch
from reempathy.decoding.loop import LoopOptions, decode
from reempathy.errors import ConfigError
from reempathy.hooks import hookimpl
from reempathy.plugins.processors.attention_reweight import AttentionReweight, AttentionReweightOptions
from reempathy.plugins.strategies.cotbs import CotbsOptions, CotbsStrategy
from reempathy.plugins.strategies.reempathy import ReEmpathyOptions, ReEmpathyStrategy
from reempathy.plugins.strategies.sft import SftOptions, SftStrategy

from helpers import NoStop
from test_attention_bias import make_glm, token_ids

MAX_NEW = 16
TEXTS = ["I lost my keys and missed the bus.", "My exam is tomorrow and I cannot sleep at all tonight, it is late."]
REWEIGHT = {
    "all-heads": {"factor": 1.6, "layers": "0-1"},
    "selected": {"factor": 1.8, "layers": "1", "heads": [0, 2]},
}
CASES = [
    ("sft", "all-heads"),
    ("cotbs", "all-heads"),
    ("cotbs", "selected"),
    ("reempathy", "all-heads"),
    ("reempathy", "selected"),
    ("reempathy-reflect-off", "all-heads"),
]
_MEMO: dict = {}


@pytest.fixture(scope="module")
def ftiny():
    """The tests' tiny backbone (same weights as ``tiny``), with its own static engine compiling with the "eager" backend."""
    backbone = load_tiny(TinyOptions())
    static.engine(backbone.model).backend = "eager"
    return backbone


class Spy:
    """Records the final scores of every step."""

    def __init__(self):
        self.steps = []

    @hookimpl
    def reempathy_logits(self, session, logits):
        self.steps.append(logits.clone())


def _strategy(bb, name):
    if name == "sft":
        return SftStrategy(SftOptions(), bb)
    if name == "cotbs":
        return CotbsStrategy(CotbsOptions(max_thought_tokens=5), bb)
    reflect = name != "reempathy-reflect-off"
    return ReEmpathyStrategy(ReEmpathyOptions(text_tokens=2, audio_tokens=3, max_reflection_tokens=3, reflect=reflect), bb)


def _decode(bb, case, prompt, **loop):
    strategy, reweight = case
    spy = Spy()
    processors = [AttentionReweight(AttentionReweightOptions(**REWEIGHT[reweight]), bb), NoStop(bb), spy]
    options = LoopOptions(max_new_tokens=MAX_NEW, greedy=True, **loop)
    return decode(bb, prompt, _strategy(bb, strategy), processors, options), spy.steps


def _prompts(bb):
    return [bb.build_prompt([Turn("user", text=t)]) for t in TEXTS]


def _reference(bb, case, prompt_index=0):
    """The SDPA-bias reference: the eager loop on a dynamic cache (computed once per case)."""
    key = ("reference", case, prompt_index)
    if key not in _MEMO:
        _MEMO[key] = _decode(bb, case, _prompts(bb)[prompt_index])
    return _MEMO[key]


def _assert_same(got, expected, where=""):
    (result, steps), (ref, ref_steps) = got, expected
    assert result.ids == ref.ids, where
    assert result.spans == ref.spans and result.counts == ref.counts, where
    assert len(steps) == len(ref_steps), where
    for n, (a, b) in enumerate(zip(steps, ref_steps)):
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), f"{where} step {n}: different tokens allowed"
        torch.testing.assert_close(a[finite], b[finite], atol=1e-4, rtol=0, msg=f"{where} step {n}")


def _case_id(case):
    return f"{case[0]}+reweight-{case[1]}"


# --- the ranges layout ------------------------------------------------------------------------------


def _ranges(layers=4, rows=2, heads=4, capacity=RANGE_CAPACITY):
    spans = torch.zeros(layers, rows, capacity, 2, dtype=torch.long)
    values = torch.zeros(layers, rows, heads, capacity)
    return spans, values


def test_the_ranges_layout_holds_each_rows_ranges_shifted_by_its_offset_with_per_head_values():
    spans, values = _ranges()
    controller = BiasController()
    controller.fix_ranges(spans, values)
    controller.set_rows([{1: [KeyBias(0, 3, 0.5), KeyBias(2, 6, 0.25, heads=(1, 1))]}, {3: [KeyBias(5, 7, 0.75)]}], [0, 2])
    assert spans[1, 0].tolist() == [[0, 3], [2, 6]] and spans[3, 1].tolist() == [[7, 9], [0, 0]]
    assert values[1, 0, :, 0].tolist() == [0.5] * 4
    assert values[1, 0, :, 1].tolist() == [0.0, 0.5, 0.0, 0.0]  # head 1 listed twice adds twice, as the dense layouts do
    assert values[3, 1, :, 0].tolist() == [0.75] * 4 and values[0].abs().sum() == 0
    assert controller._first.tolist() == [0, 2]  # each row sees its keys from its offset (its left padding) on


def test_a_row_plan_change_rewrites_that_row_of_the_ranges_in_place():
    spans, values = _ranges()
    controller = BiasController()
    controller.fix_ranges(spans, values)
    controller.set_rows([{1: [KeyBias(0, 3, 0.5)]}, {2: [KeyBias(1, 4, 0.25)]}], [0, 1])
    row0 = (spans[:, 0].clone(), values[:, 0].clone())
    controller.set_row_plan(1, {0: [KeyBias(3, 5, 0.125, heads=(2,))]})
    assert controller.ranges == (spans, values)
    assert torch.equal(spans[:, 0], row0[0]) and torch.equal(values[:, 0], row0[1])
    assert spans[2, 1].abs().sum() == 0 and values[2, 1].abs().sum() == 0  # the row's old plan is gone
    assert spans[0, 1, 0].tolist() == [4, 6] and values[0, 1, :, 0].tolist() == [0.0, 0.0, 0.125, 0.0]


def test_more_ranges_in_a_layer_than_the_capacity_grow_the_tensors():
    controller = BiasController()
    controller.fix_ranges(*_ranges(rows=1, capacity=2))
    controller.set_plan({0: [KeyBias(i, i + 1, 0.1) for i in range(3)]})
    spans, values = controller.ranges
    assert spans.shape[2] == values.shape[-1] == 4
    assert spans[0, 0, :3].tolist() == [[0, 1], [1, 2], [2, 3]]


def test_ranges_outside_a_compiled_graph_give_the_fixed_layouts_logits():
    # Eagerly (the prefill, an uncompiled static cache) the ranges are expanded to bias columns for SDPA.
    model = make_glm()
    ids = token_ids(14)
    c = model.config
    fixed = BiasController()
    fixed.fix(torch.zeros(c.num_hidden_layers, 1, c.num_attention_heads, 1, 64))
    ranges = BiasController()
    ranges.fix_ranges(*_ranges(c.num_hidden_layers, 1, c.num_attention_heads))
    torch.testing.assert_close(_run_static(model, ids, ranges), _run_static(model, ids, fixed), atol=1e-6, rtol=0)


PLANS = [
    {1: [KeyBias(2, 7, math.log(1.7), heads=(0, 2))], 3: [KeyBias(0, 5, math.log(0.6)), KeyBias(3, 9, 0.2)]},
    {0: [KeyBias(1, 4, math.log(1.3))], 2: [KeyBias(0, 6, math.log(2.0), heads=(1,))]},
]


def _run_static(model, ids, controller, call=None, pads=(0,)):
    """Prefill ``ids[:, :8]`` (rows left-padded by ``pads``), set each row's plan, then step one token at a time."""
    rows = ids.shape[0]
    cache = StaticCache(config=model.config, max_cache_len=64)
    call = call or model
    columns = torch.arange(64)
    mask = columns[None, :] >= torch.tensor(pads)[:, None]
    padded = rows > 1
    with torch.inference_mode(), biased_attention(model, controller):
        kwargs = {"attention_mask": mask[:, :8], "position_ids": (torch.arange(8)[None, :] - torch.tensor(pads)[:, None]).clamp(min=0)} if padded else {}
        model(input_ids=ids[:, :8], cache=cache, use_cache=True, **kwargs)
        controller.set_rows(PLANS[:rows], list(pads))
        out = []
        for i in range(8, ids.shape[1]):
            controller.sync_head(cache)
            if padded:
                kwargs = {"attention_mask": mask, "position_ids": torch.full((rows, 1), i) - torch.tensor(pads)[:, None]}
            out.append(call(input_ids=ids[:, i : i + 1], cache=cache, use_cache=True, **kwargs).logits)
        return torch.cat(out, 1)


def test_the_compiled_flex_kernel_builds_with_inductor_on_cpu_and_gives_the_fixed_layouts_logits():
    # One inductor graph: two rows, the second left-padded by 3, per-row plans, selected heads.
    model = make_glm()
    ids = token_ids(13, batch=2)
    c = model.config
    fixed = BiasController()
    fixed.fix(torch.zeros(c.num_hidden_layers, 2, c.num_attention_heads, 1, 64))
    expected = _run_static(model, ids, fixed, pads=(0, 3))
    ranges = BiasController()
    ranges.fix_ranges(*_ranges(c.num_hidden_layers, 2, c.num_attention_heads))
    compiled = torch.compile(model.__call__, dynamic=False)
    got = _run_static(model, ids, ranges, call=compiled, pads=(0, 3))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    plain = _run_static(model, ids, BiasController(), pads=(0, 3))  # a grouped controller with its plans
    assert torch.allclose(plain, expected, atol=1e-5)  # the reference paths agree with each other too


# --- whole decodes: flex against the SDPA-bias reference --------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_compiled_flex_answers_equal_the_sdpa_bias_reference(ftiny, case):
    got = _decode(ftiny, case, _prompts(ftiny)[0], cache="static", compile=True, attention="flex")
    _assert_same(got, _reference(ftiny, case), _case_id(case))


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_uncompiled_static_flex_answers_equal_the_sdpa_bias_reference(ftiny, case):
    got = _decode(ftiny, case, _prompts(ftiny)[0], cache="static", attention="flex")
    _assert_same(got, _reference(ftiny, case), _case_id(case))


def test_the_cases_change_phases_force_delimiters_and_steer_heads(ftiny):
    # Guards the tests above against cases that would leave the ranges empty or the two-token step unused.
    for case in CASES[1:]:
        result, _ = _reference(ftiny, case)
        if case[0] == "reempathy-reflect-off":  # the paper's ablation: chunks, but nothing hidden to steer toward
            assert not result.hidden and len(result.spans) > 1
            continue
        assert result.hidden and result.counts.forced >= 1, case
    assert len(_reference(ftiny, ("reempathy", "selected"))[0].hidden) >= 2


def test_the_processors_targets_are_the_same_plans_whichever_kernel_carries_them(ftiny):
    class PlanLog(AttentionReweight):
        def __init__(self, *args):
            super().__init__(*args)
            self.plans = []

        @hookimpl
        def reempathy_attention_plan(self, session):
            plan = super().reempathy_attention_plan(session)
            self.plans.append((session.phase, plan))
            return plan

    logs = {}
    for attention in ("sdpa-bias", "flex"):
        log = PlanLog(AttentionReweightOptions(**REWEIGHT["all-heads"]), ftiny)
        options = LoopOptions(max_new_tokens=MAX_NEW, greedy=True, cache="static", compile=True, attention=attention)
        decode(ftiny, _prompts(ftiny)[0], _strategy(ftiny, "reempathy"), [log, NoStop(ftiny)], options)
        logs[attention] = log.plans
    assert logs["flex"] == logs["sdpa-bias"]
    # The rule: while reflecting, the spoken chunk before; while speaking, the latest reflection.
    assert [phase for phase, _ in logs["flex"]] == ["speak", "reflection", "speak", "reflection", "speak"][: len(logs["flex"])]
    assert logs["flex"][0][1] is None and all(plan for _, plan in logs["flex"][1:])


def test_factor_one_with_flex_keeps_the_tokens_of_no_processor(ftiny):
    prompt = _prompts(ftiny)[0]
    options = LoopOptions(max_new_tokens=MAX_NEW, greedy=True, cache="static", compile=True, attention="flex")
    plain = decode(ftiny, prompt, _strategy(ftiny, "reempathy"), [NoStop(ftiny)], options)
    one = AttentionReweight(AttentionReweightOptions(factor=1.0, layers="0-1"), ftiny)
    same = decode(ftiny, prompt, _strategy(ftiny, "reempathy"), [one, NoStop(ftiny)], options)
    assert same.ids == plain.ids


def _batched(bb, case, **loop):
    strategy, reweight = case
    prompts = (_prompts(bb) * 3)[:5]  # five rows through four slots: a refill, then idle slots
    spies = [Spy() for _ in prompts]
    requests = [
        RowRequest(i, p, _strategy(bb, strategy), [AttentionReweight(AttentionReweightOptions(**REWEIGHT[reweight]), bb), NoStop(bb), spies[i]])
        for i, p in enumerate(prompts)
    ]
    options = LoopOptions(max_new_tokens=MAX_NEW, greedy=True, cache="static", **loop)
    results = dict(decode_batch(bb, requests, options, 4))
    return [(results[i], spies[i].steps) for i in range(len(prompts))]


BATCH_CASES = [("reempathy", "all-heads"), ("cotbs", "selected")]


@pytest.mark.parametrize("case", BATCH_CASES, ids=[_case_id(c) for c in BATCH_CASES])
def test_compiled_flex_batches_equal_the_single_row_sdpa_bias_reference(ftiny, case):
    got = _batched(ftiny, case, compile=True, attention="flex")
    for i, row in enumerate(got):
        _assert_same(row, _reference(ftiny, case, i % 2), f"{_case_id(case)} row {i}")


# --- the option -----------------------------------------------------------------------------------


def test_flex_on_a_dynamic_cache_is_refused_with_a_clear_error():
    with pytest.raises(ConfigError, match='attention = "flex" needs decode.cache = "static"'):
        LoopOptions(attention="flex")
    with pytest.raises(ConfigError, match='"sdpa-bias" or "flex"'):
        LoopOptions(cache="static", attention="dense")


def test_the_config_key_selects_the_kernel_and_checks_the_cache():
    assert DecodeSettings().attention == "sdpa-bias"
    assert DecodeSettings(cache="static", compile=True, attention="flex").attention == "flex"
    with pytest.raises(ValueError, match='needs decode.cache = "static"'):
        DecodeSettings(attention="flex")

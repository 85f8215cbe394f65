"""Compiled decoding (issue 15): every strategy, attention reweighting included, through graphs compiled once per shape.

The bar: on a static cache under ``torch.compile`` (inductor on CPU here), greedy answers are
token for token the eager loop's, for every built-in strategy with and without
``attention-reweight``, in the single-row and the batched loop; and once each graph has been
compiled, further answers — other prompts, other plans (factors, layers, selected heads), phase
changes at other steps, forced delimiters — compile nothing (dynamo's own counters).

Compile time on 2 cores is the cost, so every test here reuses the same few graphs: one
single-row shape (1 row x 256 columns) with its one- and two-token steps, one batch shape (4 rows
x 256 columns), each plain and with the bias: six graphs for the file, compiled by whichever test
runs first.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from reempathy.backbones.base import Turn
from reempathy.decoding.batch import RowRequest, decode_batch
from reempathy.decoding.loop import LoopOptions, decode
from reempathy.hooks import hookimpl
from reempathy.plugins.processors.attention_reweight import AttentionReweight, AttentionReweightOptions
from reempathy.plugins.strategies.cotbs import CotbsOptions, CotbsStrategy
from reempathy.plugins.strategies.reempathy import ReEmpathyOptions, ReEmpathyStrategy
from reempathy.plugins.strategies.sft import SftOptions, SftStrategy

from helpers import NoStop

MAX_NEW = 16
CASES = [(s, r) for r in (None, "reweight") for s in ("sft", "cotbs", "reempathy")]
TEXTS = ["I lost my keys and missed the bus.", "My exam is tomorrow and I cannot sleep at all tonight, it is late."]
_MEMO: dict = {}


class Spy:
    """Records the final scores of every step."""

    def __init__(self):
        self.steps = []

    @hookimpl
    def reempathy_logits(self, session, logits):
        self.steps.append(logits.clone())


def _strategy(tiny, name, variant=0):
    if name == "sft":
        return SftStrategy(SftOptions(), tiny)
    if name == "cotbs":
        return CotbsStrategy(CotbsOptions(max_thought_tokens=4 + variant), tiny)
    return ReEmpathyStrategy(ReEmpathyOptions(text_tokens=2 + variant, audio_tokens=3, max_reflection_tokens=3), tiny)


def _reweight(tiny, variant=0):
    if variant == 0:
        return AttentionReweight(AttentionReweightOptions(factor=1.5, layers="0-1"), tiny)
    return AttentionReweight(AttentionReweightOptions(factor=1.8, layers="1", heads=[0, 2]), tiny)


def _decode(tiny, prompt, strategy, reweight, compiled, variant=0):
    processors = ([_reweight(tiny, variant)] if reweight else []) + [NoStop(tiny)]
    options = LoopOptions(max_new_tokens=MAX_NEW, greedy=True, cache="static" if compiled else "dynamic", compile=compiled)
    return decode(tiny, prompt, _strategy(tiny, strategy, variant), processors, options)


def _prompts(tiny):
    return [tiny.build_prompt([Turn("user", text=t)]) for t in TEXTS]


def _pair(tiny, case):
    """The eager and the compiled answer of ``case`` (computed once; the first compiled ones compile)."""
    if case not in _MEMO:
        prompt = _prompts(tiny)[0]
        _MEMO[case] = (_decode(tiny, prompt, *case, compiled=False), _decode(tiny, prompt, *case, compiled=True))
    return _MEMO[case]


def _graphs():
    return counters["stats"]["unique_graphs"], counters["frames"]["total"]


@pytest.mark.parametrize("case", CASES, ids=[s if r is None else f"{s}+reweight" for s, r in CASES])
def test_compiled_greedy_answers_equal_the_eager_loop(tiny, case):
    eager, compiled = _pair(tiny, case)
    assert compiled.ids == eager.ids
    assert compiled.spans == eager.spans and compiled.counts == eager.counts


def test_the_cases_change_phases_and_force_delimiters(tiny):
    # Guards the tests above and below against a change that would leave the two-token graph unused.
    for strategy in ("cotbs", "reempathy"):
        for reweight in (None, "reweight"):
            _, compiled = _pair(tiny, (strategy, reweight))
            assert compiled.hidden and compiled.counts.forced >= 1
    assert len(_pair(tiny, ("reempathy", "reweight"))[1].hidden) >= 2


def test_after_warm_up_no_answer_compiles_at_phase_changes_prompts_or_plans(tiny):
    for case in CASES:
        _pair(tiny, case)  # the warm-up: every graph of this shape compiled
    before = _graphs()
    prompt = _prompts(tiny)[1]  # another prompt length, the same shape bucket
    answers = []
    for strategy, reweight in CASES:
        # Other chunk sizes (phase changes at other steps), another factor, layer and selected heads.
        answers.append(_decode(tiny, prompt, strategy, reweight, compiled=True, variant=1))
    assert _graphs() == before
    assert sum(len(a.hidden) for a in answers) >= 4 and sum(a.counts.forced for a in answers) >= 4


def _batched(tiny, strategy, reweight, compiled):
    prompts = (_prompts(tiny) * 3)[:5]  # five rows through four slots: a refill, then idle slots
    requests = [
        RowRequest(i, p, _strategy(tiny, strategy, i % 2), ([_reweight(tiny, i % 2)] if reweight else []) + [NoStop(tiny)])
        for i, p in enumerate(prompts)
    ]
    options = LoopOptions(max_new_tokens=_budget(strategy), greedy=True, cache="static", compile=compiled)
    return dict(decode_batch(tiny, requests, options, 4))


def _budget(strategy):
    return MAX_NEW - 3 if strategy == "sft" else MAX_NEW


@pytest.mark.parametrize("case", [("sft", None), ("reempathy", "reweight")], ids=["sft", "reempathy+reweight"])
def test_compiled_batched_answers_equal_the_single_row_eager_loop(tiny, case):
    strategy, reweight = case
    batched = _batched(tiny, strategy, reweight, compiled=True)
    prompts = (_prompts(tiny) * 3)[:5]
    for i, prompt in enumerate(prompts):
        processors = ([_reweight(tiny, i % 2)] if reweight else []) + [NoStop(tiny)]
        options = LoopOptions(max_new_tokens=_budget(strategy), greedy=True)
        single = decode(tiny, prompt, _strategy(tiny, strategy, i % 2), processors, options)
        assert batched[i].ids == single.ids, f"row {i}"
        assert batched[i].counts == single.counts


def test_a_second_batched_run_compiles_nothing(tiny):
    _batched(tiny, "reempathy", "reweight", compiled=True)  # warm-up (compiled already if the test above ran)
    before = _graphs()
    results = _batched(tiny, "reempathy", "reweight", compiled=True)
    assert _graphs() == before
    assert sum(len(r.hidden) for r in results.values()) >= 5


def test_compiled_logits_stay_close_to_eager(tiny):
    # Not only the argmax: the distribution a sampler would draw from.
    prompt = _prompts(tiny)[0]
    spies = []
    for compiled in (False, True):
        spy = Spy()
        options = LoopOptions(max_new_tokens=MAX_NEW, greedy=True, cache="static" if compiled else "dynamic", compile=compiled)
        decode(tiny, prompt, _strategy(tiny, "reempathy"), [_reweight(tiny), NoStop(tiny), spy], options)
        spies.append(spy.steps)
    assert len(spies[0]) == len(spies[1])
    for a, b in zip(*spies):
        finite = torch.isfinite(a)
        assert torch.equal(finite, torch.isfinite(b))
        torch.testing.assert_close(a[finite], b[finite], atol=1e-4, rtol=0)


@pytest.mark.parametrize("strategy", ["sft", "reempathy"])
def test_the_compiled_loop_stops_on_the_spoken_budget_as_the_eager_loop(tiny, strategy):
    # The same shape bucket as the cases above (guard MAX_NEW), so no new graph is compiled.
    prompt = _prompts(tiny)[0]
    answers = []
    for compiled in (False, True):
        options = LoopOptions(max_new_tokens=MAX_NEW, max_spoken_tokens=6, greedy=True,
                              cache="static" if compiled else "dynamic", compile=compiled)
        reweight = [_reweight(tiny)] if strategy == "reempathy" else []
        answers.append(decode(tiny, prompt, _strategy(tiny, strategy), [*reweight, NoStop(tiny)], options))
    eager, compiled = answers
    assert compiled.ids == eager.ids and compiled.counts == eager.counts
    assert compiled.stop_reason == "max_spoken_tokens" and compiled.counts.spoken == 6

"""The batched loop: the same answers as the single-row loop, one row's phase independent of its neighbours.

The bar (issue 10 §1): greedy answers from batches of 1, 3 and 8 rows are token-identical to the
single-row loop for every built-in strategy and with attention reweighting (all heads and selected
heads), on prompts of different lengths, with per-step logits within 1e-4; a third-party strategy
decodes batched unchanged; per-row forwarded counters are exact; a sampled answer depends on its
seed only, not on the batch size or its neighbours.

Nine prompts of 127–164 tokens, and answers ending at different steps (a test processor ends row
``i`` after a length of its own), so that batches of 3 and 8 pad, refill slots and drop rows.
"""

from __future__ import annotations

import pytest
import torch

from reempathy.backbones.base import Turn
from reempathy.decoding.batch import RowRequest, decode_batch, row_seed
from reempathy.decoding.directives import Switch
from reempathy.decoding.loop import LoopOptions, decode
from reempathy.errors import ConfigError
from reempathy.hooks import hookimpl
from reempathy.plugins.processors.attention_reweight import AttentionReweight, AttentionReweightOptions
from reempathy.plugins.strategies.cotbs import CotbsOptions, CotbsStrategy
from reempathy.plugins.strategies.reempathy import ReEmpathyOptions, ReEmpathyStrategy
from reempathy.plugins.strategies.sft import SftOptions, SftStrategy

WORDS = "I lost my keys and missed the bus today so I feel tired and sad about everything that happened".split()
TEXTS = [" ".join(WORDS[:n]) for n in (1, 2, 3, 5, 8, 11, 14, 17, 19)]
MAX_NEW = 40
# Row i ends after ENDS[i] tokens (None: at a stop token or the budget).
ENDS = [None, 9, 23, None, 17, 31, None, 5, 27]


class EndAt:
    """Makes the stop token the only choice at token ``n`` (varied per row, so rows finish apart)."""

    def __init__(self, backbone, n):
        self.n = n
        self.stop = backbone.layout.stop_ids[0]

    @hookimpl
    def reempathy_logits(self, session, logits):
        if self.n is not None and session.generated + 1 == self.n:
            logits.fill_(float("-inf"))
            logits[self.stop] = 0.0


class LogitsSpy:
    """Records the final scores of every step (after the strategy and every other processor)."""

    def __init__(self):
        self.steps = []

    @hookimpl
    def reempathy_logits(self, session, logits):
        self.steps.append(logits.clone())


def _strategy(tiny, name):
    if name == "sft":
        return SftStrategy(SftOptions(), tiny)
    if name == "cotbs":
        return CotbsStrategy(CotbsOptions(max_thought_tokens=6), tiny)
    if name == "reempathy":
        return ReEmpathyStrategy(ReEmpathyOptions(max_reflection_tokens=5), tiny)
    if name == "reempathy-reflect-off":
        return ReEmpathyStrategy(ReEmpathyOptions(reflect=False), tiny)
    if name == "reempathy-fixed":
        return ReEmpathyStrategy(ReEmpathyOptions(reflection_tokens=3), tiny)
    raise ValueError(name)


REWEIGHT = {
    "all-heads": {"factor": 1.5, "layers": "0-1"},
    "selected-heads": {"factor": 1.8, "layers": "0-1", "heads": {"0": [1, 3], "1": [2]}},
}

CASES = [
    ("sft", None),
    ("cotbs", None),
    ("reempathy", None),
    ("reempathy-reflect-off", None),
    ("reempathy-fixed", None),
    ("reempathy", "all-heads"),
    ("reempathy", "selected-heads"),
    ("cotbs", "selected-heads"),
]


def _plugins(tiny, strategy, reweight, row):
    processors = []
    if reweight is not None:
        processors.append(AttentionReweight(AttentionReweightOptions(**REWEIGHT[reweight]), tiny))
    spy = LogitsSpy()
    processors += [EndAt(tiny, ENDS[row]), spy]
    return _strategy(tiny, strategy), processors, spy


_MEMO: dict = {}


def _prompts(tiny):
    if "prompts" not in _MEMO:
        _MEMO["prompts"] = [tiny.build_prompt([Turn("user", text=t)]) for t in TEXTS]
    return _MEMO["prompts"]


def _single(tiny, strategy, reweight):
    """The single-row loop's answers and per-step scores, per prompt (computed once per case)."""
    key = (strategy, reweight)
    if key not in _MEMO:
        out = []
        for i, prompt in enumerate(_prompts(tiny)):
            s, processors, spy = _plugins(tiny, strategy, reweight, i)
            result = decode(tiny, prompt, s, processors, LoopOptions(max_new_tokens=MAX_NEW, greedy=True))
            out.append((result, spy.steps))
        _MEMO[key] = out
    return _MEMO[key]


def _batched(tiny, strategy, reweight, batch_size, options=None, prefill_rows=8):
    spies = {}

    def requests():
        for i, prompt in enumerate(_prompts(tiny)):
            s, processors, spies[i] = _plugins(tiny, strategy, reweight, i)
            yield RowRequest(i, prompt, s, processors)

    options = options or LoopOptions(max_new_tokens=MAX_NEW, greedy=True)
    results = dict(decode_batch(tiny, requests(), options, batch_size, prefill_rows=prefill_rows))
    return results, spies


def _case_id(case):
    strategy, reweight = case
    return strategy if reweight is None else f"{strategy}+reweight-{reweight}"


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_greedy_batched_answers_equal_the_single_row_loop_with_logits_within_1e_4(tiny, case, batch_size):
    strategy, reweight = case
    single = _single(tiny, *case)
    results, spies = _batched(tiny, strategy, reweight, batch_size)
    assert sorted(results) == list(range(len(TEXTS)))
    for i, (expected, expected_steps) in enumerate(single):
        got = results[i]
        assert got.ids == expected.ids, f"row {i}"
        assert got.spans == expected.spans and got.stop_reason == expected.stop_reason
        assert got.counts == expected.counts
        steps = spies[i].steps
        assert len(steps) == len(expected_steps)
        for step, (a, b) in enumerate(zip(steps, expected_steps)):
            finite = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a), finite), f"row {i} step {step}: different tokens allowed"
            torch.testing.assert_close(a[finite], b[finite], atol=1e-4, rtol=0, msg=f"row {i} step {step}")


def test_the_cases_cover_phases_reflections_stops_and_unequal_lengths(tiny):
    # Guards the test above against a model or prompt change that would make it trivial.
    results = [r for r, _ in _single(tiny, "reempathy", "all-heads")]
    assert len({len(p) for p in _prompts(tiny)}) == len(TEXTS)
    assert len({r.counts.generated for r in results}) >= 5
    assert sum(len(r.hidden) for r in results) >= 8
    assert {r.stop_reason for r in results} >= {"stop_token", "max_new_tokens"}


class PhaseLog:
    """Records, for each forward call of the model, the phase each row was in."""

    def __init__(self, log, key, calls):
        self.log, self.key, self.calls = log, key, calls

    @hookimpl
    def reempathy_logits(self, session, logits):
        self.log.append((self.calls[0], self.key, session.phase))


def test_rows_of_one_batch_are_in_their_own_phases(tiny):
    calls = [0]
    handle = tiny.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    log = []
    try:
        # Chunks of 3+3, 4+3, 5+3, 6+3 tokens: the rows reach their reflections at different steps.
        requests = [
            RowRequest(
                i,
                p,
                ReEmpathyStrategy(ReEmpathyOptions(text_tokens=3 + i, audio_tokens=3, max_reflection_tokens=4), tiny),
                [PhaseLog(log, i, calls)],
            )
            for i, p in enumerate(_prompts(tiny)[:4])
        ]
        list(decode_batch(tiny, requests, LoopOptions(max_new_tokens=MAX_NEW, greedy=True), 4))
    finally:
        handle.remove()
    by_call = {}
    for call, _, phase in log:
        by_call.setdefault(call, set()).add(phase)
    assert any(phases == {"speak", "reflection"} for phases in by_call.values())


def test_forwarded_counters_are_exact_per_row_and_add_up_to_what_the_model_read(tiny):
    fed = []
    handle = tiny.model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    try:  # one row per prefill, so that no call reads padding (prefills together: the next test)
        results, _ = _batched(tiny, "reempathy", "all-heads", 3, prefill_rows=1)
    finally:
        handle.remove()
    for r in results.values():
        c = r.counts
        assert c.forwarded + c.unforwarded == c.prompt + c.generated + c.forced
        assert c.unforwarded <= 1 + 1  # the last token and at most one delimiter
    assert sum(r.counts.forced for r in results.values()) > 0
    assert sum(fed) == sum(r.counts.forwarded for r in results.values())


def _sampled(tiny, keys, batch_size, seeds=None):
    prompts = _prompts(tiny)
    requests = [
        RowRequest(k, prompts[k], _strategy(tiny, "reempathy"), [], seed=(seeds or {}).get(k, row_seed(7, str(k))))
        for k in keys
    ]
    return dict(decode_batch(tiny, requests, LoopOptions(max_new_tokens=30), batch_size))


def test_a_sampled_answer_depends_on_its_seed_not_on_batch_size_or_neighbours(tiny):
    alone = _sampled(tiny, [2], 1)[2]
    in_five = _sampled(tiny, [0, 1, 2, 3, 4], 5)[2]
    other_neighbours = _sampled(tiny, [8, 2, 6, 7, 5], 5)[2]
    assert in_five.ids == alone.ids
    assert other_neighbours.ids == alone.ids


def test_a_different_seed_gives_a_different_sampled_answer(tiny):
    answers = {tuple(_sampled(tiny, [2], 1, seeds={2: seed})[2].ids) for seed in range(3)}
    assert len(answers) > 1


def test_row_seed_depends_on_run_seed_and_record_id():
    assert row_seed(1, "a") == row_seed(1, "a")
    assert len({row_seed(1, "a"), row_seed(2, "a"), row_seed(1, "b")}) == 3
    assert 0 <= row_seed(2**70, "x") < 2**63


def test_requests_are_read_lazily(tiny):
    pulled = []

    def requests():
        for i in range(100):
            pulled.append(i)
            yield RowRequest(i, _prompts(tiny)[0], SftStrategy(SftOptions(), tiny), [EndAt(tiny, 3 + i % 4)])

    stream = decode_batch(tiny, requests(), LoopOptions(max_new_tokens=8, greedy=True), 4)
    next(stream)
    assert len(pulled) == 4
    stream.close()


def test_batched_results_carry_the_prompt_ids(tiny):
    results, _ = _batched(tiny, "sft", None, 3)
    for i, prompt in enumerate(_prompts(tiny)):
        assert results[i].prompt_ids == prompt
        assert results[i].to_json()["prompt_ids"] == prompt


def test_factor_one_in_a_batch_is_bit_identical_to_no_processor(tiny):
    def run(reweight):
        requests = []
        for i, prompt in enumerate(_prompts(tiny)[:5]):
            spy = LogitsSpy()
            processors = [AttentionReweight(AttentionReweightOptions(factor=1.0, layers="0-1"), tiny)] if reweight else []
            requests.append(RowRequest(i, prompt, _strategy(tiny, "reempathy"), [*processors, spy]))
        list(decode_batch(tiny, requests, LoopOptions(max_new_tokens=30, greedy=True), 3))
        return [r.processors[-1].steps for r in requests]

    for a, b in zip(run(True), run(False)):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# --- a third-party strategy, written only against the hooks, decodes batched unchanged -----------


class Memo:
    """A test-only strategy: begins in a hidden "memo" phase (forced opening, prefilled), writes 4
    tokens there, closes it with a forced delimiter, then speaks; it drops every 7th spoken token
    (Switch with keep_token=False) and counts what its observer hook sees."""

    def __init__(self, options, backbone):
        self.open = backbone.layout.special["<|begin_of_thought|>"]
        self.close = backbone.layout.special["<|end_of_thought|>"]
        self.text = backbone.layout.text_mask()
        self.seen = {}
        self.spoken = 0

    @hookimpl
    def reempathy_decode_start(self, session):
        return Switch("memo", forced=(self.open,), hidden=True)

    @hookimpl(tryfirst=True)
    def reempathy_logits(self, session, logits):
        if session.hidden:
            logits.masked_fill_(~self.text, float("-inf"))

    @hookimpl
    def reempathy_token(self, session, token_id):
        if session.hidden:
            return Switch("speak", forced=(self.close,)) if len(session.segment) + 1 >= 4 else None
        self.spoken += 1
        return Switch("speak", keep_token=False) if self.spoken % 7 == 0 else None

    @hookimpl
    def reempathy_token_appended(self, session, token_id, kind):
        self.seen[kind] = self.seen.get(kind, 0) + 1

    @hookimpl
    def reempathy_decode_end(self, session, result):
        result.extra["memo_seen"] = dict(self.seen)


def test_a_third_party_strategy_decodes_batched_unchanged(tiny, fresh_discovery):
    import types

    from pydantic import BaseModel, ConfigDict

    from reempathy.registry import discover

    class MemoOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")

    plugin = types.SimpleNamespace(
        reempathy_register_strategies=hookimpl(lambda register: register("memo", Memo, MemoOptions))
    )
    registry = discover(extra_plugins=[("memo-plugin", plugin)]).registry
    reg = registry.get("strategy", "memo")

    def make():
        return reg.factory(registry.validate("strategy", "memo", {}), tiny)

    prompts = _prompts(tiny)
    options = LoopOptions(max_new_tokens=25, greedy=True)
    single = [decode(tiny, p, make(), [EndAt(tiny, ENDS[i])], options) for i, p in enumerate(prompts)]
    requests = [RowRequest(i, p, make(), [EndAt(tiny, ENDS[i])]) for i, p in enumerate(prompts)]
    batched = dict(decode_batch(tiny, requests, options, 3))
    for i, expected in enumerate(single):
        got = batched[i]
        assert got.ids == expected.ids and got.spans == expected.spans
        assert got.extra["memo_seen"] == expected.extra["memo_seen"]
        seen = got.extra["memo_seen"]
        assert seen["sampled"] + seen["forced"] == got.counts.generated + got.counts.forced
        assert seen.get("dropped", 0) >= 1 or got.counts.generated < 10
        assert [h.kind for h in got.hidden][:1] == ["memo"]


# --- rows that enter together are prefilled together ---------------------------------------------------


def _prefill_calls(tiny, fn):
    """``fn()``, and the shapes of the model calls it made with an empty cache (the prefills)."""
    shapes = []

    def spy(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() == 0:
            shapes.append(tuple(kwargs["input_ids"].shape))

    handle = tiny.model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        return fn(), shapes
    finally:
        handle.remove()


PREFILL_CASES = [("reempathy", "all-heads"), ("cotbs", "selected-heads"), ("sft", None)]


@pytest.mark.parametrize("batch_size", [3, 8])
@pytest.mark.parametrize("case", PREFILL_CASES, ids=[_case_id(c) for c in PREFILL_CASES])
def test_rows_prefilled_together_decode_what_one_at_a_time_prefills_and_the_single_row_loop_do(tiny, case, batch_size):
    (together, spies), shapes = _prefill_calls(tiny, lambda: _batched(tiny, *case, batch_size, prefill_rows=8))
    (alone, _), alone_shapes = _prefill_calls(tiny, lambda: _batched(tiny, *case, batch_size, prefill_rows=1))
    assert any(rows > 1 for rows, _ in shapes) and all(rows == 1 for rows, _ in alone_shapes)
    for i, (expected, expected_steps) in enumerate(_single(tiny, *case)):
        assert together[i].ids == alone[i].ids == expected.ids, f"row {i}"
        assert together[i].counts == expected.counts
        for step, (a, b) in enumerate(zip(spies[i].steps, expected_steps)):
            finite = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a), finite), f"row {i} step {step}"
            torch.testing.assert_close(a[finite], b[finite], atol=1e-4, rtol=0, msg=f"row {i} step {step}")


def test_a_prefill_together_reads_each_rows_tokens_and_right_padding_only(tiny):
    prompts = _prompts(tiny)
    (results, _), shapes = _prefill_calls(tiny, lambda: _batched(tiny, "sft", None, 8, prefill_rows=4))
    # The first refill takes rows 0-7: two calls of four rows, each as long as its longest prompt.
    lengths = [len(p) for p in prompts]
    assert shapes[:2] == [(4, max(lengths[:4])), (4, max(lengths[4:8]))]
    assert [r.counts.prompt for _, r in sorted(results.items())] == lengths


def test_prefill_groups_hold_at_most_so_many_rows_and_tokens_and_rows_with_extra_inputs_alone():
    from reempathy.decoding.batch import PREFILL_TOKENS, prefill_groups

    assert prefill_groups([({}, 10)] * 5, 2) == [[0, 1], [2, 3], [4]]
    assert prefill_groups([({}, 10)] * 3, 1) == [[0], [1], [2]]
    assert prefill_groups([({}, 10), ({"audio": 1}, 10), ({}, 10), ({}, 10)], 8) == [[0], [1], [2, 3]]
    half = PREFILL_TOKENS // 2
    assert prefill_groups([({}, half), ({}, half), ({}, half)], 8) == [[0, 1], [2]]


@pytest.mark.parametrize("rows", [0, 2.0, False])
def test_prefill_rows_below_one_is_a_config_error(tiny, rows):
    with pytest.raises(ConfigError, match="prefill rows"):
        decode_batch(tiny, [], LoopOptions(), 2, prefill_rows=rows)


# --- what the batched loop refuses ------------------------------------------------------------------


def test_compile_without_a_static_cache_is_refused_with_a_clear_error(tiny):
    # A static cache (and compile on it) is the static path's: tests/test_static_path.py, test_compiled_decode.py.
    with pytest.raises(ConfigError, match='needs decode.cache = "static"'):
        decode_batch(tiny, [], LoopOptions(compile=True), 2)


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_a_batch_size_below_one_is_a_config_error(tiny, size):
    with pytest.raises(ConfigError, match="batch size"):
        decode_batch(tiny, [], LoopOptions(), size)


def test_no_requests_give_no_results(tiny):
    assert list(decode_batch(tiny, iter(()), LoopOptions(), 4)) == []


def test_a_llama_architecture_backbone_decodes_batched_like_the_single_row_loop(reempathy_interleaved_dir):
    from reempathy.testing import isolated_discovery

    registry = isolated_discovery().registry
    declared = {k: v for k, v in reempathy_interleaved_dir.items() if k != "name"}
    backbone = registry.create("backbone", "hf-interleaved", declared)

    def plugins():
        strategy = registry.create("strategy", "reempathy", {"text_tokens": 3, "audio_tokens": 4}, backbone)
        return strategy, [registry.create("processor", "attention-reweight", {"factor": 1.5}, backbone)]

    prompts = [backbone.build_prompt([Turn("user", text=t)]) for t in ("Hi", "I had a rough day at work.", "So tired")]
    options = LoopOptions(max_new_tokens=30, greedy=True)
    single = [decode(backbone, p, *plugins(), options) for p in prompts]
    batched = dict(decode_batch(backbone, [RowRequest(i, p, *plugins()) for i, p in enumerate(prompts)], options, 2))
    assert sum(len(r.hidden) for r in single) > 0
    assert [batched[i].ids for i in range(3)] == [r.ids for r in single]

"""Token budgets that make strategies comparable (issue 20 §1).

``max_spoken_tokens`` counts the spoken stream only (text and audio), ``max_hidden_tokens`` the
hidden one (reflections and thoughts together), ``max_new_tokens`` everything: the guard. The
bar: every strategy that stops on its spoken budget has spoken exactly that many tokens, however
much it thought in between; the stop reason names the budget; the result counts both streams;
and the single-row, batched, static and compiled loops agree.
"""

from __future__ import annotations

import pytest

from reempathy.backbones.base import Turn
from reempathy.config import load_config
from reempathy.decoding.batch import RowRequest, decode_batch
from reempathy.decoding.loop import LoopOptions, decode
from reempathy.decoding.spans import SPOKEN_AUDIO, SPOKEN_TEXT
from reempathy.errors import ConfigError, InputError
from reempathy.plugins.processors.attention_reweight import AttentionReweight, AttentionReweightOptions
from reempathy.plugins.strategies.cotbs import CotbsOptions, CotbsStrategy
from reempathy.plugins.strategies.reempathy import ReEmpathyOptions, ReEmpathyStrategy
from reempathy.plugins.strategies.sft import SftOptions, SftStrategy

from helpers import NoStop

SPOKEN = 24
GUARD = 200
TEXTS = ["I lost my keys and missed the bus.", "My exam is tomorrow and I cannot sleep.", "Work was awful today."]


def _strategy(tiny, name):
    return {
        "sft": lambda: SftStrategy(SftOptions(), tiny),
        "cotbs": lambda: CotbsStrategy(CotbsOptions(max_thought_tokens=10), tiny),
        "reempathy": lambda: ReEmpathyStrategy(ReEmpathyOptions(text_tokens=3, audio_tokens=6, max_reflection_tokens=6), tiny),
        "reempathy-reflect-off": lambda: ReEmpathyStrategy(ReEmpathyOptions(text_tokens=3, audio_tokens=6, reflect=False), tiny),
    }[name]()


STRATEGIES = ("sft", "cotbs", "reempathy", "reempathy-reflect-off")


def _decode(tiny, prompt, name, **options):
    opts = LoopOptions(**{"max_new_tokens": GUARD, "greedy": True, **options})
    return decode(tiny, prompt, _strategy(tiny, name), [NoStop(tiny)], opts)


def _spoken_positions(result):
    return sum(1 for s in result.spans for _ in range(s["start"], s["end"]) if s["label"] in (SPOKEN_TEXT, SPOKEN_AUDIO))


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_speaks_exactly_its_spoken_budget_whatever_it_thinks(tiny, tiny_prompt, name):
    result = _decode(tiny, tiny_prompt, name, max_spoken_tokens=SPOKEN)
    assert result.stop_reason == "max_spoken_tokens"
    assert result.counts.spoken == SPOKEN
    assert len(result.spoken_text_ids) + len(result.audio_units) == SPOKEN
    assert _spoken_positions(result) == SPOKEN


def test_thinking_strategies_generate_more_than_the_spoken_budget(tiny, tiny_prompt):
    # Guards the test above: with max_new_tokens as the budget these would speak less than sft.
    for name in ("cotbs", "reempathy"):
        result = _decode(tiny, tiny_prompt, name, max_spoken_tokens=SPOKEN)
        assert result.counts.hidden > 0 and result.counts.generated > SPOKEN + result.counts.hidden - 1
    old_style = _decode(tiny, tiny_prompt, "reempathy", max_new_tokens=SPOKEN)
    assert old_style.counts.spoken < SPOKEN


def test_counts_split_the_generated_tokens_into_spoken_hidden_and_sampled_control(tiny, tiny_prompt):
    result = _decode(tiny, tiny_prompt, "reempathy", max_spoken_tokens=SPOKEN)
    hidden_ids = sum(len(h.ids) for h in result.hidden)
    assert result.counts.hidden == hidden_ids > 0
    sampled_control = result.counts.generated - result.counts.spoken - result.counts.hidden
    assert sampled_control >= 0
    assert result.to_json()["counts"]["spoken"] == SPOKEN
    assert result.to_json()["counts"]["hidden"] == hidden_ids


def test_the_hidden_budget_ends_the_answer_and_names_itself(tiny, tiny_prompt):
    result = _decode(tiny, tiny_prompt, "cotbs", max_hidden_tokens=4)
    assert result.stop_reason == "max_hidden_tokens"
    assert result.counts.hidden == 4 and result.counts.spoken == 0


def test_the_guard_still_ends_an_answer_that_never_fills_its_budget(tiny, tiny_prompt):
    result = _decode(tiny, tiny_prompt, "reempathy", max_new_tokens=20, max_spoken_tokens=100)
    assert result.stop_reason == "max_new_tokens" and result.counts.generated == 20


def _batched(tiny, name, batch_size, **options):
    prompts = [tiny.build_prompt([Turn("user", text=t)]) for t in TEXTS]
    requests = [RowRequest(i, p, _strategy(tiny, name), [NoStop(tiny)]) for i, p in enumerate(prompts)]
    opts = LoopOptions(**{"max_new_tokens": GUARD, "greedy": True, "max_spoken_tokens": SPOKEN, **options})
    return prompts, dict(decode_batch(tiny, requests, opts, batch_size))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", ["sft", "reempathy"])
def test_batched_and_static_loops_stop_on_the_spoken_budget_as_the_single_row_loop(tiny, name, cache):
    prompts, results = _batched(tiny, name, 2, cache=cache)
    for i, prompt in enumerate(prompts):
        single = _decode(tiny, prompt, name, max_spoken_tokens=SPOKEN)
        assert results[i].ids == single.ids, f"row {i}"
        assert results[i].counts == single.counts and results[i].stop_reason == "max_spoken_tokens"


@pytest.mark.parametrize("value", [0, -3])
def test_a_budget_below_one_is_a_config_error_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"decode\.max_spoken_tokens"):
        load_config(None, [f"decode.max_spoken_tokens={value}"])
    with pytest.raises(ConfigError, match=r"decode\.max_hidden_tokens"):
        load_config(None, [f"decode.max_hidden_tokens={value}"])


def test_a_budget_above_the_context_is_refused_naming_the_context(tiny, tiny_prompt):
    with pytest.raises(InputError, match=rf"decode\.max_spoken_tokens = {tiny.max_context + 1}.*context of {tiny.max_context}"):
        _decode(tiny, tiny_prompt, "sft", max_spoken_tokens=tiny.max_context + 1)


def test_a_guard_below_the_budgets_is_refused_and_a_missing_guard_leaves_room():
    with pytest.raises(ConfigError, match=r"max_new_tokens = 100 is below max_spoken_tokens \+ max_hidden_tokens = 150"):
        load_config(None, ["decode.max_spoken_tokens=120", "decode.max_hidden_tokens=30", "decode.max_new_tokens=100"])
    cfg = load_config(None, ["decode.max_spoken_tokens=160"])
    assert cfg.decode.max_new_tokens == 4 * 160
    assert load_config(None, []).decode.max_new_tokens == 128


def test_the_run_config_carries_the_budgets_to_the_loop():
    from reempathy.runner import loop_options

    cfg = load_config(None, ["decode.max_spoken_tokens=50", "decode.max_hidden_tokens=20"])
    opts = loop_options(cfg)
    assert (opts.max_spoken_tokens, opts.max_hidden_tokens, opts.max_new_tokens) == (50, 20, 220)


def test_reweighting_does_not_change_what_the_budget_counts(tiny, tiny_prompt):
    reweight = AttentionReweight(AttentionReweightOptions(factor=1.5, layers="0-1"), tiny)
    opts = LoopOptions(max_new_tokens=GUARD, greedy=True, max_spoken_tokens=SPOKEN)
    result = decode(tiny, tiny_prompt, _strategy(tiny, "reempathy"), [reweight, NoStop(tiny)], opts)
    assert result.stop_reason == "max_spoken_tokens" and result.counts.spoken == SPOKEN

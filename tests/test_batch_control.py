"""Continuous batching in the core: WAIT from a request source, BatchControl (cancel, prefill budget, isolation), per-row options.

Each addition is checked against the single-row loop: rows that join late, rows beside a
cancelled or failing row, and rows with their own greedy/budget give exactly the answers they
give alone (greedy), and a cancelled row stops at the next step boundary.
"""

from __future__ import annotations

import pytest

from reempathy.backbones.base import Turn
from reempathy.decoding.batch import WAIT, BatchControl, RowRequest, decode_batch
from reempathy.decoding.loop import LoopOptions, decode
from reempathy.errors import ConfigError, DecodeError, PluginFailure
from reempathy.hooks import hookimpl
from reempathy.plugins.strategies.reempathy import ReEmpathyOptions, ReEmpathyStrategy
from reempathy.plugins.strategies.sft import SftOptions, SftStrategy

TEXTS = ["I lost my keys.", "My exam is tomorrow and I cannot sleep.", "I finally got the job I wanted!", "Hello."]
GREEDY = LoopOptions(max_new_tokens=20, greedy=True)


class NoStop:
    @hookimpl
    def reempathy_logits(self, session, logits):
        logits[list(session.layout.stop_ids)] = float("-inf")


class CancelAt:
    """Asks ``control`` to cancel this row once it has ``n`` tokens (as a session would, from outside)."""

    def __init__(self, control, key, n):
        self.control, self.key, self.n = control, key, n
        self.steps_at_cancel = None

    @hookimpl
    def reempathy_token_appended(self, session, token_id, kind):
        if session.generated == self.n and self.steps_at_cancel is None:
            self.steps_at_cancel = self.control.steps
            self.control.cancel(self.key)


class FailAt:
    """Fails in its logits hook at token ``n`` (a broken third-party processor)."""

    def __init__(self, n):
        self.n = n

    @hookimpl
    def reempathy_logits(self, session, logits):
        if session.generated + 1 == self.n:
            raise RuntimeError("boom")


class BanAll:
    """Bans every token at token ``n``: no token can be chosen."""

    def __init__(self, n):
        self.n = n

    @hookimpl
    def reempathy_logits(self, session, logits):
        if session.generated + 1 == self.n:
            logits.fill_(float("-inf"))


@pytest.fixture(scope="module")
def prompts(tiny):
    return [tiny.build_prompt([Turn("user", text=t)]) for t in TEXTS]


def alone(tiny, prompt, strategy="sft", options=GREEDY, processors=(), seed=0):
    import dataclasses

    return decode(tiny, prompt, _strategy(tiny, strategy), list(processors), dataclasses.replace(options, seed=seed))


def _strategy(tiny, name):
    return SftStrategy(SftOptions(), tiny) if name == "sft" else ReEmpathyStrategy(ReEmpathyOptions(max_reflection_tokens=4), tiny)


def test_a_source_that_waits_lets_the_running_rows_go_on_and_late_rows_join(tiny, prompts):
    control = BatchControl()
    joined_at = {}

    def source():
        yield RowRequest(0, prompts[0], _strategy(tiny, "sft"), [NoStop()])
        for key in (1, 2):
            while control.steps < 3 * key:
                yield WAIT
            joined_at[key] = control.steps
            yield RowRequest(key, prompts[key], _strategy(tiny, "reempathy"), [NoStop()])

    results = dict(decode_batch(tiny, source(), GREEDY, batch_size=4, control=control))
    assert joined_at == {1: 3, 2: 6}
    assert results[0].ids == alone(tiny, prompts[0], processors=[NoStop()]).ids
    for key in (1, 2):
        assert results[key].ids == alone(tiny, prompts[key], "reempathy", processors=[NoStop()]).ids


def test_a_source_that_answers_wait_while_nothing_runs_is_refused(tiny, prompts):
    with pytest.raises(RuntimeError, match="WAIT while no row was running"):
        list(decode_batch(tiny, iter([WAIT]), GREEDY, batch_size=2, control=BatchControl()))


def test_a_cancelled_row_ends_at_the_next_step_boundary_with_stop_reason_cancelled(tiny, prompts):
    control = BatchControl()
    cancel = CancelAt(control, "b", 5)
    requests = [
        RowRequest("a", prompts[0], _strategy(tiny, "sft"), [NoStop()]),
        RowRequest("b", prompts[1], _strategy(tiny, "sft"), [NoStop(), cancel]),
    ]
    finished_at = {}
    results = {}
    for key, result in decode_batch(tiny, requests, GREEDY, batch_size=2, control=control):
        finished_at[key] = control.steps
        results[key] = result
    assert results["b"].stop_reason == "cancelled"
    assert results["b"].counts.generated == 5
    assert finished_at["b"] - cancel.steps_at_cancel <= 1
    assert results["b"].ids == alone(tiny, prompts[1], processors=[NoStop()]).ids[:5]
    assert results["a"].ids == alone(tiny, prompts[0], processors=[NoStop()]).ids


def test_a_cancel_for_a_key_that_is_not_running_is_forgotten(tiny, prompts):
    control = BatchControl()
    control.cancel("nobody")
    results = dict(decode_batch(tiny, [RowRequest("a", prompts[0], _strategy(tiny, "sft"))], GREEDY, 1, control))
    assert results["a"].stop_reason != "cancelled"
    assert results["a"].ids == alone(tiny, prompts[0]).ids


def test_the_prefill_budget_lets_one_new_row_join_per_step_boundary_when_prompts_exceed_it(tiny, prompts):
    control = BatchControl(prefill_tokens=1)
    taken_at = []

    def source():
        for key, prompt in enumerate(prompts):
            taken_at.append(control.steps)
            yield RowRequest(key, prompt, _strategy(tiny, "sft"), [NoStop()])

    results = dict(decode_batch(tiny, source(), GREEDY, batch_size=4, control=control))
    assert taken_at == [0, 1, 2, 3]
    for key, prompt in enumerate(prompts):
        assert results[key].ids == alone(tiny, prompt, processors=[NoStop()]).ids


def test_without_a_prefill_budget_every_free_row_is_filled_at_once(tiny, prompts):
    control = BatchControl()
    taken_at = []

    def source():
        for key, prompt in enumerate(prompts):
            taken_at.append(control.steps)
            yield RowRequest(key, prompt, _strategy(tiny, "sft"))

    list(decode_batch(tiny, source(), GREEDY, batch_size=4, control=control))
    assert taken_at == [0, 0, 0, 0]


def test_a_prefill_budget_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match="prefill_tokens"):
        BatchControl(prefill_tokens=0)


def test_with_isolate_a_failing_plugin_ends_only_its_row(tiny, prompts):
    control = BatchControl(isolate=True)
    requests = [
        RowRequest("ok", prompts[0], _strategy(tiny, "reempathy"), [NoStop()]),
        RowRequest("broken", prompts[1], _strategy(tiny, "sft"), [FailAt(4)]),
        RowRequest("banned", prompts[2], _strategy(tiny, "sft"), [BanAll(2)]),
        RowRequest("also-ok", prompts[3], _strategy(tiny, "sft"), [NoStop()]),
    ]
    results = dict(decode_batch(tiny, requests, GREEDY, batch_size=4, control=control))
    assert isinstance(results["broken"], PluginFailure) and "boom" in str(results["broken"])
    assert isinstance(results["banned"], DecodeError)
    assert results["ok"].ids == alone(tiny, prompts[0], "reempathy", processors=[NoStop()]).ids
    assert results["also-ok"].ids == alone(tiny, prompts[3], processors=[NoStop()]).ids


def test_with_isolate_a_request_that_fails_before_it_has_a_row_is_yielded_with_its_error(tiny, prompts):
    control = BatchControl(isolate=True)
    too_long = list(range(tiny.max_context))
    requests = [RowRequest("long", too_long, _strategy(tiny, "sft")), RowRequest("ok", prompts[0], _strategy(tiny, "sft"))]
    results = dict(decode_batch(tiny, requests, GREEDY, batch_size=2, control=control))
    assert "longer than the backbone's context" in str(results["long"])
    assert results["ok"].ids == alone(tiny, prompts[0]).ids


def test_without_isolate_a_failing_plugin_still_ends_the_whole_call(tiny, prompts):
    requests = [RowRequest("broken", prompts[1], _strategy(tiny, "sft"), [FailAt(2)])]
    with pytest.raises(PluginFailure, match="boom"):
        list(decode_batch(tiny, requests, GREEDY, batch_size=1, control=BatchControl()))


def test_rows_with_their_own_options_decode_as_they_would_alone(tiny, prompts):
    sampled = LoopOptions(max_new_tokens=12, greedy=False, strategy_name="sampled")
    short_greedy = LoopOptions(max_new_tokens=7, greedy=True, strategy_name="short")
    requests = [
        RowRequest("loop's", prompts[0], _strategy(tiny, "sft"), [NoStop()]),
        RowRequest("sampled", prompts[1], _strategy(tiny, "sft"), [NoStop()], seed=11, options=sampled),
        RowRequest("short", prompts[2], _strategy(tiny, "reempathy"), [NoStop()], options=short_greedy),
    ]
    results = dict(decode_batch(tiny, requests, GREEDY, batch_size=3))
    assert results["loop's"].ids == alone(tiny, prompts[0], processors=[NoStop()]).ids
    assert results["sampled"].ids == alone(tiny, prompts[1], options=sampled, processors=[NoStop()], seed=11).ids
    assert results["short"].ids == alone(tiny, prompts[2], "reempathy", options=short_greedy, processors=[NoStop()]).ids
    assert (results["sampled"].strategy, results["short"].strategy) == ("sampled", "short")
    assert results["short"].counts.generated == 7

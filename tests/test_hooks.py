"""Every run hook is fired by the loop as documented; every hookspec is documented and tested."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import torch

from reempathy import hookspecs
from reempathy.decoding.attention import KeyBias
from reempathy.decoding.directives import Switch
from reempathy.decoding.loop import LoopOptions, decode
from reempathy.hooks import hookimpl
from reempathy.plugins.strategies.sft import SftOptions, SftStrategy
from helpers import NoStop

ROOT = Path(__file__).resolve().parents[1]


class Recorder:
    """Records every run hook call in order."""

    def __init__(self, name="rec", log=None):
        self.name = name
        self.log = log if log is not None else []

    @hookimpl
    def reempathy_decode_start(self, session):
        self.log.append(("start", self.name, session.phase))

    @hookimpl
    def reempathy_logits(self, session, logits):
        self.log.append(("logits", self.name, session.generated))

    @hookimpl
    def reempathy_phase_change(self, session, old, new):
        self.log.append(("phase", self.name, old, new))

    @hookimpl
    def reempathy_decode_end(self, session, result):
        self.log.append(("end", self.name, result.counts.generated))
        result.extra[self.name] = "seen"


def test_reempathy_decode_start_fires_once_before_the_first_token(tiny, tiny_prompt):
    rec = Recorder()
    decode(tiny, tiny_prompt, SftStrategy(SftOptions(), tiny), [rec], LoopOptions(max_new_tokens=3, greedy=True))
    assert rec.log[0] == ("start", "rec", None)
    assert [e[0] for e in rec.log].count("start") == 1


def test_reempathy_decode_start_switch_begins_in_a_hidden_phase_within_the_prefill(tiny, tiny_prompt):
    bot = tiny.layout.special["<|begin_of_thought|>"]

    class Strat:
        @hookimpl
        def reempathy_decode_start(self, session):
            return Switch("thought", forced=(bot,), hidden=True)

        @hookimpl
        def reempathy_logits(self, session, logits):
            logits[tiny.layout.text_end :] = float("-inf")

    r = decode(tiny, tiny_prompt, Strat(), [], LoopOptions(max_new_tokens=3, greedy=True))
    assert r.spans[1] == {"label": "control", "start": len(tiny_prompt), "end": len(tiny_prompt) + 1, "segment": 0}
    assert r.hidden[0].kind == "thought" and r.hidden[0].start == len(tiny_prompt) + 1
    # one prefill call carried the prompt and the delimiter: nothing forwarded twice
    assert r.counts.forwarded + r.counts.unforwarded == len(tiny_prompt) + 1 + r.counts.generated


def test_reempathy_logits_runs_processors_in_config_order(tiny, tiny_prompt):
    log = []
    a, b, c = Recorder("a", log), Recorder("b", log), Recorder("c", log)
    decode(tiny, tiny_prompt, SftStrategy(SftOptions(), tiny), [a, b, c], LoopOptions(max_new_tokens=2, greedy=True))
    first_step = [e[1] for e in log if e[0] == "logits" and e[2] == 0]
    assert first_step == ["a", "b", "c"]


def test_reempathy_logits_changes_in_place_decide_the_token(tiny, tiny_prompt):
    class Force:
        @hookimpl
        def reempathy_logits(self, session, logits):
            logits.fill_(float("-inf"))
            logits[42] = 0.0

    r = decode(tiny, tiny_prompt, SftStrategy(SftOptions(), tiny), [Force()], LoopOptions(max_new_tokens=4))
    assert r.ids == [42, 42, 42, 42]


def test_reempathy_logits_strategy_runs_before_processors(tiny, tiny_prompt):
    log = []

    class Strat:
        @hookimpl(tryfirst=True)
        def reempathy_logits(self, session, logits):
            log.append("strategy")

    decode(tiny, tiny_prompt, Strat(), [Recorder("p", log)], LoopOptions(max_new_tokens=1, greedy=True))
    calls = [e if e == "strategy" else e[1] for e in log if e == "strategy" or e[0] == "logits"]
    assert calls == ["strategy", "p"]


def test_reempathy_token_directive_switches_phase_and_fires_phase_change(tiny, tiny_prompt):
    rec = Recorder()
    bor = tiny.layout.special["<|begin_of_reflection|>"]

    class Strat:
        @hookimpl
        def reempathy_token(self, session, token_id):
            if session.generated == 1 and session.phase == "speak":
                return Switch("reflection", forced=(bor,), hidden=True)
            return None

    r = decode(tiny, tiny_prompt, Strat(), [rec], LoopOptions(max_new_tokens=4, greedy=True))
    phases = [e for e in rec.log if e[0] == "phase"]
    assert phases == [("phase", "rec", None, "speak"), ("phase", "rec", "speak", "reflection")]
    assert r.ids[2] == bor


def test_reempathy_phase_change_sees_the_forced_tokens_already_appended(tiny, tiny_prompt):
    seen = []
    eor = tiny.layout.special["<|end_of_reflection|>"]

    class Strat:
        @hookimpl
        def reempathy_token(self, session, token_id):
            return Switch("speak", forced=(eor,)) if session.generated == 0 else None

        @hookimpl
        def reempathy_phase_change(self, session, old, new):
            seen.append(session.ids[-1])

    decode(tiny, tiny_prompt, Strat(), [], LoopOptions(max_new_tokens=3, greedy=True))
    assert seen[1] == eor


def test_reempathy_attention_plan_is_asked_once_per_phase_change(tiny, tiny_prompt):
    calls = []
    eor = tiny.layout.special["<|end_of_reflection|>"]

    class Strat:
        @hookimpl
        def reempathy_token(self, session, token_id):
            return Switch("speak", forced=(eor,)) if session.generated in (2, 5) else None

        @hookimpl
        def reempathy_logits(self, session, logits):
            logits[list(tiny.layout.stop_ids)] = float("-inf")

    class Planner:
        @hookimpl
        def reempathy_attention_plan(self, session):
            calls.append(len(session.segments))
            return {}

    decode(tiny, tiny_prompt, Strat(), [Planner()], LoopOptions(max_new_tokens=9, greedy=True))
    assert calls == [1, 2, 3]  # the first phase, then two switches


def test_reempathy_attention_plan_bias_changes_the_logits(tiny, tiny_prompt):
    seen = []

    class Planner:
        def __init__(self, alpha):
            self.alpha = alpha

        @hookimpl
        def reempathy_attention_plan(self, session):
            return {0: [KeyBias(0, session.prompt_len, math.log(self.alpha))]}

        @hookimpl
        def reempathy_logits(self, session, logits):
            seen.append(logits.clone())

    strat = SftStrategy(SftOptions(), tiny)
    decode(tiny, tiny_prompt, strat, [Planner(1.0)], LoopOptions(max_new_tokens=2, greedy=True))
    decode(tiny, tiny_prompt, strat, [Planner(3.0)], LoopOptions(max_new_tokens=2, greedy=True))
    # step 0 logits come from the prefill, before any plan; step 1 is decoded under the plan
    assert torch.equal(seen[0], seen[2])
    assert not torch.allclose(seen[1], seen[3])


def test_reempathy_token_appended_sees_every_token_whatever_the_strategy_answers(tiny, tiny_prompt):
    from reempathy.plugins.strategies.reempathy import ReEmpathyOptions, ReEmpathyStrategy

    seen = []

    class Observer:
        @hookimpl
        def reempathy_token_appended(self, session, token_id, kind):
            seen.append((kind, token_id, len(session.ids)))

    strategy = ReEmpathyStrategy(ReEmpathyOptions(text_tokens=2, audio_tokens=3, max_reflection_tokens=3), tiny)
    r = decode(tiny, tiny_prompt, strategy, [NoStop(tiny), Observer()], LoopOptions(max_new_tokens=30, greedy=True))
    appended = [s for s in seen if s[0] in ("sampled", "forced")]
    # The strategy answers Switch at every chunk and reflection end; the observer still sees every token.
    assert len(appended) == r.counts.generated + r.counts.forced
    assert [t for _, t, _ in appended] == r.ids
    assert sum(1 for s in appended if s[0] == "forced") == r.counts.forced > 0
    # each call comes right after its token is appended
    assert all(n == len(tiny_prompt) + i + 1 for i, (_, _, n) in enumerate(appended))


def test_reempathy_token_appended_reports_a_stop_token_that_was_not_appended(tiny, tiny_prompt):
    stop = tiny.layout.stop_ids[0]
    seen = []

    class ForceStop:
        @hookimpl
        def reempathy_logits(self, session, logits):
            if session.generated == 2:
                logits.fill_(float("-inf"))
                logits[stop] = 0.0

        @hookimpl
        def reempathy_token_appended(self, session, token_id, kind):
            seen.append((kind, token_id))

    r = decode(tiny, tiny_prompt, SftStrategy(SftOptions(), tiny), [NoStop(tiny), ForceStop()], LoopOptions(max_new_tokens=9, greedy=True))
    assert r.stop_reason == "stop_token" and r.counts.generated == 2
    assert [k for k, _ in seen] == ["sampled", "sampled", "stop"] and seen[-1][1] == stop


def test_reempathy_decode_end_sees_the_final_result(tiny, tiny_prompt):
    rec = Recorder()
    r = decode(tiny, tiny_prompt, SftStrategy(SftOptions(), tiny), [rec], LoopOptions(max_new_tokens=3, greedy=True))
    assert rec.log[-1] == ("end", "rec", r.counts.generated)
    assert r.extra["rec"] == "seen"


def test_every_hookspec_is_documented_with_its_real_signature():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    for name in hookspecs.RUN_HOOKS + hookspecs.DISCOVERY_HOOKS:
        sig = f"{name}{inspect.signature(getattr(hookspecs, name))}"
        assert f"### `{sig}`" in doc, f"docs/plugins.md lacks the signature {sig}"


def test_every_hookspec_is_listed_and_exercised_by_a_test():
    declared = {n for n, f in vars(hookspecs).items() if n.startswith("reempathy_") and callable(f)}
    assert declared == set(hookspecs.RUN_HOOKS + hookspecs.DISCOVERY_HOOKS)
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_hooks.py")
    own = Path(__file__).read_text()
    for name in declared:
        exercised = re.search(rf"def test_{name}\w*\(", own) or f"def {name}(" in tests
        assert exercised, f"no test exercises {name}"


# --- ordering, firstresult, wrappers, observers --------------------------------------------------

BUILTIN_STRATEGY_CASES = {
    "sft": {},
    "cotbs": {"max_thought_tokens": 4},
    "reempathy": {"text_tokens": 2, "audio_tokens": 3, "max_reflection_tokens": 3},
    "reempathy-no-reflection": {"text_tokens": 2, "audio_tokens": 3, "reflect": False},
    "reempathy-fixed": {"text_tokens": 2, "audio_tokens": 3, "reflection_tokens": 2},
}


def test_the_observer_cases_cover_every_builtin_strategy():
    from reempathy.testing import isolated_discovery

    registry = isolated_discovery().registry
    assert {case.split("-")[0] for case in BUILTIN_STRATEGY_CASES} == set(registry.names("strategy"))


@pytest.mark.parametrize("case", sorted(BUILTIN_STRATEGY_CASES))
def test_reempathy_token_appended_sees_every_token_with_every_builtin_strategy(tiny, case):
    from reempathy.testing import decode_with, isolated_discovery

    seen = []

    class Observer:
        @hookimpl
        def reempathy_token_appended(self, session, token_id, kind):
            seen.append((kind, token_id))

    registry = isolated_discovery().registry
    run = decode_with(
        registry, tiny, case.split("-")[0], BUILTIN_STRATEGY_CASES[case], plugins=[Observer()], max_new_tokens=20, ban_stop=True
    )
    appended = [t for kind, t in seen if kind in ("sampled", "forced")]
    counts = run.result.counts
    assert len(appended) == counts.generated + counts.forced
    assert appended == run.result.ids
    assert sum(kind == "forced" for kind, _ in seen) == counts.forced


def test_reempathy_token_is_answered_by_the_strategy_before_any_processor(tiny, tiny_prompt):
    from reempathy.decoding.directives import Stop

    class StopAt2:
        @hookimpl
        def reempathy_token(self, session, token_id):
            return Stop("strategy", keep_token=True) if session.generated == 1 else None

    class StopAt1:
        @hookimpl
        def reempathy_token(self, session, token_id):
            return Stop("processor", keep_token=True)

    r = decode(tiny, tiny_prompt, StopAt2(), [NoStop(tiny), StopAt1()], LoopOptions(max_new_tokens=9, greedy=True))
    # firstresult: the processor's answer counts only where the strategy answered None
    assert r.stop_reason == "processor" and r.counts.generated == 1
    r = decode(tiny, tiny_prompt, StopAt2(), [NoStop(tiny)], LoopOptions(max_new_tokens=9, greedy=True))
    assert r.stop_reason == "strategy" and r.counts.generated == 2


def test_reempathy_token_wrapper_sees_and_may_replace_the_strategy_answer(tiny, tiny_prompt):
    from reempathy.plugins.strategies.reempathy import ReEmpathyOptions, ReEmpathyStrategy

    answers = []

    class NoReflections:
        """A wrapper processor: sees the strategy's directive and turns every Switch into None."""

        @hookimpl(wrapper=True)
        def reempathy_token(self, session, token_id):
            answer = yield
            answers.append(answer)
            return None if isinstance(answer, Switch) and answer.hidden else answer

    strategy = ReEmpathyStrategy(ReEmpathyOptions(text_tokens=2, audio_tokens=3), tiny)
    r = decode(tiny, tiny_prompt, strategy, [NoStop(tiny), NoReflections()], LoopOptions(max_new_tokens=12, greedy=True))
    assert any(isinstance(a, Switch) and a.hidden for a in answers)
    assert r.hidden == [] and r.counts.forced == 0


def test_reempathy_logits_hookimpl_tryfirst_in_a_processor_runs_before_the_strategy(tiny, tiny_prompt):
    log = []

    class Strat:
        @hookimpl
        def reempathy_logits(self, session, logits):
            log.append("strategy")

    class Early:
        @hookimpl(tryfirst=True)
        def reempathy_logits(self, session, logits):
            log.append("early")

    decode(tiny, tiny_prompt, Strat(), [Recorder("p", log), Early()], LoopOptions(max_new_tokens=1, greedy=True))
    calls = [e if isinstance(e, str) else e[1] for e in log if isinstance(e, str) or e[0] == "logits"]
    assert calls == ["early", "strategy", "p"]

"""Errors inside the token loop: a plugin that raises is named with its hook; logits that allow no token are a DecodeError.

Covers issue 16 items 8 and 10 and issue 14's "processor that bans every token", in the single-row
loop and the batched loop alike, greedy and sampling alike.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from reempathy.cli import main
from reempathy.config import load_config
from reempathy.decoding.attention import KeyBias
from reempathy.decoding.batch import RowRequest, decode_batch
from reempathy.decoding.loop import LoopOptions, decode
from reempathy.registry import discover
from reempathy.errors import ConfigError, DecodeError, PluginFailure
from reempathy.hooks import hookimpl
from reempathy.plugins.strategies.sft import SftOptions, SftStrategy
from reempathy.runner import run_decode


def _sft(tiny):
    return SftStrategy(SftOptions(), tiny)


class BanAll:
    """Leaves no token possible from token ``at`` on."""

    def __init__(self, at=1):
        self.at = at

    @hookimpl
    def reempathy_logits(self, session, logits):
        if session.generated + 1 >= self.at:
            logits.fill_(float("-inf"))


class Poison:
    """Writes ``value`` into one logit (NaN, or +inf as an overflowing processor would)."""

    def __init__(self, value):
        self.value = value

    @hookimpl
    def reempathy_logits(self, session, logits):
        logits[7] = self.value


def _run(tiny, prompt, processors, *, greedy, batched):
    options = LoopOptions(max_new_tokens=10, greedy=greedy, seed=3)
    if not batched:
        return decode(tiny, prompt, _sft(tiny), processors, options)
    return list(decode_batch(tiny, [RowRequest("rec-1", prompt, _sft(tiny), processors)], options, 2))


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampling"])
def test_a_processor_that_bans_every_token_is_a_decode_error_naming_the_step(tiny, tiny_prompt, greedy, batched):
    with pytest.raises(DecodeError) as info:
        _run(tiny, tiny_prompt, [BanAll(at=3)], greedy=greedy, batched=batched)
    message = str(info.value)
    assert "token 3 of the answer" in message and "banned every token" in message and "BanAll" in message
    assert ("record 'rec-1'" in message) == batched
    assert "\n" not in message


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampling"])
def test_nan_logits_are_a_decode_error_not_token_zero(tiny, tiny_prompt, greedy, batched):
    with pytest.raises(DecodeError, match="NaN"):
        _run(tiny, tiny_prompt, [Poison(float("nan"))], greedy=greedy, batched=batched)


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampling"])
def test_an_infinite_logit_is_a_decode_error(tiny, tiny_prompt, greedy):
    with pytest.raises(DecodeError, match=r"\+inf"):
        _run(tiny, tiny_prompt, [Poison(float("inf"))], greedy=greedy, batched=False)


# --- a plugin's own code raising ---------------------------------------------------------------


class Faulty:
    """Raises in the hook named ``hook`` (the others do nothing)."""

    def __init__(self, hook):
        self.hook = hook

    def _maybe(self, name):
        if name == self.hook:
            raise ZeroDivisionError("oops")

    @hookimpl
    def reempathy_decode_start(self, session):
        self._maybe("reempathy_decode_start")

    @hookimpl
    def reempathy_logits(self, session, logits):
        self._maybe("reempathy_logits")

    @hookimpl
    def reempathy_token_appended(self, session, token_id, kind):
        self._maybe("reempathy_token_appended")

    @hookimpl
    def reempathy_phase_change(self, session, old, new):
        self._maybe("reempathy_phase_change")

    @hookimpl
    def reempathy_attention_plan(self, session):
        self._maybe("reempathy_attention_plan")

    @hookimpl
    def reempathy_decode_end(self, session, result):
        self._maybe("reempathy_decode_end")


class Harmless:
    """Another plugin with the same hooks, so that the culprit must be told apart."""

    @hookimpl
    def reempathy_logits(self, session, logits):
        pass

    @hookimpl
    def reempathy_token_appended(self, session, token_id, kind):
        pass


HOOKS = [
    "reempathy_decode_start",
    "reempathy_logits",
    "reempathy_token_appended",
    "reempathy_phase_change",
    "reempathy_attention_plan",
    "reempathy_decode_end",
]


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("hook", HOOKS)
def test_a_raising_run_hook_is_a_plugin_failure_naming_plugin_and_hook(tiny, tiny_prompt, hook, batched):
    with pytest.raises(PluginFailure) as info:
        _run(tiny, tiny_prompt, [Harmless(), Faulty(hook), Harmless()], greedy=True, batched=batched)
    failure = info.value
    assert (failure.plugin, failure.hook) == ("Faulty", hook)
    assert isinstance(failure.error, ZeroDivisionError)
    assert str(failure) == f"plugin 'Faulty' failed in {hook}: ZeroDivisionError: oops"


def test_a_raising_strategy_token_hook_names_the_strategy(tiny, tiny_prompt):
    class Picky:
        @hookimpl
        def reempathy_token(self, session, token_id):
            return {}["missing"]

    with pytest.raises(PluginFailure) as info:
        decode(tiny, tiny_prompt, Picky(), [Harmless()], LoopOptions(max_new_tokens=3, greedy=True))
    assert (info.value.plugin, info.value.hook) == ("Picky", "reempathy_token")


def test_of_two_objects_of_one_class_the_raising_one_is_named_by_its_registered_name(tiny, tiny_prompt):
    from reempathy.decoding.failures import remember_name

    calm, faulty = Faulty("none"), Faulty("reempathy_logits")
    remember_name(calm, "calm-one")
    remember_name(faulty, "faulty-one")
    with pytest.raises(PluginFailure) as info:
        decode(tiny, tiny_prompt, _sft(tiny), [calm, faulty], LoopOptions(max_new_tokens=3, greedy=True))
    assert info.value.plugin == "faulty-one"


def test_our_own_errors_from_a_hook_pass_through_unchanged(tiny, tiny_prompt):
    class Strict:
        @hookimpl
        def reempathy_logits(self, session, logits):
            raise ConfigError("processor 'strict': option 'x' is wrong")

    with pytest.raises(ConfigError, match="option 'x'"):
        decode(tiny, tiny_prompt, _sft(tiny), [Strict()], LoopOptions(max_new_tokens=3, greedy=True))


def test_a_non_finite_attention_bias_is_a_decode_error(tiny, tiny_prompt):
    class Wild:
        @hookimpl
        def reempathy_attention_plan(self, session):
            return {0: [KeyBias(0, 3, math.inf)]}

    with pytest.raises(DecodeError, match="must be finite"):
        decode(tiny, tiny_prompt, _sft(tiny), [Wild()], LoopOptions(max_new_tokens=3, greedy=True))


class _NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


def test_a_hook_failure_names_a_processor_built_from_the_registry_by_its_registered_name(tiny, fresh_discovery):
    plugin = types.SimpleNamespace(
        reempathy_register_processors=hookimpl(
            lambda register: register("faulty-logits", lambda o, b: Faulty("reempathy_logits"), _NoOptions)
        )
    )
    registry = discover(extra_plugins=[("faulty-plugin", plugin)]).registry
    cfg = load_config(
        None, ["processors=[{name = \"faulty-logits\"}]", "sampling.greedy=true", "decode.max_new_tokens=3"]
    )
    with pytest.raises(PluginFailure) as info:
        run_decode(cfg, registry, prompt="Hello", backbone=tiny)
    assert (info.value.plugin, info.value.hook) == ("faulty-logits", "reempathy_logits")


# --- options that could only overflow are refused where they are read ----------------------------


@pytest.mark.parametrize(
    "override",
    [
        "sampling.temperature=1e-300",
        "sampling.temperature=1e300",
        "sampling.temperature=inf",
        "sampling.top_p=5e-324",
        "sampling.repetition_penalty=1e-300",
        "processors=[{name = \"attention-reweight\", factor = inf}]",
        "processors=[{name = \"attention-reweight\", factor = 1e-300}]",
    ],
)
def test_out_of_range_sampling_and_reweight_options_are_one_line_config_errors(capsys, override):
    code = main(["decode", "--config", "configs/sft.toml", "--set", override, "--set", "sampling.greedy=false"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("reempathy: error: ") and err.count("\n") == 1
    assert "probability tensor" not in err


def test_top_p_below_float32_resolution_keeps_the_top_token():
    from reempathy.plugins.processors.sampling import TopP, TopPOptions

    logits = torch.tensor([0.5, 3.0, 1.0])
    TopP(TopPOptions(p=1e-6), None).reempathy_logits(types.SimpleNamespace(ids=[]), logits)
    assert torch.isfinite(logits).tolist() == [False, True, False]


def test_repetition_penalty_tracks_new_tokens_as_the_answer_grows():
    from reempathy.plugins.processors.sampling import RepetitionPenalty, RepetitionPenaltyOptions

    proc = RepetitionPenalty(RepetitionPenaltyOptions(penalty=2.0), None)
    session = types.SimpleNamespace(ids=[1, 1, 3])
    for ids_after in ([1, 1, 3], [1, 1, 3, 5], [1, 1, 3, 5, 1, 0]):
        session.ids = ids_after
        logits = torch.tensor([2.0, -2.0, 2.0, -2.0, 2.0, 4.0])
        proc.reempathy_logits(session, logits)
        expected = torch.tensor([2.0, -2.0, 2.0, -2.0, 2.0, 4.0])
        for token in set(ids_after):
            expected[token] = expected[token] * 2 if expected[token] < 0 else expected[token] / 2
        assert torch.equal(logits, expected)

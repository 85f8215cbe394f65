"""Plugin contracts that used to fail late or unclearly (issue 25): each is one line naming the plugin and the hook.

A hook's answer is checked where it enters the loop (``Row.begin``, ``Row.accept``); a wrapper that
is not a generator is refused when the plugin is registered; a misspelled hook gets a "did you mean".
Also the ways a strategy forces text into a hidden phase as part of it (``Switch(prefix=…)``,
``Backbone.encode_text``) and the strict option base ``reempathy.api.PluginOptions``.
"""

from __future__ import annotations

import types

import pytest
from pydantic import BaseModel, ConfigDict

from reempathy.api import (
    CONTROL,
    SPEAK,
    LoopOptions,
    PluginError,
    PluginFailure,
    PluginOptions,
    RowRequest,
    Switch,
    decode,
    decode_batch,
    discover,
    hookimpl,
)
from reempathy.errors import ConfigError, InputError
from reempathy.plugins.strategies.sft import SftOptions, SftStrategy
from reempathy.testing import BanStop


def _decode(tiny, prompt, strategy, processors=(), *, batched=False, max_new_tokens=6):
    options = LoopOptions(max_new_tokens=max_new_tokens, greedy=True, seed=0)
    processors = [*processors, BanStop(tiny)]  # only the budget or the strategy ends an answer
    if batched:
        return list(decode_batch(tiny, [RowRequest("rec-1", prompt, strategy, list(processors))], options, 2))[0][1]
    return decode(tiny, prompt, strategy, list(processors), options)


class Answers:
    """A strategy whose ``reempathy_token`` answers ``answer`` at its ``at``-th token (None before)."""

    def __init__(self, answer, at=2):
        self.answer, self.at = answer, at

    @hookimpl
    def reempathy_token(self, session, token_id):
        return self.answer if session.generated + 1 == self.at else None


class Opens:
    """A strategy whose ``reempathy_decode_start`` answers ``answer``."""

    def __init__(self, answer):
        self.answer = answer

    @hookimpl
    def reempathy_decode_start(self, session):
        return self.answer


class Quiet:
    """A processor that also implements the hooks, answering None."""

    @hookimpl
    def reempathy_decode_start(self, session):
        return None

    @hookimpl
    def reempathy_logits(self, session, logits):
        pass


# --- answers that are not directives ----------------------------------------------------------


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_a_token_answer_that_is_not_a_directive_is_a_plugin_failure_naming_plugin_and_hook(tiny, tiny_prompt, batched):
    with pytest.raises(PluginFailure) as info:
        _decode(tiny, tiny_prompt, Answers("switch"), [Quiet()], batched=batched)
    failure = info.value
    assert (failure.plugin, failure.hook) == ("Answers", "reempathy_token")
    message = str(failure)
    assert "'switch' (a str)" in message and "not a directive" in message and "Switch(" in message
    assert "\n" not in message and failure.exit_code == 1


def test_a_decode_start_answer_that_is_not_a_directive_is_a_plugin_failure(tiny, tiny_prompt):
    with pytest.raises(PluginFailure) as info:
        _decode(tiny, tiny_prompt, Opens({"phase": "thought"}))
    assert (info.value.plugin, info.value.hook) == ("Opens", "reempathy_decode_start")
    assert "(a dict)" in str(info.value)


def test_a_bad_answer_among_several_implementations_names_the_candidates_in_call_order(tiny, tiny_prompt):
    class AlsoAnswers(Quiet):
        @hookimpl
        def reempathy_token(self, session, token_id):
            return None

    with pytest.raises(PluginFailure) as info:
        _decode(tiny, tiny_prompt, Answers(7), [AlsoAnswers()])
    assert info.value.plugin == "one of Answers, AlsoAnswers"


def test_every_directive_and_none_is_still_accepted(tiny, tiny_prompt):
    from reempathy.api import CONTINUE, Continue, Stop

    for answer in (None, CONTINUE, Continue(), Switch(SPEAK), Stop("enough")):
        _decode(tiny, tiny_prompt, Answers(answer))


# --- forced ids outside the vocabulary -------------------------------------------------------------


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_forced_ids_outside_the_vocabulary_are_a_plugin_failure_not_an_index_error(tiny, tiny_prompt, batched):
    with pytest.raises(PluginFailure) as info:
        _decode(tiny, tiny_prompt, Answers(Switch("note", forced=(10**9,), hidden=True)), batched=batched)
    failure = info.value
    assert (failure.plugin, failure.hook) == ("Answers", "reempathy_token")
    assert f"token id 1000000000 is outside the vocabulary 0..{tiny.layout.vocab_size - 1}" in str(failure)
    assert "forced" in str(failure) and "\n" not in str(failure)


@pytest.mark.parametrize("bad", [(-1,), ("<|begin_of_reflection|>",), (1.5,), (True,)])
def test_forced_values_that_are_not_token_ids_are_refused_at_decode_start(tiny, tiny_prompt, bad):
    with pytest.raises(PluginFailure) as info:
        _decode(tiny, tiny_prompt, Opens(Switch("thought", forced=bad, hidden=True)))
    assert info.value.hook == "reempathy_decode_start" and "forced" in str(info.value)


def test_a_switch_to_a_phase_that_is_not_a_name_is_refused(tiny, tiny_prompt):
    with pytest.raises(PluginFailure, match="phase must be a non-empty string"):
        _decode(tiny, tiny_prompt, Answers(Switch(3)))


# --- wrappers that are not generators --------------------------------------------------------------


class NotAGenerator:
    """A wrapper written like an ordinary hook (no ``yield``)."""

    def __init__(self, options=None, backbone=None):
        pass

    @hookimpl(wrapper=True)
    def reempathy_token(self, session, token_id):
        return None


def test_a_wrapper_that_is_not_a_generator_is_refused_when_registered_for_a_session(tiny, tiny_prompt):
    with pytest.raises(PluginError) as info:
        _decode(tiny, tiny_prompt, SftStrategy(SftOptions(), tiny), [NotAGenerator()])
    message = str(info.value)
    assert "'NotAGenerator'" in message and "reempathy_token" in message
    assert "wrapper=True" in message and "yield" in message and "\n" not in message
    assert "processor-0" not in message


def test_a_registered_wrapper_that_is_not_a_generator_is_refused_naming_the_plugin(tiny):
    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

    module = types.ModuleType("wrapping")
    module.reempathy_register_processors = hookimpl(
        lambda register: register("not-a-generator", NotAGenerator, Options)
    )
    registry = discover([("wrapping", module)], installed=False).registry
    with pytest.raises(PluginError, match=r"processor 'not-a-generator' of plugin 'wrapping': .*reempathy_token.*yield"):
        registry.create("processor", "not-a-generator", {}, tiny)


def test_a_module_level_discovery_wrapper_that_is_not_a_generator_makes_the_plugin_broken():
    module = types.ModuleType("wrapmod")
    module.reempathy_register_strategies = hookimpl(wrapper=True)(lambda register: None)
    row = discover([("wrapmod", module)], installed=False).plugin("wrapmod")
    assert row.broken and "reempathy_register_strategies" in row.error and "yield" in row.error


# --- misspelled hooks and clashes ----------------------------------------------------------------


def test_a_misspelled_hook_gets_a_did_you_mean():
    module = types.ModuleType("typo")
    module.reempathy_register_stratgies = hookimpl(lambda register: None)
    row = discover([("typo", module)], installed=False).plugin("typo")
    assert row.broken and "did you mean reempathy_register_strategies?" in row.error


def test_a_misspelled_run_hook_on_a_session_object_gets_a_did_you_mean(tiny):
    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class Typo:
        def __init__(self, options, backbone):
            pass

        @hookimpl
        def reempathy_tokens(self, session, token_id):
            return None

    module = types.ModuleType("typos")
    module.reempathy_register_strategies = hookimpl(lambda register: register("typo", Typo, Options))
    registry = discover([("typos", module)], installed=False).registry
    with pytest.raises(PluginError, match="did you mean reempathy_token\\?"):
        registry.create("strategy", "typo", {}, tiny)


def test_the_clash_message_reads_cleanly(monkeypatch):
    class Options(BaseModel):
        pass

    module = types.ModuleType("clash")
    module.reempathy_register_strategies = hookimpl(lambda register: register("sft", lambda o, b: None, Options))
    monkeypatch.setenv("REEMPATHY_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError) as info:
        discover([("clash", module)], installed=False)
    message = str(info.value)
    assert "''s" not in message
    assert "plugin 'clash' registers strategy 'sft' (already registered by 'reempathy.plugins.strategies')" in message
    assert "give strategy 'sft' another name in plugin 'clash'" in message


# --- the strict option base -------------------------------------------------------------------------


class Scale(PluginOptions):
    factor: float = 1.0
    steps: int = 3
    on: bool = True


@pytest.mark.parametrize("value", [{"steps": True}, {"steps": 4.0}, {"on": "yes"}, {"factor": float("nan")}, {"other": 1}])
def test_plugin_options_are_strict_like_the_built_ins(value):
    with pytest.raises(Exception) as info:
        Scale.model_validate(value)
    assert type(info.value).__name__ == "ValidationError"


def test_plugin_options_take_an_integer_for_a_float():
    assert Scale.model_validate({"factor": 2}).factor == 2.0


def test_a_plugin_options_error_reads_like_a_built_in_one(fresh_discovery):
    module = types.ModuleType("scaled")
    module.reempathy_register_processors = hookimpl(lambda register: register("scaled", lambda o, b: Quiet(), Scale))
    registry = discover([("scaled", module)], installed=False).registry
    with pytest.raises(ConfigError) as info:
        registry.validate("processor", "scaled", {"steps": True}, place="processors.0")
    assert str(info.value) == "processor 'scaled' (processors.0): option 'steps': Input should be a valid integer (got true)"


# --- text forced into a phase as part of it -----------------------------------------------------------


class Reflects:
    """Speaks ``spoken`` tokens, then opens a reflection whose text begins with ``prefix`` (ids), for ``hidden`` tokens."""

    def __init__(self, backbone, prefix, spoken=3, hidden=4):
        layout = backbone.layout
        self.open_id = layout.token_id("<|begin_of_reflection|>")
        self.close_id = layout.token_id("<|end_of_reflection|>")
        self.not_text = ~layout.text_mask(backbone.model.device)
        self.prefix, self.spoken, self.hidden = tuple(prefix), spoken, hidden

    @hookimpl(tryfirst=True)
    def reempathy_logits(self, session, logits):
        if session.hidden:
            logits.masked_fill_(self.not_text, float("-inf"))

    @hookimpl
    def reempathy_token(self, session, token_id):
        if not session.hidden and session.generated + 1 == self.spoken:
            return Switch("reflection", forced=(self.open_id,), hidden=True, prefix=self.prefix)
        if session.hidden and len(session.segment) + 1 >= len(self.prefix) + self.hidden:
            return Switch(SPEAK, forced=(self.close_id,))
        return None


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_a_switch_prefix_is_labelled_as_the_new_phase_and_is_part_of_its_text(tiny, tiny_prompt, batched):
    prefix = tiny.encode_text("Thinking:")
    result = _decode(tiny, tiny_prompt, Reflects(tiny, prefix), batched=batched, max_new_tokens=12)
    reflection = result.hidden[0]
    assert reflection.kind == "reflection"
    assert reflection.ids[: len(prefix)] == prefix and len(reflection.ids) == len(prefix) + 4
    assert reflection.text.startswith("Thinking:")
    # the delimiter stays control; the prefix is the reflection's own text, right after it
    start = result.counts.prompt + 3
    labels = [s["label"] for s in result.spans for _ in range(s["end"] - s["start"])]
    assert labels[start] == CONTROL
    assert labels[start + 1 : start + 1 + len(prefix)] == ["reflection"] * len(prefix)
    # prefix tokens are forced: they go through the model but are not sampled
    assert result.counts.forced == 2 + len(prefix) and result.counts.generated == 12
    assert result.counts.forwarded + result.counts.unforwarded == result.counts.prompt + 12 + result.counts.forced


def test_a_prefix_is_observed_as_forced_tokens_before_the_phase_change_hook(tiny, tiny_prompt):
    prefix = tiny.encode_text("Note:")
    seen = []

    class Watch:
        @hookimpl
        def reempathy_token_appended(self, session, token_id, kind):
            seen.append((kind, token_id))

        @hookimpl
        def reempathy_phase_change(self, session, old, new):
            if new == "reflection":
                seen.append(("phase", list(session.segment_ids(session.segment))))

    _decode(tiny, tiny_prompt, Reflects(tiny, prefix), [Watch()], max_new_tokens=8)
    at = seen.index(("phase", prefix))
    assert seen[at - len(prefix) : at] == [("forced", t) for t in prefix]


def test_a_prefix_can_open_the_answer_from_decode_start(tiny, tiny_prompt):
    prefix = tiny.encode_text("Hmm.")
    result = _decode(tiny, tiny_prompt, Opens(Switch("thought", hidden=True, prefix=tuple(prefix))), max_new_tokens=3)
    assert result.hidden[0].kind == "thought" and result.hidden[0].ids[: len(prefix)] == prefix


def test_prefix_ids_outside_the_vocabulary_are_refused_naming_the_plugin(tiny, tiny_prompt):
    with pytest.raises(PluginFailure, match=r"prefix.*outside the vocabulary"):
        _decode(tiny, tiny_prompt, Answers(Switch("note", hidden=True, prefix=(10**9,))))


def test_a_delimiter_the_model_samples_itself_is_labelled_control(tiny, tiny_prompt):
    """The model closing a reflection on its own: the delimiter is in the segment's positions but not its text."""
    close = tiny.layout.token_id("<|end_of_reflection|>")

    class SamplesClose(Reflects):
        @hookimpl(tryfirst=True)
        def reempathy_logits(self, session, logits):
            if session.hidden and len(session.segment) < 2:
                logits.masked_fill_(self.not_text, float("-inf"))
            elif session.hidden:  # only the delimiter is left to sample
                logits.fill_(float("-inf"))
                logits[close] = 0.0

        @hookimpl
        def reempathy_token(self, session, token_id):
            if session.hidden and token_id == close:
                return Switch(SPEAK)
            return super().reempathy_token(session, token_id)

    result = _decode(tiny, tiny_prompt, SamplesClose(tiny, (), hidden=50), max_new_tokens=8)
    position = result.counts.prompt + result.ids.index(close)
    labels = [s["label"] for s in result.spans for _ in range(s["end"] - s["start"])]
    assert labels[position] == CONTROL and close not in result.hidden[0].ids


# --- Backbone.encode_text ---------------------------------------------------------------------------------


def test_encode_text_gives_text_token_ids_that_decode_back(tiny):
    ids = tiny.encode_text("Thinking: be kind.")
    assert ids and all(tiny.layout.is_text(i) for i in ids)
    assert tiny.decode_text(ids) == "Thinking: be kind."


def test_encode_text_refuses_special_token_text(tiny):
    with pytest.raises(InputError, match="special token"):
        tiny.encode_text("<|begin_of_reflection|> hi")


def test_a_prefix_decodes_the_same_on_the_static_cache(tiny, tiny_prompt):
    """Prefix tokens are forced tokens: on the static path they go through its step widths like any others."""
    prefix = tiny.encode_text("Thinking about it:")
    runs = []
    for cache in ("dynamic", "static"):
        options = LoopOptions(max_new_tokens=12, greedy=True, seed=0, cache=cache)
        runs.append(decode(tiny, tiny_prompt, Reflects(tiny, prefix), [BanStop(tiny)], options))
    dynamic, static = runs
    assert static.ids == dynamic.ids and static.spans == dynamic.spans
    assert static.hidden[0].ids[: len(prefix)] == prefix

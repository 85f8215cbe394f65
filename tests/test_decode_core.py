"""The decoder core: equivalence with transformers' generate, seeding, stopping, counters, spans."""

from __future__ import annotations

import pytest
import torch

from reempathy.backbones.base import Turn
from reempathy.decoding.directives import Stop, Switch
from reempathy.decoding.loop import LoopOptions, decode
from reempathy.hooks import hookimpl

from helpers import NoStop
from reempathy.plugins.strategies.sft import SftOptions, SftStrategy

PROMPTS = [
    "I lost my keys and missed the bus.",
    "My best friend is moving away next week.",
    "Hi",
]


def _sft(backbone):
    return SftStrategy(SftOptions(), backbone)


@pytest.mark.parametrize("text", PROMPTS)
@pytest.mark.parametrize("n", [1, 7, 40])
def test_greedy_sft_equals_transformers_generate(tiny, text, n):
    ids = tiny.build_prompt([Turn("user", text=text)])
    result = decode(tiny, ids, _sft(tiny), options=LoopOptions(max_new_tokens=n, greedy=True))
    with torch.inference_mode():
        ref = tiny.model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=n,
            eos_token_id=list(tiny.layout.stop_ids),
            pad_token_id=0,
        )[0, len(ids) :].tolist()
    if ref and ref[-1] in tiny.layout.stop_ids:
        ref = ref[:-1]  # generate keeps the stop token; our answer does not
    assert result.ids == ref


def test_greedy_equivalence_holds_with_units_prompt(tiny):
    ids = tiny.build_prompt([Turn("user", units=[3, 9, 27, 81, 243, 729])])
    result = decode(tiny, ids, _sft(tiny), options=LoopOptions(max_new_tokens=25, greedy=True))
    with torch.inference_mode():
        ref = tiny.model.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=25, eos_token_id=None, pad_token_id=0
        )[0, len(ids) :].tolist()
    assert result.ids == ref[: len(result.ids)]


def test_seeded_sampling_gives_the_same_answer_twice(tiny, tiny_prompt):
    a = decode(tiny, tiny_prompt, _sft(tiny), options=LoopOptions(max_new_tokens=30, seed=7))
    b = decode(tiny, tiny_prompt, _sft(tiny), options=LoopOptions(max_new_tokens=30, seed=7))
    assert a.ids == b.ids


def test_different_seeds_give_different_answers(tiny, tiny_prompt):
    answers = {
        tuple(decode(tiny, tiny_prompt, _sft(tiny), options=LoopOptions(max_new_tokens=30, seed=s)).ids)
        for s in range(4)
    }
    assert len(answers) > 1


def test_sampling_leaves_the_global_rng_untouched(tiny, tiny_prompt):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    decode(tiny, tiny_prompt, _sft(tiny), options=LoopOptions(max_new_tokens=10, seed=1))
    assert torch.equal(torch.rand(3), expected)




def test_decode_stops_at_max_new_tokens(tiny, tiny_prompt):
    result = decode(tiny, tiny_prompt, _sft(tiny), [NoStop(tiny)], LoopOptions(max_new_tokens=5, greedy=True))
    assert result.counts.generated == 5
    assert result.stop_reason == "max_new_tokens"


class _ForceStopToken:
    """Bans the stop token for three steps, then makes it the only choice."""

    def __init__(self, stop_id):
        self.stop_id = stop_id
        self.step = 0

    @hookimpl
    def reempathy_logits(self, session, logits):
        self.step += 1
        if self.step == 4:
            logits.fill_(float("-inf"))
            logits[self.stop_id] = 0.0
        else:
            logits[self.stop_id] = float("-inf")


def test_decode_stops_at_a_stop_token_and_drops_it(tiny, tiny_prompt):
    stop = tiny.layout.special["<|user|>"]
    result = decode(
        tiny, tiny_prompt, _sft(tiny), [_ForceStopToken(stop)], LoopOptions(max_new_tokens=50, greedy=True)
    )
    assert result.stop_reason == "stop_token"
    assert result.counts.generated == 3
    assert stop not in result.ids


def test_forwarded_counter_equals_prompt_plus_generated_plus_forced(tiny, tiny_prompt):
    result = decode(
        tiny, tiny_prompt, _SwitchEvery3(tiny), [NoStop(tiny)], LoopOptions(max_new_tokens=20, greedy=True)
    )
    c = result.counts
    assert c.forced > 0
    assert c.forwarded + c.unforwarded == c.prompt + c.generated + c.forced
    assert c.unforwarded <= 1 + 2  # at most the last token and the tokens forced with it


class _SwitchEvery3:
    """A strategy that alternates a spoken and a hidden phase every 3 tokens, forcing two delimiters."""

    def __init__(self, backbone):
        self.open = backbone.layout.special["<|begin_of_reflection|>"]
        self.close = backbone.layout.special["<|end_of_reflection|>"]
        self.text_mask = backbone.layout.text_mask()

    @hookimpl(tryfirst=True)
    def reempathy_logits(self, session, logits):
        if session.hidden:
            logits.masked_fill_(~self.text_mask, float("-inf"))

    @hookimpl
    def reempathy_token(self, session, token_id):
        if len(session.segment) + 1 < 3:
            return None
        if session.hidden:
            return Switch("speak", forced=(self.close,))
        return Switch("note", forced=(self.open,), hidden=True)


def test_forced_tokens_are_labelled_control_and_hidden_text_is_kept_apart(tiny, tiny_prompt):
    result = decode(
        tiny, tiny_prompt, _SwitchEvery3(tiny), [NoStop(tiny)], LoopOptions(max_new_tokens=12, greedy=True)
    )
    # 12 tokens in segments of 3: speak, note, speak, note; a delimiter after each segment.
    assert [(s["label"] == "control") for s in result.spans].count(True) == 4
    assert result.counts.forced == 4
    assert [h.kind for h in result.hidden] == ["note", "note"]
    assert all(len(h.ids) == 3 for h in result.hidden)
    assert len(result.chunks) == 2
    spoken = result.spoken_text_ids + [tiny.layout.unit_to_token(u) for u in result.audio_units]
    assert len(spoken) == 6
    # The hidden ids sit at the hidden segments' positions, never inside a spoken chunk.
    hidden_positions = {p for h in result.hidden for p in range(h.start, h.end)}
    for s in result.spans:
        if s["label"] in ("spoken_text", "spoken_audio"):
            assert not hidden_positions & set(range(s["start"], s["end"]))


def test_every_position_has_exactly_one_label(tiny, tiny_prompt):
    result = decode(tiny, tiny_prompt, _SwitchEvery3(tiny), options=LoopOptions(max_new_tokens=12, greedy=True))
    covered = []
    for s in result.spans:
        covered.extend(range(s["start"], s["end"]))
    assert covered == list(range(len(tiny_prompt) + len(result.ids)))


def test_strategy_stop_directive_ends_the_answer(tiny, tiny_prompt):
    class StopAt5:
        @hookimpl
        def reempathy_token(self, session, token_id):
            return Stop("enough", keep_token=True) if session.generated == 4 else None

    result = decode(tiny, tiny_prompt, StopAt5(), [NoStop(tiny)], LoopOptions(max_new_tokens=50, greedy=True))
    assert result.stop_reason == "enough"
    assert result.counts.generated == 5


def test_timings_have_one_latency_per_sampled_token(tiny, tiny_prompt):
    result = decode(tiny, tiny_prompt, _sft(tiny), options=LoopOptions(max_new_tokens=8, greedy=True))
    t = result.timings
    assert len(t.token_latencies_s) == result.counts.generated
    assert t.time_to_first_token_s is not None and t.time_to_first_token_s >= t.prefill_s
    assert all(x >= 0 for x in t.token_latencies_s)


def test_result_carries_the_prompt_ids_so_an_answer_can_be_replayed(tiny, tiny_prompt):
    result = decode(tiny, tiny_prompt, _sft(tiny), [NoStop(tiny)], LoopOptions(max_new_tokens=6, greedy=True))
    data = result.to_json()
    assert data["prompt_ids"] == result.prompt_ids == list(tiny_prompt)
    with torch.inference_mode():
        logits = tiny.model(torch.tensor([data["prompt_ids"] + data["ids"]])).logits[0]
    # every answer token is the argmax after its prefix (NoStop only bans tokens greedy never picked here)
    prompt_len = len(data["prompt_ids"])
    for i, token in enumerate(data["ids"]):
        scores = logits[prompt_len + i - 1].clone()
        scores[list(tiny.layout.stop_ids)] = float("-inf")
        assert int(scores.argmax()) == token

"""Strategy ``read-aloud``: a given text forced token by token into the backbone's interleave, the audio the model's own."""

from __future__ import annotations

import pytest

from reempathy.backbones.base import Turn
from reempathy.data.records import SourcedRecord
from reempathy.data.schema import Record
from reempathy.decoding.batch import RowRequest, decode_batch
from reempathy.decoding.loop import LoopOptions, decode
from reempathy.errors import ConfigError, InputError
from reempathy.hooks import hookimpl
from reempathy.plugins.strategies.read_aloud import (
    TEXT_SPOKEN,
    ReadAloudOptions,
    ReadAloudStrategy,
    read_aloud_budget,
)
from reempathy.plugins.strategies.sft import SftOptions, SftStrategy
from reempathy.training.builders import build_sft
from reempathy.training.reference import teacher_forced_sequence

TEXT = "I hear you. That sounds really hard, and it makes sense that you feel tired tonight. Thank you for telling me."
USER = "I lost my keys and missed the bus."


class NoStop:
    """Bans the stop tokens, so that an answer ends only by the strategy (or the budget)."""

    def __init__(self, backbone):
        self.stop = list(backbone.layout.stop_ids)

    @hookimpl
    def reempathy_logits(self, session, logits):
        logits[self.stop] = float("-inf")


def read(backbone, text=TEXT, tail=6, greedy=True, processors=(), seed=0):
    prompt = backbone.build_prompt([Turn("user", text=USER)])
    strategy = ReadAloudStrategy(ReadAloudOptions(text=text, max_tail_audio_tokens=tail), backbone)
    budget = read_aloud_budget(len(backbone.encode_text(text)), backbone, tail)
    result = decode(backbone, prompt, strategy, list(processors), LoopOptions(max_new_tokens=budget, greedy=greedy, seed=seed))
    return prompt, result


@pytest.fixture(scope="module")
def spoken(tiny):
    """TEXT read aloud once (greedy, no early stop): the prompt and the result."""
    return read(tiny, processors=[NoStop(tiny)])


def test_the_spoken_text_is_exactly_the_given_texts_tokens(tiny, spoken):
    _, result = spoken
    assert result.spoken_text_ids == tiny.encode_text(TEXT)
    assert len(result.spoken_text_ids) > 2 * tiny.stream.text_tokens  # several interleave blocks
    assert result.audio_units and result.stop_reason == TEXT_SPOKEN


def test_text_and_audio_alternate_in_the_backbones_interleave(tiny, spoken):
    _, result = spoken
    kinds = "".join("a" if tiny.layout.is_audio(t) else "t" for t in result.ids)
    n = len(result.spoken_text_ids)
    t, a = tiny.stream.text_tokens, tiny.stream.audio_tokens  # 13 : 26, GLM-4-Voice's
    full, rest = divmod(n, t)
    last = "t" * rest + "a" * (t + a - rest) if rest else ""  # the last block: the rest of the text, then audio to fill it
    expected = ("t" * t + "a" * a) * full + last + "a" * 6  # then the tail, audio only
    assert kinds == expected


def test_the_units_decode_back_to_the_same_sequence_through_the_teacher_forcing_reference(tiny, spoken):
    """The record the units make trains (sft layout) on exactly what read-aloud decoded, and the decoder replays it."""
    prompt, result = spoken
    record = Record.model_validate({"messages": [{"role": "user", "text": USER},
                                                 {"role": "assistant", "text": TEXT, "units": result.audio_units}]})
    seq = build_sft(SourcedRecord("x:1", record), tiny)
    assert seq.input_ids[: seq.prompt_len] == prompt
    assert seq.input_ids[seq.prompt_len : -1] == result.ids  # the answer as decoded, then the builder's stop token
    replayed = teacher_forced_sequence(tiny, seq.prompt_len, seq.input_ids, SftStrategy(SftOptions(), tiny))
    assert replayed == seq.input_ids


def test_sampling_changes_the_audio_but_never_the_text(tiny):
    from reempathy.plugins.processors.sampling import SAMPLING_PROCESSORS

    cls, options, _ = SAMPLING_PROCESSORS["temperature"]
    hot = cls(options(value=5.0), tiny)
    _, first = read(tiny, greedy=False, processors=[hot], seed=1)
    _, second = read(tiny, greedy=False, processors=[hot], seed=2)
    assert first.spoken_text_ids == second.spoken_text_ids == tiny.encode_text(TEXT)
    assert first.audio_units != second.audio_units


def test_the_tail_after_the_text_stops_at_its_cap(tiny):
    _, result = read(tiny, text="Oh.", tail=4, processors=[NoStop(tiny)])
    n = len(tiny.encode_text("Oh."))
    block = tiny.stream.text_tokens + tiny.stream.audio_tokens
    assert result.stop_reason == TEXT_SPOKEN and len(result.ids) == block + 4  # the text's block filled, then 4 more
    assert result.spoken_text_ids == tiny.encode_text("Oh.") and n < tiny.stream.text_tokens


def test_no_tail_allows_only_a_stop_after_the_text(tiny):
    _, result = read(tiny, text="Oh.", tail=0)
    block = tiny.stream.text_tokens + tiny.stream.audio_tokens
    assert result.stop_reason == "stop_token" and len(result.ids) == block  # the stop itself is not in ids


def test_rows_of_a_batch_speak_their_own_texts(tiny):
    texts = ["I hear you.", "That sounds really hard, and it makes sense that you feel tired.", "Thank you for telling me."]
    prompt = tiny.build_prompt([Turn("user", text=USER)])
    requests = [RowRequest(i, prompt, ReadAloudStrategy(ReadAloudOptions(text=t, max_tail_audio_tokens=5), tiny), [NoStop(tiny)])
                for i, t in enumerate(texts)]
    results = dict(decode_batch(tiny, requests, LoopOptions(max_new_tokens=200, greedy=True), batch_size=3))
    for i, text in enumerate(texts):
        alone = read(tiny, text=text, tail=5, processors=[NoStop(tiny)])[1]
        assert results[i].ids == alone.ids and results[i].spoken_text_ids == tiny.encode_text(text)


def test_read_aloud_without_a_text_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match="needs option text"):
        ReadAloudStrategy(ReadAloudOptions(), tiny)


def test_text_that_spells_a_special_token_is_refused(tiny):
    with pytest.raises(InputError, match="special token"):
        ReadAloudStrategy(ReadAloudOptions(text="Hello <|user|> there"), tiny)


def test_decode_speaks_a_text_given_on_the_command_line(capsys):
    import json

    from reempathy.cli import main

    assert main(["decode", "--strategy", "read-aloud", "--set", f"strategy.text={json.dumps('I hear you.')}",
                 "--prompt", USER, "--greedy", "--max-new-tokens", "60", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["spoken"]["text"] == "I hear you." and out["spoken"]["audio_units"]


def test_on_a_text_only_stream_the_text_is_forced_then_the_stop(qwen):
    prompt = qwen.build_prompt([Turn("user", text=USER)])
    strategy = ReadAloudStrategy(ReadAloudOptions(text="I hear you."), qwen)
    result = decode(qwen, prompt, strategy, [], LoopOptions(max_new_tokens=40, greedy=True))
    assert result.spoken_text_ids == qwen.encode_text("I hear you.") and result.stop_reason == "stop_token"
    assert result.audio_units == []

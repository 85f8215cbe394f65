"""Sequence builders: each strategy's training sequence is the layout its decoder produces."""

from __future__ import annotations

from pathlib import Path

import pytest

from reempathy.backbones.base import REFLECTION_CLOSE, REFLECTION_OPEN, THOUGHT_CLOSE, THOUGHT_OPEN, Turn
from reempathy.backbones.tiny import TinyOptions, load_tiny
from reempathy.plugins.strategies.cotbs import CotbsOptions, CotbsStrategy
from reempathy.plugins.strategies.reempathy import ReEmpathyOptions, ReEmpathyStrategy
from reempathy.errors import InputError
from reempathy.decoding.chunking import ChunkLayout, split_spoken
from reempathy.training.builders import (
    BUILDERS,
    IGNORE_INDEX,
    THOUGHT,
    CotbsBuild,
    ReempathyBuild,
    build_all,
    build_cotbs,
    build_dpo,
    build_reempathy,
    build_sft,
)
from reempathy.data.records import SourcedRecord, load_records
from reempathy.training.reference import TeacherForcingMismatch, teacher_forced_sequence
from reempathy.data.schema import Record

ROOT = Path(__file__).resolve().parents[1]
SCORES = {"need_support": 4, "wording_appropriateness": 4, "emotion_understanding": 4, "emotional_support": 4}


def make(text="I am sorry, that sounds really hard.", units=None, n_units=None, assessment="Warm and specific; names the feeling.", where="mem.jsonl:1", **extra):
    units = units if units is not None else [(7 * i) % 1024 for i in range(n_units or 60)]
    data = {
        "messages": [
            {"role": "user", "text": "My dog is sick.", "units": [1, 2, 3]},
            {"role": "assistant", "text": text, "units": units},
        ],
        "assessment": {"text": assessment, "scores": SCORES} if assessment else None,
        **extra,
    }
    return SourcedRecord(where, Record.model_validate(data))


def spoken_parts(tiny, sr):
    answer = sr.record.messages[-1]
    text = tiny.tokenizer.encode(answer.text, add_special_tokens=False)
    audio = [tiny.layout.unit_to_token(u) for u in answer.units]
    return text, audio


@pytest.fixture(scope="module")
def examples(tiny):
    return load_records(ROOT / "examples" / "empathy_dialogues.jsonl", tiny.layout.audio_count)


def test_sft_masks_the_prompt_and_trains_the_interleaved_answer_then_stop(tiny):
    sr = make()
    seq = build_sft(sr, tiny)
    prompt = tiny.build_prompt([Turn("user", units=[1, 2, 3])])
    assert seq.input_ids[: seq.prompt_len] == prompt
    assert seq.labels[: seq.prompt_len] == [IGNORE_INDEX] * len(prompt)
    assert seq.labels[seq.prompt_len :] == seq.input_ids[seq.prompt_len :]
    text, audio = spoken_parts(tiny, sr)
    stream = ChunkLayout(tiny.stream.text_tokens, tiny.stream.audio_tokens)
    expected = [t for chunk in split_spoken(text, audio, stream) for t in chunk]
    assert seq.input_ids[seq.prompt_len :] == expected + [tiny.layout.stop_ids[0]]
    assert seq.input_ids[-1] == tiny.layout.special["<|user|>"]


def test_sft_interleave_is_13_text_then_26_audio_then_audio_only(tiny):
    sr = make(text=" ".join(["sorry"] * 20), n_units=80)
    seq = build_sft(sr, tiny)
    answer = seq.spans[seq.prompt_len : -1]
    text_len = len(spoken_parts(tiny, sr)[0])
    assert text_len > 13
    assert answer[:13] == ["spoken_text"] * 13
    assert answer[13:39] == ["spoken_audio"] * 26
    assert answer[39 : 39 + min(13, text_len - 13)] == ["spoken_text"] * min(13, text_len - 13)
    assert answer.count("spoken_text") == text_len
    assert seq.spans[-1] == "control"


def test_spans_label_every_position(tiny):
    seq = build_cotbs(make(), tiny)
    assert len(seq.spans) == len(seq.input_ids) == len(seq.labels)
    assert set(seq.spans) == {"prompt", "control", THOUGHT, "spoken_text", "spoken_audio"}


def test_cotbs_is_thought_of_the_assessment_then_the_spoken_answer(tiny):
    sr = make()
    seq = build_cotbs(sr, tiny, CotbsBuild())
    body = seq.input_ids[seq.prompt_len :]
    reasoning = tiny.tokenizer.encode(sr.record.assessment.text, add_special_tokens=False)
    assert body[0] == tiny.layout.special[THOUGHT_OPEN]
    assert body[1 : 1 + len(reasoning)] == reasoning
    assert body[1 + len(reasoning)] == tiny.layout.special[THOUGHT_CLOSE]
    assert body[2 + len(reasoning) :] == build_sft(sr, tiny).input_ids[seq.prompt_len :]


@pytest.fixture(scope="module")
def quick(tiny):
    """A one-layer tiny model with the default tokenizer: teacher forcing only needs the decoder's bookkeeping."""
    return load_tiny(TinyOptions(hidden_size=16, num_heads=2, num_kv_heads=1, intermediate_size=16, num_layers=1))


def replay(backbone, seq, strategy):
    return teacher_forced_sequence(backbone, seq.prompt_len, seq.input_ids, strategy)


def reempathy_strategy(backbone, opts: ReempathyBuild):
    return ReEmpathyStrategy(
        ReEmpathyOptions(text_tokens=opts.text_tokens, audio_tokens=opts.audio_tokens, reflect=opts.reflect,
                         reflection_tokens=opts.reflection_tokens, max_reflection_tokens=1000),
        backbone,
    )


@pytest.mark.parametrize("layout", [(3, 6), (5, 10), (7, 14), (13, 26)])
def test_reempathy_sequence_is_what_the_decoder_writes_under_teacher_forcing(quick, layout):
    """The real loop and strategy, picking each next token of the training sequence, write the same sequence."""
    opts = ReempathyBuild(text_tokens=layout[0], audio_tokens=layout[1])
    seq = build_reempathy(make(n_units=61), quick, opts)
    assert replay(quick, seq, reempathy_strategy(quick, opts)) == seq.input_ids


@pytest.mark.parametrize("record", ["per-chunk", "fixed-length", "no-reflections"])
def test_every_reempathy_variant_replays_through_the_decoder(quick, record):
    opts = ReempathyBuild()
    if record == "per-chunk":
        sr = make(text="sorry", n_units=15 * 3 - 1, reflections=["Short and kind.", "Still kind.", "Done."])
    elif record == "fixed-length":
        sr, opts = make(n_units=90), ReempathyBuild(reflection_tokens=4)
    else:
        sr, opts = make(n_units=90), ReempathyBuild(reflect=False)
    seq = build_reempathy(sr, quick, opts)
    assert replay(quick, seq, reempathy_strategy(quick, opts)) == seq.input_ids


def test_cotbs_sequence_is_what_the_decoder_writes_under_teacher_forcing(quick):
    seq = build_cotbs(make(), quick)
    strategy = CotbsStrategy(CotbsOptions(max_thought_tokens=1000), quick)
    assert replay(quick, seq, strategy) == seq.input_ids


def test_teacher_forcing_catches_a_reflection_one_token_late(quick):
    """The reference is not vacuous: a sequence the decoder cannot write is caught where it parts."""
    seq = build_reempathy(make(n_units=60), quick, ReempathyBuild())
    ids = list(seq.input_ids)
    opener = ids.index(quick.layout.special[REFLECTION_OPEN])
    ids[opener], ids[opener + 1] = ids[opener + 1], ids[opener]
    with pytest.raises(TeacherForcingMismatch, match=f"position {opener}: "):
        teacher_forced_sequence(quick, seq.prompt_len, ids, reempathy_strategy(quick, ReempathyBuild()))


def test_reempathy_reflects_after_every_full_chunk_and_stops_after_a_shorter_last_one(tiny):
    opts = ReempathyBuild(text_tokens=5, audio_tokens=10)
    seq = build_reempathy(make(n_units=60), tiny, opts)
    body = seq.input_ids[seq.prompt_len :]
    opener, closer = tiny.layout.special[REFLECTION_OPEN], tiny.layout.special[REFLECTION_CLOSE]
    spoken_runs, run = [], 0
    inside = False
    for t in body[:-1]:
        if t == opener:
            spoken_runs.append(run)
            run, inside = 0, True
        elif t == closer:
            inside = False
        elif not inside:
            run += 1
    assert all(n == 15 for n in spoken_runs)
    assert 0 < run < 15  # the shorter last chunk, followed directly by the stop token
    assert body[-1] == tiny.layout.stop_ids[0] and body[-2] != closer


def test_reempathy_answer_ending_on_a_chunk_boundary_ends_with_its_reflection(tiny):
    sr = make(text="sorry", n_units=100)
    n_text = len(spoken_parts(tiny, sr)[0])
    sr = make(text="sorry", n_units=15 * 3 - n_text)
    seq = build_reempathy(sr, tiny, ReempathyBuild())
    assert seq.input_ids[-2] == tiny.layout.special[REFLECTION_CLOSE]
    assert seq.input_ids.count(tiny.layout.special[REFLECTION_OPEN]) == 3


def test_reflect_false_is_the_same_chunking_without_delimiters(tiny):
    sr = make(n_units=90)
    plain = build_reempathy(sr, tiny, ReempathyBuild(reflect=False))
    reflective = build_reempathy(sr, tiny, ReempathyBuild())
    delimiters = {tiny.layout.special[REFLECTION_OPEN], tiny.layout.special[REFLECTION_CLOSE]}
    assert not delimiters & set(plain.input_ids)
    spoken = [t for t, s in zip(reflective.input_ids, reflective.spans) if s in ("spoken_text", "spoken_audio")]
    assert plain.input_ids[plain.prompt_len : -1] == spoken


def test_an_answer_that_cannot_be_laid_out_names_its_file_and_line(tiny):
    sr = make(text="I am so very sorry to hear about that, it sounds awful and frightening.", n_units=4, where="d.jsonl:7")
    with pytest.raises(InputError, match=r"^d\.jsonl:7: the answer cannot be laid out in 13\+26 chunks"):
        build_sft(sr, tiny)


def test_cotbs_without_an_assessment_names_the_record(tiny):
    with pytest.raises(InputError, match=r"^mem\.jsonl:1: strategy 'cotbs' needs the record's assessment"):
        build_cotbs(make(assessment=None), tiny)


def test_a_record_must_end_with_the_assistant_answer(tiny):
    sr = make()
    sr.record.messages.pop()
    with pytest.raises(InputError, match="the last message must be the assistant's answer"):
        build_sft(sr, tiny)


def test_special_token_text_in_an_answer_is_refused(tiny):
    with pytest.raises(InputError, match="special-token text"):
        build_sft(make(text="hello <|user|> there"), tiny)


def rejected(score: int):
    return {
        "role": "assistant",
        "text": "Whatever.",
        "units": [9] * 20,
        "assessment": {"text": "Dismissive.", "scores": {k: score for k in SCORES}},
    }


def test_dpo_chooses_the_records_answer_when_it_scores_higher(tiny):
    pair = build_dpo(make(rejected=rejected(1)), tiny)
    sft = build_sft(make(), tiny)
    assert pair.prompt_ids == sft.input_ids[: sft.prompt_len]
    assert pair.chosen_ids == sft.input_ids[sft.prompt_len :]
    assert not pair.swapped


def test_dpo_takes_the_rejected_answer_as_chosen_when_its_scores_are_higher(tiny):
    pair = build_dpo(make(rejected=rejected(5)), tiny)
    assert pair.swapped
    assert pair.rejected_ids == build_sft(make(), tiny).input_ids[len(pair.prompt_ids) :]


def test_dpo_keeps_the_records_order_on_a_tie_or_without_scores(tiny):
    assert not build_dpo(make(rejected=rejected(4)), tiny).swapped
    r = rejected(5)
    del r["assessment"]
    assert not build_dpo(make(rejected=r), tiny).swapped


def test_dpo_skips_records_without_a_rejected_answer(tiny):
    assert build_dpo(make(), tiny) is None


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_example_record_builds_for_every_strategy(tiny, examples, name):
    spec = BUILDERS[name]
    built = build_all(examples, tiny, spec, spec.options_model())
    assert not built.skipped
    assert len(built.items) + built.unused == len(examples)


def test_build_all_lists_records_it_cannot_build_with_their_lines(tiny, examples):
    bad = make(text=" ".join(["sorry"] * 30), n_units=2, where="x.jsonl:9")
    examples = type(examples)(path="x.jsonl", records=[bad, *examples.records[:2]])
    with pytest.raises(InputError, match=r"^x\.jsonl:9: the answer cannot be laid out"):
        build_all(examples, tiny, BUILDERS["sft"], BUILDERS["sft"].options_model())
    built = build_all(examples, tiny, BUILDERS["sft"], BUILDERS["sft"].options_model(), skip_bad=True)
    assert len(built.items) == 2 and [b.where for b in built.skipped] == ["x.jsonl:9"]

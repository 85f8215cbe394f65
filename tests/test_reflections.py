"""ReEmpathy's reflections in training: per-chunk reflections after their chunk, assessments split between words,
fixed-length reflections as decoding writes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reempathy.backbones.base import REFLECTION_CLOSE, REFLECTION_OPEN
from reempathy.decoding.loop import LoopOptions, decode
from reempathy.errors import InputError
from reempathy.decoding.chunking import split_spoken
from reempathy.plugins.strategies.reempathy import ReEmpathyOptions, ReEmpathyStrategy
from reempathy.training.builders import BUILDERS, REFLECTION, ReempathyBuild, build_all, build_reempathy
from reempathy.data.records import RecordSet, SourcedRecord, load_records
from reempathy.training.reflections import fit_to_length, space_token, split_at_boundaries
from reempathy.data.schema import Record

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "empathy_dialogues.jsonl"
ASSESSMENT = "The user feels ashamed. The reply names the hurt and gently challenges the word stupid."
SCORES = {"need_support": 4, "wording_appropriateness": 4, "emotion_understanding": 4, "emotional_support": 4}


def full_chunks(tiny, k, text="sorry"):
    """Audio units that make ``text`` fill exactly ``k`` full 5+10 chunks."""
    return 15 * k - len(tiny.tokenizer.encode(text, add_special_tokens=False))


def record(text="sorry", n_units=43, assessment=ASSESSMENT, reflections=None, where="mem.jsonl:1", layout=None):
    data = {
        "messages": [
            {"role": "user", "text": "My dog is sick.", "units": [1, 2, 3]},
            {"role": "assistant", "text": text, "units": [(7 * i) % 1024 for i in range(n_units)]},
        ],
        "assessment": {"text": assessment, "scores": SCORES} if assessment else None,
    }
    if reflections is not None:
        data["reflections"] = reflections
    if layout is not None:
        data["reflections_layout"] = layout
    return SourcedRecord(where, Record.model_validate(data))


def reflections_of(tiny, seq):
    """Each reflection's (ids, labels) and the spoken ids just before its opener."""
    opener, closer = tiny.layout.special[REFLECTION_OPEN], tiny.layout.special[REFLECTION_CLOSE]
    out, start, spoken = [], None, []
    for i, token in enumerate(seq.input_ids):
        if token == opener:
            start = i + 1
        elif token == closer:
            out.append((seq.input_ids[start:i], seq.spans[start:i], spoken))
            spoken, start = [], None
        elif start is None and seq.spans[i] in ("spoken_text", "spoken_audio"):
            spoken.append(token)
    return out


def count_words(tiny):
    return lambda word: len(tiny.tokenizer.encode(word, add_special_tokens=False))


# --- per-chunk reflections -----------------------------------------------------------------


def test_per_chunk_reflections_land_after_the_chunk_they_follow(tiny):
    notes = ["Opens with sorrow.", "Keeps the tone soft.", "Ends without advice."]
    sr = record(n_units=full_chunks(tiny, 3), reflections=notes)
    seq = build_reempathy(sr, tiny, ReempathyBuild())
    answer = sr.record.messages[-1]
    chunks = split_spoken(tiny.tokenizer.encode(answer.text, add_special_tokens=False),
                          [tiny.layout.unit_to_token(u) for u in answer.units], ReempathyBuild().chunk_layout())
    found = reflections_of(tiny, seq)
    assert len(chunks) == len(found) == 3
    for k, (ids, labels, spoken_before) in enumerate(found):
        assert ids == tiny.tokenizer.encode(notes[k], add_special_tokens=False)
        assert labels == [REFLECTION] * len(ids)
        assert spoken_before == chunks[k]
    assert seq.labels[seq.prompt_len:] == seq.input_ids[seq.prompt_len:]  # reflections are trained on


def test_per_chunk_reflections_take_precedence_over_the_assessment(tiny):
    seq = build_reempathy(record(n_units=full_chunks(tiny, 3), reflections=["One.", "Two.", "Three."]), tiny, ReempathyBuild())
    texts = [tiny.tokenizer.decode(ids) for ids, _, _ in reflections_of(tiny, seq)]
    assert texts == ["One.", "Two.", "Three."]


def test_reflections_that_do_not_match_the_full_chunks_name_the_line(tiny):
    with pytest.raises(InputError, match=r"^d\.jsonl:4: 2 reflections for 3 full spoken chunks of 5\+10 tokens"):
        build_reempathy(record(n_units=full_chunks(tiny, 3), reflections=["One.", "Two."], where="d.jsonl:4"), tiny, ReempathyBuild())


def test_lenient_builds_skip_mismatched_reflections_and_count_them(tiny):
    n = full_chunks(tiny, 3)
    records = RecordSet("d.jsonl", [record(n_units=n, where="d.jsonl:1"), record(n_units=n, reflections=["One."], where="d.jsonl:2"),
                                    record(n_units=n, reflections=["A.", "B.", "C.", "D."], where="d.jsonl:3")])
    spec = BUILDERS["reempathy"]
    with pytest.raises(InputError, match=r"^2 bad records in d\.jsonl: d\.jsonl:2: 1 reflections"):
        build_all(records, tiny, spec, ReempathyBuild())
    built = build_all(records, tiny, spec, ReempathyBuild(), skip_bad=True)
    assert len(built.items) == 1 and [b.where for b in built.skipped] == ["d.jsonl:2", "d.jsonl:3"]


def test_reflections_for_another_layout_give_way_to_the_split_assessment(tiny):
    """Records keep their 5+10 reflections and still train other chunk sizes (the paper's sweep)."""
    sr = record(n_units=full_chunks(tiny, 3), reflections=["One.", "Two.", "Three."], layout="5+10")
    assert [tiny.tokenizer.decode(ids) for ids, _, _ in reflections_of(tiny, build_reempathy(sr, tiny, ReempathyBuild()))] == [
        "One.", "Two.", "Three."]
    other = build_reempathy(sr, tiny, ReempathyBuild(text_tokens=3, audio_tokens=6))
    texts = [tiny.tokenizer.decode(ids) for ids, _, _ in reflections_of(tiny, other)]
    assert " ".join(texts).split() == ASSESSMENT.split()


def test_reflections_for_another_layout_without_an_assessment_name_the_line(tiny):
    sr = record(n_units=full_chunks(tiny, 3), reflections=["One.", "Two.", "Three."], layout="5+10", assessment=None,
                where="d.jsonl:2")
    with pytest.raises(InputError, match=r"^d\.jsonl:2: the reflections were written for 5\+10 chunks, training uses 3\+6"):
        build_reempathy(sr, tiny, ReempathyBuild(text_tokens=3, audio_tokens=6))


def test_every_example_record_with_reflections_has_one_per_full_chunk_of_its_layout(tiny):
    records = [r for r in load_records(EXAMPLES, tiny.layout.audio_count).records if r.record.reflections]
    assert len(records) >= 10
    for sr in records:
        text, audio = sr.record.reflections_layout.split("+")
        seq = build_reempathy(sr, tiny, ReempathyBuild(text_tokens=int(text), audio_tokens=int(audio)))
        assert [tiny.tokenizer.decode(ids) for ids, _, _ in reflections_of(tiny, seq)] == sr.record.reflections


def test_an_empty_reflection_is_a_bad_record_naming_its_line(tmp_path, tiny):
    data = json.loads(json.dumps({"messages": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "hey", "units": [1] * 9}],
                                  "reflections": ["fine", "  "]}))
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(data) + "\n")
    with pytest.raises(InputError, match=rf"{path}:1: reflections: reflection 2 is empty"):
        load_records(path, tiny.layout.audio_count)


def test_a_short_answer_gets_no_reflection(tiny):
    seq = build_reempathy(record(n_units=8), tiny, ReempathyBuild())  # 1 text + 8 audio: less than one chunk
    assert tiny.layout.special[REFLECTION_OPEN] not in seq.input_ids
    assert seq.input_ids[-1] == tiny.layout.stop_ids[0]
    assert build_reempathy(record(n_units=8, reflections=[]), tiny, ReempathyBuild()).input_ids == seq.input_ids


# --- a global assessment split into reflections ------------------------------------------


def test_an_assessment_is_split_at_its_sentence_ends_first(tiny):
    assert split_at_boundaries(ASSESSMENT, 2, count_words(tiny)) == [
        "The user feels ashamed.",
        "The reply names the hurt and gently challenges the word stupid.",
    ]


@pytest.mark.parametrize("parts", range(1, 16))
def test_an_assessment_is_split_only_between_words(tiny, parts):
    text = "The user  feels ashamed; the reply is warm, names the hurt, and gently challenges the word \u201cstupid\u201d."
    pieces = split_at_boundaries(text, parts, count_words(tiny))
    assert len(pieces) == parts
    words = text.split()
    assert [w for p in pieces for w in p.split()] == words  # nothing lost, nothing cut: every word whole
    assert all(p == p.strip() for p in pieces)
    assert all(pieces[: min(parts, len(words))])  # no empty piece while there are words to give


def test_more_sentences_cut_into_fewer_pieces_keep_sentences_whole(tiny):
    text = "Warm. Names the fear. Offers a step. Ends with a question? Yes."
    for parts in (1, 2, 3, 4, 5):
        pieces = split_at_boundaries(text, parts, count_words(tiny))
        assert all(p.endswith((".", "?")) for p in pieces), pieces


def test_an_assessment_with_fewer_words_than_chunks_leaves_the_last_reflections_empty(tiny):
    assert split_at_boundaries("Kind and brief.", 5, count_words(tiny)) == ["Kind", "and", "brief.", "", ""]


def test_built_reflections_from_an_assessment_are_whole_words_in_order(tiny):
    seq = build_reempathy(record(n_units=full_chunks(tiny, 6)), tiny, ReempathyBuild())
    texts = [tiny.tokenizer.decode(ids) for ids, _, _ in reflections_of(tiny, seq)]
    assert len(texts) == 6
    assert " ".join(texts).split() == ASSESSMENT.split()


# --- fixed-length reflections ---------------------------------------------------------------


def test_fixed_length_cuts_after_the_last_whole_word_that_fits_then_pads_with_spaces(tiny):
    encode = lambda t: tiny.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    space = space_token(tiny)
    ids = fit_to_length("The user feels ashamed and alone tonight.", 6, encode, space)
    assert len(ids) == 6
    text = tiny.tokenizer.decode(ids)
    kept = text.rstrip()
    assert "The user feels ashamed and alone tonight.".startswith(kept)
    assert kept.split() == "The user feels ashamed and alone tonight.".split()[: len(kept.split())]
    assert ids[len(encode(kept)):] == [space] * (6 - len(encode(kept)))


def test_fixed_length_pads_a_short_reflection_with_spaces(tiny):
    encode = lambda t: tiny.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    ids = fit_to_length("Warm.", 8, encode, space_token(tiny))
    assert ids == encode("Warm.") + [space_token(tiny)] * (8 - len(encode("Warm.")))


def test_fixed_length_cuts_inside_a_word_only_when_the_first_word_is_too_long(tiny):
    encode = lambda t: tiny.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    word = "Unquestionablyoverwhelming"
    assert fit_to_length(word, 2, encode, space_token(tiny)) == encode(word)[:2]


@pytest.mark.parametrize("length", [1, 3, 7])
def test_fixed_length_training_and_decoding_give_every_reflection_the_same_length(tiny, tiny_prompt, length):
    seq = build_reempathy(record(n_units=full_chunks(tiny, 6)), tiny, ReempathyBuild(reflection_tokens=length))
    trained = [len(ids) for ids, _, _ in reflections_of(tiny, seq)]
    strategy = ReEmpathyStrategy(ReEmpathyOptions(reflection_tokens=length), tiny)
    result = decode(tiny, tiny_prompt, strategy, [], LoopOptions(max_new_tokens=80, seed=1))
    end = len(tiny_prompt) + result.counts.generated + result.counts.forced
    decoded = [len(h.ids) for h in result.hidden if h.end < end]  # closed ones: the budget may end the last
    assert trained and decoded
    assert set(trained) == set(decoded) == {length}

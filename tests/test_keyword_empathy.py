"""``keyword-empathy``: the word-list heuristic (NOT the paper's EmpathyEval), its rule by hand and through `reempathy eval`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from evaluation_helpers import run_tiny
from reempathy.cli import main
from reempathy.evaluation.base import EvalItem
from reempathy.evaluation.keywords import LISTS, KeywordEmpathy, KeywordEmpathyOptions, find_cues, keyword_scores, words

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real run of the tiny backbone (`reempathy run`, no speech)."""
    return run_tiny(tmp_path_factory.mktemp("tiny"), ["I lost my keys.", "My dog is sick."])


def scores(text: str) -> tuple[float, float, float, float]:
    s = keyword_scores(find_cues(text))
    return s["need_support"], s["wording_appropriateness"], s["emotion_understanding"], s["emotional_support"]


def test_a_warm_answer_with_every_kind_of_cue_scores_five_everywhere():
    text = "I hear you. It's okay to feel sad, and I'm here for you. Would you like to talk about it?"
    cues = find_cues(text)
    assert cues.found["acknowledge"] == ["i hear you", "it's okay to"]
    assert cues.found["emotion"] == ["feel", "sad"]
    assert cues.found["support"] == ["i'm here for you", "would you like", "talk about it"]
    # A=2 E=2 S=3 P=0 H=0: need 1+2+2, wording 3+2, emotion 1+2+2, support 1+1+3
    assert scores(text) == (5, 5, 5, 5)


def test_a_mixed_answer_scores_by_the_documented_rule():
    text = "That sounds hard. Maybe take a break, but honestly you are overreacting."
    # A=1 (that sounds) E=0 S=1 (take a break) P=1 (maybe) H=1 (overreacting)
    # need 1+2+1-2=2, wording 3+min(2,2)-2=3, emotion 1+2+0-1=2, support 1+1+1-2=1
    assert scores(text) == (2, 3, 2, 1)


def test_harsh_words_bring_every_dimension_to_the_floor():
    text = "Whatever. Just deal with it, it is not a big deal."
    assert find_cues(text).found["harsh"] == ["whatever", "deal with it", "not a big deal"]
    assert scores(text) == (1, 1, 1, 1)


def test_an_answer_without_cues_is_neutral_in_wording_and_lowest_elsewhere():
    assert scores("The bus leaves at nine from the main station.") == (1, 3, 1, 1)


def test_a_cue_counts_once_and_the_longest_phrase_wins_without_overlap():
    assert find_cues("sad, so sad, sad").found["emotion"] == ["sad"]
    cues = find_cues("I'm here for you")
    assert cues.found["support"] == ["i'm here for you"]  # not also "i'm here" or "here for you"


def test_negation_is_not_understood_as_documented():
    assert find_cues("I am not sad").found["emotion"] == ["sad"]


def test_curly_apostrophes_read_as_straight_ones():
    assert words("I’m here") == ["i'm", "here"]
    assert find_cues("I’m here").found["support"] == ["i'm here"]


def test_every_cue_is_found_on_its_own():
    for kind, phrases in LISTS.items():
        for phrase in phrases:
            assert find_cues(phrase).found[kind] == [" ".join(words(phrase))], (kind, phrase)


def test_an_answer_without_spoken_text_fails_and_is_not_scored():
    empty, said = KeywordEmpathy(KeywordEmpathyOptions()).evaluate(
        [EvalItem("e", [], "   "), EvalItem("s", [], "I hear you.")]
    )
    assert empty.scores == {} and "no spoken text" in empty.error
    assert said.ok and said.text.startswith("keyword heuristic, not EmpathyEval")


def test_keyword_empathy_scores_a_tiny_backbone_run_through_reempathy_eval(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    assert main(["eval", str(run), "--evaluator", "keyword-empathy", "--quiet"]) == 0
    docs = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    rows = [json.loads(x) for x in (run / "scores" / "keyword-empathy.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [d["id"] for d in docs]
    for row, doc in zip(rows, docs):
        text = doc["result"]["spoken"]["text"]
        if text.strip():
            assert row["scores"] == keyword_scores(find_cues(text)) and row["error"] is None
        else:
            assert row["scores"] == {} and "no spoken text" in row["error"]
    assert any(r["error"] is None for r in rows)


def test_keyword_empathy_takes_no_options(tiny_run, tmp_path, capsys):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    assert main(["eval", str(run), "--evaluator", "keyword-empathy", "--set", "lenient=true", "--quiet"]) == 2
    assert "lenient" in capsys.readouterr().err and not (run / "scores").exists()


def test_its_description_and_docs_say_it_is_not_the_papers_empathyeval():
    from reempathy.registry import default_discovery

    assert "NOT the paper's EmpathyEval" in default_discovery().registry.get("evaluator", "keyword-empathy").description
    docs = (ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8")
    assert "`keyword-empathy` is NOT the paper's EmpathyEval" in docs


def test_plugins_lists_keyword_empathy(capsys):
    assert main(["plugins"]) == 0
    assert "evaluator keyword-empathy  HEURISTIC, NOT the paper's EmpathyEval" in capsys.readouterr().out

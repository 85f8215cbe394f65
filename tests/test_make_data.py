"""``reempathy make-data``: records from an LLM endpoint (a stub chat-completions server on 127.0.0.1, no network)."""

from __future__ import annotations

import json
import shutil
import socket
import threading
from pathlib import Path

import pytest

from evaluation_helpers import ChatServer, user_text
from llm_stub import GOOD, DataLLM, step_of
from reempathy.cli import main
from reempathy.data.records import SourcedRecord
from reempathy.data.schema import Record
from reempathy.decoding.batch import row_seed
from reempathy.training.builders import build_sft
from reempathy.training.make_data import TEMPLATE_DIR, Item, hints


def make(server_url: str, out: Path, n: int, *extra: str) -> int:
    return main(["make-data", "--out", str(out), "--n", str(n), "--set", f"endpoint={json.dumps(server_url)}",
                 "--set", 'model="stub"', "--set", "backoff_s=0", "--quiet", *extra])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def item(i: int, seed: int = 0) -> Item:
    return Item(f"md-{i:06d}", i, row_seed(seed, f"md-{i:06d}"))


def test_each_record_is_a_scenario_a_dialogue_and_a_scored_assessment_in_the_training_schema(tmp_path, capsys):
    out = tmp_path / "made.jsonl"
    with ChatServer(DataLLM()) as server:
        assert make(server.url, out, 3) == 0
    records = read_jsonl(out)
    assert [r["id"] for r in records] == ["md-000001", "md-000002", "md-000003"]
    for i, r in enumerate(records, start=1):
        Record.model_validate(r)
        h = hints(item(i), 2)
        assert r["scenario"]["topic"] == h["topic"] and r["scenario"]["emotion"] == h["emotion"]
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"] * h["turns"]
        assert h["emotion"] in r["messages"][-1]["text"] and r["assessment"]["scores"] == GOOD
        assert r["language"] == "English" and "rejected" not in r
    assert "make-data: 3 of 3 records made" in capsys.readouterr().out
    assert not Path(f"{out}.partial").exists() and not Path(f"{out}.failures.jsonl").exists()


def test_the_prompts_carry_the_language_and_the_records_hints(tmp_path):
    out = tmp_path / "made.jsonl"
    with ChatServer(DataLLM()) as server:
        assert make(server.url, out, 1, "--language", "Mandarin Chinese", "--seed", "5") == 0
    bodies = server.requests
    assert all("Mandarin Chinese" in b["messages"][0]["content"] for b in bodies)  # the system prompt
    scenario = next(b for b in bodies if step_of(b) == "scenario")
    h = hints(item(1, seed=5), 2)
    assert f"topic: {h['topic']}. How they feel: {h['emotion']}." in user_text(scenario)
    assert "Write in Mandarin Chinese." in user_text(scenario)
    assert [step_of(b) for b in bodies] == ["scenario", "dialogue", "assessment"]
    assert all(b["model"] == "stub" and b["temperature"] == 0.7 for b in bodies)


def test_rejected_answers_score_below_the_reference_answer(tmp_path):
    out = tmp_path / "made.jsonl"
    with ChatServer(DataLLM()) as server:
        assert make(server.url, out, 2, "--rejected") == 0
    for r in read_jsonl(out):
        record = Record.model_validate(r)
        assert record.rejected.text == "Just get over it."
        assert record.rejected.assessment.scores.total() < record.assessment.scores.total()


def test_a_rejected_answer_that_scores_higher_is_asked_again(tmp_path):
    def rejected(body, n):
        scores = GOOD if n == 1 else {k: 1 for k in GOOD}  # the first reply "prefers" the worse answer
        return 200, json.dumps({"text": "Whatever.", "assessment": {"text": "Cold.", "scores": scores}})

    llm = DataLLM({"rejected": rejected})
    with ChatServer(llm) as server:
        assert make(server.url, tmp_path / "made.jsonl", 1, "--rejected") == 0
    assert llm.requests["rejected"] == 2
    [r] = read_jsonl(tmp_path / "made.jsonl")
    assert sum(r["rejected"]["assessment"]["scores"].values()) == 4


def test_garbage_is_retried_then_the_record_fails_alone_with_its_raw_reply_and_a_rerun_makes_it(tmp_path, capsys):
    out = tmp_path / "made.jsonl"
    llm = DataLLM({"dialogue": lambda body, n: (200, "I would rather not.") if n in (2, 3) else (200, DataLLM().dialogue(user_text(body)))})
    with ChatServer(llm) as server:
        assert make(server.url, out, 3, "--set", "retries=1") == 1  # record 2's dialogue: garbage twice
    captured = capsys.readouterr()
    assert "2 of 3 records made" in captured.out and "1 failed (first: md-000002: dialogue: unusable reply" in captured.out
    assert "the LLM failed on 1 record" in captured.err and captured.err.count("\n") == 1
    [failure] = read_jsonl(Path(f"{out}.failures.jsonl"))
    assert failure == {"id": "md-000002", "step": "dialogue", "error": "unusable reply: no JSON object in the reply (after 2 tries)",
                       "raw": "I would rather not.", "attempts": 2}
    assert not out.exists() and {d["id"] for d in read_jsonl(Path(f"{out}.partial"))} == {"md-000001", "md-000003"}

    llm = DataLLM()
    with ChatServer(llm) as server:
        assert make(server.url, out, 3, "--set", "retries=1") == 0
    assert llm.requests == {"scenario": 1, "dialogue": 1, "assessment": 1}  # only the failed record again
    assert [r["id"] for r in read_jsonl(out)] == ["md-000001", "md-000002", "md-000003"]
    assert not Path(f"{out}.failures.jsonl").exists()


def test_skip_bad_finishes_without_the_failed_records_and_keeps_their_replies(tmp_path):
    out = tmp_path / "made.jsonl"
    llm = DataLLM({"assessment": lambda body, n: (200, '{"text": "ok", "scores": {"need_support": 9}}') if n == 1
                   else (200, DataLLM().assessment(""))})
    with ChatServer(llm) as server:
        assert make(server.url, out, 2, "--set", "retries=0", "--skip-bad") == 0
    assert [r["id"] for r in read_jsonl(out)] == ["md-000002"]
    [failure] = read_jsonl(Path(f"{out}.failures.jsonl"))
    assert failure["step"] == "assessment" and "not the training schema" in failure["error"] and "need_support" in failure["raw"]


@pytest.mark.parametrize("status", [500, 0])  # an HTTP error; a request held past timeout_s
def test_an_endpoint_that_errs_or_times_out_fails_each_record_alone_and_loses_none(tmp_path, capsys, status):
    out = tmp_path / "made.jsonl"
    llm = DataLLM({"scenario": lambda body, n: (status, '{"error": "overloaded"}') if n % 2 == 0 else
                   (200, DataLLM().scenario(user_text(body)))})
    with ChatServer(llm) as server:
        assert make(server.url, out, 4, "--set", "retries=0", "--set", "timeout_s=0.5") == 1
    printed = capsys.readouterr().out
    assert "2 of 4 records made" in printed and "2 failed" in printed
    failures = read_jsonl(Path(f"{out}.failures.jsonl"))
    assert sorted(f["id"] for f in failures) == ["md-000002", "md-000004"]
    assert all(f["step"] == "scenario" and f["raw"] is None for f in failures)
    assert ("HTTP 500" if status else "did not answer within 0.5 s") in failures[0]["error"]
    assert len(read_jsonl(Path(f"{out}.partial"))) == 2


def test_an_endpoint_that_refuses_fails_every_record_and_says_so(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    out = tmp_path / "made.jsonl"
    assert make(f"http://127.0.0.1:{port}/v1", out, 2, "--set", "retries=0") == 1
    assert "0 of 2 records made" in capsys.readouterr().out
    assert all("cannot reach" in f["error"] for f in read_jsonl(Path(f"{out}.failures.jsonl")))


def test_a_dialogue_that_repeats_another_is_dropped_when_the_output_is_written(tmp_path, capsys):
    same = json.dumps({"messages": [{"role": "user", "text": "Hi."}, {"role": "assistant", "text": "Hello, I am here."}]})
    with ChatServer(DataLLM({"dialogue": lambda body, n: (200, same)})) as server:
        assert make(server.url, tmp_path / "made.jsonl", 3) == 0
    assert [r["id"] for r in read_jsonl(tmp_path / "made.jsonl")] == ["md-000001"]
    assert "2 duplicates dropped" in capsys.readouterr().out


def test_concurrency_sends_several_records_requests_at_once(tmp_path):
    barrier = threading.Barrier(4, timeout=20)
    llm = DataLLM()

    def scenario(body, n):
        barrier.wait()  # the first four scenario requests answer only when all four are in flight together
        return 200, DataLLM().scenario(user_text(body))

    llm.override["scenario"] = lambda body, n: scenario(body, n) if n <= 4 else (200, DataLLM().scenario(user_text(body)))
    with ChatServer(llm) as server:
        assert make(server.url, tmp_path / "made.jsonl", 6, "--concurrency", "4") == 0
    assert [r["id"] for r in read_jsonl(tmp_path / "made.jsonl")] == [f"md-{i:06d}" for i in range(1, 7)]


def test_a_template_missing_a_placeholder_is_a_one_line_error_before_any_request(tmp_path, capsys):
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "dialogue.txt").write_text("Write a dialogue about {scenario} in {language}.")  # no {story}
    with ChatServer(DataLLM()) as server:
        assert make(server.url, tmp_path / "made.jsonl", 1, "--templates", str(templates)) == 2
    err = capsys.readouterr().err
    assert "dialogue.txt" in err and "missing placeholder {story}" in err and err.count("\n") == 1
    assert server.requests == [] and not list(tmp_path.glob("made.jsonl*"))


def test_a_template_with_an_unknown_placeholder_is_refused_but_json_braces_are_text(tmp_path, capsys):
    templates = tmp_path / "templates"
    templates.mkdir()
    shutil.copy(TEMPLATE_DIR / "scenario.txt", templates / "scenario.txt")  # holds a JSON example, braces and all
    (templates / "assessment.txt").write_text("Assess {answer} after {dialogue} for {langauge}.")
    with ChatServer(DataLLM()) as server:
        assert make(server.url, tmp_path / "made.jsonl", 1, "--templates", str(templates)) == 2
    assert "unknown placeholder {langauge}" in capsys.readouterr().err


def test_a_rerun_with_other_settings_is_refused_on_a_half_made_output(tmp_path, capsys):
    out = tmp_path / "made.jsonl"
    with ChatServer(DataLLM({"scenario": lambda body, n: (500, "down") if n == 1 else (200, DataLLM().scenario(user_text(body)))})) as server:
        assert make(server.url, out, 2, "--set", "retries=0") == 1
        assert make(server.url, out, 2, "--set", "retries=0", "--language", "German") == 2
    assert "half made with other settings (language" in capsys.readouterr().err


def test_n_may_grow_while_the_output_is_unfinished(tmp_path):
    out = tmp_path / "made.jsonl"
    with ChatServer(DataLLM({"scenario": lambda body, n: (500, "down") if n == 1 else (200, DataLLM().scenario(user_text(body)))})) as server:
        assert make(server.url, out, 2, "--set", "retries=0", "--concurrency", "1") == 1
    llm = DataLLM()
    with ChatServer(llm) as server:
        assert make(server.url, out, 3, "--concurrency", "2") == 0  # concurrency may change too
    assert [r["id"] for r in read_jsonl(out)] == ["md-000001", "md-000002", "md-000003"] and llm.requests["scenario"] == 2


def test_speech_voices_every_turn_through_the_backbone(tiny, tmp_path):
    out = tmp_path / "made.jsonl"
    with ChatServer(DataLLM()) as server:
        assert make(server.url, out, 2, "--speech", "--set", "tts.max_tail_audio_tokens=2", "--set", "tts.greedy=true") == 0
    for r in read_jsonl(out):
        assert all(m["units"] for m in r["messages"])
        assert build_sft(SourcedRecord("x:1", Record.model_validate(r)), tiny).input_ids


def test_reflections_follow_each_full_chunk_of_the_voiced_answer(tiny, tmp_path):
    from reempathy.decoding.chunking import ChunkLayout, split_spoken

    out = tmp_path / "made.jsonl"
    llm = DataLLM()
    with ChatServer(llm) as server:
        assert make(server.url, out, 2, "--speech", "--reflections", "--layout", "3+6",
                    "--set", "tts.max_tail_audio_tokens=2") == 0
    for r in read_jsonl(out):
        answer = r["messages"][-1]
        chunks = split_spoken(tiny.encode_text(answer["text"]), [tiny.layout.unit_to_token(u) for u in answer["units"]],
                              ChunkLayout(3, 6))
        full = sum(1 for c in chunks if len(c) == 9)
        assert r["reflections_layout"] == "3+6" and r["reflections"] == [f"Chunk {k} names the feeling; keep it warm."
                                                                       for k in range(1, full + 1)]
    assert llm.requests["reflection"] >= 2


def test_reflections_on_an_interleaved_backbone_need_speech(tmp_path, capsys):
    with ChatServer(DataLLM()) as server:
        assert make(server.url, tmp_path / "made.jsonl", 1, "--reflections") == 2
    err = capsys.readouterr().err
    assert "needs each answer's audio units" in err and "--speech" in err and err.count("\n") == 1 and server.requests == []


def test_a_local_instruct_model_is_asked_through_llm_judges_local_back_end(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from reempathy.backbones.tiny import build_tokenizer

    tok = build_tokenizer(300, 16)
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096))
    model.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    out = tmp_path / "made.jsonl"
    assert main(["make-data", "--out", str(out), "--n", "1", "--set", "backend=\"local\"",
                 "--set", f"path={json.dumps(str(tmp_path / 'llm'))}", "--set", "max_tokens=6", "--set", "retries=0",
                 "--quiet"]) == 1
    [failure] = read_jsonl(Path(f"{out}.failures.jsonl"))
    assert failure["step"] == "scenario" and isinstance(failure["raw"], str)  # the model's own words, never a record


def test_without_an_endpoint_make_data_says_what_the_llm_needs(tmp_path, capsys):
    assert main(["make-data", "--out", str(tmp_path / "made.jsonl"), "--n", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "make-data: the LLM's options" in err and "needs endpoint" in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())

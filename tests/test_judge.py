"""llm-judge: reply parsing, retries, A/B in both orders, and the endpoint back end against a server on 127.0.0.1."""

from __future__ import annotations

import json
import socket

import pytest

from evaluation_helpers import SCORES_JSON, ChatServer, user_text
from reempathy.errors import ConfigError
from reempathy.evaluation.base import EMPATHY_SCORES, EvalItem, PairItem, combine_orders
from reempathy.evaluation.judge.evaluator import LlmJudge
from reempathy.evaluation.judge.options import JudgeOptions
from reempathy.evaluation.judge.parsing import ParseError, parse_scores, parse_verdict

EXPECTED = {"need_support": 4.0, "wording_appropriateness": 3.0, "emotion_understanding": 5.0, "emotional_support": 4.0}


def item(i: int = 1, answer: str = "I am so sorry.") -> EvalItem:
    return EvalItem(id=f"r{i}", messages=[{"role": "user", "text": "My dog is sick."}], answer_text=answer)


def options(**kw) -> JudgeOptions:
    base = {"endpoint": "http://127.0.0.1:9/v1", "model": "judge", "backoff_s": 0.0, "retries": 1}
    return JudgeOptions(**{**base, **kw})


class Scripted:
    """A back end that answers from a list, and remembers the messages it was sent."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.sent = []

    def complete(self, messages):
        self.sent.append(messages)
        return self.replies.pop(0)


# --- parsing -------------------------------------------------------------------------------


def test_parse_scores_reads_a_well_formed_reply():
    scores, rationale = parse_scores(SCORES_JSON, EMPATHY_SCORES)
    assert scores == EXPECTED and rationale == "warm"


def test_parse_scores_reads_json_in_a_markdown_fence():
    scores, _ = parse_scores(f"Here you go:\n```json\n{SCORES_JSON}\n```\nThanks!", EMPATHY_SCORES)
    assert scores == EXPECTED


def test_parse_scores_finds_the_object_inside_chatty_prose():
    reply = "Let me think {briefly}. The answer is kind. " + SCORES_JSON.replace('"need_support": 4', '"Need Support": "4"') + " Hope this helps."
    scores, _ = parse_scores(reply, EMPATHY_SCORES)
    assert scores == EXPECTED


def test_parse_scores_calls_a_truncated_reply_truncated():
    with pytest.raises(ParseError, match="truncated"):
        parse_scores(SCORES_JSON[:40], EMPATHY_SCORES)


def test_parse_scores_rejects_out_of_range_values_instead_of_clipping():
    with pytest.raises(ParseError, match="need_support = 7 is outside 1-5"):
        parse_scores(SCORES_JSON.replace('"need_support": 4', '"need_support": 7'), EMPATHY_SCORES)


def test_parse_scores_needs_all_four_dimensions():
    with pytest.raises(ParseError, match="missing score"):
        parse_scores('{"need_support": 4}', EMPATHY_SCORES)


def test_parse_verdict_maps_a_and_b_to_presentation_positions():
    assert parse_verdict('{"winner": "A"}')[0] == "first"
    assert parse_verdict('```json\n{"winner": "b", "rationale": "kinder"}\n```') == ("second", "kinder")
    assert parse_verdict('{"winner": "tie"}')[0] == "tie"
    with pytest.raises(ParseError):
        parse_verdict('{"winner": "C"}')


# --- retries and failures ------------------------------------------------------------------


def test_a_reply_that_does_not_parse_is_retried_then_scored():
    backend = Scripted(["I think it is good.", SCORES_JSON])
    [ev] = LlmJudge(options(retries=1), backend).evaluate([item()])
    assert ev.ok and ev.scores == EXPECTED and len(backend.sent) == 2


def test_a_reply_that_never_parses_is_a_failure_with_the_raw_text_and_no_scores():
    [ev] = LlmJudge(options(retries=1), Scripted(["nope", "still {not json"])).evaluate([item()])
    assert ev.scores == {} and ev.raw == "still {not json"
    assert ev.error.startswith("unusable reply: truncated") and "after 2 tries" in ev.error


# --- A/B -----------------------------------------------------------------------------------


def test_ab_asks_both_orders_with_the_answers_swapped():
    backend = Scripted(['{"winner": "A"}', '{"winner": "B"}'])
    [c] = LlmJudge(options(), backend).compare([PairItem("r1", item(answer="kind words"), item(answer="cold words"))])
    first, second = (user_text({"messages": m}) for m in backend.sent)
    assert first.index("kind words") < first.index("cold words")
    assert second.index("cold words") < second.index("kind words")
    assert c.outcome == "win" and c.orders == {"ab": "first", "ba": "second"}


def test_ab_position_bias_cancels_to_a_tie():
    [c] = LlmJudge(options(), Scripted(['{"winner": "A"}', '{"winner": "A"}'])).compare([PairItem("r1", item(), item())])
    assert c.outcome == "tie"


def test_combine_orders_wins_ties_and_losses():
    assert combine_orders("first", "tie") == "win"
    assert combine_orders("second", "first") == "loss"
    assert combine_orders("tie", "tie") == "tie"
    assert combine_orders("first", None) is None


# --- the endpoint back end against a server on 127.0.0.1 -------------------------------------


@pytest.mark.parametrize("client", ["http", "openai"])
def test_endpoint_back_end_scores_from_a_chat_completions_server(client, monkeypatch):
    if client == "openai":
        pytest.importorskip("openai")
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    with ChatServer(lambda body: (200, f"Sure!\n```json\n{SCORES_JSON}\n```")) as server:
        judge = LlmJudge(options(endpoint=server.url, client=client, api_key_env="JUDGE_KEY"))
        [ev] = judge.evaluate([item()])
    assert ev.ok and ev.scores == EXPECTED
    assert server.requests[0]["model"] == "judge" and server.requests[0]["messages"][0]["role"] == "system"
    assert server.headers[0]["Authorization"] == "Bearer sk-test"


@pytest.mark.parametrize("client", ["http", "openai"])
def test_endpoint_http_500_is_a_per_record_failure_and_other_records_are_scored(client):
    if client == "openai":
        pytest.importorskip("openai")

    def reply(body):
        return (500, '{"error": "model crashed"}') if "record two" in user_text(body) else (200, SCORES_JSON)

    with ChatServer(reply) as server:
        evs = LlmJudge(options(endpoint=server.url, client=client)).evaluate(
            [item(1, "record one"), item(2, "record two"), item(3, "record three")]
        )
    assert [e.ok for e in evs] == [True, False, True]
    assert "HTTP 500" in evs[1].error and "model crashed" in evs[1].error and evs[1].scores == {}
    assert "after 2 tries" in evs[1].error


@pytest.mark.parametrize("client", ["http", "openai"])
def test_endpoint_timeout_is_a_per_record_failure(client):
    if client == "openai":
        pytest.importorskip("openai")
    def reply(body):
        return (0, "") if "record two" in user_text(body) else (200, SCORES_JSON)

    with ChatServer(reply) as server:
        evs = LlmJudge(options(endpoint=server.url, client=client, timeout_s=0.2, retries=0)).evaluate(
            [item(1, "record one"), item(2, "record two"), item(3, "record three")]
        )
    assert [e.ok for e in evs] == [True, False, True] and evs[0].scores and evs[2].scores
    assert "did not answer within 0.2 s" in evs[1].error and evs[1].scores == {}


@pytest.mark.parametrize("client", ["http", "openai"])
def test_endpoint_refused_connection_is_a_per_record_failure(client):
    if client == "openai":
        pytest.importorskip("openai")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    evs = LlmJudge(options(endpoint=f"http://127.0.0.1:{port}/v1", client=client, retries=0)).evaluate(
        [item(1, "record one"), item(2, "record two")]
    )
    assert len(evs) == 2 and all(not e.ok and "cannot reach" in e.error and e.scores == {} for e in evs)


def test_endpoint_needs_the_key_variable_it_names(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_KEY_VAR"):
        LlmJudge(options(api_key_env="NO_SUCH_KEY_VAR"))


def test_options_say_what_the_endpoint_back_end_needs():
    from reempathy.registry import default_discovery

    with pytest.raises(ConfigError, match="needs endpoint"):
        default_discovery().registry.validate("evaluator", "llm-judge", {"model": "x"})


# --- the local back end ----------------------------------------------------------------------


def test_local_back_end_runs_an_instruct_model_from_a_directory_and_records_unparsable_output(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from reempathy.backbones.tiny import build_tokenizer

    tok = build_tokenizer(300, 16)
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096))
    model.save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    judge = LlmJudge(JudgeOptions(backend="local", path=str(tmp_path / "judge"), max_tokens=6, retries=0))
    [ev] = judge.evaluate([item()])
    assert isinstance(ev.raw, str) and ev.raw  # the model's own words came back …
    assert not ev.ok and ev.scores == {}  # … and random words are never turned into scores
    json.dumps(ev.__dict__)


# --- hostile endpoints and options (issue 25) -------------------------------------------------------


@pytest.mark.parametrize("client", ["http", "openai"])
@pytest.mark.parametrize("mode", ["drip-headers", "drip-body"])
def test_an_endpoint_that_drips_bytes_fails_at_the_whole_request_deadline(client, mode):
    """Each byte comes well within timeout_s, so only a deadline on the whole request can end it."""
    if client == "openai":
        pytest.importorskip("openai")
    from evaluation_helpers import RawServer

    with RawServer(mode, interval=0.05, limit_s=5.0) as server:
        [ev] = LlmJudge(options(endpoint=server.url, client=client, timeout_s=0.4, retries=0)).evaluate([item()])
    assert not ev.ok and ev.scores == {}
    assert "did not answer within 0.4 s (timeout_s, the whole request)" in ev.error


@pytest.mark.parametrize("client", ["http", "openai"])
def test_a_body_shorter_than_its_content_length_is_a_failed_request(client):
    if client == "openai":
        pytest.importorskip("openai")
    from evaluation_helpers import RawServer

    with RawServer("short") as server:
        [ev] = LlmJudge(options(endpoint=server.url, client=client, retries=1)).evaluate([item()])
    assert not ev.ok and ev.scores == {} and "after 2 tries" in ev.error
    assert "cut short" in ev.error or "connection" in ev.error.lower()


def test_a_deeply_nested_reply_body_is_a_failed_record():
    from evaluation_helpers import RawServer

    with RawServer("body", body=b"[" * 100_000 + b"]" * 100_000) as server:
        [ev] = LlmJudge(options(endpoint=server.url, retries=0)).evaluate([item()])
    assert not ev.ok and ev.scores == {} and "sent no chat completion" in ev.error


def test_a_deeply_nested_reply_content_is_an_ordinary_failed_record():
    nested = '{"scores": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with ChatServer(lambda body: (200, nested)) as server:
        [ev] = LlmJudge(options(endpoint=server.url, retries=0)).evaluate([item()])
    assert not ev.ok and ev.scores == {} and ev.error.startswith("unusable reply:") and "nested" in ev.error


def test_parse_scores_calls_deeply_nested_json_a_parse_error():
    with pytest.raises(ParseError, match="nested too deeply"):
        parse_scores('{"need_support": ' + "[" * 100_000 + "]" * 100_000 + "}", EMPATHY_SCORES)


@pytest.mark.parametrize("endpoint", ["127.0.0.1 8000", "127.0.0.1:8000/v1", "ftp://host/v1", "http://", "http://host name/v1"])
def test_an_endpoint_that_is_not_an_http_url_is_refused_when_options_are_read(endpoint):
    from reempathy.registry import default_discovery

    with pytest.raises(ConfigError, match="endpoint") as info:
        default_discovery().registry.validate("evaluator", "llm-judge", {"endpoint": endpoint, "model": "m"})
    assert "http://" in str(info.value) and "\n" not in str(info.value)


def test_an_https_endpoint_with_a_port_and_path_is_accepted():
    assert options(endpoint="https://api.example.com:8443/v1").endpoint == "https://api.example.com:8443/v1"


@pytest.mark.parametrize(("option", "value"), [("timeout_s", 1e300), ("timeout_s", 7200.0), ("backoff_s", 1e9), ("backoff_s", float("inf"))])
def test_time_options_are_bounded_when_options_are_read(option, value):
    from reempathy.registry import default_discovery

    with pytest.raises(ConfigError, match=option):
        default_discovery().registry.validate("evaluator", "llm-judge", {"endpoint": "http://h/v1", "model": "m", option: value})


def test_a_retry_never_waits_longer_than_the_longest_backoff(monkeypatch):
    from reempathy.evaluation.judge import evaluator as judge_module

    waits = []
    monkeypatch.setattr(judge_module.time, "sleep", waits.append)

    class Failing:
        def complete(self, messages):
            from reempathy.evaluation.judge.backends import BackendError

            raise BackendError("HTTP 500")

    LlmJudge(options(backoff_s=300.0, retries=10), Failing()).evaluate([item()])
    assert len(waits) == 10 and max(waits) == judge_module.MAX_WAIT_S and waits[0] == 300.0

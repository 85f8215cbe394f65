"""The request engine shared by llm-judge and make-data: bounded concurrency, retries with backoff, a rate limit."""

from __future__ import annotations

import json
import threading

import pytest

from evaluation_helpers import SCORES_JSON, ChatServer, write_run_dir
from reempathy.errors import ConfigError
from reempathy.evaluation.base import EvalItem
from reempathy.evaluation.judge.backends import BackendError
from reempathy.evaluation.judge.engine import RateLimit, RequestEngine
from reempathy.evaluation.judge.evaluator import LlmJudge
from reempathy.evaluation.judge.options import JudgeOptions
from reempathy.evaluation.judge.parsing import ParseError


class Gate:
    """A back end that lets calls through only ``width`` at a time together (a barrier), and counts how many overlap."""

    def __init__(self, width: int, reply=lambda messages: messages[-1]["content"]) -> None:
        self.barrier = threading.Barrier(width, timeout=20)
        self.reply = reply
        self.lock = threading.Lock()
        self.active = 0
        self.most = 0
        self.threads: set[int] = set()

    def complete(self, messages):
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
            self.threads.add(threading.get_ident())
        try:
            self.barrier.wait()  # a call returns only when `width` calls are in flight together
        finally:
            with self.lock:
                self.active -= 1
        return self.reply(messages)


def ask(n: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": str(n)}]


def test_concurrency_runs_exactly_that_many_requests_at_once():
    gate = Gate(4)
    engine = RequestEngine(gate, concurrency=4, retries=0)
    replies = engine.map(lambda n: engine.ask(ask(n), int), list(range(12)))
    assert [r.value for r in replies] == list(range(12))  # in the order of the inputs
    assert gate.most == 4 and len(gate.threads) >= 2


def test_concurrency_one_runs_every_request_in_the_callers_thread_in_order():
    seen = []

    class Recorder:
        def complete(self, messages):
            seen.append((threading.get_ident(), messages[0]["content"]))
            return "ok"

    engine = RequestEngine(Recorder(), concurrency=1, retries=0)
    engine.map(lambda n: engine.ask(ask(n), str), [1, 2, 3])
    assert seen == [(threading.get_ident(), "1"), (threading.get_ident(), "2"), (threading.get_ident(), "3")]


def test_as_completed_reads_its_items_lazily_and_keeps_the_bound():
    gate = Gate(2)
    engine = RequestEngine(gate, concurrency=2, retries=0)
    taken = []

    def items():
        for n in range(6):
            taken.append(n)
            yield n

    stream = engine.as_completed(lambda n: engine.ask(ask(n), int).value, items())
    first = next(stream)
    assert first[0] in (0, 1) and len(taken) <= 4  # two in flight, at most two more queued as they end
    rest = list(stream)
    assert sorted([first[0]] + [item for item, _ in rest]) == list(range(6)) and gate.most == 2


def test_a_failed_request_is_retried_after_a_doubling_backoff_then_reported_with_its_error(monkeypatch):
    from reempathy.evaluation.judge import engine as engine_module

    waits = []
    monkeypatch.setattr(engine_module.time, "sleep", waits.append)

    class Refusing:
        def complete(self, messages):
            raise BackendError("cannot reach http://127.0.0.1:9/v1/chat/completions: Connection refused")

    reply = RequestEngine(Refusing(), retries=3, backoff_s=0.5).ask(ask(1), str)
    assert not reply.ok and reply.value is None and reply.attempts == 4
    assert reply.error.startswith("cannot reach") and reply.error.endswith("(after 4 tries)")
    assert waits == [0.5, 1.0, 2.0]


def test_a_reply_that_does_not_parse_is_asked_again_and_the_last_raw_text_is_kept():
    replies = iter(["not a number", "still not", "7"])

    class Scripted:
        def complete(self, messages):
            return next(replies)

    def parse(text):
        if not text.isdigit():
            raise ParseError(f"{text!r} is not a number")
        return int(text)

    assert RequestEngine(Scripted(), retries=2, backoff_s=0).ask(ask(1), parse).value == 7
    replies = iter(["a", "b"])
    reply = RequestEngine(Scripted(), retries=1, backoff_s=0).ask(ask(1), parse)
    assert reply.raw == "b" and reply.error == "unusable reply: 'b' is not a number (after 2 tries)"


def test_the_rate_limit_spaces_request_starts_over_every_caller():
    now = [100.0]
    slept = []
    rate = RateLimit(4.0, clock=lambda: now[0], sleep=slept.append)
    for _ in range(3):
        rate.wait()  # three requests asked for at the same instant
    assert slept == [0.25, 0.5]
    now[0] = 200.0  # long after: no wait
    rate.wait()
    assert slept == [0.25, 0.5]


def test_the_engine_waits_its_rate_before_each_attempt():
    starts = []

    class Limit(RateLimit):
        def wait(self):
            starts.append("start")

    class Flaky:
        calls = 0

        def complete(self, messages):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise BackendError("HTTP 500")
            return "ok"

    assert RequestEngine(Flaky(), retries=2, backoff_s=0, rate=Limit(None)).ask(ask(1), str).ok
    assert starts == ["start", "start"]  # a retry is a request: it waits for its slot too


# --- llm-judge through the engine ------------------------------------------------------------------


def judge_options(**kw) -> JudgeOptions:
    return JudgeOptions(**{"endpoint": "http://127.0.0.1:9/v1", "model": "judge", "backoff_s": 0.0, "retries": 0, **kw})


def item(i: int) -> EvalItem:
    return EvalItem(id=f"r{i}", messages=[{"role": "user", "text": "My dog is sick."}], answer_text=f"answer {i}")


def test_the_judge_sends_concurrency_requests_at_once_and_keeps_the_items_order():
    gate = Gate(3, reply=lambda messages: SCORES_JSON)
    evs = LlmJudge(judge_options(concurrency=3), gate).evaluate([item(i) for i in range(6)])
    assert [e.id for e in evs] == [f"r{i}" for i in range(6)] and all(e.ok for e in evs)
    assert gate.most == 3


def test_the_judge_sends_one_request_at_a_time_by_default():
    assert judge_options().concurrency == 1


def test_ab_runs_both_orders_of_each_pair_side_by_side():
    from reempathy.evaluation.base import PairItem

    gate = Gate(4, reply=lambda messages: '{"winner": "A"}')
    out = LlmJudge(judge_options(concurrency=4), gate).compare([PairItem(f"p{i}", item(i), item(i + 10)) for i in range(2)])
    assert [c.id for c in out] == ["p0", "p1"] and all(c.outcome == "tie" for c in out) and gate.most == 4


def test_a_local_back_end_refuses_concurrency():
    from reempathy.registry import default_discovery

    with pytest.raises(ConfigError, match="concurrency > 1 is for the endpoint back end"):
        default_discovery().registry.validate("evaluator", "llm-judge", {"backend": "local", "path": "x", "concurrency": 2})


def test_eval_with_concurrency_scores_every_record_against_a_server(tiny, tmp_path, capsys):
    from reempathy.cli import main

    run = write_run_dir(tmp_path / "run", tiny, ["one", "two", "three", "four"], max_new_tokens=4)
    barrier = threading.Barrier(4, timeout=20)

    def reply(body):
        barrier.wait()  # answers only once all four records are being asked at once
        return 200, SCORES_JSON

    with ChatServer(reply) as server:
        rc = main(["eval", str(run), "--evaluator", "llm-judge", "--set", f"endpoint={json.dumps(server.url)}",
                   "--set", 'model="m"', "--set", "concurrency=4", "--batch-size", "4", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (run / "scores" / "llm-judge.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["rec1", "rec2", "rec3", "rec4"] and all(r["error"] is None for r in rows)


def test_a_score_file_resumes_with_another_concurrency(tiny, tmp_path, capsys):
    from reempathy.cli import main

    run = write_run_dir(tmp_path / "run", tiny, ["one", "two"], max_new_tokens=4)
    with ChatServer(lambda body: (200, SCORES_JSON)) as server:
        base = ["eval", str(run), "--evaluator", "llm-judge", "--set", f"endpoint={json.dumps(server.url)}",
                "--set", 'model="m"', "--quiet"]
        assert main(base) == 0
        assert main([*base, "--set", "concurrency=4", "--set", "rate_limit_per_s=50.0"]) == 0, capsys.readouterr().err
    options = json.loads((run / "scores" / "llm-judge.options.json").read_text())["options"]
    assert "concurrency" not in options and "rate_limit_per_s" not in options

"""Throughput of llm-judge and make-data against a slow OpenAI-compatible endpoint: concurrency 8 against 1.

A chat-completions server on 127.0.0.1 answers every request after a fixed delay (200 ms by
default, a remote model's round trip) with one JSON object that every step can read: the
scenario step its ``scenario`` and ``story``, the dialogue step its ``messages`` (the user's text
carries a hash of the prompt, so no two records repeat), the assessment step and llm-judge its
``text`` and ``scores``, the rejected step its ``text`` and a lower-scored ``assessment``. Nothing
is parsed differently from a real endpoint; only the model is missing.

    .venv/bin/python bench/llm_throughput.py [--delay 0.2] [--items 32] [--records 16] [--concurrency 1,8] [--json OUT]

For each concurrency it times (wall clock, one run each, after a warm-up request) llm-judge
scoring ``--items`` answers (``reempathy eval``'s evaluator, ``batch_size`` = all of them) and
make-data making ``--records`` records (3 requests each), and prints requests per second and the
speed-up against the first concurrency. The target of issue 22: at least 4x with 8 against 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SCORES = {"need_support": 4, "wording_appropriateness": 4, "emotion_understanding": 4, "emotional_support": 4}
LOW = {"need_support": 2, "wording_appropriateness": 2, "emotion_understanding": 2, "emotional_support": 2}


def universal_reply(prompt: str) -> str:
    """One JSON object that answers every make-data step and llm-judge's scores."""
    tag = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8]
    return json.dumps({
        "scenario": "A person feels tired after a long week.", "story": "Work piled up. They want to be heard.",
        "messages": [{"role": "user", "text": f"I am so tired, {tag}."},
                     {"role": "assistant", "text": "That sounds exhausting. I am here with you."}],
        "text": "Warm and attentive.", "scores": SCORES,
        "assessment": {"text": "Colder.", "scores": LOW},
    })


class SlowServer:
    """A chat-completions server on 127.0.0.1 that answers each request after ``delay`` seconds (threads: any number at once)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.requests = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                time.sleep(server.delay)  # the endpoint's own latency: what the benchmark is about
                prompt = next((m["content"] for m in body["messages"] if m["role"] == "user"), "")
                payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model"),
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": universal_reply(prompt)}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "SlowServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def judge_seconds(url: str, items: int, concurrency: int) -> float:
    """Wall seconds for llm-judge to score ``items`` answers with ``concurrency`` requests in flight."""
    from reempathy.evaluation.base import EvalItem
    from reempathy.evaluation.judge.evaluator import LlmJudge
    from reempathy.evaluation.judge.options import JudgeOptions

    judge = LlmJudge(JudgeOptions(endpoint=url, model="m", concurrency=concurrency, retries=0))
    batch = [EvalItem(f"r{i}", [{"role": "user", "text": f"Hello {i}."}], f"answer {i}") for i in range(items)]
    started = time.perf_counter()
    results = judge.evaluate(batch)
    seconds = time.perf_counter() - started
    failed = [e for e in results if not e.ok]
    if failed:
        raise SystemExit(f"llm-judge failed on {len(failed)} items: {failed[0].error}")
    return seconds


def make_data_seconds(url: str, records: int, concurrency: int) -> float:
    """Wall seconds for make-data to make ``records`` records (3 requests each) with ``concurrency`` in flight."""
    from reempathy.registry import default_discovery
    from reempathy.training.make_data import MakeDataOptions, make_data

    registry = default_discovery().registry  # discovered once per process, before the clock starts
    with tempfile.TemporaryDirectory() as tmp:
        opts = MakeDataOptions(out=str(Path(tmp) / "made.jsonl"), n=records,
                               llm_options={"endpoint": url, "model": "m", "concurrency": concurrency, "retries": 0},
                               progress=False)
        started = time.perf_counter()
        summary = make_data(opts, registry)
        seconds = time.perf_counter() - started
    if not summary.finished or summary.made != records:  # (records that repeat another are made, then dropped)
        raise SystemExit(f"make-data made {summary.made} of {records} records")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.2, help="seconds the endpoint takes per request (default 0.2)")
    parser.add_argument("--items", type=int, default=32, help="answers llm-judge scores (default 32)")
    parser.add_argument("--records", type=int, default=16, help="records make-data makes, 3 requests each (default 16)")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated concurrencies; the first is the baseline")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    with SlowServer(args.delay) as server:
        judge_seconds(server.url, 1, 1)  # warm-up: imports, the first connection
        for c in levels:
            j = judge_seconds(server.url, args.items, c)
            m = make_data_seconds(server.url, args.records, c)
            rows.append({"concurrency": c, "judge_s": j, "judge_req_per_s": args.items / j,
                         "make_data_s": m, "make_data_req_per_s": 3 * args.records / m})
    base = rows[0]
    print(f"endpoint delay {args.delay * 1000:.0f} ms; llm-judge {args.items} answers; make-data {args.records} records "
          f"({3 * args.records} requests)")
    print(f"{'concurrency':>11}  {'judge s':>8}  {'req/s':>6}  {'speed-up':>8}  {'make-data s':>11}  {'req/s':>6}  {'speed-up':>8}")
    for r in rows:
        r["judge_speedup"] = base["judge_s"] / r["judge_s"]
        r["make_data_speedup"] = base["make_data_s"] / r["make_data_s"]
        print(f"{r['concurrency']:>11}  {r['judge_s']:>8.2f}  {r['judge_req_per_s']:>6.1f}  {r['judge_speedup']:>7.2f}x  "
              f"{r['make_data_s']:>11.2f}  {r['make_data_req_per_s']:>6.1f}  {r['make_data_speedup']:>7.2f}x")
    if args.json:
        doc = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "python": sys.version.split()[0],
               "command": "bench/llm_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "delay_s": args.delay, "items": args.items, "records": args.records, "rows": rows}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

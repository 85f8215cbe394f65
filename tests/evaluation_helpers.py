"""Shared by the evaluation tests: run directories of real tiny decodes, a chat-completions server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

SCORES_JSON = '{"need_support": 4, "wording_appropriateness": 3, "emotion_understanding": 5, "emotional_support": 4, "rationale": "warm"}'


def write_run_dir(directory: Path, backbone, prompts: list[str], max_new_tokens: int = 16, manifest: dict | None = None) -> Path:
    """A run directory in the shared format, from real greedy decodes of ``backbone``."""
    from reempathy.config import load_config
    from reempathy.registry import default_discovery
    from reempathy.runner import run_decode

    directory.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, [f"decode.max_new_tokens={max_new_tokens}", "sampling.greedy=true"])
    registry = default_discovery().registry
    lines = []
    for n, prompt in enumerate(prompts, 1):
        result = run_decode(cfg, registry, prompt=prompt, backbone=backbone)
        lines.append({
            "schema": "reempathy.run-record/1", "id": f"rec{n}", "line": n,
            "messages": [{"role": "user", "text": prompt}], "reference": None,
            "result": result.to_json(), "wav": None,
        })
    (directory / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (directory / "manifest.json").write_text(json.dumps(manifest or {"schema": "reempathy.run/1", "config": {"backbone": {"name": "tiny"}}}))
    return directory


class ChatServer:
    """A chat-completions server on 127.0.0.1 whose reply to each request is decided by ``reply(body)``.

    ``reply`` returns (status, text): text is the assistant's content for 200, the body otherwise.
    Returning status 0 holds the request until the server stops (a client timeout).
    """

    def __init__(self, reply: Callable[[dict], tuple[int, str]]) -> None:
        self.reply = reply
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append({"Authorization": self.headers.get("Authorization")})
                status, text = server.reply(body)
                if status == 0:
                    server.release.wait(10)
                    return
                if status == 200 and self.path.endswith("/chat/completions"):
                    payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model"),
                                          "choices": [{"index": 0, "finish_reason": "stop",
                                                       "message": {"role": "assistant", "content": text}}]}).encode()
                else:
                    payload = text.encode()
                    status = status if status != 200 else 404
                self.send_response(status)
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

    def __enter__(self) -> "ChatServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def user_text(body: dict) -> str:
    """The user message of a chat request."""
    return next(m["content"] for m in body["messages"] if m["role"] == "user")


ROOT = Path(__file__).resolve().parents[1]


def run_tiny(directory: Path, prompts: list[str], max_new_tokens: int = 24) -> Path:
    """``reempathy run`` on the tiny backbone (configs/reempathy.toml, no speech): a run whose records have no WAV."""
    from reempathy.cli import main

    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "test.jsonl"
    data.write_text("".join(json.dumps({"id": f"rec{n}", "messages": [{"role": "user", "text": p}]}) + "\n"
                            for n, p in enumerate(prompts, 1)), encoding="utf-8")
    out = directory / "run"
    assert main(["run", "--config", str(ROOT / "configs" / "reempathy.toml"), "--data", str(data), "--out", str(out),
                 "--set", f"decode.max_new_tokens={max_new_tokens}", "--set", "sampling.greedy=true"]) == 0
    return out


def run_speech(directory: Path, prompts: list[str], max_new_tokens: int = 16) -> Path:
    """``reempathy run --speech`` on a tiny GLM-4-Voice with a tiny speech tokenizer and decoder: answers written as WAVs."""
    from glm4voice_fixture import make_tiny_glm4voice_dir

    from reempathy.cli import main
    from reempathy.speech.tiny import make_tiny_decoder_dir, make_tiny_tokenizer_dir

    directory.mkdir(parents=True, exist_ok=True)
    glm = make_tiny_glm4voice_dir(directory / "glm")
    tok, dec = make_tiny_tokenizer_dir(directory / "tok"), make_tiny_decoder_dir(directory / "dec")
    config = directory / "glm.toml"
    config.write_text(
        f'[backbone]\nname = "glm-4-voice"\npath = "{glm}"\ntokenizer_path = "{tok}"\ndecoder_path = "{dec}"\n'
        'device = "cpu"\n[strategy]\nname = "reempathy"\ntext_tokens = 3\naudio_tokens = 5\nreflect = false\n'
        f"[sampling]\ngreedy = true\n[decode]\nmax_new_tokens = {max_new_tokens}\n"
    )  # reempathy's chunks make audio slots: every answer has spoken text and units to synthesise
    data = directory / "test.jsonl"
    data.write_text("".join(json.dumps({"id": f"rec{n}", "messages": [{"role": "user", "text": p}]}) + "\n"
                            for n, p in enumerate(prompts, 1)), encoding="utf-8")
    out = directory / "run"
    assert main(["run", "--config", str(config), "--data", str(data), "--out", str(out), "--speech"]) == 0
    return out


class RawServer:
    """An HTTP endpoint on 127.0.0.1 that misbehaves below the level of a well-formed reply.

    ``mode``: ``drip-headers`` sends a status line, then one header byte every ``interval`` s;
    ``drip-body`` sends complete headers, then one body byte every ``interval`` s; ``short`` sends a
    body shorter than its Content-Length and closes; ``body`` sends ``body`` as a well-formed reply.
    A dripping connection stops after ``limit_s`` seconds or when the client hangs up, so a client
    without a whole-request deadline ends up with a body cut short instead of hanging for ever.
    """

    def __init__(self, mode: str, *, body: bytes = b"", interval: float = 0.05, limit_s: float = 5.0) -> None:
        import socketserver
        import time

        server = self
        self.mode, self.body, self.interval, self.limit_s = mode, body, interval, limit_s
        self.connections = 0

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                server.connections += 1
                length = 0
                while True:  # the request's headers, then its body
                    line = self.rfile.readline()
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                    if line in (b"\r\n", b"\n", b""):
                        break
                self.rfile.read(length)
                w = self.wfile
                try:
                    if server.mode == "body":
                        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(server.body) + server.body)
                        return
                    if server.mode == "short":
                        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n"
                                b"Connection: close\r\n\r\n" + b'{"choices": [')
                        return
                    if server.mode == "drip-headers":
                        w.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                    else:
                        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n"
                                b"Connection: close\r\n\r\n")
                    w.flush()
                    end = time.monotonic() + server.limit_s
                    while time.monotonic() < end:
                        w.write(b"a" if server.mode == "drip-headers" else b" ")
                        w.flush()
                        time.sleep(server.interval)  # the drip itself: one byte per interval
                except OSError:
                    pass  # the client hung up

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "RawServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

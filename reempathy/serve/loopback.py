"""A real server on a loopback port in this process, and a small realtime client: for tests and load tests.

``running_server`` starts uvicorn on a socket bound to port 0 (no port races) in a thread and
yields once the model is loaded; the client functions speak the OpenAI Realtime event names
through the ``websockets`` library (one response at a time: ``ask``). Third-party strategy
authors can test their plugin served the same way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import uvicorn
import websockets

from reempathy.registry import Registry
from reempathy.serve.app import build_app
from reempathy.serve.cli import uvicorn_config
from reempathy.serve.config import load_serve_config
from reempathy.serve.server import Server


@dataclass
class Running:
    """A server running in this process."""

    server: Server
    port: int
    thread: threading.Thread
    uv: uvicorn.Server

    @property
    def http(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        """The realtime websocket's URL."""
        return f"ws://127.0.0.1:{self.port}/v1/realtime"


@contextlib.contextmanager
def running_server(config_path: str | Path, registry: Registry, api_key: str | None = None, timeout: float = 300) -> Iterator[Running]:
    """Start a server on a loopback port in this process; yield it once the model is loaded; stop it after."""
    reg = registry
    server = Server(load_serve_config(config_path, reg), reg, api_key=api_key)
    app = build_app(server)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, server.settings.max_message_bytes, "warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        if not server.ready.wait(timeout):
            raise RuntimeError(f"the server did not load within {timeout:g} s")
        if server.status != "ok":
            raise RuntimeError(f"the server failed to load: {server.error}")
        yield Running(server, port, thread, uv)
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()


# --- the realtime client --------------------------------------------------------------------------


@dataclass
class Conversation:
    """What one response produced, as the client saw it."""

    events: list[dict[str, Any]] = field(default_factory=list)
    transcript_deltas: list[str] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)
    reflections: dict[tuple[str, int], str] = field(default_factory=dict)
    done: dict[str, Any] | None = None

    @property
    def transcript(self) -> str:
        """The transcript of ``response.done``'s item."""
        part = self.done["response"]["output"][0]["content"][0]
        return part.get("transcript", part.get("text"))

    def types(self) -> list[str]:
        """The event types, in order."""
        return [e["type"] for e in self.events]


async def receive_until(ws: Any, kind: str, into: Conversation | None = None, timeout: float = 120) -> dict[str, Any]:
    """Read events until one of ``kind`` (recorded into ``into``); that event."""
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await ws.recv())
            if into is not None:
                record(into, event)
            if event["type"] == kind:
                return event


def record(conv: Conversation, event: dict[str, Any]) -> None:
    """Add one server event to ``conv`` (transcript, audio and reflection deltas are gathered as they come)."""
    conv.events.append(event)
    kind = event["type"]
    if kind in ("response.output_audio_transcript.delta", "response.output_text.delta"):
        conv.transcript_deltas.append(event["delta"])
    elif kind == "response.output_audio.delta":
        conv.audio.extend(base64.b64decode(event["delta"]))
    elif kind == "response.reflection.delta":
        key = (event["kind"], event["index"])
        conv.reflections[key] = conv.reflections.get(key, "") + event["delta"]
    elif kind == "response.done":
        conv.done = event


async def send(ws: Any, **event: Any) -> None:
    """Send one client event."""
    await ws.send(json.dumps(event))


async def ask(ws: Any, text: str | None = None, pcm: bytes | None = None, **response: Any) -> Conversation:
    """One user item (text, or PCM16 through the input buffer) and one response, read to ``response.done``."""
    conv = Conversation()
    if text is not None:
        await send(ws, type="conversation.item.create",
                   item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})
    else:
        for start in range(0, len(pcm), 48000):  # 1 s per append
            await send(ws, type="input_audio_buffer.append", audio=base64.b64encode(pcm[start : start + 48000]).decode())
        await send(ws, type="input_audio_buffer.commit")
    await receive_until(ws, "conversation.item.done", conv)
    await send(ws, type="response.create", **({"response": response} if response else {}))
    await receive_until(ws, "response.done", conv)
    return conv


async def session(url: str, model: str | None = None, **settings: Any) -> Any:
    """Open a realtime session (read ``session.created``; apply ``settings`` through session.update)."""
    ws = await websockets.connect(url + (f"?model={model}" if model else ""), max_size=2**24)
    await receive_until(ws, "session.created")
    if settings:
        await send(ws, type="session.update", session={"type": "realtime", **settings})
        await receive_until(ws, "session.updated")
    return ws


__all__ = ["Conversation", "Running", "ask", "receive_until", "record", "running_server", "send", "session"]

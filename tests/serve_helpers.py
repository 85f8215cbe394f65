"""A real `reempathy serve` on a loopback port, in-process, for the serve tests; and a realtime client.

The server is uvicorn + starlette on a socket bound to port 0 (so tests never race for ports),
run in a thread; the client is the `websockets` library speaking the OpenAI Realtime event names.
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
from typing import Any

import numpy as np
import pydantic
import torch
import uvicorn
import websockets

from reempathy.decoding.registry import discover
from reempathy.hooks import hookimpl
from reempathy.serve.app import build_app
from reempathy.serve.cli import uvicorn_config
from reempathy.serve.config import load_serve_config
from reempathy.serve.server import Server

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "I failed my driving test today and I feel stupid."
MAX_TOKENS = 24


class ExplodeOptions(pydantic.BaseModel):
    at: int = 3


class Explode:
    """A processor whose code fails at token ``at`` of the answer (a broken third-party plugin)."""

    def __init__(self, options: ExplodeOptions, backbone: Any) -> None:
        self.at = options.at

    @hookimpl
    def reempathy_logits(self, session, logits):
        if session.generated + 1 == self.at:
            raise RuntimeError("boom")


class NoStopOptions(pydantic.BaseModel):
    pass


class NoStop:
    """Bans the stop tokens, so that an answer runs to its budget (long answers to cancel mid-way)."""

    def __init__(self, options: NoStopOptions, backbone: Any) -> None:
        self.ids = list(backbone.layout.stop_ids)

    @hookimpl
    def reempathy_logits(self, session, logits):
        logits[self.ids] = float("-inf")


class ScriptedOptions(pydantic.BaseModel):
    text: int = 6


class Scripted:
    """The first ``text`` tokens text only, then audio only, never a stop: an answer with both, whatever was heard."""

    def __init__(self, options: ScriptedOptions, backbone: Any) -> None:
        self.text = options.text
        self.layout = backbone.layout
        self.masks: dict = {}

    @hookimpl
    def reempathy_logits(self, session, logits):
        kind = "text" if session.generated < self.text else "audio"
        if kind not in self.masks:
            banned = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
            layout = self.layout
            if kind == "text":
                banned[: layout.text_end] = False
            else:
                banned[layout.audio_offset : layout.audio_offset + layout.audio_count] = False
            self.masks[kind] = banned
        logits[self.masks[kind]] = float("-inf")


class TestPlugins:
    """Registers the test processors."""

    @hookimpl
    def reempathy_register_processors(self, register):
        register("explode", Explode, ExplodeOptions)
        register("no-stop", NoStop, NoStopOptions)
        register("scripted", Scripted, ScriptedOptions)


def registry():
    """The built-in plugins plus the test processors."""
    return discover([("serve-test", TestPlugins())], installed=False).registry


MODELS = {
    "sft": "[strategy]\nname = \"sft\"\n",
    "cotbs": "[strategy]\nname = \"cotbs\"\nmax_thought_tokens = 8\n",
    "reempathy": (
        "[strategy]\nname = \"reempathy\"\ntext_tokens = 3\naudio_tokens = 6\nreflect = true\nmax_reflection_tokens = 5\n\n"
        "[[processors]]\nname = \"attention-reweight\"\nfactor = 1.15\nlayers = \"0-1\"\n"
    ),
    "long": "[strategy]\nname = \"sft\"\n\n[[processors]]\nname = \"no-stop\"\n",
    "broken": "[strategy]\nname = \"sft\"\n\n[[processors]]\nname = \"explode\"\nat = 3\n",
    "scripted": "[strategy]\nname = \"sft\"\n\n[[processors]]\nname = \"scripted\"\ntext = 6\n",
}


def model_config(name: str) -> str:
    """The decode config text of a test model (greedy, tiny backbone)."""
    return (
        "[backbone]\nname = \"tiny\"\nseed = 0\n\n"
        + MODELS[name]
        + f"\n[sampling]\ngreedy = true\nseed = 0\n\n[decode]\nmax_new_tokens = {MAX_TOKENS}\n"
    )


def write_configs(folder: Path, **serve: Any) -> Path:
    """A serve config with every test model, plus ``serve`` keys; the path of the serve file."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        (folder / f"{name}.toml").write_text(model_config(name))
    settings = {"max_sessions": 16, "max_output_tokens": 256, "speech_tokenizer": "tiny", "speech_decoder": "tiny",
                "default_model": "sft", **serve}
    lines = ["[serve]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    for name in MODELS:
        lines += ["", "[[serve.models]]", f'name = "{name}"', f'config = "{name}.toml"']
    path = folder / "serve.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Running:
    """A server running in this process."""

    server: Server
    port: int
    thread: threading.Thread
    uv: uvicorn.Server

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"


@contextlib.contextmanager
def running_server(config_path: Path, api_key: str | None = None):
    """Start a server on a loopback port; yield it once the model is loaded; stop it after."""
    reg = registry()
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
        if not server.ready.wait(120):
            raise RuntimeError("the server did not load within 120 s")
        assert server.status == "ok", server.error
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
        return [e["type"] for e in self.events]


async def receive_until(ws, kind: str, into: Conversation | None = None, timeout: float = 120) -> dict[str, Any]:
    """Read events until one of ``kind`` (recorded into ``into``); that event."""
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await ws.recv())
            if into is not None:
                record(into, event)
            if event["type"] == kind:
                return event


def record(conv: Conversation, event: dict[str, Any]) -> None:
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


async def send(ws, **event: Any) -> None:
    await ws.send(json.dumps(event))


async def ask(ws, text: str | None = None, pcm: bytes | None = None, **response: Any) -> Conversation:
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


async def session(url: str, model: str | None = None, **settings: Any):
    """Open a realtime session (read ``session.created``; apply ``settings`` through session.update)."""
    ws = await websockets.connect(url + (f"?model={model}" if model else ""), max_size=2**24)
    await receive_until(ws, "session.created")
    if settings:
        await send(ws, type="session.update", session={"type": "realtime", **settings})
        await receive_until(ws, "session.updated")
    return ws


def voice(seconds: float = 2.0, rate: int = 24000) -> np.ndarray:
    """A rising chirp, float32 mono: the 'speech' the tiny tokenizer hears."""
    t = np.arange(int(seconds * rate), dtype=np.float64) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t * (1 + t))).astype(np.float32)


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).round().astype("<i2").tobytes()


def heard_units(server: Server, pcm: bytes) -> list[int]:
    """The units the server's tokenizer hears in ``pcm`` (24 kHz PCM16)."""
    samples = torch.from_numpy(np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0)
    return server.units(samples, 24000)

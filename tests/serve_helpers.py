"""What the serve tests share: test processors, a serve config with every test model, a test voice.

The server itself runs through :mod:`reempathy.serve.loopback` (a real uvicorn on a loopback port,
in-process) and is talked to with its realtime client (the `websockets` library).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import torch

from reempathy.registry import discover
from reempathy.hooks import hookimpl
from reempathy.serve import loopback
from reempathy.serve.loopback import Conversation, Running, ask, receive_until, record, send, session  # noqa: F401
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


@contextlib.contextmanager
def running_server(config_path: Path, api_key: str | None = None):
    """A server with the test processors registered, on a loopback port, once its model is loaded."""
    with loopback.running_server(config_path, registry(), api_key=api_key) as running:
        yield running


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

"""Where the judge model runs: an OpenAI-compatible chat-completions endpoint, or a local transformers model.

Each back end turns chat messages into the reply text, or raises ``BackendError`` with one line
saying what went wrong (timeout, refused connection, HTTP status with the start of the body).
The caller records that line as the record's failure; nothing is scored from a failed request.

The endpoint back end needs no extra package: ``client = "http"`` posts to
``<endpoint>/chat/completions`` with the standard library. ``client = "openai"`` uses the official
``openai`` client instead (``pip install 'reempathy[judge]'``), with its own retries turned off so
that ours are the only ones.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from typing import Any, Protocol

from reempathy.backbones.quiet import no_loading_bar
from reempathy.errors import CheckpointError, ConfigError, NotAvailableError
from reempathy.evaluation.judge.options import JudgeOptions


class BackendError(RuntimeError):
    """A request that produced no reply; the message is one line for the score file."""


class ChatBackend(Protocol):
    """Chat messages in, reply text out."""

    def complete(self, messages: list[dict[str, str]]) -> str: ...


def api_key(options: JudgeOptions) -> str | None:
    """The API key from the environment variable the options name; ConfigError when it is unset."""
    if options.api_key_env is None:
        return None
    key = os.environ.get(options.api_key_env)
    if not key:
        raise ConfigError(
            f"llm-judge: environment variable {options.api_key_env} (api_key_env) is not set; export the API key "
            "there, or unset api_key_env for a server that needs none"
        )
    return key


class HttpChatBackend:
    """POST ``{endpoint}/chat/completions`` with urllib; the reply is ``choices[0].message.content``."""

    def __init__(self, options: JudgeOptions) -> None:
        self.url = options.endpoint.rstrip("/") + "/chat/completions"  # type: ignore[union-attr]
        self.options = options
        self.key = api_key(options)

    def complete(self, messages: list[dict[str, str]]) -> str:
        o = self.options
        body = json.dumps(
            {"model": o.model, "messages": messages, "temperature": o.temperature, "max_tokens": o.max_tokens}
        ).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=o.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read(300).decode("utf-8", "replace").replace("\n", " ").strip()
            raise BackendError(f"{self.url} answered HTTP {exc.code}: {detail or exc.reason}") from None
        except (TimeoutError, socket.timeout):
            raise BackendError(f"{self.url} did not answer within {o.timeout_s:g} s (timeout_s)") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise BackendError(f"{self.url} did not answer within {o.timeout_s:g} s (timeout_s)") from None
            raise BackendError(f"cannot reach {self.url}: {getattr(reason, 'strerror', None) or reason}") from None
        except (ConnectionError, OSError) as exc:
            raise BackendError(f"connection to {self.url} failed: {exc}") from None
        return _content(payload, self.url)


def _content(payload: bytes, url: str) -> str:
    try:
        data = json.loads(payload)
        content = data["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        start = payload[:200].decode("utf-8", "replace").replace("\n", " ")
        raise BackendError(f"{url} sent no chat completion (body starts {start!r})") from None
    if not isinstance(content, str):
        raise BackendError(f"{url} sent a completion without text content")
    return content


class OpenAIClientBackend:
    """The official ``openai`` client against any base URL (its own retries off: ours decide)."""

    def __init__(self, options: JudgeOptions) -> None:
        try:
            import openai
        except ImportError:
            raise NotAvailableError(
                "llm-judge client = \"openai\" needs the openai package: pip install 'reempathy[judge]' "
                "(or use client = \"http\", which needs nothing)"
            ) from None
        self.openai = openai
        self.options = options
        self.client = openai.OpenAI(
            base_url=options.endpoint, api_key=api_key(options) or "unused", timeout=options.timeout_s, max_retries=0
        )

    def complete(self, messages: list[dict[str, str]]) -> str:
        o, openai = self.options, self.openai
        try:
            reply = self.client.chat.completions.create(
                model=o.model, messages=messages, temperature=o.temperature, max_tokens=o.max_tokens  # type: ignore[arg-type]
            )
        except openai.APITimeoutError:
            raise BackendError(f"{o.endpoint} did not answer within {o.timeout_s:g} s (timeout_s)") from None
        except openai.APIStatusError as exc:
            try:
                body = exc.response.text
            except Exception:  # a streamed or closed response: fall back to the client's message
                body = ""
            detail = (body or str(exc.message)).replace("\n", " ").strip()[:300]
            raise BackendError(f"{o.endpoint} answered HTTP {exc.status_code}: {detail}") from None
        except openai.APIConnectionError as exc:
            raise BackendError(f"cannot reach {o.endpoint}: {exc.__cause__ or exc}") from None
        try:
            content = reply.choices[0].message.content
        except (AttributeError, IndexError):
            raise BackendError(f"{o.endpoint} sent no chat completion") from None
        if not isinstance(content, str):
            raise BackendError(f"{o.endpoint} sent a completion without text content")
        return content


class LocalChatBackend:
    """A local transformers causal LM with a chat template, greedy unless ``temperature`` > 0."""

    def __init__(self, options: JudgeOptions) -> None:
        from pathlib import Path

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(options.path)  # type: ignore[arg-type]
        if not (path / "config.json").is_file():
            raise CheckpointError(f"llm-judge path {str(path)!r} has no config.json; give a local instruct-model directory")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if not getattr(self.tokenizer, "chat_template", None):
            raise CheckpointError(f"llm-judge path {str(path)!r}: its tokenizer has no chat template; use an instruct model")
        with no_loading_bar():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, options.dtype))
        self.model = model.to(options.device).eval()
        self.options = options
        self.torch = torch

    def complete(self, messages: list[dict[str, str]]) -> str:
        o = self.options
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = {k: v.to(o.device) for k, v in ids.items()}
        kwargs: dict[str, Any] = {"max_new_tokens": o.max_tokens, "do_sample": o.temperature > 0}
        if o.temperature > 0:
            kwargs["temperature"] = o.temperature
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with self.torch.no_grad():
            out = self.model.generate(**ids, pad_token_id=pad, **kwargs)
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def make_backend(options: JudgeOptions) -> ChatBackend:
    """The back end the options ask for."""
    if options.backend == "local":
        return LocalChatBackend(options)
    if options.client == "openai":
        return OpenAIClientBackend(options)
    return HttpChatBackend(options)


__all__ = ["BackendError", "ChatBackend", "HttpChatBackend", "OpenAIClientBackend", "LocalChatBackend", "make_backend", "api_key"]

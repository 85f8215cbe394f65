"""Where the judge model runs: an OpenAI-compatible chat-completions endpoint, or a local transformers model.

Each back end turns chat messages into the reply text, or raises ``BackendError`` with one line
saying what went wrong (timeout, refused connection, HTTP status with the start of the body, a
reply cut short or that is not a chat completion). The caller records that line as the record's
failure; nothing is scored from a failed request.

The endpoint back end needs no extra package: ``client = "http"`` posts to
``<endpoint>/chat/completions`` with the standard library. ``client = "openai"`` uses the official
``openai`` client instead (``pip install 'reempathy[judge]'``), with its own retries turned off so
that ours are the only ones.

Where it decides how long a request may take: :class:`Deadline`. A socket timeout bounds each read,
so a server that sends one byte every half second keeps a request alive for ever; ``timeout_s`` is
instead a deadline on the whole request (connect, TLS, headers, body): when it passes, the
request's sockets are shut down, which ends whatever read is blocked, and the request fails as a
timeout. Both clients open a fresh connection per request, so every socket is seen.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import socket
import threading
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


class Deadline:
    """The end of one request, ``seconds`` after it starts: then every socket it opened is shut down.

    Use as a context manager around the request; :meth:`watch` each socket as it is connected.
    ``expired`` says whether the deadline ended the request (whatever error the client then raised).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> socket.socket:
        """Shut ``sock`` down at the deadline (at once if it has passed); returns ``sock``."""
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed, or never connected
        pass


def _watched(base: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
    """``base`` whose sockets a :class:`Deadline` watches from the moment they connect (before a TLS handshake)."""

    class Watched(base):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any, deadline: Deadline, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._deadline = deadline
            create = self._create_connection  # socket.create_connection; HTTPSConnection wraps its result in TLS
            self._create_connection = lambda *a, **k: deadline.watch(create(*a, **k))

        def connect(self) -> None:
            super().connect()
            self._deadline.watch(self.sock)  # idempotent; covers a Python without _create_connection

    return Watched


_HTTP, _HTTPS = _watched(http.client.HTTPConnection), _watched(http.client.HTTPSConnection)


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_HTTP, deadline=self.deadline), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_HTTPS, deadline=self.deadline), req)


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
        headers = {"Content-Type": "application/json", "Connection": "close"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        timeout = f"{self.url} did not answer within {o.timeout_s:g} s (timeout_s, the whole request)"
        with Deadline(o.timeout_s) as deadline:
            opener = urllib.request.build_opener(_DeadlineHTTPHandler(deadline), _DeadlineHTTPSHandler(deadline))
            try:
                with opener.open(request, timeout=o.timeout_s) as response:
                    payload = response.read()
            except urllib.error.HTTPError as exc:
                if deadline.expired:
                    raise BackendError(timeout) from None
                detail = _read_some(exc).decode("utf-8", "replace").replace("\n", " ").strip()
                raise BackendError(f"{self.url} answered HTTP {exc.code}: {detail or exc.reason}") from None
            except (TimeoutError, socket.timeout):
                raise BackendError(timeout) from None
            except urllib.error.URLError as exc:
                reason = exc.reason
                if deadline.expired or isinstance(reason, (TimeoutError, socket.timeout)):
                    raise BackendError(timeout) from None
                raise BackendError(f"cannot reach {self.url}: {getattr(reason, 'strerror', None) or reason}") from None
            except http.client.IncompleteRead as exc:
                if deadline.expired:
                    raise BackendError(timeout) from None
                got, more = len(exc.partial), exc.expected
                raise BackendError(
                    f"{self.url} sent a reply cut short ({got} bytes of {got + more if more is not None else 'more'})"
                ) from None
            except (http.client.HTTPException, ConnectionError, OSError) as exc:
                if deadline.expired:
                    raise BackendError(timeout) from None
                raise BackendError(f"connection to {self.url} failed: {type(exc).__name__}: {exc}") from None
        if deadline.expired:  # the deadline cut the body short without an error (a server that closes)
            raise BackendError(timeout)
        return _content(payload, self.url)


def _read_some(exc: urllib.error.HTTPError) -> bytes:
    try:
        return exc.read(300)
    except (OSError, http.client.HTTPException):
        return b""


def _content(payload: bytes, url: str) -> str:
    try:
        data = json.loads(payload)
        content = data["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, IndexError, TypeError):
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
            base_url=options.endpoint, api_key=api_key(options) or "unused", timeout=options.timeout_s, max_retries=0,
            http_client=_deadline_client(options.timeout_s),
        )

    def complete(self, messages: list[dict[str, str]]) -> str:
        o, openai = self.options, self.openai
        try:
            reply = self.client.chat.completions.create(
                model=o.model, messages=messages, temperature=o.temperature, max_tokens=o.max_tokens  # type: ignore[arg-type]
            )
        except openai.APITimeoutError:
            raise BackendError(f"{o.endpoint} did not answer within {o.timeout_s:g} s (timeout_s, the whole request)") from None
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


def _deadline_client(seconds: float) -> Any:
    """An ``httpx.Client`` for the openai client whose every request ends at a :class:`Deadline`.

    The deadline sees each request's socket through httpcore's documented ``trace`` extension
    (``connection.connect_tcp.complete``); keep-alive is off, so every request connects. A request the
    deadline ended raises ``httpx.ReadTimeout``, which the openai client reports as a timeout.
    (Proxies taken from the environment bypass this transport; through one, ``timeout_s`` bounds each read.)
    """
    import httpx

    def ended(request: Any) -> Exception:
        return httpx.ReadTimeout(f"the whole request took longer than {seconds:g} s", request=request)

    class Body(httpx.SyncByteStream):
        def __init__(self, stream: Any, deadline: Deadline, request: Any) -> None:
            self.stream, self.deadline, self.request = stream, deadline, request

        def __iter__(self) -> Any:
            try:
                yield from self.stream
            except Exception:
                if self.deadline.expired:
                    raise ended(self.request) from None
                raise
            if self.deadline.expired:
                raise ended(self.request)

        def close(self) -> None:
            self.deadline.__exit__()
            self.stream.close()

    class Transport(httpx.HTTPTransport):
        def handle_request(self, request: Any) -> Any:
            deadline = Deadline(seconds).__enter__()

            def trace(event: str, info: dict[str, Any]) -> None:
                if event == "connection.connect_tcp.complete":
                    sock = info["return_value"].get_extra_info("socket")
                    if sock is not None:
                        deadline.watch(sock)

            request.extensions = {**request.extensions, "trace": trace}
            try:
                response = super().handle_request(request)
            except Exception:
                deadline.__exit__()
                if deadline.expired:
                    raise ended(request) from None
                raise
            response.stream = Body(response.stream, deadline, request)
            return response

    return httpx.Client(transport=Transport(limits=httpx.Limits(max_keepalive_connections=0)), timeout=seconds)


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

"""Options of the ``llm-judge`` evaluator (validated like a strategy's; unknown keys are errors).

Where it decides: ``endpoint`` must be an ``http://`` or ``https://`` URL with a host, checked when the
options are read (``127.0.0.1 8000`` is refused there, not by the HTTP client on the first record);
the time options are bounded (:data:`MAX_TIMEOUT_S`, :data:`MAX_BACKOFF_S`), so no value can make
``eval`` wait for ever or overflow a socket timeout.
"""

from __future__ import annotations

import urllib.parse
from typing import Literal

from pydantic import Field, field_validator, model_validator

from reempathy.options import PluginOptions

MAX_TIMEOUT_S = 3600.0
"""The longest ``timeout_s``: one request may take an hour (a slow local server), not more."""
MAX_BACKOFF_S = 300.0
"""The longest ``backoff_s``; each wait doubles from it, up to ``evaluator.MAX_WAIT_S``."""


class JudgeOptions(PluginOptions):
    """``llm-judge``: a chat-completions endpoint (``endpoint`` + ``model``) or a local model directory (``path``)."""

    backend: Literal["endpoint", "local"] = Field("endpoint", description="where the judge model runs")
    endpoint: str | None = Field(
        None, description="base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 (…/chat/completions is appended)"
    )
    model: str | None = Field(None, description="model name sent to the endpoint, e.g. gpt-4o")
    api_key_env: str | None = Field(
        None, description="name of the environment variable that holds the API key (unset: no Authorization header)"
    )
    client: Literal["http", "openai"] = Field(
        "http", description="http: built-in client (no extra); openai: the official client (pip install 'reempathy[judge]')"
    )
    timeout_s: float = Field(
        60.0, gt=0.0, le=MAX_TIMEOUT_S,
        description="deadline of one whole request (connect, headers, body), at most 3600",
    )
    retries: int = Field(2, ge=0, le=10, description="extra attempts when a reply does not parse or a request fails")
    backoff_s: float = Field(
        1.0, ge=0.0, le=MAX_BACKOFF_S,
        description="wait before a retry after a failed request (doubles each time, at most 600 s a wait); at most 300",
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(512, ge=1, lt=2**31, description="length limit of a reply")
    path: str | None = Field(None, description="local back end: a transformers instruct-model directory (with a chat template)")
    device: str = Field("cpu", description="local back end: torch device")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        check_endpoint(value)
        return value

    @model_validator(mode="after")
    def _backend_needs(self) -> "JudgeOptions":
        if self.backend == "endpoint" and (not self.endpoint or not self.model):
            raise ValueError("the endpoint back end needs endpoint (base URL) and model; or set backend = \"local\" and path")
        if self.backend == "local" and not self.path:
            raise ValueError("the local back end needs path (a local instruct-model directory)")
        return self


def check_endpoint(url: str) -> None:
    """ValueError unless ``url`` is an ``http(s)://host[:port][/path]`` URL (no spaces, a valid port)."""
    example = "e.g. http://127.0.0.1:8000/v1"
    if any(c.isspace() for c in url):
        raise ValueError(f"endpoint {url!r} holds a space; give one URL, {example}")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # ValueError for a port that is not a number in 0..65535
    except ValueError as exc:
        raise ValueError(f"endpoint {url!r} is not a valid URL ({exc}); {example}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"endpoint {url!r} is not an http:// or https:// URL with a host; {example}")
    if port == 0:
        raise ValueError(f"endpoint {url!r}: port 0 cannot be connected to; {example}")


__all__ = ["JudgeOptions", "MAX_TIMEOUT_S", "MAX_BACKOFF_S", "check_endpoint"]

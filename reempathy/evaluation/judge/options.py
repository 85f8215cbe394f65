"""Options of the ``llm-judge`` evaluator (validated like a strategy's; unknown keys are errors)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class JudgeOptions(BaseModel):
    """``llm-judge``: a chat-completions endpoint (``endpoint`` + ``model``) or a local model directory (``path``)."""

    model_config = ConfigDict(extra="forbid")

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
    timeout_s: float = Field(60.0, gt=0.0, description="per request")
    retries: int = Field(2, ge=0, le=10, description="extra attempts when a reply does not parse or a request fails")
    backoff_s: float = Field(1.0, ge=0.0, description="wait before a retry after a failed request (doubles each time)")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(512, ge=1, description="length limit of a reply")
    path: str | None = Field(None, description="local back end: a transformers instruct-model directory (with a chat template)")
    device: str = Field("cpu", description="local back end: torch device")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _backend_needs(self) -> "JudgeOptions":
        if self.backend == "endpoint" and (not self.endpoint or not self.model):
            raise ValueError("the endpoint back end needs endpoint (base URL) and model; or set backend = \"local\" and path")
        if self.backend == "local" and not self.path:
            raise ValueError("the local back end needs path (a local instruct-model directory)")
        return self


__all__ = ["JudgeOptions"]

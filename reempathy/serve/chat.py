"""``POST /v1/chat/completions`` (streamed as server-sent events, or whole) and ``GET /v1/models``.

The OpenAI Chat Completions shapes: ``messages`` of ``system`` / ``user`` / ``assistant`` with
text content or ``input_audio`` parts (base64 WAV, or base64 PCM16 at 24 kHz with ``format:
"pcm16"``); ``modalities`` ``["text"]`` or ``["text", "audio"]``; ``stream``. With audio, the
spoken text arrives as ``delta.audio.transcript`` and the sound as ``delta.audio.data`` (base64
PCM16, 24 kHz) — or, unstreamed, as ``message.audio`` (a base64 WAV). Sampling: ``temperature``,
``top_p``, ``seed``, and in the ``reempathy`` extension ``greedy``, ``top_k``,
``repetition_penalty``, ``reflections`` (hidden text as ``reempathy.reflection`` in chunks).

Where it decides: :func:`parse_request` turns the body into one response's spec and refuses
anything it would have to ignore silently (``n`` > 1, ``stop``, tools); a full batch is HTTP 429;
a client that disconnects mid-stream cancels its row (the task streaming it is cancelled).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets
import time
import wave
from dataclasses import dataclass
from typing import Any, AsyncIterator

import torch
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from reempathy.backbones.base import Turn
from reempathy.errors import InputError, NotAvailableError, ReempathyError
from reempathy.options import check_text
from reempathy.serve.audio import WIRE_RATE, StreamResampler, decode_base64, encode_pcm16, float_to_pcm16, pcm16_to_float
from reempathy.serve.scheduler import ServerBusy
from reempathy.serve.server import Server
from reempathy.serve.stream import Outcome, ResponseRun, describe_failure
from reempathy.speech.audio import parse_wav
from reempathy.streaming import AudioEvent, HiddenTextEvent, ReflectionEvent, TextEvent

IGNORED = ("user", "store", "stream_options", "logprobs", "frequency_penalty", "presence_penalty", "service_tier", "metadata")


class RequestError(Exception):
    """A request the server refuses: an OpenAI-shaped JSON error with ``status``."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param, self.kind = status, code, message, param, kind

    def response(self) -> JSONResponse:
        """The JSON error response."""
        return error_response(self.status, self.code, self.message, self.param, self.kind)


def error_response(status: int, code: str, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    """``{"error": {...}}`` with ``status``, as the OpenAI API answers errors."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": {"message": message, "type": kind, "code": code, "param": param}}, status, headers=headers)


@dataclass
class ChatRequest:
    """A parsed chat request."""

    model: str
    turns: list[Turn]
    instructions: str | None
    stream: bool
    audio: bool
    audio_format: str
    max_tokens: Any
    sampling: dict[str, Any]
    reflections: bool


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, read up to ``limit`` bytes (413 beyond)."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise RequestError(413, "request_too_large", f"the body is {size} bytes; this server takes at most {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise RequestError(413, "request_too_large", f"the body is over {limit} bytes, this server's limit")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise RequestError(400, "invalid_json", "the body is not valid JSON") from None


def parse_request(server: Server, body: Any) -> ChatRequest:
    """Check a chat body field by field; ``RequestError`` naming the field for anything wrong."""
    if not isinstance(body, dict):
        raise RequestError(400, "invalid_value", "the body must be a JSON object")
    known = {"model", "messages", "stream", "modalities", "audio", "max_tokens", "max_completion_tokens", "temperature",
             "top_p", "seed", "n", "stop", "tools", "tool_choice", "reempathy", *IGNORED}
    unknown = [k for k in body if k not in known]
    if unknown:
        raise RequestError(400, "unknown_parameter", f"unknown field {str(unknown[0])[:40]!r}", str(unknown[0])[:40])
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, "invalid_value", "model must be a string", "model")
    try:
        name = server.model(model).name
    except InputError as exc:
        raise RequestError(404, "model_not_found", str(exc), "model") from None
    if body.get("n", 1) != 1:
        raise RequestError(400, "not_supported", "n must be 1", "n")
    for key in ("stop", "tools"):
        if body.get(key) not in (None, []):
            raise RequestError(400, "not_supported", f"{key} is not supported by this server", key)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "invalid_value", "stream must be true or false", "stream")
    modalities = body.get("modalities", ["text"])
    if modalities not in (["text"], ["text", "audio"], ["audio", "text"]):
        raise RequestError(400, "invalid_value", 'modalities must be ["text"] or ["text", "audio"]', "modalities")
    audio = "audio" in modalities
    if audio and not server.speaks:
        raise RequestError(400, "not_available", "this server has no speech decoder; ask for modalities [\"text\"]", "modalities")
    audio_opts = body.get("audio") or {}
    if not isinstance(audio_opts, dict):
        raise RequestError(400, "invalid_value", "audio must be an object", "audio")
    fmt = audio_opts.get("format", "pcm16" if stream else "wav")
    if fmt not in ("pcm16", "wav") or (stream and fmt != "pcm16"):
        raise RequestError(400, "not_supported", 'audio.format must be "pcm16" (streamed) or "wav"', "audio.format")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling: dict[str, Any] = {}
    for key in ("temperature", "top_p", "seed"):
        if body.get(key) is not None:
            sampling[key] = body[key]
    ext = body.get("reempathy") or {}
    if not isinstance(ext, dict):
        raise RequestError(400, "invalid_value", "reempathy must be an object", "reempathy")
    reflections = ext.get("reflections", False)
    if not isinstance(reflections, bool):
        raise RequestError(400, "invalid_value", "reempathy.reflections must be true or false", "reempathy.reflections")
    for key, value in ext.items():
        if key in ("greedy", "top_k", "repetition_penalty"):
            sampling[key] = value
        elif key != "reflections":
            raise RequestError(400, "unknown_parameter", f"unknown field reempathy.{str(key)[:40]}", "reempathy")
    turns, instructions = _turns(server, body.get("messages"))
    return ChatRequest(name, turns, instructions, stream, audio, fmt, max_tokens, sampling, reflections)


def _turns(server: Server, messages: Any) -> tuple[list[Turn], str | None]:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "invalid_value", "messages must be a non-empty list", "messages")
    if len(messages) > server.settings.max_conversation_items:
        raise RequestError(400, "invalid_value", f"at most {server.settings.max_conversation_items} messages", "messages")
    turns: list[Turn] = []
    instructions = None
    for n, message in enumerate(messages):
        where = f"messages[{n}]"
        if not isinstance(message, dict):
            raise RequestError(400, "invalid_value", f"{where} must be an object", where)
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            if n != 0:
                raise RequestError(400, "not_supported", "a system message can only come first", where)
            instructions = _text(content if isinstance(content, str) else _joined(content, where), f"{where}.content")
            continue
        if role not in ("user", "assistant"):
            raise RequestError(400, "invalid_value", f"{where}.role must be system, user or assistant", f"{where}.role")
        if isinstance(content, str):
            turns.append(Turn(role, text=_text(content, f"{where}.content")))
            continue
        if not isinstance(content, list) or not content:
            raise RequestError(400, "invalid_value", f"{where}.content must be a string or a list of parts", f"{where}.content")
        audio_parts = [p for p in content if isinstance(p, dict) and p.get("type") == "input_audio"]
        if audio_parts:
            if role != "user" or len(audio_parts) != len(content) or len(audio_parts) > 1:
                raise RequestError(400, "not_supported", f"{where}: a user message holds one input_audio part alone, or text", where)
            turns.append(Turn("user", units=_units(server, audio_parts[0], f"{where}.content[0]")))
        else:
            turns.append(Turn(role, text=_text(_joined(content, where), f"{where}.content")))
    if not turns or turns[-1].role != "user":
        raise RequestError(400, "invalid_value", "the last message must be the user's", "messages")
    return turns, instructions


def _joined(content: Any, where: str) -> str:
    if not isinstance(content, list):
        raise RequestError(400, "invalid_value", f"{where}.content must be a string or a list of text parts", f"{where}.content")
    texts = []
    for m, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError(400, "invalid_value", f"{where}.content[{m}] must be {{\"type\": \"text\", \"text\": ...}}", f"{where}.content[{m}]")
        texts.append(part["text"])
    return "".join(texts)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RequestError(400, "invalid_value", f"{where} must be a string", where)
    try:
        return check_text(value, where)
    except ValueError as exc:
        raise RequestError(400, "invalid_value", str(exc), where) from None


def _units(server: Server, part: dict[str, Any], where: str) -> list[int]:
    spec = part.get("input_audio")
    if not isinstance(spec, dict):
        raise RequestError(400, "invalid_value", f"{where}.input_audio must be an object with data and format", where)
    try:
        data = decode_base64(spec.get("data"), f"{where}.input_audio.data")
        fmt = spec.get("format")
        if fmt == "wav":
            audio = parse_wav(data, f"{where}.input_audio", server.settings.max_audio_seconds)
            samples, rate = torch.from_numpy(audio.samples[0]), audio.sample_rate
        elif fmt == "pcm16":
            samples, rate = pcm16_to_float(data), WIRE_RATE
        else:
            raise RequestError(400, "not_supported", f'{where}.input_audio.format must be "wav" or "pcm16"', where)
        return server.units(samples, rate)
    except InputError as exc:
        raise RequestError(400, "invalid_value", str(exc), where) from None


async def chat_completions(server: Server, request: Request) -> Response:
    """The endpoint: parse, start a row (429 when full), stream it or answer whole."""
    try:
        body = await read_json(request, server.settings.max_message_bytes)
        loop = asyncio.get_running_loop()
        chat = await loop.run_in_executor(server.speech_pool, parse_request, server, body)  # may tokenize audio
        started = time.perf_counter()
        model = server.model(chat.model)
        prompt = server.prompt_ids(chat.turns, chat.instructions, model)
        spec = server.response_spec(model, prompt, chat.sampling, chat.max_tokens, chat.audio, chat.reflections)
        run = ResponseRun(server.scheduler, server.backbone, server.backbone.speech_decoder, spec, server.speech_pool, server.count_token, started)  # type: ignore[arg-type]
        run.start()
    except RequestError as exc:
        return exc.response()
    except ServerBusy as exc:
        server.metrics.refused.inc()
        return error_response(429, "server_busy", str(exc), kind="server_error")
    except NotAvailableError as exc:
        return error_response(503, "not_available", str(exc), kind="server_error")
    except ReempathyError as exc:
        return error_response(400, "invalid_value", str(exc))
    ident = "chatcmpl-" + secrets.token_hex(12)
    created = int(time.time())
    if chat.stream:
        return StreamingResponse(_sse(server, run, chat, ident, created, len(prompt)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _whole(server, run, chat, ident, created, len(prompt))


_END = object()


async def _sse(server: Server, run: ResponseRun, chat: ChatRequest, ident: str, created: int, prompt_len: int) -> AsyncIterator[str]:
    queue: asyncio.Queue = asyncio.Queue()

    async def emit(event: Any) -> None:
        queue.put_nowait(event)

    task = asyncio.create_task(run.stream(emit))
    task.add_done_callback(lambda _: queue.put_nowait(_END))
    resampler = StreamResampler(server.backbone.speech_decoder.sample_rate, WIRE_RATE) if chat.audio else None  # type: ignore[union-attr]
    audio_id = "audio_" + secrets.token_hex(10)

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": chat.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": "" if not chat.audio else None})
        while True:
            event = await queue.get()
            if event is _END:
                break
            if isinstance(event, TextEvent):
                yield chunk({"audio": {"id": audio_id, "transcript": event.text}} if chat.audio else {"content": event.text})
            elif isinstance(event, AudioEvent) and resampler is not None:
                samples = resampler.push(event.samples)
                if samples.shape[0]:
                    yield chunk({"audio": {"id": audio_id, "data": encode_pcm16(samples)}})
            elif isinstance(event, HiddenTextEvent):
                yield chunk({}, reempathy={"reflection": {"kind": event.kind, "index": event.index, "delta": event.text}})
            elif isinstance(event, ReflectionEvent) and chat.reflections:
                yield chunk({}, reempathy={"reflection_done": {"kind": event.kind, "index": event.index, "text": event.text}})
        outcome: Outcome = task.result()
        if resampler is not None and outcome.status != "cancelled":
            samples = resampler.finish()
            if samples.shape[0]:
                yield chunk({"audio": {"id": audio_id, "data": encode_pcm16(samples)}})
        _count(server, outcome)
        if outcome.status == "failed":
            code, message = describe_failure(outcome.error)  # type: ignore[arg-type]
            yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'code': code}})}\n\n"
        else:
            yield chunk({}, "length" if outcome.status == "incomplete" else "stop", usage=_usage(prompt_len, outcome), reempathy=_ext(outcome))
        yield "data: [DONE]\n\n"
    finally:
        if not task.done():
            task.cancel()  # the client went away: the row leaves the batch at the next step boundary


async def _whole(server: Server, run: ResponseRun, chat: ChatRequest, ident: str, created: int, prompt_len: int) -> Response:
    pieces: list[torch.Tensor] = []
    hidden: list[dict[str, Any]] = []

    async def emit(event: Any) -> None:
        if isinstance(event, AudioEvent):
            pieces.append(event.samples)
        elif isinstance(event, ReflectionEvent) and chat.reflections:
            hidden.append({"kind": event.kind, "index": event.index, "text": event.text})

    outcome = await run.stream(emit)
    _count(server, outcome)
    if outcome.status == "failed":
        code, message = describe_failure(outcome.error)  # type: ignore[arg-type]
        return error_response(500, code, message, kind="server_error")
    result = outcome.result
    text = result.spoken_text if result is not None else ""
    message: dict[str, Any] = {"role": "assistant", "content": None if chat.audio else text}
    if chat.audio:
        rate = server.backbone.speech_decoder.sample_rate  # type: ignore[union-attr]
        resampler = StreamResampler(rate, WIRE_RATE)
        wave_24k = torch.cat([resampler.push(torch.cat(pieces) if pieces else torch.zeros(0)), resampler.finish()])
        pcm = float_to_pcm16(wave_24k)
        data = _wav_bytes(pcm) if chat.audio_format == "wav" else pcm
        message["audio"] = {"id": "audio_" + secrets.token_hex(10), "data": base64.b64encode(data).decode("ascii"),
                            "transcript": text, "expires_at": created + 3600}
    ext = _ext(outcome)
    if chat.reflections:
        ext["reflections"] = hidden
    body = {"id": ident, "object": "chat.completion", "created": created, "model": chat.model,
            "choices": [{"index": 0, "message": message, "finish_reason": "length" if outcome.status == "incomplete" else "stop"}],
            "usage": _usage(prompt_len, outcome), "reempathy": ext}
    return JSONResponse(body)


def _wav_bytes(pcm: bytes) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(WIRE_RATE)
        w.writeframes(pcm)
    return out.getvalue()


def _usage(prompt_len: int, outcome: Outcome) -> dict[str, int]:
    generated = outcome.result.counts.generated if outcome.result is not None else 0
    return {"prompt_tokens": prompt_len, "completion_tokens": generated, "total_tokens": prompt_len + generated}


def _ext(outcome: Outcome) -> dict[str, Any]:
    result = outcome.result
    return {
        "stop_reason": result.stop_reason if result is not None else outcome.status,
        "strategy": result.strategy if result is not None else None,
        "first_token_s": outcome.first_token_s,
        "first_audio_s": outcome.first_audio_s,
    }


def _count(server: Server, outcome: Outcome) -> None:
    metrics = server.metrics
    metrics.responses.labels(status=outcome.status).inc()
    if outcome.first_token_s is not None:
        metrics.ttft.observe(outcome.first_token_s)
    if outcome.first_audio_s is not None:
        metrics.ttfa.observe(outcome.first_audio_s)


def models(server: Server) -> JSONResponse:
    """``GET /v1/models``: one entry per configured model (strategy and processors on the one backbone)."""
    data = []
    for model in server.models.values():
        cfg = model.cfg
        data.append({
            "id": model.name, "object": "model", "created": 0, "owned_by": "reempathy",
            "reempathy": {
                "strategy": cfg.strategy.name, "processors": [p.name for p in cfg.processors],
                "backbone": cfg.backbone.name, "checkpoint": cfg.decode.checkpoint, "description": model.description,
                "default": model.name == server.config.default_model,
            },
        })
    return JSONResponse({"object": "list", "data": data})


__all__ = ["chat_completions", "error_response", "models", "parse_request", "read_json"]

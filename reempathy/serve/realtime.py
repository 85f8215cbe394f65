"""``/v1/realtime``: one websocket session speaking the OpenAI Realtime API's (GA) event names.

Client events: ``session.update``, ``input_audio_buffer.append`` / ``.commit`` / ``.clear``,
``conversation.item.create`` (text, or audio as base64 PCM16), ``response.create``,
``response.cancel``. Server events: ``session.created`` / ``.updated``,
``input_audio_buffer.committed`` / ``.cleared``, ``conversation.item.added`` / ``.done``,
``response.created``, ``response.output_item.added`` / ``.done``, ``response.content_part.added``
/ ``.done``, ``response.output_audio.delta`` / ``.done``, ``response.output_audio_transcript.delta``
/ ``.done`` (``response.output_text.*`` for text-only sessions), ``response.done``, ``error``.
The extension: with ``session.reempathy.reflections = true``, ``response.reflection.delta`` (a
hidden segment's text as it is written) and ``response.reflection.done``. Shapes:
docs/serving.md.

Where it decides:

* **Nothing a client sends ends the session** (:meth:`RealtimeSession.handle`): a message that
  is too large, not JSON, not an object, of an unknown type or with a wrong field gets one
  ``error`` event (with the client's ``event_id`` when it had one) and the session reads on.
* **One response at a time** per session (``conversation_already_has_active_response``), run as
  its own task so that ``response.cancel`` and new audio are read while it streams; a full batch
  is an ``error`` (``server_busy``), never a queue.
* **The conversation** is the items created, each a turn of the prompt: a spoken item is its
  speech units, an answer its spoken text and units (never its reflections). Answers that were
  cancelled or failed stay out of the next prompt.
* **Leaving**: when the socket closes, the response in progress is cancelled; its row leaves
  the batch at the next step boundary.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from reempathy.backbones.base import Turn
from reempathy.errors import InputError, NotAvailableError, ReempathyError
from reempathy.options import check_text
from reempathy.serve.audio import WIRE_RATE, StreamResampler, decode_base64, encode_pcm16, pcm16_to_float
from reempathy.serve.scheduler import ServerBusy
from reempathy.serve.server import SAMPLING_KEYS, Server
from reempathy.serve.stream import Outcome, ResponseRun, describe_failure
from reempathy.streaming import AudioEvent, HiddenTextEvent, ReflectionEvent, TextEvent

log = logging.getLogger("reempathy.serve")

PCM = {"type": "audio/pcm", "rate": WIRE_RATE}
IGNORED_SESSION_KEYS = ("tracing", "include", "truncation", "parallel_tool_calls", "tool_choice", "object", "id", "expires_at")
MAX_ID = 64


def new_id(prefix: str) -> str:
    """An id like the Realtime API's (``resp_…``, ``item_…``)."""
    return f"{prefix}_{secrets.token_hex(10)}"


class ClientError(Exception):
    """A client event the server refuses: sent back as one ``error`` event; the session goes on."""

    def __init__(self, code: str, message: str, param: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.code, self.message, self.param, self.kind = code, message, param, kind


@dataclass
class Item:
    """One conversation item: its wire form and the turn it is in the prompt (None: left out)."""

    wire: dict[str, Any]
    turn: Turn | None


@dataclass
class Active:
    """The response in progress."""

    id: str
    item_id: str
    run: ResponseRun
    task: asyncio.Task | None = None
    reason: str | None = None


@dataclass
class SessionConfig:
    """The effective session (what ``session.updated`` shows)."""

    model: str
    output_modalities: list[str]
    instructions: str | None = None
    max_output_tokens: Any = None  # None: the model's decode.max_new_tokens (within the server's cap)
    reflections: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)


class RealtimeSession:
    """One websocket client: reads its events in order, runs its responses, writes events back."""

    def __init__(self, server: Server, websocket: WebSocket, model: str) -> None:
        self.server = server
        self.ws = websocket
        self.id = new_id("sess")
        self.config = SessionConfig(model=model, output_modalities=["audio"] if server.speaks else ["text"])
        self.items: list[Item] = []
        self.buffer = bytearray()
        self.active: Active | None = None
        self.closed = False
        self._send_lock = asyncio.Lock()
        settings = server.settings
        self.max_message = settings.max_message_bytes
        self.max_buffer = int(settings.max_audio_seconds * WIRE_RATE) * 2

    # --- the connection ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the session until the client leaves."""
        await self.send({"type": "session.created", "session": self.session_wire()})
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:
                    data = message.get("bytes") or b""
                    await self.error("invalid_event", f"binary frames ({len(data)} bytes) are not events; send JSON text")
                    continue
                await self.handle(text)
        except WebSocketDisconnect:
            pass
        finally:
            self.closed = True
            if self.active is not None:
                self.active.reason = "client_disconnected"
                self.active.run.cancel()
                if self.active.task is not None:
                    self.active.task.cancel()

    async def send(self, event: dict[str, Any]) -> None:
        """Send one server event (an ``event_id`` is added); a closed socket is noted, not raised."""
        if self.closed:
            return
        event = {"event_id": new_id("event"), **event}
        text = json.dumps(event, ensure_ascii=False)
        async with self._send_lock:
            try:
                await self.ws.send_text(text)
            except Exception:  # the client went away; the receive loop sees it too
                self.closed = True

    async def error(self, code: str, message: str, event_id: Any = None, param: str | None = None, kind: str = "invalid_request_error") -> None:
        """One ``error`` event."""
        body: dict[str, Any] = {"type": kind, "code": code, "message": message}
        if isinstance(event_id, str) and len(event_id) <= 200:
            body["event_id"] = event_id
        if param is not None:
            body["param"] = param
        await self.send({"type": "error", "error": body})

    # --- client events -------------------------------------------------------------------------------

    async def handle(self, text: str) -> None:
        """Act on one client message; anything wrong with it becomes an ``error`` event."""
        if len(text.encode("utf-8", "surrogatepass")) > self.max_message:
            await self.error("message_too_large", f"a message may hold at most {self.max_message} bytes; send audio in smaller appends")
            return
        try:
            event = json.loads(text)
        except (ValueError, RecursionError):
            await self.error("invalid_json", "the message is not valid JSON; send one JSON object per message")
            return
        if not isinstance(event, dict):
            await self.error("invalid_event", f"an event is a JSON object with a 'type', got {type(event).__name__}")
            return
        event_id = event.get("event_id")
        kind = event.get("type")
        handler = HANDLERS.get(kind) if isinstance(kind, str) else None
        if handler is None:
            shown = repr(kind)[:80]
            await self.error("unknown_event", f"unknown event type {shown}; known: {', '.join(HANDLERS)}", event_id, "type")
            return
        try:
            await handler(self, event)
        except ClientError as exc:
            await self.error(exc.code, exc.message, event_id, exc.param, exc.kind)
        except (InputError, NotAvailableError) as exc:
            await self.error("invalid_value" if isinstance(exc, InputError) else "not_available", str(exc), event_id)
        except ReempathyError as exc:  # a plugin's factory failed, say: this request fails, the session lives
            await self.error(type(exc).__name__.lower(), str(exc), event_id, kind="server_error")
        except Exception as exc:  # a bug: reported and logged; the session goes on
            log.exception("handling %s failed", kind)
            await self.error("server_error", f"the server failed on this event ({type(exc).__name__}); it was logged", event_id, kind="server_error")

    async def on_session_update(self, event: dict[str, Any]) -> None:
        session = _table(event.get("session"), "session")
        cfg = SessionConfig(**vars(self.config))
        cfg.sampling = dict(self.config.sampling)
        for key, value in session.items():
            if key == "type":
                if value != "realtime":
                    raise ClientError("invalid_value", "session.type must be 'realtime' (transcription sessions are not served)", "session.type")
            elif key == "model":
                if not isinstance(value, str):
                    raise ClientError("invalid_value", "session.model must be a string", "session.model")
                if value != cfg.model and self.active is not None:
                    raise ClientError("invalid_value", "the model cannot change while a response is in progress", "session.model")
                self.server.model(value)
                cfg.model = value
            elif key == "instructions":
                cfg.instructions = _text(value, "session.instructions") if value is not None else None
            elif key == "output_modalities":
                cfg.output_modalities = self._modalities(value, "session.output_modalities")
            elif key == "max_output_tokens":
                self.server.budget(value)
                cfg.max_output_tokens = value
            elif key == "audio":
                _check_audio(value, "session.audio")
            elif key == "tools":
                if value not in (None, []):
                    raise ClientError("not_supported", "tools are not supported by this server", "session.tools")
            elif key in ("prompt", "reasoning"):
                if value is not None:
                    raise ClientError("not_supported", f"session.{key} is not supported by this server", f"session.{key}")
            elif key == "reempathy":
                ext = _table(value, "session.reempathy")
                for name, setting in ext.items():
                    if name == "reflections":
                        if not isinstance(setting, bool):
                            raise ClientError("invalid_value", "session.reempathy.reflections must be true or false", "session.reempathy.reflections")
                        cfg.reflections = setting
                    elif name == "sampling":
                        sampling = _table(setting, "session.reempathy.sampling")
                        merged = {**cfg.sampling, **sampling}
                        self.server.sampling(self.server.model(cfg.model), merged)  # validated now, used per response
                        cfg.sampling = merged
                    else:
                        raise ClientError("unknown_parameter", f"unknown field session.reempathy.{str(name)[:40]}; known: reflections, sampling", "session.reempathy")
            elif key not in IGNORED_SESSION_KEYS:
                raise ClientError("unknown_parameter", f"unknown session field {str(key)[:40]!r}", f"session.{str(key)[:40]}")
        self.config = cfg
        await self.send({"type": "session.updated", "session": self.session_wire()})

    async def on_append(self, event: dict[str, Any]) -> None:
        pcm = decode_base64(event.get("audio"), "input_audio_buffer.append audio")
        if len(pcm) % 2:
            raise ClientError("invalid_value", "audio must be whole PCM16 samples (an even number of bytes)", "audio")
        if len(self.buffer) + len(pcm) > self.max_buffer:
            seconds = self.server.settings.max_audio_seconds
            raise ClientError("input_audio_buffer_full", f"the input audio buffer holds at most {seconds:g} s; commit or clear it", "audio")
        self.buffer.extend(pcm)

    async def on_clear(self, event: dict[str, Any]) -> None:
        self.buffer.clear()
        await self.send({"type": "input_audio_buffer.cleared"})

    async def on_commit(self, event: dict[str, Any]) -> None:
        if not self.buffer:
            raise ClientError("input_audio_buffer_commit_empty", "the input audio buffer is empty; append audio first")
        self._check_room()
        pcm, self.buffer = bytes(self.buffer), bytearray()
        units = await self._units(pcm)
        item_id = new_id("item")
        previous = self.items[-1].wire["id"] if self.items else None
        await self.send({"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": previous})
        wire = {
            "id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        await self._add(Item(wire, Turn("user", units=units)))

    async def on_item_create(self, event: dict[str, Any]) -> None:
        item = _table(event.get("item"), "item")
        previous = event.get("previous_item_id")
        last = self.items[-1].wire["id"] if self.items else None
        if previous is not None and previous != last:
            raise ClientError("not_supported", "items can only be appended (previous_item_id: the last item or null)", "previous_item_id")
        self._check_room()
        if item.get("type") != "message":
            raise ClientError("not_supported", "only items of type 'message' are supported", "item.type")
        role = item.get("role")
        if role not in ("user", "assistant"):
            raise ClientError("invalid_value", "item.role must be 'user' or 'assistant' (system text goes in session.instructions)", "item.role")
        item_id = item.get("id")
        if item_id is None:
            item_id = new_id("item")
        elif not isinstance(item_id, str) or not 0 < len(item_id) <= MAX_ID or any(i.wire["id"] == item_id for i in self.items):
            raise ClientError("invalid_value", f"item.id must be a new string of 1 to {MAX_ID} characters", "item.id")
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise ClientError("invalid_value", "item.content must be a non-empty list of parts", "item.content")
        texts: list[str] = []
        pcm = bytearray()
        wire_parts: list[dict[str, Any]] = []
        for n, part in enumerate(content):
            part = _table(part, f"item.content[{n}]")
            kind = part.get("type")
            if role == "user" and kind == "input_text" or role == "assistant" and kind in ("output_text", "text"):
                texts.append(_text(part.get("text"), f"item.content[{n}].text"))
                wire_parts.append({"type": kind, "text": texts[-1]})
            elif role == "assistant" and kind == "output_audio":
                texts.append(_text(part.get("transcript"), f"item.content[{n}].transcript"))
                wire_parts.append({"type": kind, "transcript": texts[-1]})
            elif role == "user" and kind == "input_audio":
                chunk = decode_base64(part.get("audio"), f"item.content[{n}].audio")
                if len(chunk) % 2:
                    raise ClientError("invalid_value", "audio must be whole PCM16 samples", f"item.content[{n}].audio")
                if len(pcm) + len(chunk) > self.max_buffer:
                    raise ClientError("input_audio_too_long", f"an item holds at most {self.server.settings.max_audio_seconds:g} s of audio", f"item.content[{n}].audio")
                pcm.extend(chunk)
                wire_parts.append({"type": kind, "transcript": None})
            else:
                raise ClientError("invalid_value", f"content part type {str(kind)[:40]!r} is not valid for a {role} message", f"item.content[{n}].type")
        if texts and pcm:
            raise ClientError("not_supported", "a user item holds text or audio, not both; send two items", "item.content")
        if pcm:
            turn = Turn("user", units=await self._units(bytes(pcm)))
        else:
            text = "".join(texts)
            if role == "user" and not text.strip():
                raise ClientError("invalid_value", "the text is empty", "item.content")
            turn = Turn(role, text=text)
        wire = {"id": item_id, "object": "realtime.item", "type": "message", "role": role, "status": "completed", "content": wire_parts}
        await self._add(Item(wire, turn))

    async def on_response_create(self, event: dict[str, Any]) -> None:
        if self.active is not None:
            raise ClientError("conversation_already_has_active_response", f"response {self.active.id} is in progress; cancel it or wait for response.done")
        params = _table(event.get("response") or {}, "response")
        cfg = self.config
        modalities, max_tokens, instructions = cfg.output_modalities, cfg.max_output_tokens, cfg.instructions
        reflections, sampling, metadata = cfg.reflections, dict(cfg.sampling), None
        for key, value in params.items():
            if key == "output_modalities":
                modalities = self._modalities(value, "response.output_modalities")
            elif key == "max_output_tokens":
                max_tokens = value
            elif key == "instructions":
                instructions = _text(value, "response.instructions") if value is not None else None
            elif key == "metadata":
                metadata = _metadata(value)
            elif key == "conversation":
                if value not in (None, "auto"):
                    raise ClientError("not_supported", "responses write to the session's conversation ('auto') only", "response.conversation")
            elif key == "audio":
                _check_audio(value, "response.audio")
            elif key in ("tools", "input", "prompt", "reasoning"):
                if value not in (None, []):
                    raise ClientError("not_supported", f"response.{key} is not supported by this server", f"response.{key}")
            elif key == "reempathy":
                ext = _table(value, "response.reempathy")
                if "reflections" in ext:
                    if not isinstance(ext["reflections"], bool):
                        raise ClientError("invalid_value", "response.reempathy.reflections must be true or false")
                    reflections = ext["reflections"]
                if "sampling" in ext:
                    sampling.update(_table(ext["sampling"], "response.reempathy.sampling"))
                unknown = [k for k in ext if k not in ("reflections", "sampling")]
                if unknown:
                    raise ClientError("unknown_parameter", f"unknown field response.reempathy.{str(unknown[0])[:40]}")
            elif key not in ("tool_choice", "parallel_tool_calls"):
                raise ClientError("unknown_parameter", f"unknown response field {str(key)[:40]!r}", f"response.{str(key)[:40]}")
        turns = [item.turn for item in self.items if item.turn is not None]
        if not any(turn.role == "user" for turn in turns):
            raise ClientError("invalid_value", "the conversation has no user item yet; send audio (commit) or a text item first")
        server = self.server
        model = server.model(cfg.model)
        started = time.perf_counter()
        prompt = server.prompt_ids(turns, instructions, model)
        audio = modalities == ["audio"]
        spec = server.response_spec(model, prompt, sampling, max_tokens, audio=audio, hidden_text=reflections)
        run = ResponseRun(server.scheduler, server.backbone, server.backbone.speech_decoder, spec, server.speech_pool, server.count_token, started)  # type: ignore[arg-type]
        try:
            run.start()
        except ServerBusy as exc:
            server.metrics.refused.inc()
            raise ClientError("server_busy", str(exc), kind="server_error") from None
        active = self.active = Active(new_id("resp"), new_id("item"), run)
        base = {
            "id": active.id, "object": "realtime.response", "status": "in_progress", "output": [],
            "output_modalities": modalities, "max_output_tokens": spec.options.max_new_tokens,
            "conversation_id": self.id, "metadata": metadata, "audio": {"output": {"format": PCM}},
        }
        await self.send({"type": "response.created", "response": base})
        active.task = asyncio.create_task(self._stream(active, base, audio, reflections, len(prompt), model.name))

    async def on_response_cancel(self, event: dict[str, Any]) -> None:
        active = self.active
        wanted = event.get("response_id")
        if active is None or (wanted is not None and wanted != active.id):
            raise ClientError("response_cancel_not_active", "there is no response in progress to cancel", "response_id")
        active.reason = "client_cancelled"
        active.run.cancel()

    # --- a response ---------------------------------------------------------------------------------

    async def _stream(self, active: Active, base: dict[str, Any], audio: bool, reflections: bool, prompt_len: int, model: str) -> None:
        ids = {"response_id": active.id, "item_id": active.item_id, "output_index": 0}
        part_ids = {**ids, "content_index": 0}
        item = {"id": active.item_id, "object": "realtime.item", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        await self.send({"type": "response.output_item.added", "response_id": active.id, "output_index": 0, "item": item})
        await self.send({"type": "conversation.item.added", "item": item, "previous_item_id": self.items[-1].wire["id"] if self.items else None})
        part: dict[str, Any] = {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}
        await self.send({"type": "response.content_part.added", **part_ids, "part": part})
        transcript: list[str] = []
        hidden: list[dict[str, Any]] = []
        resampler = StreamResampler(self.server.backbone.speech_decoder.sample_rate, WIRE_RATE) if audio else None  # type: ignore[union-attr]
        sent_audio = [0.0]

        async def emit(event: Any) -> None:
            if isinstance(event, TextEvent):
                transcript.append(event.text)
                kind = "response.output_audio_transcript.delta" if audio else "response.output_text.delta"
                await self.send({"type": kind, **part_ids, "delta": event.text})
            elif isinstance(event, AudioEvent) and resampler is not None:
                await self._audio(part_ids, resampler.push(event.samples), sent_audio, active)
            elif isinstance(event, HiddenTextEvent):
                await self.send({"type": "response.reflection.delta", **ids, "kind": event.kind, "index": event.index, "delta": event.text})
            elif isinstance(event, ReflectionEvent) and reflections:
                hidden.append({"kind": event.kind, "index": event.index, "text": event.text})
                await self.send({"type": "response.reflection.done", **ids, "kind": event.kind, "index": event.index, "text": event.text})

        try:
            outcome = await active.run.stream(emit)
        except asyncio.CancelledError:
            self.active = None
            return
        except Exception as exc:  # a bug in streaming: this response fails, the session and the server go on
            log.exception("streaming response %s failed", active.id)
            active.run.cancel()
            outcome = Outcome("failed", error=exc)
        if resampler is not None and outcome.status != "cancelled":
            await self._audio(part_ids, resampler.finish(), sent_audio, active)
        self.active = None
        text = "".join(transcript)
        if outcome.result is not None and outcome.status != "cancelled":
            text = outcome.result.spoken_text  # the whole answer's text, as `reempathy decode` shows it
        await self._finish(active, base, item, part, part_ids, outcome, text, audio, hidden if reflections else None, prompt_len, model)

    async def _audio(self, part_ids: dict[str, Any], samples: Any, sent: list[float], active: Active) -> None:
        if samples.shape[0] == 0:
            return
        if sent[0] == 0.0 and active.run.stream_.first_audio is not None:
            self.server.metrics.ttfa.observe(time.perf_counter() - active.run.started)
        sent[0] += samples.shape[0] / WIRE_RATE
        await self.send({"type": "response.output_audio.delta", **part_ids, "delta": encode_pcm16(samples)})

    async def _finish(
        self, active: Active, base: dict[str, Any], item: dict[str, Any], part: dict[str, Any], part_ids: dict[str, Any],
        outcome: Outcome, text: str, audio: bool, hidden: list[dict[str, Any]] | None, prompt_len: int, model: str,
    ) -> None:
        status = outcome.status
        if audio:
            await self.send({"type": "response.output_audio.done", **part_ids})
            await self.send({"type": "response.output_audio_transcript.done", **part_ids, "transcript": text})
            part = {"type": "audio", "transcript": text}
            content = [{"type": "output_audio", "transcript": text}]
        else:
            await self.send({"type": "response.output_text.done", **part_ids, "text": text})
            part = {"type": "text", "text": text}
            content = [{"type": "output_text", "text": text}]
        await self.send({"type": "response.content_part.done", **part_ids, "part": part})
        item = {**item, "status": "completed" if status == "completed" else "incomplete", "content": content}
        await self.send({"type": "response.output_item.done", "response_id": active.id, "output_index": 0, "item": item})
        previous = self.items[-1].wire["id"] if self.items else None
        await self.send({"type": "conversation.item.done", "item": item, "previous_item_id": previous})
        result = outcome.result
        keep = result is not None and status in ("completed", "incomplete")
        self.items.append(Item(item, Turn("assistant", text=result.spoken_text, units=result.audio_units) if keep else None))  # type: ignore[union-attr]
        details: dict[str, Any] | None = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": "client_cancelled" if active.reason != "turn_detected" else "turn_detected"}
        elif status == "incomplete":
            details = {"type": "incomplete", "reason": "max_output_tokens"}
        elif status == "failed":
            code, message = describe_failure(outcome.error)  # type: ignore[arg-type]
            details = {"type": "failed", "error": {"type": "server_error", "code": code, "message": message}}
        generated = result.counts.generated if result is not None else 0
        ext: dict[str, Any] = {
            "model": model,
            "stop_reason": result.stop_reason if result is not None else status,
            "strategy": result.strategy if result is not None else None,
            "audio_units": len(result.audio_units) if result is not None else 0,
            "first_token_s": outcome.first_token_s,
            "first_audio_s": outcome.first_audio_s,
        }
        if hidden is not None:
            ext["reflections"] = hidden
        response = {
            **base, "status": status, "status_details": details, "output": [item],
            "usage": {"input_tokens": prompt_len, "output_tokens": generated, "total_tokens": prompt_len + generated},
            "reempathy": ext,
        }
        metrics = self.server.metrics
        metrics.responses.labels(status=status).inc()
        if outcome.first_token_s is not None:
            metrics.ttft.observe(outcome.first_token_s)
        await self.send({"type": "response.done", "response": response})

    # --- helpers -------------------------------------------------------------------------------------

    def session_wire(self) -> dict[str, Any]:
        """The effective session, as ``session.created`` / ``session.updated`` show it."""
        cfg = self.config
        return {
            "type": "realtime", "object": "realtime.session", "id": self.id, "model": cfg.model,
            "output_modalities": cfg.output_modalities, "instructions": cfg.instructions or "",
            "max_output_tokens": cfg.max_output_tokens if cfg.max_output_tokens is not None else self.server.budget(None, self.server.model(cfg.model)),
            "tools": [],
            "audio": {
                "input": {"format": PCM, "turn_detection": None, "transcription": None},
                "output": {"format": PCM},
            },
            "reempathy": {
                "reflections": cfg.reflections, "sampling": cfg.sampling, "models": list(self.server.models),
                "hears": self.server.hears, "speaks": self.server.speaks, "sampling_keys": list(SAMPLING_KEYS),
            },
        }

    def _modalities(self, value: Any, param: str) -> list[str]:
        if value == ["audio"]:
            if not self.server.speaks:
                raise ClientError("not_available", "this server has no speech decoder; use output_modalities [\"text\"]", param)
            return ["audio"]
        if value == ["text"]:
            return ["text"]
        raise ClientError("invalid_value", f"{param} must be [\"audio\"] (with its transcript) or [\"text\"]", param)

    def _check_room(self) -> None:
        if len(self.items) >= self.server.settings.max_conversation_items:
            raise ClientError("conversation_full", f"the conversation holds at most {self.server.settings.max_conversation_items} items; start a new session")

    async def _units(self, pcm: bytes) -> list[int]:
        samples = pcm16_to_float(pcm)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.server.speech_pool, self.server.units, samples, WIRE_RATE)

    async def _add(self, item: Item) -> None:
        previous = self.items[-1].wire["id"] if self.items else None
        self.items.append(item)
        await self.send({"type": "conversation.item.added", "item": item.wire, "previous_item_id": previous})
        await self.send({"type": "conversation.item.done", "item": item.wire, "previous_item_id": previous})


HANDLERS = {
    "session.update": RealtimeSession.on_session_update,
    "input_audio_buffer.append": RealtimeSession.on_append,
    "input_audio_buffer.commit": RealtimeSession.on_commit,
    "input_audio_buffer.clear": RealtimeSession.on_clear,
    "conversation.item.create": RealtimeSession.on_item_create,
    "response.create": RealtimeSession.on_response_create,
    "response.cancel": RealtimeSession.on_response_cancel,
}


def _table(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ClientError("invalid_value", f"{param} must be a JSON object", param)
    return value


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise ClientError("invalid_value", f"{param} must be a string", param)
    try:
        return check_text(value, param)
    except ValueError as exc:
        raise ClientError("invalid_value", str(exc), param) from None


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    table = _table(value, "response.metadata")
    if len(table) > 16 or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in table.items()):
        raise ClientError("invalid_value", "response.metadata holds at most 16 string pairs (keys ≤ 64, values ≤ 512 characters)", "response.metadata")
    return table


def _check_audio(value: Any, param: str) -> None:
    """Only 24 kHz PCM16 in and out; no server VAD, no transcription, normal speed."""
    audio = _table(value, param)
    for side, table in audio.items():
        if side not in ("input", "output"):
            raise ClientError("unknown_parameter", f"unknown field {param}.{str(side)[:20]}", param)
        table = _table(table, f"{param}.{side}")
        for key, setting in table.items():
            where = f"{param}.{side}.{key}"
            if key == "format":
                fmt = _table(setting, where)
                if fmt.get("type", "audio/pcm") != "audio/pcm" or fmt.get("rate", WIRE_RATE) != WIRE_RATE:
                    raise ClientError("not_supported", f"{where}: only audio/pcm at {WIRE_RATE} Hz is supported", where)
            elif key in ("turn_detection", "transcription", "noise_reduction"):
                if setting is not None:
                    raise ClientError("not_supported", f"{where} is not supported (push-to-talk: commit the buffer yourself); send null", where)
            elif key == "speed":
                if setting != 1 and setting != 1.0:
                    raise ClientError("not_supported", f"{where}: only speed 1.0 is supported", where)
            elif key != "voice":
                raise ClientError("unknown_parameter", f"unknown field {where}", where)


__all__ = ["HANDLERS", "RealtimeSession"]

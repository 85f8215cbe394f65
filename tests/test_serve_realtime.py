"""`reempathy serve`'s realtime websocket, driven by a client written against the OpenAI event names.

The bar (issue 24): text and audio prompts with every strategy give the transcript that
`reempathy decode` gives for the same prompt (greedy); reflections stream only on request and are
never heard; 16 sessions at once all complete; a disconnect or cancel frees its row within one
step (read off the scheduler); 200 malformed events each get an `error` event while another
session converses unaffected; a plugin failure ends only its response; every server event is a
valid event of the OpenAI SDK's own types.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math

import pytest
import websockets
from serve_helpers import (
    MAX_TOKENS,
    PROMPT,
    ask,
    heard_units,
    model_config,
    pcm16,
    receive_until,
    registry,
    running_server,
    send,
    session,
    voice,
    write_configs,
)

from reempathy.config import load_config
from reempathy.runner import load_backbone, run_decode
from reempathy.serve.audio import WIRE_RATE
from reempathy.speech.decoder.flow import mel_frames


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    with running_server(write_configs(folder)) as running:
        running.folder = folder
        yield running


@pytest.fixture(scope="module")
def offline(served):
    """`reempathy decode`'s answers, on a backbone of its own (same seed, same weights)."""
    reg = registry()
    cache: dict = {}
    backbone = load_backbone(load_config(served.folder / "sft.toml", [], None, reg), reg)

    def answer(model: str, prompt: str | None = None, units: list[int] | None = None):
        key = (model, prompt, tuple(units or ()))
        if key not in cache:
            cfg = load_config(served.folder / f"{model}.toml", [], None, reg)
            cache[key] = run_decode(cfg, reg, prompt=prompt, units=units, backbone=backbone)
        return cache[key]

    return answer


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("model", ["sft", "cotbs", "reempathy"])
def test_a_text_prompt_gives_the_offline_greedy_transcript_for_every_strategy(served, offline, model):
    async def main():
        async with await session(served.ws, model) as ws:
            return await ask(ws, PROMPT)

    conv = run(main())
    expected = offline(model, PROMPT)
    assert conv.done["response"]["status"] in ("completed", "incomplete")
    assert conv.transcript == expected.spoken_text
    assert "".join(conv.transcript_deltas) == expected.spoken_text
    assert conv.done["response"]["usage"]["output_tokens"] == expected.counts.generated
    assert conv.done["response"]["reempathy"]["strategy"] == model


def test_a_spoken_prompt_gives_the_offline_transcript_of_the_same_units(served, offline):
    pcm = pcm16(voice(2.0))

    async def main():
        async with await session(served.ws, "sft") as ws:
            return await ask(ws, pcm=pcm)

    conv = run(main())
    units = heard_units(served.server, pcm)
    assert len(units) == math.ceil(2.0 * 12.5)
    assert "input_audio_buffer.committed" in conv.types()
    assert conv.transcript == offline("sft", units=units).spoken_text


def test_audio_out_is_exactly_the_spoken_units_synthesised_never_a_reflection(served, offline):
    async def main():
        async with await session(served.ws, "reempathy", reempathy={"reflections": True}) as ws:
            return await ask(ws, PROMPT)

    conv = run(main())
    expected = offline("reempathy", PROMPT)
    assert expected.hidden, "the reempathy strategy should have reflected"
    samples_22k = 256 * mel_frames(len(expected.audio_units), 12.5)
    assert len(conv.audio) // 2 == math.ceil(samples_22k * WIRE_RATE / 22050)


def test_reflections_stream_only_when_the_session_asks_for_them(served, offline):
    async def main(reflections: bool):
        async with await session(served.ws, "reempathy", reempathy={"reflections": reflections}) as ws:
            return await ask(ws, PROMPT)

    quiet, told = run(main(False)), run(main(True))
    expected = offline("reempathy", PROMPT)
    assert not any(t.startswith("response.reflection") for t in quiet.types())
    assert "reflections" not in quiet.done["response"]["reempathy"]
    assert told.reflections == {(h.kind, h.index): h.text for h in expected.hidden}
    assert told.done["response"]["reempathy"]["reflections"] == [
        {"kind": h.kind, "index": h.index, "text": h.text} for h in expected.hidden
    ]
    assert told.transcript == quiet.transcript == expected.spoken_text


def test_a_second_turn_continues_the_conversation_with_the_first_answer_in_its_prompt(served, offline):
    async def main():
        async with await session(served.ws, "sft") as ws:
            first = await ask(ws, PROMPT)
            second = await ask(ws, "Thank you.")
            return first, second

    first, second = run(main())
    assert first.done["response"]["usage"]["input_tokens"] < second.done["response"]["usage"]["input_tokens"]
    assert second.done["response"]["status"] in ("completed", "incomplete")


def test_every_server_event_is_a_valid_openai_realtime_event(served):
    from openai.types.realtime import RealtimeServerEvent
    from pydantic import TypeAdapter

    adapter = TypeAdapter(RealtimeServerEvent)

    async def main():
        async with await session(served.ws, "sft") as ws:
            conv = await ask(ws, PROMPT)
            conv.events += (await ask(ws, pcm=pcm16(voice(1.0)))).events
            await send(ws, type="no.such.event", event_id="evt_1")
            conv.events.append(await receive_until(ws, "error"))
            return conv

    conv = run(main())
    standard = [e for e in conv.events if not e["type"].startswith("response.reflection")]
    kinds = {adapter.validate_python(e).type for e in standard}
    assert {"response.created", "response.output_audio.delta", "response.output_audio_transcript.delta",
            "response.done", "conversation.item.done", "input_audio_buffer.committed", "error"} <= kinds
    assert [e for e in conv.events if e["type"] == "error"][0]["error"]["event_id"] == "evt_1"


def test_sixteen_sessions_at_once_all_complete_with_their_offline_transcripts(served, offline):
    models = ["sft", "cotbs", "reempathy", "sft"] * 4
    prompts = [f"{PROMPT} ({n})" for n in range(16)]

    async def one(model, prompt):
        async with await session(served.ws, model) as ws:
            return await ask(ws, prompt)

    async def main():
        return await asyncio.gather(*(one(m, p) for m, p in zip(models, prompts)))

    convs = run(main())
    for model, prompt, conv in zip(models, prompts, convs):
        assert conv.transcript == offline(model, prompt).spoken_text, (model, prompt)
    assert served.server.scheduler.running == 0


def test_response_cancel_ends_the_response_and_frees_its_row_within_one_step(served):
    async def main():
        async with await session(served.ws, "long", max_output_tokens=256) as ws:
            await send(ws, type="conversation.item.create",
                       item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": PROMPT}]})
            await receive_until(ws, "conversation.item.done")
            await send(ws, type="response.create")
            await receive_until(ws, "response.output_audio_transcript.delta")
            await send(ws, type="response.cancel")
            return await receive_until(ws, "response.done")

    freed_before = len(served.server.scheduler.freed)
    done = run(main())
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"]["reason"] == "client_cancelled"
    assert done["response"]["usage"]["output_tokens"] < 256
    freed = list(served.server.scheduler.freed)[freed_before:]
    assert len(freed) == 1 and freed[0][1] <= 1


def test_a_client_that_disconnects_mid_answer_frees_its_row_within_one_step(served):
    scheduler = served.server.scheduler
    freed_before = len(scheduler.freed)

    async def main():
        ws = await session(served.ws, "long", max_output_tokens=256)
        await send(ws, type="conversation.item.create",
                   item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": PROMPT}]})
        await receive_until(ws, "conversation.item.done")
        await send(ws, type="response.create")
        await receive_until(ws, "response.output_audio_transcript.delta")
        await ws.close()

    run(main())
    assert wait_for(lambda: len(scheduler.freed) > freed_before and scheduler.running == 0)
    key, steps = scheduler.freed[-1]
    assert steps <= 1


def wait_for(condition, timeout: float = 60.0) -> bool:
    """Poll ``condition`` (the scheduler thread ends rows on its own time) until true or ``timeout``."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_two_hundred_malformed_events_each_get_an_error_and_another_session_is_unaffected(served, offline):
    import random

    rng = random.Random(24)
    samples = [
        "not json", "[]", "null", "42", '"text"', "{}", '{"type": 7}', '{"type": "nope"}',
        '{"type": "session.update"}', '{"type": "session.update", "session": []}',
        '{"type": "session.update", "session": {"model": "missing"}}',
        '{"type": "session.update", "session": {"max_output_tokens": -1}}',
        '{"type": "session.update", "session": {"output_modalities": ["video"]}}',
        '{"type": "session.update", "session": {"reempathy": {"sampling": {"temperature": -3}}}}',
        '{"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 8000}}}}}',
        '{"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "server_vad"}}}}}',
        '{"type": "input_audio_buffer.append"}', '{"type": "input_audio_buffer.append", "audio": "%%%"}',
        '{"type": "input_audio_buffer.append", "audio": "AAAA"}', '{"type": "input_audio_buffer.commit"}',
        '{"type": "conversation.item.create"}', '{"type": "conversation.item.create", "item": {"type": "function_call"}}',
        '{"type": "conversation.item.create", "item": {"type": "message", "role": "system", "content": []}}',
        '{"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": 5}]}}',
        '{"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": ""}]}}',
        '{"type": "response.create"}', '{"type": "response.create", "response": {"max_output_tokens": 100000}}',
        '{"type": "response.cancel"}', '{"type": "response.create", "response": {"tools": [{"type": "function"}]}}',
        '{"type": "response.create", "response": 3}', '{"type": "' + "x" * 5000 + '"}', "[" * 10000,
    ]

    def fuzzed(n: int) -> str:
        text = samples[n % len(samples)]
        if n >= len(samples):  # mangle in ways that keep it malformed: cut it short, or put a stray character first
            if rng.random() < 0.5:
                text = text[: rng.randrange(len(text))]
            else:
                text = chr(rng.randrange(33, 0x2FFF)) + text
        return text

    async def fuzz():
        async with await session(served.ws) as ws:
            errors = 0
            for n in range(200):
                await ws.send(fuzzed(n))
                event = await receive_until(ws, "error", timeout=30)
                errors += event["type"] == "error"
            await ws.send(json.dumps({"type": "binary?"}).encode())
            await receive_until(ws, "error")
            return errors, ws.state

    async def bystander():
        async with await session(served.ws, "reempathy") as ws:
            return await ask(ws, PROMPT)

    async def main():
        return await asyncio.gather(fuzz(), bystander())

    (errors, state), conv = run(main())
    assert errors == 200
    assert state == websockets.protocol.State.OPEN
    assert conv.transcript == offline("reempathy", PROMPT).spoken_text


def test_a_plugin_failure_ends_that_response_and_the_session_and_server_go_on(served, offline):
    async def main():
        async with await session(served.ws, "broken") as ws:
            failed = await ask(ws, PROMPT)
            await send(ws, type="session.update", session={"model": "sft"})
            await receive_until(ws, "session.updated")
            same_session = await ask(ws, PROMPT)
        async with await session(served.ws, "sft") as ws:
            other = await ask(ws, PROMPT)
        return failed, same_session, other

    failed, same_session, other = run(main())
    details = failed.done["response"]["status_details"]
    assert failed.done["response"]["status"] == "failed"
    assert details["error"]["code"] == "pluginfailure" and "boom" in details["error"]["message"]
    assert same_session.done["response"]["status"] in ("completed", "incomplete")
    assert other.transcript == offline("sft", PROMPT).spoken_text


def test_a_second_response_create_while_one_runs_is_an_error_not_a_second_row(served):
    async def main():
        async with await session(served.ws, "long", max_output_tokens=64) as ws:
            await send(ws, type="conversation.item.create",
                       item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": PROMPT}]})
            await receive_until(ws, "conversation.item.done")
            await send(ws, type="response.create")
            await receive_until(ws, "response.created")
            await send(ws, type="response.create")
            error = await receive_until(ws, "error")
            await receive_until(ws, "response.done")
            return error

    assert run(main())["error"]["code"] == "conversation_already_has_active_response"


def test_a_message_over_the_size_cap_gets_an_error_and_the_session_lives(served):
    cap = served.server.settings.max_message_bytes

    async def main():
        async with await session(served.ws) as ws:
            audio = base64.b64encode(b"\0" * cap).decode()
            await send(ws, type="input_audio_buffer.append", audio=audio)
            error = await receive_until(ws, "error")
            await send(ws, type="input_audio_buffer.clear")
            await receive_until(ws, "input_audio_buffer.cleared")
            return error

    assert run(main())["error"]["code"] == "message_too_large"


def test_audio_beyond_the_cap_in_seconds_is_refused(served):
    seconds = served.server.settings.max_audio_seconds

    async def main():
        async with await session(served.ws) as ws:
            chunk = base64.b64encode(b"\0" * 48000).decode()  # 1 s
            for _ in range(int(seconds)):
                await send(ws, type="input_audio_buffer.append", audio=chunk)
            await send(ws, type="input_audio_buffer.append", audio=chunk)
            return await receive_until(ws, "error")

    assert run(main())["error"]["code"] == "input_audio_buffer_full"


def test_a_session_beyond_max_sessions_is_refused_with_429(tmp_path):
    with running_server(write_configs(tmp_path, max_sessions=1)) as one:

        async def main():
            async with await session(one.ws):
                with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
                    await websockets.connect(one.ws)
                return refused.value.response.status_code

        assert run(main()) == 429


def test_a_websocket_from_another_origin_is_refused_and_the_own_origin_is_accepted(served):
    async def main():
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            await websockets.connect(served.ws, origin="http://evil.example")
        own = await websockets.connect(served.ws, origin=f"http://127.0.0.1:{served.port}")
        await own.close()
        return refused.value.response.status_code

    assert run(main()) == 403


def test_with_an_api_key_the_websocket_needs_it_as_bearer_or_subprotocol(served):
    async def main():
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            await websockets.connect(served.ws)
        with pytest.raises(websockets.exceptions.InvalidStatus) as wrong:
            await websockets.connect(served.ws, additional_headers={"Authorization": "Bearer nope-nope"})
        bearer = await websockets.connect(served.ws, additional_headers={"Authorization": "Bearer secret-key-1"})
        await bearer.close()
        browser = await websockets.connect(served.ws, subprotocols=["realtime", "openai-insecure-api-key.secret-key-1"])
        chosen = browser.subprotocol
        await browser.close()
        return refused.value.response.status_code, wrong.value.response.status_code, chosen

    served.server.api_key = "secret-key-1"
    try:
        assert run(main()) == (401, 401, "realtime")
    finally:
        served.server.api_key = None


def test_an_unknown_model_is_refused_at_the_handshake(served):
    async def main():
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            await websockets.connect(served.ws + "?model=gpt-nothing")
        return refused.value.response.status_code

    assert run(main()) == 404


def test_the_model_configs_used_are_the_ones_written(served):
    """The offline side reads the same files as the server (a guard for the comparisons above)."""
    for name in ("sft", "cotbs", "reempathy"):
        assert (served.folder / f"{name}.toml").read_text() == model_config(name)
    assert MAX_TOKENS == load_config(served.folder / "sft.toml").decode.max_new_tokens

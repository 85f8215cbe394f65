"""`reempathy serve`'s HTTP side: chat completions (streamed and whole), models, health, metrics, keys, limits.

A real server on a loopback port; requests through the standard library's HTTP client.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import wave

import numpy as np
import pytest
from serve_helpers import PROMPT, pcm16, registry, running_server, voice, write_configs

from reempathy.config import load_config
from reempathy.runner import load_backbone, run_decode
from reempathy.serve.audio import WIRE_RATE
from reempathy.speech.decoder.flow import mel_frames


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-http")
    with running_server(write_configs(folder)) as running:
        running.folder = folder
        yield running


@pytest.fixture(scope="module")
def offline(served):
    reg = registry()
    backbone = load_backbone(load_config(served.folder / "sft.toml", [], None, reg), reg)

    def answer(model, prompt=None, units=None):
        return run_decode(load_config(served.folder / f"{model}.toml", [], None, reg), reg, prompt=prompt, units=units, backbone=backbone)

    return answer


def request(served, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=120)
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    return response.status, response.getheader("Content-Type"), response.read()


def sse(raw: bytes) -> list:
    events = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_a_streamed_text_completion_gives_the_offline_transcript_as_server_sent_events(served, offline):
    status, kind, raw = request(served, "POST", "/v1/chat/completions",
                                {"model": "reempathy", "stream": True, "messages": [{"role": "user", "content": PROMPT}]})
    events = sse(raw)
    assert status == 200 and kind.startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    expected = offline("reempathy", PROMPT)
    assert text == expected.spoken_text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["usage"]["completion_tokens"] == expected.counts.generated


def test_a_streamed_audio_completion_sends_the_transcript_and_pcm16_of_the_spoken_units(served, offline):
    status, _, raw = request(served, "POST", "/v1/chat/completions", {
        "model": "sft", "stream": True, "modalities": ["text", "audio"], "audio": {"format": "pcm16"},
        "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]})
    chunks = sse(raw)[:-1]
    audio = [c["choices"][0]["delta"]["audio"] for c in chunks if "audio" in c["choices"][0]["delta"]]
    transcript = "".join(a.get("transcript", "") for a in audio)
    pcm = b"".join(base64.b64decode(a["data"]) for a in audio if "data" in a)
    expected = offline("sft", PROMPT)
    assert status == 200 and transcript == expected.spoken_text
    assert len(pcm) // 2 == math.ceil(256 * mel_frames(len(expected.audio_units), 12.5) * WIRE_RATE / 22050)


def test_a_whole_completion_from_a_wav_question_answers_with_a_wav(served, offline):
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(pcm16(voice(1.5, 16000)))
    question = {"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(), "format": "wav"}}
    status, _, raw = request(served, "POST", "/v1/chat/completions", {
        "model": "sft", "modalities": ["text", "audio"], "messages": [{"role": "user", "content": [question]}]})
    body = json.loads(raw)
    assert status == 200, body
    samples = np.frombuffer(pcm16(voice(1.5, 16000)), dtype="<i2").astype(np.float32) / 32768
    import torch

    units = served.server.units(torch.from_numpy(samples), 16000)
    message = body["choices"][0]["message"]
    assert message["audio"]["transcript"] == offline("sft", units=units).spoken_text
    with wave.open(io.BytesIO(base64.b64decode(message["audio"]["data"]))) as answer:
        assert answer.getframerate() == WIRE_RATE and answer.getnframes() > 0


def test_reflections_come_in_the_extension_only_when_asked(served, offline):
    body = {"model": "reempathy", "messages": [{"role": "user", "content": PROMPT}]}
    _, _, quiet = request(served, "POST", "/v1/chat/completions", body)
    _, _, told = request(served, "POST", "/v1/chat/completions", {**body, "reempathy": {"reflections": True}})
    expected = offline("reempathy", PROMPT)
    assert "reflections" not in json.loads(quiet)["reempathy"]
    assert json.loads(told)["reempathy"]["reflections"] == [{"kind": h.kind, "index": h.index, "text": h.text} for h in expected.hidden]
    assert json.loads(told)["choices"][0]["message"]["content"] == expected.spoken_text


@pytest.mark.parametrize("body, status, code", [
    ({"messages": []}, 400, "invalid_value"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "not_supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi"}], "bogus": 1}, 400, "unknown_parameter"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "invalid_value"),
    ([1, 2], 400, "invalid_value"),
])
def test_a_bad_request_gets_an_openai_shaped_error_naming_the_field(served, body, status, code):
    got, _, raw = request(served, "POST", "/v1/chat/completions", body)
    assert got == status and json.loads(raw)["error"]["code"] == code


def test_a_body_over_the_size_cap_is_refused_with_413(served):
    big = b'{"messages": "' + b"x" * served.server.settings.max_message_bytes + b'"}'
    status, _, _ = request(served, "POST", "/v1/chat/completions", big)
    assert status == 413


def test_models_lists_one_model_per_configured_strategy(served):
    status, _, raw = request(served, "GET", "/v1/models")
    data = json.loads(raw)["data"]
    assert status == 200
    assert [m["id"] for m in data] == ["sft", "cotbs", "reempathy", "long", "broken", "scripted"]
    assert {m["id"]: m["reempathy"]["strategy"] for m in data}["reempathy"] == "reempathy"


def test_health_says_ok_once_the_model_is_loaded(served):
    status, _, raw = request(served, "GET", "/health")
    body = json.loads(raw)
    assert status == 200 and body["status"] == "ok" and body["scheduler_alive"]


def test_metrics_are_prometheus_text_with_sessions_queue_tokens_and_time_to_first_audio(served):
    request(served, "POST", "/v1/chat/completions", {"modalities": ["text", "audio"], "messages": [{"role": "user", "content": PROMPT}]})
    status, kind, raw = request(served, "GET", "/metrics")
    text = raw.decode()
    assert status == 200 and kind.startswith("text/plain")
    for name in ("reempathy_sessions", "reempathy_queue", "reempathy_rows_running", "reempathy_tokens_per_second",
                 "reempathy_generated_tokens_total", "reempathy_time_to_first_audio_seconds_count", "reempathy_ready 1.0"):
        assert name in text, name
    count = [line for line in text.splitlines() if line.startswith("reempathy_time_to_first_audio_seconds_count")][0]
    assert float(count.split()[-1]) >= 1


def test_with_an_api_key_the_api_wants_the_bearer_token_and_health_stays_open(served):
    served.server.api_key = "secret-key-2"
    try:
        assert request(served, "GET", "/v1/models")[0] == 401
        assert request(served, "GET", "/v1/models", headers={"Authorization": "Bearer wrong-key-2"})[0] == 401
        assert request(served, "GET", "/v1/models", headers={"Authorization": "Bearer secret-key-2"})[0] == 200
        assert request(served, "GET", "/metrics")[0] == 401
        assert request(served, "GET", "/health")[0] == 200
        assert request(served, "GET", "/")[0] == 200
    finally:
        served.server.api_key = None


def test_a_post_from_another_origin_is_refused(served):
    status, _, _ = request(served, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
                           headers={"Origin": "http://evil.example"})
    assert status == 403


def test_the_page_and_its_script_are_served_from_the_package(served):
    status, kind, raw = request(served, "GET", "/")
    assert status == 200 and kind.startswith("text/html") and b"/static/app.js" in raw
    for name in ("app.js", "capture.js", "style.css"):
        assert request(served, "GET", f"/static/{name}")[0] == 200


def test_a_request_beyond_the_rows_of_the_batch_gets_429(tmp_path):
    with running_server(write_configs(tmp_path, max_sessions=1)) as one:
        import threading

        conn = http.client.HTTPConnection("127.0.0.1", one.port, timeout=120)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({
            "model": "long", "stream": True, "max_tokens": 256, "messages": [{"role": "user", "content": PROMPT}]}),
            headers={"Content-Type": "application/json"})
        first = conn.getresponse()
        first.readline()  # the row is running: its first chunk has been sent
        status, _, raw = request(one, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        conn.close()  # the streaming client goes away: its row is cancelled
        assert status == 429 and json.loads(raw)["error"]["code"] == "server_busy"
        done = threading.Event()
        assert wait(lambda: one.server.scheduler.running == 0, done)


def wait(condition, event, timeout=60.0):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end and not condition():
        event.wait(0.01)
    return condition()

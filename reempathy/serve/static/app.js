// The page at /: push-to-talk over the OpenAI Realtime events of /v1/realtime, playback as audio arrives,
// the transcript, the reflections (the response.reflection.delta extension), and time to first audio.
// Plain JS, no build step. State for tests and screen readers: body[data-state], #ttfa[data-ms],
// #audio-received[data-samples], #captured[data-ms].
"use strict";
const RATE = 24000;
const $ = (id) => document.getElementById(id);
const state = { ws: null, ctx: null, mic: null, recording: false, heardSamples: 0, pending: [], playAt: 0,
  received: 0, sentAt: 0, firstAudio: false, current: null, hidden: {}, key: sessionStorage.getItem("reempathy-key") || "" };

function setState(s, text) { document.body.dataset.state = s; if (text !== undefined) $("status").textContent = text; }

function b64FromInt16(samples) {
  const bytes = new Uint8Array(samples.buffer, samples.byteOffset, samples.byteLength);
  let bin = ""; for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(bin);
}
function int16FromB64(b64) {
  const bin = atob(b64); const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Int16Array(bytes.buffer, 0, bytes.length >> 1);
}
function send(event) { if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(event)); }
function headers() { return state.key ? { Authorization: "Bearer " + state.key } : {}; }

async function loadModels() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (r.status === 401) { $("key-box").hidden = false; setState("key", "this server wants an API key"); return false; }
  if (r.status === 503) { setState("loading", "the model is loading…"); setTimeout(start, 1000); return false; }
  const body = await r.json();
  const select = $("model"); select.innerHTML = "";
  for (const m of body.data) {
    const o = document.createElement("option"); o.value = m.id; o.textContent = m.id + " (" + m.reempathy.strategy + ")";
    o.title = m.reempathy.description || ""; if (m.reempathy.default) o.selected = true; select.appendChild(o);
  }
  return true;
}

function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const protocols = ["realtime"]; if (state.key) protocols.push("openai-insecure-api-key." + state.key);
  const ws = new WebSocket(proto + "//" + location.host + "/v1/realtime?model=" + encodeURIComponent($("model").value), protocols);
  state.ws = ws;
  ws.onopen = () => { setState("ready", "connected: hold the button (or space) and talk"); enable(true); };
  ws.onclose = () => { enable(false); setState("closed", "disconnected (reload to reconnect)"); };
  ws.onmessage = (m) => onEvent(JSON.parse(m.data));
}

function enable(on) { for (const id of ["ptt", "text", "send"]) $(id).disabled = !on; }

function turn(role, text, meta) {
  const div = document.createElement("div"); div.className = "turn " + role;
  div.innerHTML = '<span class="who"></span><span class="text"></span><span class="meta"></span>';
  div.querySelector(".who").textContent = role === "user" ? "you:" : "assistant:";
  div.querySelector(".text").textContent = text || ""; div.querySelector(".meta").textContent = meta || "";
  $("transcript").appendChild(div); $("transcript").scrollTop = 1e9; return div;
}

function onEvent(e) {
  switch (e.type) {
    case "session.created": case "session.updated":
      if (!e.session.reempathy.hears) $("ptt").title = "this server has no speech tokenizer"; break;
    case "conversation.item.added":
      if (e.item.role === "user") {
        const part = e.item.content[0];
        turn("user", part.type === "input_text" ? part.text : "(spoken)", part.type === "input_audio" ? (state.lastHeard || "") : "");
      }
      break;
    case "response.created":
      state.current = turn("assistant", "", "…"); state.firstAudio = false; state.hidden = {};
      $("stop").disabled = false; setState("responding", "answering…"); break;
    case "response.output_audio_transcript.delta": case "response.output_text.delta":
      if (state.current) state.current.querySelector(".text").textContent += e.delta; break;
    case "response.output_audio.delta": play(int16FromB64(e.delta)); break;
    case "response.reflection.delta": hidden(e.kind, e.index, e.delta); break;
    case "response.done": {
      const r = e.response, ext = r.reempathy || {};
      if (state.current) {
        const t = r.output && r.output[0] && r.output[0].content[0];
        if (t) state.current.querySelector(".text").textContent = t.transcript !== undefined ? t.transcript : t.text;
        state.current.querySelector(".meta").textContent = "(" + r.status + (ext.strategy ? ", " + ext.strategy : "") + ", " + (r.usage ? r.usage.output_tokens : 0) + " tokens)";
      }
      $("stop").disabled = true; state.current = null; setState("done", "answered: hold the button to talk again"); break;
    }
    case "error": setState(document.body.dataset.state, "error: " + e.error.message); break;
  }
}

function hidden(kind, index, delta) {
  const id = kind + "-" + index; let div = state.hidden[id];
  if (!div) {
    div = document.createElement("div"); div.className = "hidden-seg"; div.innerHTML = "<b></b> <span></span>";
    div.querySelector("b").textContent = kind + " " + index + ":"; $("hidden").appendChild(div); state.hidden[id] = div;
  }
  div.querySelector("span").textContent += delta;
}

async function audio() {
  if (!state.ctx) {
    state.ctx = new AudioContext({ sampleRate: RATE });
    await state.ctx.audioWorklet.addModule("/static/capture.js");
  }
  if (state.ctx.state === "suspended") await state.ctx.resume();
  return state.ctx;
}

function play(pcm) {
  if (!state.firstAudio) {
    state.firstAudio = true; const ms = Math.round(performance.now() - state.sentAt);
    $("ttfa").dataset.ms = String(ms); $("ttfa").textContent = ms + " ms";
  }
  state.received += pcm.length;
  $("audio-received").dataset.samples = String(state.received);
  $("audio-received").textContent = (state.received / RATE).toFixed(1) + " s";
  const ctx = state.ctx; if (!ctx) return;
  const buf = ctx.createBuffer(1, pcm.length, RATE); const ch = buf.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
  const src = ctx.createBufferSource(); src.buffer = buf; src.connect(ctx.destination);
  state.playAt = Math.max(state.playAt, ctx.currentTime + 0.05); src.start(state.playAt); state.playAt += buf.duration;
}

async function startTalking() {
  if (state.recording || $("ptt").disabled) return;
  const ctx = await audio();
  if (!state.mic) {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true } });
    const node = new AudioWorkletNode(ctx, "pcm-capture");
    node.port.onmessage = (m) => onMic(m.data);
    ctx.createMediaStreamSource(stream).connect(node);
    state.mic = node;
  }
  if (state.current) send({ type: "response.cancel" });  // talking over the answer stops it
  state.recording = true; state.heardSamples = 0; $("captured").dataset.ms = "0";
  send({ type: "input_audio_buffer.clear" });
  $("ptt").classList.add("recording"); setState("recording", "listening… release to send");
}

function onMic(block) {
  if (!state.recording) return;
  const pcm = new Int16Array(block.length);
  for (let i = 0; i < block.length; i++) pcm[i] = Math.max(-32768, Math.min(32767, Math.round(block[i] * 32767)));
  send({ type: "input_audio_buffer.append", audio: b64FromInt16(pcm) });
  state.heardSamples += block.length;
  const ms = Math.round(state.heardSamples * 1000 / RATE);
  $("captured").dataset.ms = String(ms); $("captured").textContent = (ms / 1000).toFixed(1) + " s";
}

function stopTalking() {
  if (!state.recording) return;
  state.recording = false; $("ptt").classList.remove("recording");
  if (state.heardSamples === 0) { setState("ready", "nothing heard: hold the button a little longer"); return; }
  state.lastHeard = "(" + (state.heardSamples / RATE).toFixed(1) + " s)";
  send({ type: "input_audio_buffer.commit" }); respond();
}

function respond() { state.sentAt = performance.now(); send({ type: "response.create" }); }

function sessionUpdate() {
  send({ type: "session.update", session: { type: "realtime", model: $("model").value, reempathy: { reflections: $("reflections").checked } } });
  $("reflections-panel").hidden = !$("reflections").checked;
}

async function start() {
  if (!(await loadModels())) return;
  connect();
  state.ws.addEventListener("open", sessionUpdate);
}

$("ptt").addEventListener("pointerdown", (e) => { e.preventDefault(); startTalking(); });
$("ptt").addEventListener("pointerup", stopTalking);
$("ptt").addEventListener("pointerleave", stopTalking);
document.addEventListener("keydown", (e) => { if (e.code === "Space" && e.target.tagName !== "INPUT" && !e.repeat) { e.preventDefault(); startTalking(); } });
document.addEventListener("keyup", (e) => { if (e.code === "Space" && e.target.tagName !== "INPUT") stopTalking(); });
$("text-form").addEventListener("submit", async (e) => {
  e.preventDefault(); const text = $("text").value.trim(); if (!text) return; $("text").value = "";
  await audio();
  send({ type: "conversation.item.create", item: { type: "message", role: "user", content: [{ type: "input_text", text }] } });
  respond();
});
$("stop").addEventListener("click", () => send({ type: "response.cancel" }));
$("model").addEventListener("change", sessionUpdate);
$("reflections").addEventListener("change", sessionUpdate);
$("key-go").addEventListener("click", () => { state.key = $("key").value; sessionStorage.setItem("reempathy-key", state.key); $("key-box").hidden = true; start(); });
start();

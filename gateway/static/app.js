// The Tributary playground: a chat over /v1/chat/completions (SSE) and the tiers' live state from /dashboard/state.
// Every URL is relative, so the page works wherever the gateway is mounted (tributary up, compose, an ingress path).
"use strict";

const $ = (id) => document.getElementById(id);

// Text into HTML: a file's name is the user's (and a file named "<img onerror=...>" would run on the page that
// holds the API key).
const esc = (text) => String(text).replace(/[&<>"']/g,
  (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);

const state = {
  key: sessionStorage.getItem("tributary-key") || "",
  model: null,
  needsKey: false,
  history: [],          // the conversation, in the API's message format (pictures and sounds resent every turn)
  attachments: [],      // {kind: "image"|"audio", name, url (data: URL or blob:), data, format}
  controller: null,     // the AbortController of the answer streaming now
  recorder: null,
};

function headers(json) {
  const h = {};
  if (json) h["content-type"] = "application/json";
  if (state.key) h["authorization"] = "Bearer " + state.key;
  return h;
}

// --- the tiers -----------------------------------------------------------------------------------------------------

async function poll() {
  let resp;
  try {
    resp = await fetch("dashboard/state", {headers: headers(false), cache: "no-store"});
  } catch (e) {
    $("model").textContent = "the gateway does not answer";
    return;
  }
  if (resp.status === 401) {
    askForKey(state.key ? "That key was refused: " + (await errorText(resp)) : "");
    return;
  }
  if (!resp.ok) {
    $("model").textContent = "state unavailable: " + (await errorText(resp));
    return;
  }
  const s = await resp.json();
  state.needsKey = s.keys_required;
  haveKey();
  state.model = s.model;
  $("model").textContent = `model ${s.model}` + (s.tenant ? ` · tenant ${s.tenant}` : "") +
    (s.redis === "ok" ? "" : ` · Redis ${s.redis}`);
  renderTiers(s);
}

function renderTiers(s) {
  const rows = Object.entries(s.tiers || {}).map(([tier, t]) => {
    const batch = t.mean_batch != null ? t.mean_batch.toFixed(1) : "–";
    const done = t.items != null ? t.items : t.tokens;
    const what = t.items != null ? "media items encoded" : "tokens generated";
    return `<tr data-tier="${esc(tier)}"><td>${esc(tier)}</td><td class="live">${t.live}</td><td>${t.restarts}</td>` +
      `<td>${t.queue.lag}</td><td>${t.queue.in_flight}</td><td>${batch}</td>` +
      `<td class="done" title="${what}">${done}</td></tr>`;
  });
  $("tier-rows").innerHTML = rows.join("");
  $("updated").textContent = "updated " + new Date(s.time * 1000).toLocaleTimeString();
  $("cache-scope").textContent = s.cache_scope === "tenant" ? "your tenant's" : "whole cluster";
  $("cache").innerHTML = Object.entries(s.cache || {}).map(([m, c]) =>
    `<li data-modality="${esc(m)}">${esc(m)}: <span class="hits">${c.hits}</span> hits, <span class="misses">${c.misses}` +
    `</span> misses` + (c.hit_rate != null ? ` (${Math.round(c.hit_rate * 100)}% hit rate)` : "") + "</li>").join("");
  for (const kind of ["ttft", "itl"]) plot(kind, (s.latency || {})[kind] || []);
}

function plot(kind, points) {
  const svg = $(kind);
  const seen = points.filter((p) => p.n);
  const top = Math.max(1, ...seen.map((p) => p.max_ms));
  const x = (i) => (i / Math.max(1, points.length - 1)) * 300;
  const y = (v) => 58 - (v / top) * 54;
  const line = (field) => points.map((p, i) => p.n ? `${x(i).toFixed(1)},${y(p[field]).toFixed(1)}` : null)
    .filter(Boolean).join(" ");
  const dots = points.map((p, i) => p.n ? `<circle cx="${x(i).toFixed(1)}" cy="${y(p.mean_ms).toFixed(1)}" ` +
    `r="1.8"><title>${p.mean_ms} ms mean, ${p.max_ms} ms max, ${p.n} samples</title></circle>` : "").join("");
  svg.innerHTML = `<polyline class="max" points="${line("max_ms")}"></polyline>` +
    `<polyline points="${line("mean_ms")}"></polyline>` + dots;
  const last = seen[seen.length - 1];
  $(kind + "-last").textContent = last ? `latest: mean ${last.mean_ms} ms, max ${last.max_ms} ms ` +
    `(${last.n} samples); scale 0–${Math.round(top)} ms` : "no requests yet";
}

// --- the key -------------------------------------------------------------------------------------------------------

function askForKey(message) {
  state.needsKey = true;
  $("key-form").hidden = false;
  $("key-error").textContent = message || "";
  $("send").disabled = true;
  $("model").textContent = "an API key is needed";
}

function haveKey() {
  $("key-form").hidden = true;
  $("send").disabled = state.controller !== null;
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.key = $("key").value.trim();
  sessionStorage.setItem("tributary-key", state.key);
  poll();
});

// --- attachments ---------------------------------------------------------------------------------------------------

function readAs(file, how) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    how === "url" ? r.readAsDataURL(file) : r.readAsArrayBuffer(file);
  });
}

function renderAttachments() {
  $("attachments").innerHTML = state.attachments.map((a, i) =>
    `<span>${a.kind}: ${esc(a.name)} <button type="button" data-drop="${i}" aria-label="remove ${esc(a.name)}">` +
    `×</button></span>`).join("");
}

$("attachments").addEventListener("click", (ev) => {
  const i = ev.target.dataset.drop;
  if (i !== undefined) { state.attachments.splice(Number(i), 1); renderAttachments(); }
});

$("image").addEventListener("change", async (ev) => {
  const file = ev.target.files[0];
  if (!file) return;
  state.attachments.push({kind: "image", name: file.name, url: await readAs(file, "url")});
  ev.target.value = "";
  renderAttachments();
});

const AUDIO_FORMATS = {wav: "wav", "x-wav": "wav", wave: "wav", mpeg: "mp3", mp3: "mp3", flac: "flac", ogg: "ogg"};

$("audio").addEventListener("change", async (ev) => {
  const file = ev.target.files[0];
  if (!file) return;
  const ext = (file.name.split(".").pop() || "").toLowerCase();
  const format = AUDIO_FORMATS[ext] || AUDIO_FORMATS[(file.type.split("/")[1] || "").toLowerCase()];
  if (!format) { $("chat-error").textContent = `${file.name}: send WAV, MP3, FLAC or OGG audio`; return; }
  const url = await readAs(file, "url");
  state.attachments.push({kind: "audio", name: file.name, data: url.split(",")[1], format, url});
  ev.target.value = "";
  renderAttachments();
});

// Recording: the browser records compressed audio (webm/opus); it is decoded here and sent as 16 kHz mono WAV.
$("record").addEventListener("click", async () => {
  if (state.recorder) { state.recorder.stop(); return; }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({audio: true});
  } catch (e) {
    $("chat-error").textContent = "no microphone: " + e.message;
    return;
  }
  const chunks = [];
  const rec = new MediaRecorder(stream);
  rec.ondataavailable = (e) => chunks.push(e.data);
  rec.onstop = async () => {
    stream.getTracks().forEach((t) => t.stop());
    state.recorder = null;
    $("record").setAttribute("aria-pressed", "false");
    $("record").textContent = "Record";
    try {
      const wav = await toWav(await new Blob(chunks).arrayBuffer());
      const b64 = await blobBase64(wav);
      state.attachments.push({kind: "audio", name: "recording.wav", data: b64, format: "wav",
                              url: URL.createObjectURL(wav)});
      renderAttachments();
    } catch (e) {
      $("chat-error").textContent = "could not read the recording: " + e.message;
    }
  };
  rec.start();
  state.recorder = rec;
  $("record").setAttribute("aria-pressed", "true");
  $("record").textContent = "Stop recording";
});

async function toWav(encoded) {
  const ctx = new AudioContext();
  const decoded = await ctx.decodeAudioData(encoded);
  ctx.close();
  const rate = 16000;
  const off = new OfflineAudioContext(1, Math.ceil(decoded.duration * rate), rate);
  const src = off.createBufferSource();
  src.buffer = decoded;
  src.connect(off.destination);
  src.start();
  const pcm = (await off.startRendering()).getChannelData(0);
  const buf = new DataView(new ArrayBuffer(44 + pcm.length * 2));
  const text = (at, s) => [...s].forEach((c, i) => buf.setUint8(at + i, c.charCodeAt(0)));
  text(0, "RIFF"); buf.setUint32(4, 36 + pcm.length * 2, true); text(8, "WAVE"); text(12, "fmt ");
  buf.setUint32(16, 16, true); buf.setUint16(20, 1, true); buf.setUint16(22, 1, true);
  buf.setUint32(24, rate, true); buf.setUint32(28, rate * 2, true); buf.setUint16(32, 2, true);
  buf.setUint16(34, 16, true); text(36, "data"); buf.setUint32(40, pcm.length * 2, true);
  pcm.forEach((v, i) => buf.setInt16(44 + i * 2, Math.max(-1, Math.min(1, v)) * 0x7fff, true));
  return new Blob([buf], {type: "audio/wav"});
}

async function blobBase64(blob) {
  return (await readAs(blob, "url")).split(",")[1];
}

// --- the chat ------------------------------------------------------------------------------------------------------

function addMessage(role, text, attachments) {
  const li = document.createElement("li");
  li.className = role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  li.appendChild(body);
  for (const a of attachments || []) {
    const el = document.createElement(a.kind === "image" ? "img" : "audio");
    el.src = a.url;
    if (a.kind === "image") el.alt = a.name; else el.controls = true;
    li.appendChild(el);
  }
  $("messages").appendChild(li);
  li.scrollIntoView({block: "end"});
  return body;
}

async function errorText(resp) {
  try {
    const e = (await resp.json()).error;
    return e.message + (e.code ? ` (${e.code})` : "");
  } catch (_) {
    return `HTTP ${resp.status}`;
  }
}

function number(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

async function send() {
  if (state.needsKey && !state.key) { askForKey("Give a key first."); return; }
  const text = $("prompt").value.trim();
  if (!text && !state.attachments.length) return;
  $("chat-error").textContent = "";
  const content = [];
  if (text) content.push({type: "text", text});
  for (const a of state.attachments) {
    content.push(a.kind === "image" ? {type: "image_url", image_url: {url: a.url}}
                                    : {type: "input_audio", input_audio: {data: a.data, format: a.format}});
  }
  const shown = state.attachments;
  state.history.push({role: "user", content: content.length === 1 && text ? text : content});
  addMessage("user", text, shown);
  state.attachments = [];
  renderAttachments();
  $("prompt").value = "";
  const out = addMessage("assistant", "");
  const body = {model: state.model, messages: state.history, stream: true, stream_options: {include_usage: true},
                temperature: number("temperature"), top_p: number("top_p"), max_tokens: number("max_tokens"),
                seed: number("seed")};
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").hidden = false;
  let answer = "";
  try {
    const resp = await fetch("v1/chat/completions", {method: "POST", headers: headers(true),
                                                     body: JSON.stringify(body), signal: state.controller.signal});
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message + (chunk.error.code ? ` (${chunk.error.code})` : ""));
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) { answer += delta.content; out.textContent = answer; }
          if (chunk.usage) out.parentElement.title = `${chunk.usage.prompt_tokens} prompt tokens, ` +
            `${chunk.usage.completion_tokens} generated`;
        }
      }
    }
    state.history.push({role: "assistant", content: answer});
  } catch (e) {
    const stopped = e.name === "AbortError";
    out.parentElement.classList.toggle("error", !stopped);
    out.textContent = answer + (stopped ? " [stopped]" : (answer ? "\n" : "") + "Error: " + e.message);
    if (answer) state.history.push({role: "assistant", content: answer});
    else state.history.pop();  // nothing answered: the turn can be sent again
    if (!stopped) $("chat-error").textContent = e.message;
  } finally {
    state.controller = null;
    $("send").disabled = state.needsKey && !state.key;
    $("stop").hidden = true;
  }
}

$("composer").addEventListener("submit", (ev) => { ev.preventDefault(); send(); });
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); if (!$("send").disabled) send(); }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => {
  state.history = [];
  $("messages").innerHTML = "";
  $("chat-error").textContent = "";
});

poll();
setInterval(poll, 2000);

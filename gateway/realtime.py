"""``/v1/realtime``: the OpenAI Realtime API (GA event names) over a WebSocket, for text output.

A connection holds one session (instructions, sampling) and one conversation: user, system and assistant message
items with ``input_text``, ``input_image`` (a data URL) and ``input_audio`` (the protocol's PCM16, 24 kHz mono, base64)
parts, and the assistant's answers appended as they complete. ``response.create`` turns the conversation (or, with
``conversation: "none"``, the response's own ``input``) into a chat request and runs it through the very code the
REST endpoint runs (``ChatService.respond``: the same validation, limits, admission and errors). So media already
encoded in an earlier turn come from the cache, never re-encoded. Text deltas stream back as
``response.output_text.delta`` events.

Audio in: ``input_audio_buffer.append`` collects PCM16; ``.commit`` turns it into a user item. As the audio arrives it
is resampled and turned into the encoder's log-mel features (``models.audio``, on a worker thread), so that at commit
only the last frames are left; the first response that has to encode the item sends the encoder these features
instead of the audio, and the encoder runs only its forward pass. The features are bitwise those the encoder computes
from the same PCM sent as a 24 kHz WAV (the REST path), and the cache key is that WAV's, so REST and Realtime share
encodings. A turn longer than the encoder's window (30 s for Whisper-style encoders) is cut to it, as REST does.
Turn detection is the client's (``turn_detection: null``, the default) or the server's (``server_vad``: an energy
detector, see ``ServerVad``; features are streamed once speech has started).

Truncation (``session.truncation``, OpenAI's default ``"auto"``): when the conversation no longer fits the context
(less the room kept for the answer: ``max_output_tokens``, or the REST default when "inf", at most half the context),
its oldest items are left out of the prompt, as few as needed (``"auto"``) or until a ``retention_ratio`` of the room
is used (so that the next turns keep the same start); so are they when it holds more images or audio clips than
``--limit-mm-per-prompt``; the items stay in the conversation (until it is full: then
the items left out are deleted first, then the oldest others but an answer being written, each told as
``conversation.item.deleted``). Items are counted with
``PromptBuilder.message_tokens`` (each once), the prompt itself is then checked exactly. ``"disabled"``: a
conversation past the context fails its response with ``context_length_exceeded``.

Refused with an ``error`` event, the connection staying usable: audio output, ``semantic_vad``, tools,
transcription, noise reduction, prompt templates, ``conversation.item.truncate``, transcription sessions,
a second response while one runs, unknown events, bad JSON, out-of-range values, and any field this server does not
know (``unknown_parameter``; a beta protocol name is told its GA name): never silently ignored. A refused
``session.update`` changes nothing; an item's media are checked when it is created. Sampling is not in the GA
protocol: ``temperature``, ``top_p`` and ``seed`` are accepted as extension fields of ``session.update``'s session
and ``response.create``'s response (defaults: the REST defaults, temperature 1, top_p 1, a random seed).

Item events carry no media (``_public``); ``conversation.item.retrieve`` returns an item whole (its JSON written on a
thread when large). No permessage-deflate (gateway/server.py): it would (de)compress megabytes on the event loop.

Limits: frames over ``max_body_bytes`` close the socket with 1009 (uvicorn's ``ws_max_size``); buffered audio is
capped at ``max_audio_seconds``; a conversation at ``MAX_ITEMS`` items and at ``max_body_bytes`` of text and media
(the largest request REST takes; its tokens are checked against the context at each response, as REST does);
connections at ``max_inflight``, beyond which a new one is closed with 1013; a connection silent for ``IDLE_S`` is
closed, and uvicorn's pings (every 20 s) drop dead peers. With API keys: one tenant's connections at a quarter of
``max_inflight``; opening a session counts as a request toward its tenant's rate limit; a session whose key is
revoked is closed (1008) at its next event or within ``KEY_CHECK_S``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import io
import json
import logging
import math
import re
import time
import uuid
import wave
from collections import Counter
from dataclasses import dataclass

import numpy as np
from redis.exceptions import RedisError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from gateway.chat import LARGE_PARSE, RequestIds, count_by, tenant_share
from gateway.errors import (
    MESSAGE_AT_MOST,
    PARAM_AT_MOST,
    APIError,
    InvalidRequest,
    clip,
    redis_failure,
    redis_unavailable,
)
from gateway.media import b64decode_chunked, image_from_url, is_remote
from gateway.schemas import check_sampling, parse_json
from gateway.tiers import ClientGone
from models.audio import AudioConfig, StreamingFeatures, pcm16_samples
from models.media import MediaInfo
from router.logs import REQUEST_ID, Throttle

log = logging.getLogger(__name__)
CANCEL_CLEANUP_S = 1.0  # how long a cancelled response's request may take to clean up before the answer goes on

PCM_RATE = 24_000  # the protocol's input audio: PCM16, 24 kHz, mono
MAX_ITEMS = 1024
LARGE_EVENT = LARGE_PARSE  # characters of an event's JSON past which it is parsed on a thread (and its JSON written)
KEY_CHECK_S = 5.0  # with API keys, how often a silent connection checks that its key was not revoked
REFUSALS_LOGGED_S = 10.0  # a session logs its refused events one line per this at most (with the count between)
IDLE_S = 600.0  # a connection that sends no event for this long is closed (pings already drop dead peers)
UNSUPPORTED_EVENTS = {
    "conversation.item.truncate": "conversation.item.truncate (it trims audio output, which this server does not make)",
    "output_audio_buffer.clear": "audio output",
    "transcription_session.update": "transcription sessions",
}


# Fields each object of a client event may carry (GA names, plus the sampling extension fields): anything else is
# refused with ``unknown_parameter`` rather than ignored, since a client relying on a field it believes is applied
# (a beta name, a feature this server lacks) would otherwise get silently different behaviour.
SESSION_FIELDS = {"type", "output_modalities", "instructions", "audio", "tools", "tool_choice", "max_output_tokens",
                  "model", "prompt", "truncation", "include", "tracing", "temperature", "top_p", "seed",
                  "id", "object", "expires_at"}  # the last three: read-only, echoed back by clients that resend it
RESPONSE_FIELDS = {"conversation", "input", "instructions", "max_output_tokens", "metadata", "output_modalities",
                   "audio", "tools", "tool_choice", "prompt", "temperature", "top_p", "seed"}
AUDIO_INPUT_FIELDS = {"format", "turn_detection", "transcription", "noise_reduction"}
VAD_FIELDS = {"type", "threshold", "prefix_padding_ms", "silence_duration_ms", "create_response",
              "interrupt_response", "idle_timeout_ms"}
ITEM_FIELDS = {"id", "type", "object", "status", "role", "content"}
_MEDIA_KINDS = {"input_image": "image", "input_audio": "audio"}  # content part type -> its media kind
PART_FIELDS = {"input_text": {"type", "text"}, "input_image": {"type", "image_url", "detail"},
               "input_audio": {"type", "audio", "transcript"}, "output_text": {"type", "text", "annotations"},
               "text": {"type", "text"}}
BETA_NAMES = {  # the beta protocol's names for GA fields: refused with the GA name to use
    "modalities": "output_modalities", "input_audio_format": "audio.input.format",
    "output_audio_format": "audio.output.format", "turn_detection": "audio.input.turn_detection",
    "input_audio_transcription": "audio.input.transcription", "voice": "audio.output.voice",
    "input_audio_noise_reduction": "audio.input.noise_reduction", "speed": "audio.output.speed",
    "max_response_output_tokens": "max_output_tokens"}
MIN_COMMIT_MS = 100  # a client's commit of less audio is refused, as OpenAI refuses it
MAX_METADATA = 16  # response metadata: key/value pairs (keys <= 64 characters, values <= 512), as OpenAI bounds it


def truncation(value, param: str) -> str | dict:
    """``session.truncation``: "auto", "disabled" or ``{"type": "retention_ratio", "retention_ratio": 0..1,
    "token_limits": {"post_instructions": N}}`` (as OpenAI takes it), checked."""
    if value in ("auto", "disabled"):
        return value
    shape = ('"auto", "disabled" or {"type": "retention_ratio", "retention_ratio": 0..1, '
             '"token_limits": {"post_instructions": N}}')
    if not isinstance(value, dict) or value.get("type") != "retention_ratio":
        raise EventError(f"{param} must be {shape}", param=param)
    only(value, {"type", "retention_ratio", "token_limits"}, param)
    ratio = value.get("retention_ratio")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise EventError(f"{param}.retention_ratio must be a number from 0 to 1", param=f"{param}.retention_ratio")
    out = {"type": "retention_ratio", "retention_ratio": ratio}
    limits = value.get("token_limits")
    if limits is not None:
        if not isinstance(limits, dict):
            raise EventError(f"{param}.token_limits must be an object", param=f"{param}.token_limits")
        only(limits, {"post_instructions"}, f"{param}.token_limits")
        post = limits.get("post_instructions")
        if post is not None and (isinstance(post, bool) or not isinstance(post, int) or post < 1):
            raise EventError(f"{param}.token_limits.post_instructions must be an integer >= 1",
                             param=f"{param}.token_limits.post_instructions")
        out["token_limits"] = {"post_instructions": post}
    return out


def only(obj: dict, known: set[str], param: str) -> None:
    """Refuse any field of ``obj`` (at ``param``) not in ``known``, naming the GA field for a beta one."""
    for key in obj:
        if key in known:
            continue
        where = f"{param}.{key}"
        if key in BETA_NAMES:
            raise EventError(f"{where} is the beta protocol's name; this server speaks the GA protocol: use "
                             f"{param}.{BETA_NAMES[key]}", code="unknown_parameter", param=where)
        raise EventError(f"unknown parameter {where}", code="unknown_parameter", param=where)


def unset(obj: dict, key: str, param: str, what: str, allowed=(None,)) -> None:
    """A field this server knows but does not implement: accepted only with a value that asks for nothing."""
    value = obj.get(key)
    if value not in allowed and value != [] and value != {}:
        raise EventError(f"{what} is not supported by this server", code="unsupported", param=f"{param}.{key}")


FRAME = 480  # samples per voice-activity frame: 20 ms


def ms(samples: int) -> int:
    return samples * 1000 // PCM_RATE


@dataclass
class ServerVad:
    """``turn_detection: {"type": "server_vad", ...}``: an energy detector over 20 ms frames. A frame is speech when
    its RMS level exceeds ``-60 + 50 * threshold`` dBFS (threshold 0.5: -35 dBFS). Speech starts at the first loud
    frame (the committed audio keeps ``prefix_padding_ms`` before it) and stops after ``silence_duration_ms`` of quiet
    frames; the buffer is then committed and, with ``create_response``, a response starts. ``interrupt_response``
    cancels a running response when speech starts."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True

    @classmethod
    def parse(cls, raw: dict, param: str) -> ServerVad:
        only(raw, VAD_FIELDS, param)
        vad = cls()
        for key, kind, lo, hi in (("threshold", float, 0.0, 1.0), ("prefix_padding_ms", int, 0, 10_000),
                                  ("silence_duration_ms", int, 20, 10_000)):
            if raw.get(key) is not None:
                value = raw[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi or (
                        kind is int and value != int(value)):
                    raise EventError(f"{param}.{key} must be a number in [{lo}, {hi}]", param=f"{param}.{key}")
                setattr(vad, key, kind(value))
        for key in ("create_response", "interrupt_response"):
            if raw.get(key) is not None:
                if not isinstance(raw[key], bool):
                    raise EventError(f"{param}.{key} must be true or false", param=f"{param}.{key}")
                setattr(vad, key, raw[key])
        if raw.get("idle_timeout_ms") is not None:
            raise EventError("idle_timeout_ms is not supported by this server", code="unsupported",
                             param=f"{param}.idle_timeout_ms")
        return vad

    @property
    def level(self) -> float:
        return 10 ** ((-60 + 50 * self.threshold) / 20)  # RMS over int16 full scale

    def public(self) -> dict:
        return {"type": "server_vad", **dataclasses.asdict(self), "idle_timeout_ms": None}


class EventError(Exception):
    """A client event that cannot be carried out: becomes an ``error`` event; the connection goes on."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.code, self.param, self.type = message, code, param, type_


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def pcm16_to_wav(pcm: bytes, rate: int = PCM_RATE) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def _b64(data, param: str) -> bytes:
    if not isinstance(data, str):
        raise EventError(f"{param} must be a base64 string", param=param)
    try:
        return b64decode_chunked(data)
    except (binascii.Error, ValueError):
        raise EventError(f"{param} is not valid base64", param=param) from None


def _public(item: dict) -> dict:
    """An item as events show it: audio parts without their audio and image parts without their data URL (the
    client has them). Echoed whole, a 6 MB image went back twice per item, and compressing it (permessage-deflate)
    held the gateway's event loop for 0.4 s: every other request on the gateway stalled. A remote image's URL stays."""
    def public(p: dict) -> dict:
        if p["type"] == "input_audio":
            return {"type": "input_audio", "transcript": None}
        if p["type"] == "input_image" and p["image_url"].startswith("data:"):
            return {**p, "image_url": None}
        return p

    if not any(p["type"] in ("input_audio", "input_image") for p in item["content"]):
        return item
    return {**item, "content": [public(p) for p in item["content"]]}


def _json_bytes(obj) -> bytes:
    return json.dumps(obj).encode()


def _media_of(item: dict) -> Counter:
    """An item's media parts by kind (image, audio)."""
    return Counter(_MEDIA_KINDS[p["type"]] for p in item["content"] if p["type"] in _MEDIA_KINDS)


def _item_bytes(item: dict) -> int:
    """What an item holds, as the conversation's limit counts it: every string of its parts (text, transcripts,
    base64 audio, image data URLs)."""
    return sum(len(v) for p in item["content"] for v in p.values() if isinstance(v, str))


class RealtimeSession:
    def __init__(self, ws: WebSocket, chat, model: str, max_audio_seconds: float):
        self.ws, self.chat, self.model = ws, chat, model
        self.tenant = ws.scope.get("state", {}).get("tenant")  # gateway/auth.py: None without API keys
        self.namespace = chat.namespace(self.tenant)
        self.max_audio_bytes = int(max_audio_seconds * PCM_RATE) * 2
        self.max_bytes = chat.cfg.max_body_bytes  # the conversation's text and media (base64): REST's request limit
        self.audio_cfg = None  # the audio encoder's feature config, when features can be streamed for it
        if "audio" in chat.spec.modalities:
            try:
                self.audio_cfg = AudioConfig.of(chat.spec.preprocess["audio"])
            except (KeyError, ValueError) as exc:
                log.warning("realtime audio features are not streamed for this encoder", extra={"error": str(exc)})
        self.stream: StreamingFeatures | None = None  # features of self.audio[: self.stream_at], as it grows
        self.stream_at = 0
        self.features: dict[str, tuple[str, bytes]] = {}  # committed item id -> (media digest, features blob)
        self.cancel_reason = "client_cancelled"  # why the running response was cancelled
        self.draining = False  # the gateway is shutting down: the answer in progress ends, then the socket closes
        self.session_id = _id("sess")
        self.instructions = ""
        self.sampling: dict = {}  # temperature / top_p / seed (extension fields)
        self.max_output_tokens: int | None = None
        self.items: list[dict] = []  # the conversation, in order
        self.truncation: str | dict = "auto"
        self.left_out: set[str] = set()  # ids of items truncation has left out of every later prompt
        self.tokens: dict[str, int] = {}  # item id -> its estimated tokens (PromptBuilder.message_tokens)
        self.media: dict[str, Counter] = {}  # item id -> its media parts by kind (counted with its tokens)
        # Item id -> its bytes as the conversation's limit counts them (``_item_bytes``), counted once as it is
        # added, and their sum: summing every part of every item at each create took a second a create at 100 big
        # items, on the event loop (an outside tester's run).
        self.sizes: dict[str, int] = {}
        self.held = 0
        self.audio = bytearray()  # the input audio buffer (PCM16)
        self.audio_carry = b""  # the odd byte of the last append: the first half of a sample
        self.vad: ServerVad | None = None  # server-side turn detection, when the session asks for it
        self.audio_pos0 = 0  # stream position (samples since the session began) of self.audio[0]
        self.vad_at = 0  # bytes of self.audio the detector has looked at
        self.speaking: str | None = None  # the item id of the speech in progress
        self.silence = 0  # quiet samples since the last loud frame
        # the running response (its task None while the response is still being made: response_create)
        self.active: tuple[asyncio.Task | None, asyncio.Event, str] | None = None
        self.turn_waiting = False  # a turn server VAD committed while the response it interrupted was ending
        self.refusals = Throttle(REFUSALS_LOGGED_S)
        self.send_lock = asyncio.Lock()

    # -- output -------------------------------------------------------------------------------------------------

    async def send(self, type_: str, large: bool = False, **fields) -> None:
        """One server event. ``large`` (an event that may carry megabytes of media): its JSON is written on a thread,
        so that other connections' events are not held meanwhile."""
        event = {"type": type_, "event_id": _id("event"), **fields}
        text = await asyncio.to_thread(json.dumps, event, allow_nan=False) if large else json.dumps(event,
                                                                                                     allow_nan=False)
        async with self.send_lock:
            await self.ws.send_text(text)

    async def error(self, exc: EventError | APIError, event_id: str | None) -> None:
        """An ``error`` event. What it quotes of the client's is clipped (a 31 MB key came back in a 62 MB error),
        and the refusals a session logs are one line per ``REFUSALS_LOGGED_S`` at most (one client looping a bad
        event wrote 28.8 MB of log in 10 s)."""
        message, param = clip(exc.message, MESSAGE_AT_MOST), clip(exc.param, PARAM_AT_MOST)
        err = {"type": exc.type, "code": exc.code, "message": message, "param": param,
               "event_id": clip(event_id, PARAM_AT_MOST)}
        if self.refusals.due():
            log.info("realtime event refused", extra={"session_id": self.session_id, "code": exc.code,
                                                      "param": param, "error": message,
                                                      "refused_since_last": self.refusals.held})
        await self.send("error", error=err)

    def session(self) -> dict:
        return {"type": "realtime", "object": "realtime.session", "id": self.session_id, "model": self.model,
                "output_modalities": ["text"], "instructions": self.instructions,
                "max_output_tokens": self.max_output_tokens if self.max_output_tokens is not None else "inf",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": PCM_RATE},
                                    "turn_detection": self.vad.public() if self.vad else None,
                                    "transcription": None, "noise_reduction": None}},
                "tools": [], "tool_choice": "auto", "truncation": self.truncation, **self.sampling}

    # -- the loop -----------------------------------------------------------------------------------------------

    async def _revoked(self, event_id: str | None) -> bool:
        """Whether the session's API key was revoked (or moved to another tenant) since the handshake: then an error
        event, and the socket closed with 1008. A key file is re-read within a second of a change (gateway/auth.py)."""
        in_force = self.ws.scope.get("state", {}).get("key_in_force")
        if in_force is None or in_force():
            return False
        log.info("realtime session's key revoked; closing", extra={"session_id": self.session_id})
        await self.error(EventError("the API key of this session was revoked", code="invalid_api_key"), event_id)
        await self.ws.close(code=1008)
        return True

    async def run(self) -> None:
        keyed = self.ws.scope.get("state", {}).get("key_in_force") is not None
        heard = time.monotonic()  # the last event
        try:
            await self.send("session.created", session=self.session())  # the socket may be gone already
            while True:
                idle = IDLE_S - (time.monotonic() - heard)
                try:  # with keys, a silent connection still wakes every KEY_CHECK_S to ask whether its key holds
                    message = await asyncio.wait_for(self.ws.receive(), max(min(idle, KEY_CHECK_S) if keyed
                                                                             else idle, 0.0))
                except TimeoutError:  # cancelling a receive loses no message
                    if await self._revoked(None):
                        return
                    if time.monotonic() - heard < IDLE_S:
                        continue
                    await self.error(EventError(f"no event for {IDLE_S:g} s; closing", code="idle_timeout"), None)
                    await self.ws.close(code=1000)
                    return
                heard = time.monotonic()
                if message["type"] == "websocket.disconnect":
                    return
                text, event_id = message.get("text"), None
                try:
                    if text is None:
                        raise EventError("events are JSON text frames, not binary ones", code="invalid_json")
                    try:  # strict, as a REST body: no NaN or Infinity, nesting bounded, no lone surrogates
                        # A large event (an image, seconds of audio) is parsed on a thread, one at a time with the
                        # REST bodies (gateway/chat.LARGE_PARSE): the event loop serves every other connection.
                        event = (parse_json(text, "the event") if len(text) <= LARGE_EVENT
                                 else await self.chat.parse_off_loop(len(text), parse_json, text, "the event"))
                    except InvalidRequest as exc:
                        raise EventError(exc.message, code="invalid_json", param=exc.param) from None
                    if isinstance(event, dict) and isinstance(event.get("event_id"), str):
                        event_id = event["event_id"]
                    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                        raise EventError("an event is a JSON object with a string 'type'", param="type")
                    if await self._revoked(event_id):
                        return
                    await self.handle(event)
                except (EventError, APIError) as exc:
                    await self.error(exc, event_id)
                except RedisError as exc:  # a cache lookup for this event: Redis away, as REST answers it
                    log.warning("realtime event: redis failed", extra={"session_id": self.session_id,
                                                                       "event_id": event_id, "error": str(exc)})
                    await self.error(redis_unavailable(exc), event_id)
                except (WebSocketDisconnect, WebSocketDisconnected):  # gone: ends the session, not an event's bug
                    raise
                except Exception as exc:  # a bug handling this one event: the session goes on (a send to a closed
                    # socket raises again from here, and ends it)
                    if redis_failure(exc):  # raised inside redis-py (its cluster client's own): as above
                        await self.error(redis_unavailable(exc), event_id)
                        continue
                    log.exception("realtime event failed", extra={"session_id": self.session_id,
                                                                  "event_id": event_id})
                    await self.error(EventError(f"the server could not handle this event ({type(exc).__name__})",
                                                code="server_error", type_="server_error"), event_id)
        except (WebSocketDisconnect, RuntimeError):  # gone (a send to a closed socket is a RuntimeError)
            pass
        finally:
            self.turn_waiting = False  # no response after the socket has gone
            if self.active is not None:  # a dropped socket stops its response and frees the backbone slot
                task, cancelled, _ = self.active
                cancelled.set()
                if task is not None:  # None: still being made (it starts cancelled, its first send fails)
                    await asyncio.gather(task, return_exceptions=True)
            self.audio.clear()
            self.stream = None
            self.features.clear()

    async def handle(self, event: dict) -> None:
        kind = event["type"]
        if kind in UNSUPPORTED_EVENTS:
            raise EventError(f"{UNSUPPORTED_EVENTS[kind]} is not supported by this server", code="unsupported",
                             param="type")
        handler = {
            "session.update": self.session_update,
            "conversation.item.create": self.item_create,
            "conversation.item.delete": self.item_delete,
            "conversation.item.retrieve": self.item_retrieve,
            "input_audio_buffer.append": self.audio_append,
            "input_audio_buffer.commit": self.audio_commit,
            "input_audio_buffer.clear": self.audio_clear,
            "response.create": self.response_create,
            "response.cancel": self.response_cancel,
        }.get(kind)
        if handler is None:
            raise EventError(f"unknown event type {kind!r}", code="invalid_event_type", param="type")
        await handler(event)

    # -- session ------------------------------------------------------------------------------------------------

    def _sampling(self, obj: dict, param: str) -> dict:
        """The sampling extension fields, refused here unless a chat request would take them (so that a session
        never holds values every later response would fail on)."""
        out = {key: obj[key] for key in ("temperature", "top_p", "seed") if key in obj}
        try:  # types included (strict: a string or a boolean is not a number)
            check_sampling({k: v for k, v in out.items() if v is not None}, param)
        except InvalidRequest as exc:
            raise EventError(exc.message, param=exc.param) from None
        return out

    async def session_update(self, event: dict) -> None:
        """Checked whole before anything is applied: a refused update changes nothing."""
        s = event.get("session")
        if not isinstance(s, dict):
            raise EventError("session.update needs a 'session' object", param="session")
        if s.get("type", "realtime") != "realtime":
            raise EventError("transcription sessions are not supported by this server", code="unsupported",
                             param="session.type")
        only(s, SESSION_FIELDS, "session")
        if s.get("model") not in (None, self.model):
            raise EventError(f"this session serves '{self.model}'; its model cannot change", code="unsupported",
                             param="session.model")
        modalities = s.get("output_modalities", ["text"])
        if modalities != ["text"]:
            raise EventError("this server answers in text only: output_modalities must be [\"text\"]",
                             code="unsupported", param="session.output_modalities")
        audio = s.get("audio") or {}
        if not isinstance(audio, dict):
            raise EventError("session.audio must be an object", param="session.audio")
        only(audio, {"input", "output"}, "session.audio")
        if audio.get("output"):
            raise EventError("audio output is not supported by this server", code="unsupported",
                             param="session.audio.output")
        audio_in = audio.get("input") or {}
        if not isinstance(audio_in, dict):
            raise EventError("session.audio.input must be an object", param="session.audio.input")
        only(audio_in, AUDIO_INPUT_FIELDS, "session.audio.input")
        unset(audio_in, "transcription", "session.audio.input", "input audio transcription")
        unset(audio_in, "noise_reduction", "session.audio.input", "noise reduction")
        vad = self.vad
        if "turn_detection" in audio_in:
            turn = audio_in["turn_detection"]
            if turn is None:
                vad = None
            elif isinstance(turn, dict) and turn.get("type") == "server_vad":
                vad = ServerVad.parse(turn, "session.audio.input.turn_detection")
            else:
                what = turn.get("type") if isinstance(turn, dict) else turn
                raise EventError(f"turn detection {what!r} is not supported: use server_vad, or null and commit "
                                 "the audio buffer yourself", code="unsupported",
                                 param="session.audio.input.turn_detection")
        fmt = audio_in.get("format") or {}
        if not isinstance(fmt, dict):
            raise EventError("session.audio.input.format must be an object: {\"type\": \"audio/pcm\", \"rate\": "
                             "24000}", code="unsupported", param="session.audio.input.format")
        only(fmt, {"type", "rate"}, "session.audio.input.format")
        if fmt and (fmt.get("type", "audio/pcm") != "audio/pcm" or fmt.get("rate", PCM_RATE) != PCM_RATE):
            raise EventError("input audio must be audio/pcm at 24000 Hz", code="unsupported",
                             param="session.audio.input.format")
        if s.get("tools"):
            raise EventError("tools are not supported by this server", code="unsupported", param="session.tools")
        unset(s, "tool_choice", "session", "tool_choice other than \"auto\" or \"none\" (there are no tools)",
              (None, "auto", "none"))
        unset(s, "prompt", "session", "prompt templates")
        unset(s, "include", "session", "include (transcription log probabilities)")
        unset(s, "tracing", "session", "tracing")
        truncate = truncation(s["truncation"], "session.truncation") if "truncation" in s else self.truncation
        sampling = self._sampling(s, "session")
        if "instructions" in s:
            await self._instructions(s["instructions"], "session.instructions")
        max_tokens = (self._max_tokens(s["max_output_tokens"], "session.max_output_tokens")
                      if "max_output_tokens" in s else self.max_output_tokens)
        # Valid: applied whole.
        self.instructions = s.get("instructions", self.instructions)
        self.max_output_tokens = max_tokens
        self.truncation = truncate
        self.sampling = {k: v for k, v in {**self.sampling, **sampling}.items() if v is not None}  # null: default
        if (vad is None) != (self.vad is None):
            self._reset_vad()
        self.vad = vad
        await self.send("session.updated", session=self.session())

    def _max_tokens(self, value, param: str) -> int | None:
        """An answer's token cap: at most the model's context (a larger number is no cap, but echoing 1e30 back as
        the session's setting would be), or "inf"."""
        if value == "inf" or value is None:
            return None
        context = self.chat.spec.max_context
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= context:
            raise EventError(f"{param} must be an integer in [1, {context}] (this model's context) or \"inf\"",
                             param=param)
        return value

    # -- conversation -------------------------------------------------------------------------------------------

    def _item(self, raw, param: str) -> dict:
        """A client message item, checked, in the protocol's shape (with an id and status)."""
        if not isinstance(raw, dict) or raw.get("type", "message") != "message":
            kind = raw.get("type") if isinstance(raw, dict) else None
            if kind in ("function_call", "function_call_output"):
                raise EventError("tools are not supported by this server", code="unsupported", param=f"{param}.type")
            raise EventError("an item must be a message", param=f"{param}.type")
        only(raw, ITEM_FIELDS, param)
        role = raw.get("role")
        if role not in ("user", "system", "assistant"):
            raise EventError("item role must be user, system or assistant", param=f"{param}.role")
        content = raw.get("content")
        if not isinstance(content, list) or not content:
            raise EventError("item content must be a non-empty list of parts", param=f"{param}.content")
        allowed = {"user": ("input_text", "input_image", "input_audio"), "system": ("input_text",),
                   "assistant": ("output_text", "text")}[role]
        parts = []
        for i, part in enumerate(content):
            where = f"{param}.content.{i}"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in allowed:
                raise EventError(f"a {role} item takes parts of type {', '.join(allowed)}", param=f"{where}.type")
            only(part, PART_FIELDS[kind], where)
            if kind in ("input_text", "output_text", "text"):
                if not isinstance(part.get("text"), str):
                    raise EventError("a text part needs a string 'text'", param=f"{where}.text")
                parts.append({"type": kind, "text": part["text"]})
            elif kind == "input_image":
                if not isinstance(part.get("image_url"), str):
                    raise EventError("an input_image part needs an 'image_url' (a data URL)",
                                     param=f"{where}.image_url")
                parts.append({"type": kind, "image_url": part["image_url"]})
            else:
                self._modality("audio", f"{where}.type")
                pcm = _b64(part.get("audio"), f"{where}.audio")
                if len(pcm) < 2:
                    raise EventError("the audio is empty", param=f"{where}.audio", code="invalid_media")
                if len(pcm) > self.max_audio_bytes:  # in REST's words and code
                    raise EventError(f"audio of {len(pcm) / 2 / PCM_RATE:.6g} s is longer than "
                                     f"{self.max_audio_bytes / 2 / PCM_RATE:g} s", param=f"{where}.audio",
                                     code="invalid_media")
                parts.append({"type": kind, "audio": part["audio"]})
        item_id = raw.get("id") if isinstance(raw.get("id"), str) and raw["id"] else _id("item")
        if item_id == "root":  # previous_item_id "root" means the conversation's start, never this item
            raise EventError("an item's id cannot be 'root' (previous_item_id 'root' is the conversation's start)",
                             param=f"{param}.id")
        if item_id == self.speaking or any(it["id"] == item_id for it in self.items):  # the turn being heard has its
            raise EventError(f"an item with id {item_id!r} already exists", param=f"{param}.id")  # id already
        return {"id": item_id, "type": "message", "object": "realtime.item", "status": "completed", "role": role,
                "content": parts}

    async def _checked_item(self, raw, param: str) -> dict:
        """``_item``, and its images checked as REST checks them (a large one on a thread, as large events are
        parsed: the event loop serves every other connection meanwhile)."""
        content = raw.get("content") if isinstance(raw, dict) else None
        large = isinstance(content, list) and any(isinstance(p, dict) and isinstance(p.get("audio"), str)
                                                   and len(p["audio"]) > LARGE_EVENT for p in content)
        # An item with megabytes of audio is checked (its base64 decoded) on a thread, as large events are parsed.
        item = await asyncio.to_thread(self._item, raw, param) if large else self._item(raw, param)
        for i, part in enumerate(item["content"]):
            if "text" in part:  # echoed, tens of MB of JSON would be written on the event loop twice
                await self._prompt_sized(part["text"], f"{param}.content.{i}.text")
            if part["type"] == "input_image":
                url, where = part["image_url"], f"{param}.content.{i}.image_url"
                if len(url) < LARGE_EVENT:
                    self._check_image(url, where)
                else:
                    await asyncio.to_thread(self._check_image, url, where)
        texts = [part["text"] for part in item["content"] if "text" in part]
        if len(texts) > 1:
            await self._prompt_sized(texts, f"{param}.content")
        return item

    @staticmethod
    def _referenced(raw: dict, param: str, by_id: dict[str, dict]) -> dict:
        """A conversation item (of ``by_id``) named in ``response.input`` by an ``item_reference`` (GA: ``{"type":
        "item_reference", "id"}``)."""
        only(raw, {"type", "id"}, param)
        item = by_id.get(raw["id"]) if isinstance(raw.get("id"), str) else None
        if item is None:
            raise EventError(f"no item with id {raw.get('id')!r}", code="item_not_found", param=f"{param}.id")
        return item

    async def _instructions(self, value, param: str) -> None:
        """Instructions must be a string any prompt could hold: longer ones would fail every later response."""
        if not isinstance(value, str):
            raise EventError(f"{param} must be a string", param=param)
        await self._prompt_sized(value, param)

    async def _prompt_sized(self, text: str | list[str], param: str) -> None:
        """An error event for text longer than any prompt could hold; kept, it would only fail every response that
        includes it (an outside tester's 3,000 characters against a context of 1,024 tokens). Past ``max_text_chars``
        (REST refuses such text untokenized too) without counting; text of more characters than the context has
        tokens is counted (on a thread when large); shorter text may still be more tokens (a character can be
        several), and is left to the response's own check. ``text``: one text, or an item's texts, counted
        together (three parts of 1,000 characters each passed one by one against a context of 1,024 tokens)."""
        context = self.chat.spec.max_context
        texts = [text] if isinstance(text, str) else text
        chars = sum(map(len, texts))
        if chars > self.chat.builder.max_text_chars:
            raise EventError(f"{param} is {chars} characters: more than any prompt of this model "
                             f"({context} tokens) can hold", code="context_length_exceeded", param=param)
        if chars < context:
            return
        count = lambda: sum(len(self.chat.builder.encode(t, split=True)) for t in texts)  # noqa: E731 -- as
        tokens = await asyncio.to_thread(count) if chars > LARGE_EVENT // 64 else count()  # message_tokens counts
        if tokens >= context:
            raise EventError(f"{param} is {tokens} tokens: more than any prompt of this model ({context} tokens) "
                             "can hold", code="context_length_exceeded", param=param)

    def _modality(self, modality: str, param: str) -> None:
        if modality not in self.chat.spec.modalities:
            raise EventError(f"model '{self.model}' does not accept {modality} input; it accepts text and "
                             f"{' and '.join(self.chat.spec.modalities) or 'nothing else'}", param=param,
                             code="unsupported_modality")

    def _check_image(self, url: str, param: str) -> None:
        """An image part is checked when its item is created, as REST checks one (a data URL that decodes to an
        image within the limits, or an http(s) URL where the server fetches them): else every later response
        would fail on it."""
        self._modality("image", param)
        try:
            if is_remote(url):  # fetched for each response that needs it, until its encoding is cached
                self.chat.remote.check_url(url, "image", param)
                return
            self.chat.builder.check_media("image", image_from_url(url, param, self.chat.cfg.max_media_bytes), param)
        except InvalidRequest as exc:
            raise EventError(exc.message, code=exc.code or "invalid_value", param=param) from None

    def _fits(self, size: int) -> bool:
        return len(self.items) < MAX_ITEMS and self.held + size <= self.max_bytes

    def _resized(self, item: dict) -> None:
        """Count ``item`` (held, changed since it was added) at its size now."""
        size = _item_bytes(item)
        self.held += size - self.sizes.get(item["id"], 0)
        self.sizes[item["id"]] = size

    async def _room(self, item: dict, keep: str | None = None) -> None:
        """Whether ``item`` fits in the conversation (its item count and bytes); an error event if not. Items make
        room for it, oldest first, each told as ``conversation.item.deleted``: those truncation has left out of every
        prompt, then (truncation on) any but an answer being written (a voice session's long turns
        filled the 32 MiB in three turns, whose prompts held a few hundred tokens: an outside tester's run). So a
        long voice session runs on instead of filling up (the client deletes nothing). ``keep``: an item the event
        names (the one it goes after), never deleted for it. Nothing is deleted for an item that is refused anyway:
        a refused event changes nothing (an outside tester's refused item had cost an item the client held)."""
        size = _item_bytes(item)
        count, held, gone = len(self.items), self.held, []
        left_out = [it for it in self.items if it["id"] in self.left_out]
        others = ([it for it in self.items if it["id"] not in self.left_out and it.get("status") != "in_progress"]
                  if self.truncation != "disabled" else [])
        for it in left_out + others:
            if size > self.max_bytes or (count < MAX_ITEMS and held + size <= self.max_bytes):
                break
            if it["id"] != keep:
                gone.append(it["id"])
                count, held = count - 1, held - self.sizes.get(it["id"], 0)
        if count >= MAX_ITEMS:
            raise EventError(f"the conversation holds {MAX_ITEMS} items; delete some first",
                             code="conversation_too_long")
        if held + size > self.max_bytes:
            raise EventError(f"the conversation's text, images and audio would exceed {self.max_bytes} bytes (media "
                             "as base64); delete some items first", code="conversation_too_long")
        for item_id in gone:
            self._forget(item_id)
            await self.send("conversation.item.deleted", item_id=item_id)

    async def _add(self, item: dict, after: str | None = "end", done: bool = True) -> str | None:
        """Put ``item`` in the conversation: at its end, at its start (``after`` None) or after the item ``after``."""
        if after not in ("end", None) and not any(it["id"] == after for it in self.items):
            raise EventError(f"no item with id {after!r}", code="item_not_found", param="previous_item_id")
        await self._room(item, keep=after)
        if after == "end":
            index, after = len(self.items), (self.items[-1]["id"] if self.items else None)
        elif after is None:
            index = 0
        else:  # there (checked above, and never deleted to make room)
            index = next(i + 1 for i, it in enumerate(self.items) if it["id"] == after)
        self.items.insert(index, item)
        self._resized(item)
        public = _public(item)
        large = _item_bytes(public) > LARGE_EVENT  # its JSON written on a thread
        await self.send("conversation.item.added", large=large, previous_item_id=after, item=public)
        if done:
            await self.send("conversation.item.done", large=large, previous_item_id=after, item=public)
        return after

    async def item_create(self, event: dict) -> None:
        item = await self._checked_item(event.get("item"), "item")
        previous = event.get("previous_item_id")
        if previous is not None and not isinstance(previous, str):
            raise EventError("previous_item_id must be a string", param="previous_item_id")
        await self._add(item, "end" if previous is None else None if previous == "root" else previous)

    async def item_delete(self, event: dict) -> None:
        item_id = event.get("item_id")
        index = next((i for i, it in enumerate(self.items) if it["id"] == item_id), None)
        if index is None:
            raise EventError(f"no item with id {item_id!r}", code="item_not_found", param="item_id")
        if self.items[index].get("status") == "in_progress":  # its response would go on adding to it
            raise EventError(f"item {item_id!r} is being written by the response in progress: cancel it first "
                             "(response.cancel)", code="item_in_progress", param="item_id")
        self._forget(item_id)
        await self.send("conversation.item.deleted", item_id=item_id)

    async def item_retrieve(self, event: dict) -> None:
        """The item as the server holds it, media included (item events leave audio and data-URL images out: a
        client that wants them back asks here, as the protocol has it for audio)."""
        item_id = event.get("item_id")
        item = next((it for it in self.items if it["id"] == item_id), None)
        if item is None:
            raise EventError(f"no item with id {item_id!r}", code="item_not_found", param="item_id")
        # A copy (its JSON may be written on a thread while a response adds to the conversation).
        whole = {**item, "content": [{**p, "transcript": p.get("transcript")} if p["type"] == "input_audio" else dict(p)
                                     for p in item["content"]]}
        await self.send("conversation.item.retrieved", large=_item_bytes(item) > LARGE_EVENT, item=whole)

    def _forget(self, item_id: str) -> None:
        """The item gone from the conversation, and all that was kept for it."""
        self.items[:] = [it for it in self.items if it["id"] != item_id]
        self.held -= self.sizes.pop(item_id, 0)
        self.features.pop(item_id, None)
        self.tokens.pop(item_id, None)
        self.media.pop(item_id, None)
        self.left_out.discard(item_id)

    # -- input audio buffer -------------------------------------------------------------------------------------

    async def audio_append(self, event: dict) -> None:
        """Chunks may split a sample (a client cutting its byte stream anywhere): an odd byte waits for the next
        chunk's first (``audio_carry``). A model without an audio encoder takes none: the buffer (and server VAD,
        which commits it) is refused at once, as an input_audio item is. Accepted, its committed item broke every
        later response of the session (an outside tester's, on LLaVA)."""
        self._modality("audio", "audio")
        data = event.get("audio")  # megabytes of it decoded on a thread (binascii holds the GIL for a whole call)
        large = isinstance(data, str) and len(data) > LARGE_EVENT
        pcm = self.audio_carry + (await asyncio.to_thread(_b64, data, "audio") if large else _b64(data, "audio"))
        whole = len(pcm) - len(pcm) % 2
        if len(self.audio) + whole > self.max_audio_bytes and self.vad is not None:
            # A turn as long as the server takes ends there: refused, the appends that followed (its silence
            # included) never reached the detector, and the session stalled until the client committed or cleared
            # by hand (an outside tester's 305 s of noise).
            await self._detect()
            if self.speaking is not None and self.vad_at:
                log.info("realtime turn cut at the audio length limit", extra={"session_id": self.session_id})
                await self._end_turn()
        if len(self.audio) + whole > self.max_audio_bytes:
            raise EventError("the input audio buffer is full (the server's audio length limit); commit or clear it",
                             code="input_audio_buffer_full", param="audio")
        self.audio += pcm[:whole]
        self.audio_carry = pcm[whole:]
        if self.vad is not None:
            await self._detect()
        await self._stream()

    async def _stream(self) -> None:
        """Feed the audio appended since the last call to the features stream (started at the buffer's first byte,
        or with server VAD once speech has started: before that the buffer's front still moves)."""
        if self.audio_cfg is None or (self.vad is not None and self.speaking is None):
            return
        if self.stream is None:
            self.stream, self.stream_at = StreamingFeatures(self.audio_cfg, PCM_RATE), 0
        if len(self.audio) > self.stream_at:
            samples = pcm16_samples(bytes(self.audio[self.stream_at :]))
            self.stream_at = len(self.audio)
            await self._features(self.stream.feed, samples)

    async def _features(self, fn, *args):
        """Run a features step on a worker thread. A failure (a bug: the input is PCM16 the session checked) costs
        only the head start: streaming stops for this connection and the audio is encoded from its WAV."""
        try:
            return await asyncio.to_thread(fn, *args)
        except Exception:
            log.exception("streaming audio features failed; the encoder will decode the audio instead",
                          extra={"session_id": self.session_id})
            self.audio_cfg = self.stream = None
            return None

    def _drop_front(self, n: int) -> None:
        """Forget the buffer's first ``n`` bytes (quiet audio before the prefix padding)."""
        n -= n % 2
        if n > 0:
            del self.audio[:n]
            self.audio_pos0 += n // 2
            self.vad_at -= n

    def _reset_vad(self) -> None:
        """The detector (and the features stream) start again at the buffer's front. The buffer's place in the
        session's audio (``audio_pos0``) moves only as audio leaves the buffer (``_drop_front``, ``_clear_audio``):
        moved here too, server VAD turned on with a second of audio buffered told that turn's audio_start_ms and
        audio_end_ms a second late, against what VAD on from the start tells of the same audio (an outside
        tester's)."""
        self.vad_at, self.speaking, self.silence = 0, None, 0
        self.stream = None  # the buffer starts again

    def _clear_audio(self) -> None:
        """Empty the buffer; the audio after it is that much further into the session's."""
        self.audio_pos0 += len(self.audio) // 2
        self.audio.clear()

    async def _detect(self) -> None:
        """Run the detector over the frames appended since it last looked (see ServerVad)."""
        vad, frame_bytes = self.vad, 2 * FRAME
        prefix = 2 * (vad.prefix_padding_ms * PCM_RATE // 1000)
        while len(self.audio) - self.vad_at >= frame_bytes:
            frame = np.frombuffer(self.audio, dtype="<i2", count=FRAME, offset=self.vad_at).astype(np.float32)
            loud = float(np.sqrt(np.mean(frame * frame))) / 32768.0 > vad.level
            start = self.vad_at
            self.vad_at += frame_bytes
            if self.speaking is None:
                if not loud:
                    self._drop_front(self.vad_at - prefix)  # keep only the padding a start would need
                    continue
                self._drop_front(start - prefix)
                self.speaking, self.silence = _id("item"), 0
                if self.active is not None and vad.interrupt_response:  # before it is told: no delta after it
                    self.cancel_reason = "turn_detected"
                    self.active[1].set()  # the user talks over the answer: it stops
                await self.send("input_audio_buffer.speech_started", audio_start_ms=ms(self.audio_pos0),
                                item_id=self.speaking)
                continue
            self.silence = 0 if loud else self.silence + FRAME
            if self.silence * 1000 < vad.silence_duration_ms * PCM_RATE:
                continue
            await self._end_turn()

    async def _end_turn(self) -> None:
        """Server VAD: the turn being spoken ends at the audio the detector has judged (its trailing silence
        included, as OpenAI counts audio_end_ms): committed, and answered if the session says so."""
        vad = self.vad
        item_id, end = self.speaking, self.audio_pos0 + self.vad_at // 2
        await self.send("input_audio_buffer.speech_stopped", audio_end_ms=ms(end), item_id=item_id)
        rest = bytes(self.audio[self.vad_at :])
        del self.audio[self.vad_at :]
        try:
            await self._commit(item_id)
        except EventError:  # no room for the turn: it is dropped (the error says why), listening goes on
            self._reset_vad()
            self._clear_audio()
            raise
        finally:
            self.audio += rest
        if vad.create_response and self.active is None:
            await self.response_create({"type": "response.create", "response": {}})
        elif vad.create_response:  # the response it interrupted is still ending: answered once it has
            self.turn_waiting = True

    async def _commit(self, item_id: str | None = None) -> None:
        """The buffer becomes a user item (and the buffer starts again after it); its streamed features are
        completed and kept for the first response that has to encode it."""
        self._modality("audio", "audio")
        if not self.audio:
            raise EventError("the input audio buffer is empty", code="input_audio_buffer_commit_empty")
        pcm = bytes(self.audio)
        item = {"id": item_id or _id("item"), "type": "message", "object": "realtime.item", "status": "completed",
                "role": "user", "content": [{"type": "input_audio", "audio": base64.b64encode(pcm).decode()}]}
        previous = self.items[-1]["id"] if self.items else None
        await self._room(item)  # checked before "committed" is told: committed, then the item added (OpenAI's order)
        await self.send("input_audio_buffer.committed", previous_item_id=previous, item_id=item["id"])
        await self._add(item)
        await self._stream()  # the rest of the buffer (with server VAD, a commit cuts it short of the last append)
        if self.stream_at != len(self.audio):  # fed past the commit point: never send features of other audio
            self.stream = None
        if self.stream is not None:
            stream, digest, ns = self.stream, self.chat.builder.digest, self.namespace
            done = await self._features(lambda: (digest("audio", pcm16_to_wav(pcm), ns), stream.finish().to_bytes()))
            if done is not None:
                self.features[item["id"]] = done
        self._reset_vad()
        self._clear_audio()

    async def audio_commit(self, event: dict) -> None:
        if 0 < len(self.audio) < 2 * MIN_COMMIT_MS * PCM_RATE // 1000:
            raise EventError(f"the input audio buffer is too small: expected at least {MIN_COMMIT_MS} ms of audio, "
                             f"got {ms(len(self.audio) // 2)} ms", code="input_audio_buffer_commit_empty")
        await self._commit(self.speaking)
        self.audio_carry = b""  # half a sample of the committed audio's end

    async def audio_clear(self, event: dict) -> None:
        self._reset_vad()  # the features stream starts again too
        self._clear_audio()
        self.audio_carry = b""
        await self.send("input_audio_buffer.cleared")

    # -- responses ----------------------------------------------------------------------------------------------

    def _messages(self, items: list[dict], instructions: str) -> list[dict]:
        """Conversation items as chat messages (what the REST endpoint takes)."""
        messages = [{"role": "system", "content": instructions}] if instructions else []
        for it in items:
            if it["role"] in ("system", "assistant"):  # parts kept apart, as REST sends them to the template (LLaVA's
                # puts a space after each part: joined, "You answer" + "briefly." read "You answerbriefly.")
                messages.append({"role": it["role"], "content": [{"type": "text", "text": p["text"]}
                                                                 for p in it["content"]]})
                continue
            parts = []
            for p in it["content"]:
                if p["type"] == "input_text":
                    parts.append({"type": "text", "text": p["text"]})
                elif p["type"] == "input_image":
                    parts.append({"type": "image_url", "image_url": {"url": p["image_url"]}})
                else:
                    wav = pcm16_to_wav(base64.b64decode(p["audio"]))
                    parts.append({"type": "input_audio",
                                  "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}})
            messages.append({"role": "user", "content": parts})
        return messages

    def _item_tokens(self, item: dict) -> int:
        """About how many tokens ``item`` takes in a prompt (PromptBuilder.message_tokens), as ``_messages`` sends
        it."""
        texts = [p["text"] for p in item["content"] if "text" in p]
        media = [("image", MediaInfo()) if p["type"] == "input_image" else
                 ("audio", MediaInfo(frames=_decoded_len(p["audio"]) // 2, rate=PCM_RATE))
                 for p in item["content"] if p["type"] in ("input_image", "input_audio")]
        return self.chat.builder.message_tokens(item["role"], texts, media)

    async def _fit(self, items: list[dict], instructions: str, max_tokens: int | None, remember: bool) -> list[dict]:
        """The items a response's prompt holds: with truncation on and the conversation past the context (less the
        answer's room), without its oldest ones (see the module's docstring); ``remember``: the items left out stay
        out of later responses (the conversation's own). At least the newest item stays, and the prompt starts at
        a user or system item."""
        if self.truncation == "disabled" or not items:
            return items
        if remember:
            items = [it for it in items if it["id"] not in self.left_out]
        counted = await self._counted(items)
        builder, spec = self.chat.builder, self.chat.spec
        if instructions:
            fixed = builder.conversation_tokens("system") + builder.message_tokens("system", [instructions])
        else:  # the first item kept is not known yet (a template may add a system prompt before a user one)
            fixed = max(builder.conversation_tokens("system"), builder.conversation_tokens("user"))
        reserve = min(max_tokens or self.chat.cfg.default_max_tokens, spec.max_context // 2)
        room = limit = target = spec.max_context - reserve - fixed  # what the items may take
        if isinstance(self.truncation, dict):
            limit = min(room, self.truncation.get("token_limits", {}).get("post_instructions") or room)
            target = int(limit * self.truncation["retention_ratio"])
        counts = [n for n, _ in counted]
        total = sum(counts)
        # Media past --limit-mm-per-prompt are left out the same way (a voice session failed every response from its
        # fifth spoken turn on: "at most 4 audio part(s)", though its prompt was a fifth of the context).
        media = [kinds for _, kinds in counted]
        held = sum(media, Counter())
        limits = self.chat.builder.limits

        def too_many() -> bool:
            return any(n > limits.get(kind, 0) for kind, n in held.items())

        if total <= limit and not too_many():
            return items
        start = 0
        while start < len(items) - 1 and (total > target or too_many() or items[start]["role"] == "assistant"):
            total -= counts[start]
            held.subtract(media[start])
            start += 1
        if remember:  # of the items still held: an id deleted meanwhile may come back as another item
            held = self._held()
            self.left_out.update(it["id"] for it in items[:start] if held.get(it["id"]) is it)
            for it in items[:start]:  # audio features streamed for an item no prompt will hold
                self.features.pop(it["id"], None)
        log.info("realtime conversation truncated", extra={
            "session_id": self.session_id, "left_out": start, "kept": len(items) - start, "tokens": total,
            "room": room})
        return items[start:]

    async def _counted(self, items: list[dict]) -> list[tuple[int, Counter]]:
        """Each item's tokens and media (``_item_tokens``, ``_media_of``), in order: those counted before from
        ``self.tokens``, read before any await, the others counted once, on a thread (an item may hold megabytes of
        text). A conversation.item.delete handled while the thread counted took the counts of an item this fit still
        held (``_forget``): its KeyError left a turn server VAD had committed unanswered, and the client untold (an
        outside tester's fuzz). So the fit works on what it read, and keeps the new counts of the items still in the
        conversation only (kept for one deleted, they were never dropped)."""
        counted = [(self.tokens[it["id"]], self.media[it["id"]]) if it["id"] in self.tokens else None for it in items]
        new = [i for i, c in enumerate(counted) if c is None]
        if new:
            fresh = await asyncio.to_thread(lambda: [(self._item_tokens(items[i]), _media_of(items[i])) for i in new])
            held = self._held()
            for i, c in zip(new, fresh):
                counted[i] = c
                if held.get(items[i]["id"]) is items[i]:
                    self.tokens[items[i]["id"]], self.media[items[i]["id"]] = c
        return counted

    def _held(self) -> dict[str, dict]:
        """The conversation's items by id."""
        return {it["id"]: it for it in self.items}

    def drain(self) -> None:
        """The gateway is shutting down (gateway/server.WSProtocol.shutdown): the answer in progress goes on to its
        end (at worst the graceful period's: an error event, as REST's streams get), then the socket closes with
        1012; a session with none closes now. uvicorn closed every socket at once, cutting answers mid-text with no
        event saying so (an outside tester's)."""
        self.draining = True
        if self.active is None:
            task = asyncio.get_running_loop().create_task(self._close_draining())
            self._closing = task  # held: a task only the loop refers to may be collected before it runs

    async def _close_draining(self) -> None:
        log.info("realtime session closed: the gateway is shutting down", extra={"session_id": self.session_id})
        with contextlib.suppress(Exception):  # the socket may be gone already
            await self.ws.close(code=1012, reason="the server is restarting; reconnect")

    async def response_create(self, event: dict) -> None:
        """Every response starts here, the client's and server VAD's. One at a time: the session's slot
        (``self.active``) is taken before the first await, its task still to come, and given back only by the
        response holding it (``_release``). Taken after the request was made (the conversation fitted and its JSON
        written, on threads), a turn server VAD answered as the response it interrupted ended and a client's
        response.create both passed the check meanwhile: two responses ran at once, the second could not be
        cancelled, and the first to end told the session none was running (an outside tester's fuzz)."""
        if self.draining:
            raise EventError("this server is shutting down; reconnect to go on", code="server_shutting_down",
                             type_="server_error")
        if self.active is not None:
            raise EventError("a response is already in progress; cancel it or wait for response.done",
                             code="conversation_already_has_active_response")
        cancelled, response_id = asyncio.Event(), _id("resp")
        self.active = (None, cancelled, response_id)  # a cancel (new speech, response.cancel) meanwhile is heard
        self.cancel_reason = "client_cancelled"
        try:
            run, payload, features = await self._request(event, cancelled, response_id)
        except BaseException:
            self._release(response_id)
            if self.draining:  # drain() left the close to this response
                self.drain()
            raise
        task = asyncio.get_running_loop().create_task(self._respond(run, payload, features))
        self.active = (task, cancelled, response_id)

    def _release(self, response_id: str) -> None:
        """Give back the session's response slot if ``response_id`` holds it, and only then."""
        if self.active is not None and self.active[2] == response_id:
            self.active = None

    async def _request(self, event: dict, cancelled: asyncio.Event, response_id: str) -> tuple[Run, bytes, dict]:
        """What ``response.create`` asks, checked, as the chat request's JSON (and the streamed features it takes)."""
        r = event.get("response") or {}
        if not isinstance(r, dict):
            raise EventError("response must be an object", param="response")
        only(r, RESPONSE_FIELDS, "response")
        if r.get("output_modalities", ["text"]) != ["text"] or r.get("audio"):
            raise EventError("this server answers in text only", code="unsupported", param="response.output_modalities")
        if r.get("tools"):
            raise EventError("tools are not supported by this server", code="unsupported", param="response.tools")
        unset(r, "tool_choice", "response", "tool_choice other than \"auto\" or \"none\" (there are no tools)",
              (None, "auto", "none"))
        unset(r, "prompt", "response", "prompt templates")
        metadata = _metadata(r.get("metadata"))
        conversation = r.get("conversation", "auto")
        if conversation not in ("auto", "none"):
            raise EventError("response.conversation must be \"auto\" or \"none\"", param="response.conversation")
        instructions = r.get("instructions", self.instructions)
        await self._instructions(instructions, "response.instructions")
        max_tokens = (self._max_tokens(r["max_output_tokens"], "response.max_output_tokens")
                      if "max_output_tokens" in r else self.max_output_tokens)
        if "input" in r:
            if not isinstance(r["input"], list):
                raise EventError("response.input must be a list of items", param="response.input")
            by_id = {it["id"]: it for it in self.items}  # references looked up at once, not a scan each (an
            # outside tester's 33,000 references into 1,024 items held the event loop a second)
            items = [self._referenced(raw, f"response.input.{i}", by_id) if isinstance(raw, dict) and raw.get("type")
                     == "item_reference" else await self._checked_item(raw, f"response.input.{i}")
                     for i, raw in enumerate(r["input"])]
        else:
            items = list(self.items) if conversation == "auto" else []
        items = await self._fit(items, instructions, max_tokens, conversation == "auto" and "input" not in r)
        sampling = {k: v for k, v in {**self.sampling, **self._sampling(r, "response")}.items() if v is not None}
        # The conversation's audio as the chat request carries it (WAV, base64), and that request's JSON: megabytes
        # of work for a long voice session, done on a thread (base64 and JSON release the GIL between items).
        large = sum(self.sizes[it["id"]] if it["id"] in self.sizes else _item_bytes(it) for it in items) > LARGE_EVENT
        messages = (await asyncio.to_thread(self._messages, items, instructions) if large
                    else self._messages(items, instructions))
        if not messages:
            raise EventError("there is nothing to respond to: the conversation is empty and there are no "
                             "instructions (add an item, or give response.input)", code="conversation_empty",
                             param="response.input" if conversation == "none" else None)
        into_conversation = conversation == "auto"
        if into_conversation:  # the answer will need a place: refused now, not halfway through its events
            await self._room({"content": []})
        body = {"model": self.model, "messages": messages, "stream": True, **sampling}
        # Streamed features go with this response; afterwards the encoding is cached (or, if it failed, the audio
        # is there to encode again), so they are dropped.
        features = dict(self.features.pop(it["id"]) for it in items if it["id"] in self.features)
        # Which conversation item each chat message stands for, to name items (not chat messages) in errors.
        sources = ([None] if instructions else []) + [it["id"] for it in items]
        run = Run(response_id, cancelled, into_conversation, max_tokens, metadata, event.get("event_id"), sources)
        payload = await asyncio.to_thread(_json_bytes, body) if large else _json_bytes(body)
        return run, payload, features

    async def response_cancel(self, event: dict) -> None:
        if self.active is None:
            raise EventError("no response is in progress", code="response_cancel_not_active")
        wanted = event.get("response_id")
        if wanted not in (None, self.active[2]):
            raise EventError(f"response {wanted!r} is not the one in progress", param="response_id")
        self.active[1].set()

    def _response(self, run: Run, status: str, output: list, usage: dict | None, details=None):
        return {"id": run.response_id, "object": "realtime.response", "status": status, "status_details": details,
                "output": output, "output_modalities": ["text"], "usage": usage, "metadata": run.metadata,
                "max_output_tokens": run.max_tokens if run.max_tokens is not None else "inf",
                "conversation_id": None}

    def _item_error(self, exc: APIError, run: Run) -> APIError:
        """``exc`` with the chat message it names (``messages.3.content.0``) told as the conversation item it came
        from (``item 'item_x', content 0``): the client never saw the chat request."""
        if exc.param == "messages":  # the whole prompt (too long, too many media parts): the conversation's, which
            # the client never sent as such (an outside tester's fuzz saw the chat request's field named)
            exc.param = None
            return exc
        match = re.match(r"messages\.(\d+)(?:\.content\.(\d+))?", exc.param or "")
        if not match or int(match[1]) >= len(run.sources):
            return exc
        item_id, part = run.sources[int(match[1])], match[2]
        where = (f"item {item_id!r}" if item_id else "the instructions") + (f", content {part}" if part else "")
        param = ("item.content." + part if part else "item") if item_id else "instructions"
        exc.message = exc.message.replace(match[0], where, 1) if match[0] in exc.message else f"{where}: {exc.message}"
        exc.param = param
        return exc

    async def _respond(self, run: Run, body: bytes, features: dict[str, bytes]) -> None:
        item = {"id": _id("item"), "type": "message", "object": "realtime.item", "status": "in_progress",
                "role": "assistant", "content": []}
        response_id = run.response_id
        where = {"response_id": response_id, "item_id": item["id"], "output_index": 0, "content_index": 0}
        text, last, started, status, details = "", None, False, "completed", None
        joined = False  # the answer's item is in the conversation
        try:
            await self.send("response.created", response=self._response(run, "in_progress", [], None))
            deltas = self.chat.respond(response_id, body, run.cancelled, via=f"realtime {self.session_id}",
                                       features=features, tenant=self.tenant, namespace=self.namespace,
                                       cap=math.inf if run.max_tokens is None else run.max_tokens)
            stop = asyncio.ensure_future(run.cancelled.wait())  # one for the response, raced against each delta
            try:
                while (d := await _next_unless(deltas, run.cancelled, stop)) is not None:
                    if not started:
                        started = True
                        await self.send("response.output_item.added", response_id=response_id, output_index=0,
                                        item=item)
                        if run.into_conversation:
                            try:
                                await self._add(item, done=False)
                                joined = True
                            except EventError as exc:  # filled up since response.create: answered, not kept
                                log.warning("realtime answer not kept in the conversation", extra={
                                    "request_id": response_id, "reason": exc.message})
                        await self.send("response.content_part.added", **where,
                                        part={"type": "output_text", "text": ""})
                        # The text so far, for conversation.item.retrieve meanwhile (it answered no content at all:
                        # an outside tester's fuzz); the item's size is counted once it is done.
                        item["content"] = [{"type": "output_text", "text": ""}]
                    if d.text:
                        text += d.text
                        item["content"][0]["text"] = text
                        await self.send("response.output_text.delta", **where, delta=d.text)
                    last = d
            finally:
                stop.cancel()
                with contextlib.suppress(RuntimeError):  # still running: a cut request past its clean-up bound
                    await deltas.aclose()
            if last is not None and last.finish == "length":
                status, details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
        except ClientGone:
            status, details = "cancelled", {"type": "cancelled", "reason": self.cancel_reason}
        except APIError as exc:
            exc = self._item_error(exc, run)
            status, details = "failed", {"type": "failed", "error": {"type": exc.type, "code": exc.code,
                                                                      "message": exc.message}}
            await self.error(exc, run.event_id)
        except (WebSocketDisconnect, WebSocketDisconnected):  # the socket went (a reset, the send bound cut it)
            run.cancelled.set()
            self._release(response_id)
            return
        except Exception as exc:  # one response's fault: it fails, the connection goes on
            log.exception("realtime response failed", extra={"request_id": response_id})
            status, details = "failed", {"type": "failed", "error": {
                "type": "server_error", "code": None, "message": f"internal error ({type(exc).__name__})"}}
        try:
            output = []
            if started:
                item.update(status="completed" if status == "completed" else "incomplete",
                            content=[{"type": "output_text", "text": text}])
                await self.send("response.output_text.done", **where, text=text)
                await self.send("response.content_part.done", **where, part={"type": "output_text", "text": text})
                await self.send("response.output_item.done", response_id=response_id, output_index=0, item=item)
                if joined and any(it is item for it in self.items):
                    self._resized(item)  # its text, added since it joined the conversation
                    # the item before it now (the one it followed may have been deleted meanwhile)
                    at = next(i for i, it in enumerate(self.items) if it is item)
                    previous = self.items[at - 1]["id"] if at else None
                    await self.send("conversation.item.done", previous_item_id=previous, item=_public(item))
                output = [item]
            usage = None
            if last is not None:
                usage = {"total_tokens": last.prompt_tokens + last.completion_tokens,
                         "input_tokens": last.prompt_tokens, "output_tokens": last.completion_tokens,
                         "input_token_details": _input_details(last)}
            await self.send("response.done", response=self._response(run, status, output, usage, details))
        except (WebSocketDisconnect, RuntimeError):
            self.turn_waiting = False  # the socket is gone
        finally:
            self._release(response_id)
        if self.draining:
            await self._close_draining()
            return
        if self.turn_waiting:
            self.turn_waiting = False
            await self._answer_turn()

    async def _answer_turn(self) -> None:
        """The response to a turn server VAD committed while another response was still ending (the turn
        interrupted it): it was never made, and nothing told the client why (an outside tester, 2 runs of 4). A
        failure making it is told as an error event, as run() tells one: a bug here was only logged, and the turn
        was never answered with nothing said (an outside tester's fuzz: a KeyError in ``_fit``)."""
        try:
            await self.response_create({"type": "response.create", "response": {}})
            return
        except (WebSocketDisconnect, WebSocketDisconnected, RuntimeError):  # the socket is gone
            return
        except (EventError, APIError) as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 -- as run()'s: this one response's fault, the session goes on
            if redis_failure(exc):
                error = redis_unavailable(exc)
            else:
                log.exception("realtime response failed", extra={"session_id": self.session_id})
                error = EventError(f"the server could not answer the turn ({type(exc).__name__})",
                                   code="server_error", type_="server_error")
        with contextlib.suppress(WebSocketDisconnect, WebSocketDisconnected, RuntimeError):  # gone meanwhile
            await self.error(error, None)


@dataclass
class Run:
    """A response being made: what ``response.create`` asked, for the task that makes it."""

    response_id: str
    cancelled: asyncio.Event
    into_conversation: bool
    max_tokens: int | None  # None: "inf", as many as the context leaves
    metadata: dict | None
    event_id: str | None  # the response.create's, named by the errors the response meets
    sources: list[str | None]  # the conversation item each chat message came from (None: the instructions)


def _decoded_len(b64: str) -> int:
    """The length of base64 data once decoded (checked base64: see ``_b64``)."""
    return len(b64) * 3 // 4 - b64[-2:].count("=")


def _metadata(value) -> dict | None:
    """A response's ``metadata``: up to 16 string pairs (keys <= 64 characters, values <= 512), echoed on it."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_METADATA or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in value.items()):
        raise EventError(f"response.metadata must be an object of at most {MAX_METADATA} string pairs (keys up to 64 "
                         "characters, values up to 512)", param="response.metadata")
    return value


_REFUSED_LOGGED = Throttle(1.0)


async def realtime_endpoint(ws: WebSocket) -> None:
    app = ws.app
    chat, spec, cfg = app.state.chat, app.state.spec, app.state.cfg
    # The handshake's answer carries the connection's id (gateway/app.with_request_id: every log line of the
    # connection names it) and echoes the client's own, as a REST answer does.
    ids = RequestIds.of(ws)
    ids = dataclasses.replace(ids, server=ws.scope.get("state", {}).get("response_id") or ids.server)
    REQUEST_ID.set(ids.server)  # every log line of this connection names it, unless it names a response's
    # Browsers' OpenAI clients offer "realtime" beside the key subprotocol (gateway/auth.py): accept it.
    await ws.accept(subprotocol="realtime" if "realtime" in ws.scope.get("subprotocols", ()) else None,
                    headers=[(k.encode(), v.encode()) for k, v in ids.headers().items()])
    tenant = ws.scope.get("state", {}).get("tenant")  # gateway/auth.py: None without API keys
    held = app.state.realtime_by_tenant.get(tenant.name, 0) if tenant else 0
    full = ("this gateway's" if app.state.realtime_connections >= cfg.max_inflight else
            "this key's" if tenant and held >= tenant_share(cfg, chat.tenants()) else None)
    if full:  # counted as REST counts them: a key past its share is rate limited, a full gateway overloaded
        chat.metrics.reject("server_overloaded" if full == "this gateway's" else "rate_limit_exceeded")
        if _REFUSED_LOGGED.due():  # a line a second at most: refused handshakes cost a client nothing
            log.warning("realtime connection refused: too many", extra={
                "connections": app.state.realtime_connections, "tenant": tenant.name if tenant else None,
                "held": held, "unlogged_since_last": _REFUSED_LOGGED.held})
        await ws.close(code=1013, reason=f"too many realtime connections ({full}); retry later")
        return
    model = ws.query_params.get("model")
    session = RealtimeSession(ws, chat, spec.name, cfg.max_audio_seconds)
    ws.scope["tributary.drain"] = session.drain  # called by gateway/server.WSProtocol.shutdown
    if model is not None and model != spec.name:
        await session.error(EventError(f"model '{model}' does not exist; this server serves '{spec.name}'",
                                       code="model_not_found", param="model"), None)
        await ws.close(code=1008)
        return
    # Counted before the rate limit's round trip: handshakes arriving while it waits see this one (the caps above
    # held only between awaits).
    app.state.realtime_connections += 1
    if tenant:
        count_by(app.state.realtime_by_tenant, tenant.name, 1)
    chat.metrics.realtime.set(app.state.realtime_connections)
    try:
        try:  # opening a session counts as a request toward the tenant's rate limit (a 429 here closes it)
            await chat._rate(tenant, session.session_id)
        except APIError as exc:  # a 429, or Redis failing or too slow (a 503)
            await session.error(exc, None)
            await ws.close(code=1013, reason=("rate limited" if exc.status == 429 else "unavailable") + "; retry later")
            return
        log.info("realtime connected", extra={"request_id": ids.server, "client_request_id": ids.client,
                                              "session_id": session.session_id,
                                              "tenant": session.tenant.name if session.tenant else None})
        await session.run()
    finally:
        app.state.realtime_connections -= 1
        if tenant:
            count_by(app.state.realtime_by_tenant, tenant.name, -1)
        chat.metrics.realtime.set(app.state.realtime_connections)
        log.info("realtime closed", extra={"request_id": ids.server, "session_id": session.session_id})


def _input_details(last) -> dict:
    """A response's ``usage.input_token_details``: its input tokens by what made them (text, or the image and audio
    encoders' outputs) and those the prefix cache held."""
    image, audio = last.media_tokens
    return {"text_tokens": last.prompt_tokens - image - audio, "audio_tokens": audio, "image_tokens": image,
            "cached_tokens": last.cached_tokens}


async def _next_unless(deltas, cancelled: asyncio.Event, stop: asyncio.Future):
    """The next delta of ``deltas`` (None at its end), or ClientGone as soon as ``cancelled`` is set (``stop``, the
    caller's one waiter on it for the whole response), whatever the request waits on meanwhile: a response.cancel
    sent while Redis was paused waited for the request's Redis bound (10 s) and the response then ended ``failed``
    (an outside tester's). Tokens already on their way are not sent after a cancel either (new speech went on
    receiving some twenty deltas of the answer it cut). Cut, the request's own clean-up runs (its backbone slot
    freed, its cancellation posted until Redis takes it). One task per delta (the step); the waiter is the
    response's, not made anew for each delta."""
    if cancelled.is_set():
        raise ClientGone()

    async def step():
        try:
            return await anext(deltas)
        except StopAsyncIteration:
            return None

    nxt = asyncio.ensure_future(step())
    try:
        await asyncio.wait((nxt, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not nxt.done():
            nxt.cancel()
            await asyncio.wait((nxt,), timeout=CANCEL_CLEANUP_S)  # its clean-up, bounded
    if nxt.cancelled() or not nxt.done() or cancelled.is_set():
        if nxt.done() and not nxt.cancelled():
            nxt.exception()  # taken: the cancel comes first (a delta that came with it is not sent, nor an error)
        raise ClientGone()
    return nxt.result()

"""End to end: ``/v1/realtime`` against a real local cluster, with the official `openai` SDK's realtime client and a
raw `websockets` client. Text + image + audio in, text deltas out equal to the REST endpoint's answer at temperature
0; two responses on one connection, the second re-encoding nothing; cancel; a dropped socket; bad events."""

from __future__ import annotations

import base64
import json
import time

import numpy as np
import pytest
import redis
from openai import OpenAI
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from gateway.realtime import pcm16_to_wav
from tests.media import data_url, pcm16, png_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(cluster) -> OpenAI:
    return OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def rest_audio(pcm: bytes) -> dict:
    """The REST endpoint's part for the same audio: a 24 kHz WAV."""
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(pcm16_to_wav(pcm)).decode(),
                                                   "format": "wav"}}


def until_done(conn) -> tuple[str, object, list[str]]:
    """Events until ``response.done``: the deltas joined, the done event, every event type seen."""
    text, seen = "", []
    for event in conn:
        seen.append(event.type)
        assert event.type != "error", event
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type == "response.done":
            return text, event, seen
    raise AssertionError(f"the socket closed before response.done: {seen}")


def audio_tensors(cluster) -> dict[bytes, bytes]:
    """Every cached audio encoding: tensor key -> its safetensors bytes."""
    r = redis.Redis.from_url(cluster.redis_url)
    return {k: r.hget(k, "data") for k in r.scan_iter(f"{cluster.prefix}:t:*audio*")}


def test_streamed_audio_and_an_image_give_the_rest_answer(client, cluster):
    """Instructions, a text + image item, then audio appended in 200 ms chunks and committed (its own user item).
    The audio's features are computed while it streams in, and the encoder gets them instead of the audio. Then the
    cached encoding is deleted and the REST endpoint gets the same three messages, with the audio as a 24 kHz WAV
    that the encoder decodes itself: the same encoding, bitwise, and the same answer."""
    png, pcm = png_bytes(48, 36, seed=31), pcm16(1.0, seed=31)
    before, cached = cluster.stats("encoder:audio"), audio_tensors(cluster)
    with client.realtime.connect(model=cluster.model) as conn:
        assert conn.recv().type == "session.created"
        conn.session.update(session={"type": "realtime", "instructions": "You are terse.", "temperature": 0.0})
        assert conn.recv().type == "session.updated"
        conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "What do you see and hear?"},
            {"type": "input_image", "image_url": data_url(png)}]})
        assert [conn.recv().type for _ in range(2)] == ["conversation.item.added", "conversation.item.done"]
        for i in range(0, len(pcm), 9600):  # 200 ms chunks, as a microphone sends them
            conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 9600]).decode())
        conn.input_audio_buffer.commit()
        assert conn.recv().type == "input_audio_buffer.committed"  # first, as OpenAI orders them
        added = conn.recv()
        seen = [added.type, conn.recv().type]
        assert seen == ["conversation.item.added", "conversation.item.done"]
        assert added.item.content[0].type == "input_audio" and added.item.content[0].audio is None  # not echoed
        conn.response.create(response={"max_output_tokens": 8})
        text, done, types = until_done(conn)
    assert types[:2] == ["response.created", "response.output_item.added"]
    assert "response.output_text.done" in types and "response.content_part.done" in types
    streamed = cluster.stats("encoder:audio")
    assert streamed.get("feature_inputs", 0) == before.get("feature_inputs", 0) + 1  # features, not the WAV
    assert streamed["encoder_calls"] == before.get("encoder_calls", 0) + 1
    new = {k: v for k, v in audio_tensors(cluster).items() if k not in cached}
    assert len(new) == 1
    redis.Redis.from_url(cluster.redis_url).delete(*new)  # REST must encode the WAV itself

    rest = client.chat.completions.create(model=cluster.model, temperature=0.0, max_tokens=8, messages=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "What do you see and hear?"},
                                     {"type": "image_url", "image_url": {"url": data_url(png)}}]},
        {"role": "user", "content": [rest_audio(pcm)]}])
    after = cluster.stats("encoder:audio")
    assert after["encoder_calls"] == streamed["encoder_calls"] + 1
    assert after.get("feature_inputs", 0) == streamed.get("feature_inputs", 0)
    assert {k: audio_tensors(cluster).get(k) for k in new} == new  # bitwise the encoding the features gave
    assert text and text == rest.choices[0].message.content
    assert (done.response.usage.input_tokens, done.response.usage.output_tokens) == (
        rest.usage.prompt_tokens, rest.usage.completion_tokens)
    details = done.response.usage.input_token_details
    assert details.audio_tokens == rest.usage.prompt_tokens_details.audio_tokens > 0
    assert details.image_tokens > 0 and details.text_tokens > 0
    assert details.text_tokens + details.audio_tokens + details.image_tokens == rest.usage.prompt_tokens
    assert done.response.status == ("incomplete" if rest.choices[0].finish_reason == "length" else "completed")


def test_one_message_equals_rest_and_a_second_response_reencodes_nothing(client, cluster):
    """The item's event is over LARGE_EVENT (parsed on a thread); its echoes carry neither the image nor the audio."""
    png, pcm = png_bytes(120, 132, seed=32), pcm16(0.8, seed=32)
    rest = client.chat.completions.create(model=cluster.model, temperature=0.0, max_tokens=8, messages=[
        {"role": "user", "content": [
            {"type": "text", "text": "Describe."},
            {"type": "image_url", "image_url": {"url": data_url(png)}},
            rest_audio(pcm)]}])
    with client.realtime.connect(model=cluster.model) as conn:
        assert conn.recv().type == "session.created"
        conn.session.update(session={"type": "realtime", "temperature": 0.0})
        conn.recv()
        conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Describe."},
            {"type": "input_image", "image_url": data_url(png)},
            {"type": "input_audio", "audio": base64.b64encode(pcm).decode()}]})
        for event in (conn.recv(), conn.recv()):
            assert event.type in ("conversation.item.added", "conversation.item.done")
            text_part, image_part, audio_part = event.item.content
            assert (text_part.text, image_part.image_url, audio_part.audio) == ("Describe.", None, None)
        conn.response.create(response={"max_output_tokens": 8})
        text, done, _ = until_done(conn)
        assert text and text == rest.choices[0].message.content  # the REST endpoint's answer, token for token
        assert done.response.output[0].content[0].text == text
        before = {m: cluster.stats(f"encoder:{m}").get("encoder_calls", 0) for m in ("image", "audio")}
        conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "And now?"}]})
        conn.recv(), conn.recv()
        conn.response.create(response={"max_output_tokens": 4})
        second, done2, _ = until_done(conn)
        assert done2.response.usage.input_tokens > done.response.usage.input_tokens + done.response.usage.output_tokens
    after = {m: cluster.stats(f"encoder:{m}").get("encoder_calls", 0) for m in ("image", "audio")}
    assert after == before, "the second response encoded the earlier turn's media again"


def test_cancel_mid_response_and_the_connection_goes_on(client, cluster):
    with client.realtime.connect(model=cluster.model) as conn:
        conn.recv()
        conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "long"}]})
        conn.recv(), conn.recv()
        # Greedy: the same long answer every run (a sampled one once ended on its own before the cancel arrived)
        conn.response.create(response={"max_output_tokens": 900, "conversation": "auto", "temperature": 0})
        for event in conn:
            if event.type == "response.output_text.delta":
                conn.response.cancel()
                break
        for event in conn:
            if event.type == "response.done":
                assert event.response.status == "cancelled"
                assert event.response.usage is None or event.response.usage.output_tokens < 900
                break
        conn.response.create(response={"max_output_tokens": 2, "conversation": "none", "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]})
        _, done, _ = until_done(conn)
        assert done.response.status in ("completed", "incomplete")


def test_a_cancel_is_heard_while_the_response_waits_on_a_paused_redis(cluster):
    """Redis paused: a response.create's request waits in its plan's submission (bounded at 10 s). The cancel sent
    meanwhile was heard only then, and the response ended ``failed`` with ``redis_unavailable`` (an outside
    tester's). It ends ``cancelled`` at once; once Redis is back the connection goes on."""
    r = redis.Redis.from_url(cluster.redis_url)
    with raw(cluster) as ws:
        next_of(ws, "session.created")
        ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "wait for it"}]}}))
        next_of(ws, "conversation.item.done")
        r.execute_command("CLIENT", "PAUSE", 3000, "ALL")
        try:
            ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 4}}))
            next_of(ws, "response.created")
            time.sleep(0.5)
            t = time.monotonic()
            ws.send(json.dumps({"type": "response.cancel"}))
            done = next_of(ws, "response.done")["response"]
            took = time.monotonic() - t
        finally:
            r.execute_command("CLIENT", "UNPAUSE")
        assert done["status"] == "cancelled" and took < 1.5, (done, took)
        import httpx

        deadline = time.monotonic() + 30  # the gateway's monitor sees Redis back within a beat or two
        while httpx.get(cluster.base_url + "/ready", timeout=10).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 2}}))
        after = next_of(ws, "response.done")["response"]
        assert after["status"] in ("completed", "incomplete"), after


def test_response_input_may_name_conversation_items_by_reference(cluster):
    """GA's ``{"type": "item_reference", "id"}`` in ``response.input``: the item, as it is in the conversation (an
    outside tester's was refused as "an item must be a message"); an id not in it is ``item_not_found``."""
    with raw(cluster) as ws:
        next_of(ws, "session.created")
        ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "remember"}]}}))
        item_id = next_of(ws, "conversation.item.added")["item"]["id"]
        ws.send(json.dumps({"type": "response.create", "event_id": "ev-ref", "response": {
            "conversation": "none", "max_output_tokens": 2, "temperature": 0,
            "input": [{"type": "item_reference", "id": item_id}]}}))
        done = next_of(ws, "response.done")["response"]
        assert done["status"] in ("completed", "incomplete") and done["usage"]["input_tokens"] > 0, done
        ws.send(json.dumps({"type": "response.create", "event_id": "ev-bad", "response": {
            "conversation": "none", "input": [{"type": "item_reference", "id": "item_nope"}]}}))
        error = next_of(ws, "error")
        assert (error["error"]["code"], error["error"]["param"], error["error"]["event_id"]) == (
            "item_not_found", "response.input.0.id", "ev-bad"), error


def raw(cluster):
    url = cluster.base_url.replace("http://", "ws://") + f"/v1/realtime?model={cluster.model}"
    return connect(url, max_size=None, open_timeout=30)


def next_of(ws, kind: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        if event["type"] == kind:
            return event
    raise AssertionError(f"no {kind} event")


def test_a_dropped_socket_frees_the_backbone_slot(cluster):
    before = cluster.stats("backbone").get("cancelled", 0)
    with raw(cluster) as ws:
        next_of(ws, "session.created")
        ws.send(json.dumps({"type": "response.create", "response": {  # greedy: a sampled answer may end at once
            "max_output_tokens": 900, "conversation": "none", "temperature": 0,
            "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "long"}]}]}}))
        next_of(ws, "response.output_text.delta")  # then the socket drops, mid-response
    deadline = time.monotonic() + 10
    while cluster.stats("backbone").get("cancelled", 0) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster.stats("backbone").get("cancelled", 0) == before + 1


def test_a_conversations_media_count_toward_its_limit_and_no_text_longer_than_any_prompt_is_taken(cluster):
    """Items are held by the gateway: past the conversation's limit (32 MiB, REST's largest request; media as
    base64) an item is refused with an error event with truncation disabled, and the connection goes on; with it on
    (the default) the oldest item makes room, told as deleted. A text part longer than any prompt could hold is
    refused at once (echoed, 12 MB of text took the event loop 0.5 s per event: an outside reviewer's finding), as
    REST refuses it."""
    audio = base64.b64encode(bytes(9 << 20)).decode()  # 12 MiB of base64: 196 s of silence

    def add(part: dict, event_id: str) -> None:
        ws.send(json.dumps({"type": "conversation.item.create", "event_id": event_id, "item": {
            "type": "message", "role": "user", "content": [part]}}))

    with raw(cluster) as ws:
        next_of(ws, "session.created")
        add({"type": "input_text", "text": "x" * (12 << 20)}, "text")
        err = next_of(ws, "error")["error"]
        assert (err["code"], err["param"], err["event_id"]) == ("context_length_exceeded", "item.content.0.text",
                                                                "text")
        # Fewer characters than the bound that needs no counting, more tokens than the context (1,024): counted, and
        # refused as it arrives, not kept to fail every response (an outside tester's 3,000 characters)
        add({"type": "input_text", "text": " ".join(str(i) for i in range(1000))}, "long")
        err = next_of(ws, "error")["error"]
        assert (err["code"], err["event_id"]) == ("context_length_exceeded", "long") and "tokens" in err["message"]
        ws.send(json.dumps({"type": "conversation.item.create", "event_id": "parts", "item": {  # the same in 4 parts,
            "type": "message", "role": "user", "content": [  # each of fewer characters than the context has tokens
                {"type": "input_text", "text": " ".join(map(str, range(k, k + 250)))} for k in (0, 250, 500, 750)]}}))
        err = next_of(ws, "error")["error"]
        assert (err["code"], err["event_id"], err["param"]) == ("context_length_exceeded", "parts", "item.content")
        ws.send(json.dumps({"type": "session.update", "session": {"truncation": "disabled"}}))
        next_of(ws, "session.updated")
        ids = []
        for n in range(2):
            add({"type": "input_audio", "audio": audio}, f"big{n}")
            ids.append(next_of(ws, "conversation.item.done")["item"]["id"])
        add({"type": "input_audio", "audio": audio}, "big2")
        err = next_of(ws, "error")["error"]
        assert (err["code"], err["event_id"]) == ("conversation_too_long", "big2")
        add({"type": "input_text", "text": "small"}, "small")  # under the limit still
        next_of(ws, "conversation.item.done")
        ws.send(json.dumps({"type": "conversation.item.delete", "item_id": ids[0]}))
        next_of(ws, "conversation.item.deleted")
        add({"type": "input_audio", "audio": audio}, "big3")  # room again
        assert next_of(ws, "conversation.item.done")["item"]["content"][0]["type"] == "input_audio"
        ws.send(json.dumps({"type": "session.update", "session": {"truncation": "auto"}}))
        next_of(ws, "session.updated")
        add({"type": "input_audio", "audio": audio}, "big4")  # full: the oldest item makes room
        assert next_of(ws, "conversation.item.deleted")["item_id"] == ids[1]
        assert next_of(ws, "conversation.item.done")["item"]["content"][0]["type"] == "input_audio"


def test_the_item_a_response_is_writing_cannot_be_deleted_until_it_ends(cluster):
    with raw(cluster) as ws:
        next_of(ws, "session.created")
        ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "long"}]}}))
        next_of(ws, "conversation.item.done")
        # Greedy: the same long answer every run (a sampled one might end before the delete arrives).
        ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 900, "temperature": 0}}))
        item = next_of(ws, "conversation.item.added")["item"]
        assert item["role"] == "assistant"
        ws.send(json.dumps({"type": "conversation.item.delete", "item_id": item["id"], "event_id": "del"}))
        err = next_of(ws, "error")["error"]
        assert (err["code"], err["event_id"]) == ("item_in_progress", "del")
        ws.send(json.dumps({"type": "response.cancel"}))
        assert next_of(ws, "response.done")["response"]["status"] == "cancelled"
        ws.send(json.dumps({"type": "conversation.item.delete", "item_id": item["id"]}))
        assert next_of(ws, "conversation.item.deleted")["item_id"] == item["id"]


def test_an_item_is_retrieved_whole_though_item_events_leave_media_out(cluster):
    """Item events echo no audio and no data-URL image; conversation.item.retrieve gives them back as sent (the
    protocol's way to get a turn's audio), a committed buffer's audio too. The socket negotiates no
    permessage-deflate, whose work on megabytes would run on the gateway's event loop."""
    png, pcm = png_bytes(40, 30, seed=5), pcm16(0.5, seed=5)
    url = cluster.base_url.replace("http://", "ws://") + f"/v1/realtime?model={cluster.model}"
    with connect(url, max_size=None, open_timeout=30, compression="deflate") as ws:  # the client offers it
        assert "sec-websocket-extensions" not in {k.lower() for k in ws.response.headers.keys()}
        next_of(ws, "session.created")
        content = [{"type": "input_text", "text": "look"}, {"type": "input_image", "image_url": data_url(png)},
                   {"type": "input_audio", "audio": base64.b64encode(pcm).decode()}]
        ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": content}}))
        done = next_of(ws, "conversation.item.done")["item"]
        assert done["content"][1]["image_url"] is None and "audio" not in done["content"][2]
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}))
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        committed = next_of(ws, "conversation.item.done")["item"]
        for item_id, want in ((done["id"], content), (committed["id"], [content[2]])):
            ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": item_id, "event_id": "get"}))
            got = next_of(ws, "conversation.item.retrieved")["item"]
            assert got["id"] == item_id and got["role"] == "user"
            assert got["content"] == [{**p, "transcript": None} if p["type"] == "input_audio" else p for p in want]
        ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": "nope", "event_id": "missing"}))
        err = next_of(ws, "error")["error"]
        assert (err["code"], err["param"], err["event_id"]) == ("item_not_found", "item_id", "missing")


@pytest.mark.parametrize("path,headers,status,code", [
    ("/health", b"", 404, "not_found"),  # uvicorn answered 403 with an empty text body
    ("/v1/realtime?model=x", b"Origin: http://evil.example\r\n", 403, "origin_not_allowed"),
])
def test_a_websocket_refused_before_its_handshake_gets_the_error_shape_and_a_request_id(cluster, path, headers,
                                                                                          status, code):
    import socket

    host, port = cluster.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n".encode() + headers
                  + b"\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status) and b"x-request-id: " in head.lower(), head
    assert json.loads(body)["error"]["code"] == code


def test_an_accepted_handshake_carries_the_connections_id_and_echoes_the_clients(cluster):
    """Every HTTP answer carries x-request-id, the WebSocket handshake's too (it had none, and the client's own id
    was neither echoed nor logged): the id the gateway's log lines of the connection name."""
    url = cluster.base_url.replace("http://", "ws://") + f"/v1/realtime?model={cluster.model}"
    with connect(url, open_timeout=30, additional_headers={"X-Client-Request-Id": "client-rt-1"}) as ws:
        headers = {k.lower(): v for k, v in ws.response.headers.raw_items()}
        assert len(headers.get("x-request-id", "")) == 32 and headers.get("x-client-request-id") == "client-rt-1"
        next_of(ws, "session.created")


def test_malformed_events_get_errors_and_the_connection_stays_usable(cluster):
    bad = [
        ("{not json", "invalid_json", None),
        (b"\x00 a binary frame", "invalid_json", None),
        (json.dumps([1, 2]), "invalid_value", "type"),
        (json.dumps({"type": "no.such.event", "event_id": "e1"}), "invalid_event_type", "type"),
        (json.dumps({"type": "input_audio_buffer.append", "audio": "***", "event_id": "e2"}), "invalid_value", "audio"),
        (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty", None),
        (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "wizard",
                                                                  "content": []}}), "invalid_value", "item.role"),
        (json.dumps({"type": "conversation.item.delete", "item_id": "nope"}), "item_not_found", "item_id"),
        (json.dumps({"type": "conversation.item.truncate", "item_id": "x"}), "unsupported", "type"),
        (json.dumps({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["audio"]}}),
         "unsupported", "session.output_modalities"),
        (json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "turn_detection": {"type": "semantic_vad"}}}}}), "unsupported", "session.audio.input.turn_detection"),
        (json.dumps({"type": "response.cancel"}), "response_cancel_not_active", None),
        (json.dumps({"type": "response.create", "response": {"max_output_tokens": 0}}), "invalid_value",
         "response.max_output_tokens"),
        (json.dumps({"type": "session.update", "session": {"max_output_tokens": 10**30}}), "invalid_value",
         "session.max_output_tokens"),
        # Shapes a handler did not expect, strict JSON, values every later response would fail on:
        (json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": "pcm16"}}}}), "unsupported",
         "session.audio.input.format"),
        (json.dumps({"type": "session.update", "session": {"audio": {"input": ["pcm16"]}}}), "invalid_value",
         "session.audio.input"),
        ('{"type": "session.update", "session": {"temperature": NaN}}', "invalid_json", None),
        ('{"type": "session.update", "session": {"seed": Infinity}}', "invalid_json", None),
        ("[" * 2000 + "]" * 2000, "invalid_json", None),
        ('{"type": "session.update", "x": ' + "[" * 40 + "]" * 40 + "}", "invalid_json", "x.0.0"),
        (json.dumps({"type": "session.update", "session": {"temperature": 7}}), "invalid_value",
         "session.temperature"),
        (json.dumps({"type": "session.update", "session": {"temperature": "0.5"}}), "invalid_value",
         "session.temperature"),
        (json.dumps({"type": "response.create", "response": {"seed": True}}), "invalid_value", "response.seed"),
        (json.dumps({"type": "response.create", "response": {"top_p": 0}}), "invalid_value", "response.top_p"),
        # instructions no prompt could hold: every later response would fail on them
        (json.dumps({"type": "session.update", "session": {"instructions": "x" * 2_000_000}}),
         "context_length_exceeded", "session.instructions"),
        (json.dumps({"type": "response.create", "response": {"instructions": 7}}), "invalid_value",
         "response.instructions"),
    ]
    with raw(cluster) as ws:
        next_of(ws, "session.created")
        for text, code, param in bad:
            ws.send(text)
            err = next_of(ws, "error", timeout=10)["error"]
            assert (err["code"], err["param"]) == (code, param), (text, err)
        ws.send(json.dumps({"type": "no.such.event", "event_id": "mine"}))
        assert next_of(ws, "error")["error"]["event_id"] == "mine"  # the offending event is named
        ws.send(json.dumps({"type": "response.create", "response": {
            "max_output_tokens": 2, "conversation": "none",
            "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "still?"}]}]}}))
        after = next_of(ws, "response.done")["response"]
        assert after["status"] in ("completed", "incomplete"), after


def test_a_frame_over_the_limit_closes_with_1009(cluster):
    big = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (33 * 2**20)})
    with raw(cluster) as ws:
        next_of(ws, "session.created")
        with pytest.raises(ConnectionClosed) as info:
            ws.send(big)
            ws.recv(timeout=30)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


def test_server_vad_finds_the_turn_commits_it_and_answers(client, cluster):
    """0.5 s of near silence, 1 s of speech-level noise, 0.8 s of near silence, sent in 100 ms chunks with server VAD
    (threshold 0.5 = -35 dBFS, 300 ms prefix padding, 500 ms of silence ends a turn): speech starts at ~500 - 300 ms,
    stops at ~1500 ms, the turn is committed as a user item and answered; the answer equals REST's on that audio."""
    rng = np.random.default_rng(40)
    quiet = lambda s: (rng.standard_normal(int(s * 24000)) * 30).astype("<i2")  # noqa: E731  (~ -60 dBFS)
    loud = (rng.standard_normal(24000) * 3000).astype("<i2")  # ~ -20 dBFS
    pcm = np.concatenate([quiet(0.5), loud, quiet(0.8)]).tobytes()
    with client.realtime.connect(model=cluster.model) as conn:
        assert conn.recv().type == "session.created"
        conn.session.update(session={"type": "realtime", "temperature": 0.0, "audio": {"input": {"turn_detection": {
            "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}}}})
        updated = conn.recv()
        assert updated.type == "session.updated"
        assert updated.session.audio.input.turn_detection.type == "server_vad"
        for i in range(0, len(pcm), 4800):
            conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 4800]).decode())
        events = []
        for event in conn:
            events.append(event)
            assert event.type != "error", event
            if event.type == "response.done":
                break
    by_type = {e.type: e for e in events}
    started, stopped = by_type["input_audio_buffer.speech_started"], by_type["input_audio_buffer.speech_stopped"]
    # The end counts the silence that ended the turn (500 ms after the speech's end at 1500 ms), as OpenAI's does.
    assert abs(started.audio_start_ms - 200) <= 20 and abs(stopped.audio_end_ms - 2000) <= 20
    assert started.item_id == stopped.item_id == by_type["input_audio_buffer.committed"].item_id
    order = [e.type for e in events]
    assert order.index("input_audio_buffer.speech_stopped") < order.index("input_audio_buffer.committed") \
        < order.index("response.created")
    # The turn: from the start (300 ms of padding before the first loud frame) to 500 ms of silence after the last;
    # both ends fall on 10 ms boundaries, so the event's milliseconds say exactly which samples were committed.
    audio = pcm[started.audio_start_ms * 48 : stopped.audio_end_ms * 48]
    assert abs(len(audio) / 48 - 1800) <= 40  # 300 ms padding + 1 s speech + 500 ms silence, in ms
    assert cluster.stats("encoder:audio").get("feature_inputs", 0) > 0
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    rest = client.chat.completions.create(model=cluster.model, temperature=0.0, messages=[{"role": "user", "content": [
        rest_audio(audio)]}],
        max_tokens=by_type["response.done"].response.usage.output_tokens)
    assert text and text == rest.choices[0].message.content


def test_speech_over_an_answer_interrupts_it_and_the_turn_is_answered(client, cluster):
    """Server VAD with interrupt_response: the user starts talking while an answer streams; the answer stops
    (``cancelled``, reason ``turn_detected``), and once the turn ends it is committed and answered."""
    rng = np.random.default_rng(41)
    loud = (rng.standard_normal(12000) * 3000).astype("<i2").tobytes()  # 500 ms at ~ -20 dBFS
    quiet = (rng.standard_normal(19200) * 30).astype("<i2").tobytes()  # 800 ms at ~ -60 dBFS
    with client.realtime.connect(model=cluster.model) as conn:
        assert conn.recv().type == "session.created"
        conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": {
            "type": "server_vad", "silence_duration_ms": 500, "interrupt_response": True}}}})
        assert conn.recv().type == "session.updated"
        # Greedy, as the cancel test: the same long answer every run (sampled, one may end on its own first)
        conn.response.create(response={"max_output_tokens": 900, "conversation": "none", "temperature": 0, "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "long"}]}]})
        for event in conn:
            assert event.type not in ("error", "response.done"), event
            if event.type == "response.output_text.delta":
                conn.input_audio_buffer.append(audio=base64.b64encode(loud).decode())
                break
        events = []
        for event in conn:
            events.append(event)
            if event.type == "response.done":
                break
        kinds = [e.type for e in events]
        # no delta once the server has said it heard speech (some twenty came after it, already on their way)
        assert "response.output_text.delta" not in kinds[kinds.index("input_audio_buffer.speech_started"):], kinds
        assert events[-1].response.status == "cancelled"
        assert events[-1].response.status_details.reason == "turn_detected"
        conn.input_audio_buffer.append(audio=base64.b64encode(quiet).decode())
        events = []
        for event in conn:
            events.append(event.type)
            assert event.type != "error", event
            if event.type == "response.done":
                break
    assert events.index("input_audio_buffer.speech_stopped") < events.index("input_audio_buffer.committed") \
        < events.index("response.created")
    assert event.response.status in ("completed", "incomplete")


def test_a_turn_heard_whole_while_the_answer_it_interrupts_ends_is_answered_and_keeps_its_id(cluster):
    """One append of speech and the silence after it, while an answer streams: the turn is committed while the
    answer it interrupted is still ending, and was never answered (an outside tester, 2 runs of 4). It is answered
    once that one has ended. And the id speech_started announced is the turn's: a client item may not take it (two
    items had one id)."""
    rng = np.random.default_rng(43)
    loud = (rng.standard_normal(7200) * 3000).astype("<i2").tobytes()  # 300 ms
    quiet = (rng.standard_normal(14400) * 30).astype("<i2").tobytes()  # 600 ms
    with raw(cluster) as ws:
        next_of(ws, "session.created")
        ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 200, "interrupt_response": True}}}}}))
        next_of(ws, "session.updated")
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(loud).decode()}))
        heard = next_of(ws, "input_audio_buffer.speech_started")["item_id"]
        ws.send(json.dumps({"type": "conversation.item.create", "event_id": "taken", "item": {
            "id": heard, "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}}))
        err = next_of(ws, "error")["error"]
        assert (err["event_id"], err["param"]) == ("taken", "item.id"), err
        ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        next_of(ws, "input_audio_buffer.cleared")
        ws.send(json.dumps({"type": "response.create", "response": {
            "max_output_tokens": 900, "conversation": "none", "temperature": 0,
            "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "long"}]}]}}))
        # at once: the answer is still being prepared as the turn cuts it, the slowest time for it to end
        ws.send(json.dumps({"type": "input_audio_buffer.append",
                            "audio": base64.b64encode(loud + quiet).decode()}))
        kinds, done = [], []
        deadline = time.monotonic() + 90
        while len(done) < 2:
            assert time.monotonic() < deadline, kinds
            event = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            kinds.append(event["type"])
            assert event["type"] != "error", event
            if event["type"] == "response.done":
                done.append(event["response"])
    assert done[0]["status"] == "cancelled" and done[0]["status_details"]["reason"] == "turn_detected"
    assert done[1]["status"] in ("completed", "incomplete"), done[1]
    assert kinds.index("input_audio_buffer.committed") < len(kinds) - 1 - kinds[::-1].index("response.created")


def test_open_connections_are_reported_in_health_and_metrics(cluster):
    """/health's ``realtime_connections`` and the ``tributary_realtime_connections`` gauge follow open sockets, and
    fall back when they close (an operator's only view of a gateway held by WebSocket clients)."""
    import httpx

    def seen() -> tuple[int, float]:
        health = httpx.get(f"{cluster.base_url}/health", timeout=10).json()["realtime_connections"]
        text = httpx.get(f"{cluster.base_url}/metrics", timeout=10).text
        gauge = [float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("tributary_realtime_connections")]
        return health, sum(gauge)

    def settled(want: int) -> tuple[int, float]:
        deadline = time.monotonic() + 10
        while (got := seen()) != (want, want) and time.monotonic() < deadline:
            time.sleep(0.1)  # a close is seen by the server a moment after the client's
        return got

    base = settled(0)
    with raw(cluster) as a, raw(cluster) as b:
        next_of(a, "session.created"), next_of(b, "session.created")
        assert settled(2) == (2, 2.0)
    assert settled(0) == base == (0, 0.0)


def test_audio_chunks_may_split_a_sample(client, cluster):
    """A client cutting its PCM byte stream anywhere (odd-sized chunks) loses nothing: the turn gives the REST answer
    for the same audio (an outside tester's 9601-byte chunks were refused and most of the audio lost)."""
    pcm = pcm16(0.6, seed=41)
    rest = client.chat.completions.create(model=cluster.model, temperature=0.0, max_tokens=6, messages=[
        {"role": "user", "content": [rest_audio(pcm)]}])
    with client.realtime.connect(model=cluster.model) as conn:
        assert conn.recv().type == "session.created"
        conn.session.update(session={"type": "realtime", "temperature": 0.0})
        conn.recv()
        for i in range(0, len(pcm), 9601):
            conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 9601]).decode())
        conn.input_audio_buffer.commit()
        seen = [conn.recv().type for _ in range(3)]
        assert seen == ["input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"], seen
        conn.response.create(response={"max_output_tokens": 6})
        text, done, _ = until_done(conn)
    assert text == rest.choices[0].message.content
    assert done.response.usage.input_tokens == rest.usage.prompt_tokens


def test_fields_this_server_does_not_apply_are_refused_and_a_refused_update_changes_nothing(cluster):
    """An outside tester's finding: beta names (``input_audio_format: g711_ulaw`` decoded as PCM16), fields of
    features this server lacks (transcription) and unknown fields were accepted and ignored, and a refused
    ``session.update`` kept the instructions it carried. Each is an error event naming the field now, and a refused
    update applies nothing."""
    bad = [
        ({"session": {"input_audio_format": "g711_ulaw"}}, "unknown_parameter", "session.input_audio_format"),
        ({"session": {"modalities": ["text"]}}, "unknown_parameter", "session.modalities"),
        ({"session": {"turn_detection": {"type": "semantic_vad"}}}, "unknown_parameter", "session.turn_detection"),
        ({"session": {"frobnicate": 1}}, "unknown_parameter", "session.frobnicate"),
        ({"session": {"audio": {"input": {"transcription": {"model": "whisper-1"}}}}}, "unsupported",
         "session.audio.input.transcription"),
        ({"session": {"audio": {"input": {"noise_reduction": {"type": "near_field"}}}}}, "unsupported",
         "session.audio.input.noise_reduction"),
        ({"session": {"audio": {"input": {"turn_detection": {"type": "server_vad", "eagerness": "low"}}}}},
         "unknown_parameter", "session.audio.input.turn_detection.eagerness"),
        ({"session": {"prompt": {"id": "pmpt_1"}}}, "unsupported", "session.prompt"),
        ({"session": {"truncation": {"type": "retention_ratio", "retention_ratio": 1.5}}}, "invalid_value",
         "session.truncation.retention_ratio"),
        ({"session": {"truncation": "middle"}}, "invalid_value", "session.truncation"),
        ({"session": {"tool_choice": "required"}}, "unsupported", "session.tool_choice"),
        ({"session": {"model": "gpt-realtime"}}, "unsupported", "session.model"),
        ({"session": {"instructions": "SHOULD-NOT-STICK", "max_output_tokens": 0}}, "invalid_value",
         "session.max_output_tokens"),
    ]
    with raw(cluster) as ws:
        created = next_of(ws, "session.created")["session"]
        for i, (event, code, param) in enumerate(bad):
            ws.send(json.dumps({"type": "session.update", "event_id": f"u{i}", **event}))
            err = next_of(ws, "error", timeout=10)["error"]
            assert (err["code"], err["param"], err["event_id"]) == (code, param, f"u{i}"), (event, err)
        for i, response in enumerate([{"voice": "alloy"}, {"max_response_output_tokens": 5}, {"nope": 1},
                                      {"metadata": {"k": 1}}]):
            ws.send(json.dumps({"type": "response.create", "event_id": f"r{i}", "response": response}))
            err = next_of(ws, "error", timeout=10)["error"]
            assert err["event_id"] == f"r{i}" and err["param"].startswith("response."), (response, err)
        # The session as created, resent whole (as a client echoing it back does), is accepted and changes nothing.
        ws.send(json.dumps({"type": "session.update", "session": created}))
        updated = next_of(ws, "session.updated")["session"]
        assert updated == created and updated["instructions"] == ""
        ws.send(json.dumps({"event_id": "no-type"}))  # named although the event has no type
        assert next_of(ws, "error")["error"]["event_id"] == "no-type"


def test_media_are_checked_when_their_item_is_created_and_response_errors_name_the_item(cluster):
    """A bad image or empty audio was accepted as an item and then failed every later response (with the chat
    request's ``messages.3.content.0`` and no event id). Now refused at ``conversation.item.create``; what only the
    encoder can find (a PNG whose header reads but whose data is cut) fails the response with an error naming the
    item and the ``response.create``'s event id. Metadata is echoed on the response."""
    def item(*content) -> dict:
        return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "look"}, *content]}

    refused = [
        ({"type": "input_image", "image_url": "not a url"}, "item.content.1.image_url"),
        ({"type": "input_image", "image_url": data_url(b"GIF89a" + bytes(40))}, "item.content.1.image_url"),
        ({"type": "input_image", "image_url": "https://example.com/cat.png"}, "item.content.1.image_url"),
        ({"type": "input_audio", "audio": ""}, "item.content.1.audio"),
    ]
    png = png_bytes(64, 48, seed=5)
    with raw(cluster) as ws:
        next_of(ws, "session.created")
        for i, (part, param) in enumerate(refused):
            ws.send(json.dumps({"type": "conversation.item.create", "event_id": f"c{i}", "item": item(part)}))
            err = next_of(ws, "error", timeout=10)["error"]
            assert (err["param"], err["event_id"]) == (param, f"c{i}"), (part, err)
        ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "id": "cut", **item({"type": "input_image", "image_url": data_url(png[: len(png) // 2])})}}))
        next_of(ws, "conversation.item.done")
        ws.send(json.dumps({"type": "response.create", "event_id": "go", "response": {
            "instructions": "be brief", "metadata": {"turn": "7"}}}))
        err = next_of(ws, "error")["error"]
        assert (err["code"], err["event_id"], err["param"]) == ("invalid_media", "go", "item.content.1"), err
        assert "item 'cut', content 1" in err["message"], err
        done = next_of(ws, "response.done")["response"]
        assert done["status"] == "failed" and done["metadata"] == {"turn": "7"}


def test_max_output_tokens_is_a_cap_inf_is_the_context_and_a_full_conversation_refuses_at_create(cluster):
    """"inf" stopped at the REST default of 256 tokens, and a cap of the whole context made every response fail;
    both run to the context's end now (a cap past the context is refused: the malformed-events test). A response
    whose answer has no room in a full conversation is refused at ``response.create`` (it failed halfway through
    its events, out of order)."""
    from gateway.realtime import MAX_ITEMS

    with raw(cluster) as ws:
        next_of(ws, "session.created")
        ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "go on"}]}}))
        next_of(ws, "conversation.item.done")
        for cap in ("inf", 1024):  # the tiny demo model's context
            ws.send(json.dumps({"type": "session.update", "session": {"max_output_tokens": cap}}))
            next_of(ws, "session.updated")
            # Greedy, the random demo model never says its end token here: the answer runs to the context's end.
            ws.send(json.dumps({"type": "response.create", "response": {"temperature": 0, "conversation": "none",
                                                                         "input": [{"type": "message", "role": "user",
                                                                                    "content": [{"type": "input_text",
                                                                                                 "text": "go on"}]}]}}))
            done = next_of(ws, "response.done", timeout=120)["response"]
            usage = done["usage"]
            assert done["status"] == "incomplete" and usage["output_tokens"] > 256, done
            assert usage["total_tokens"] == 1024, usage  # the tiny demo model's context
        # (with truncation on, a full conversation deletes the items it left out: see the truncation test)
        ws.send(json.dumps({"type": "session.update", "session": {"truncation": "disabled"}}))
        next_of(ws, "session.updated")
        for i in range(MAX_ITEMS - 1):
            ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "."}]}}))
        for _ in range(MAX_ITEMS - 1):
            next_of(ws, "conversation.item.done")
        ws.send(json.dumps({"type": "response.create", "event_id": "full"}))
        err = next_of(ws, "error")["error"]
        assert (err["code"], err["event_id"]) == ("conversation_too_long", "full"), err


def test_a_commit_too_short_is_refused_and_committed_comes_before_the_item(cluster):
    with raw(cluster) as ws:
        next_of(ws, "session.created")
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm16(0.05)).decode()}))
        ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "short"}))
        err = next_of(ws, "error")["error"]
        assert (err["code"], err["event_id"]) == ("input_audio_buffer_commit_empty", "short"), err
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm16(0.1)).decode()}))
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        kinds = []
        while "conversation.item.done" not in kinds:
            kinds.append(json.loads(ws.recv(timeout=30))["type"])
        assert kinds.index("input_audio_buffer.committed") < kinds.index("conversation.item.added"), kinds


def test_a_conversation_past_the_media_limit_leaves_its_oldest_media_out(cluster):
    """A voice session failed every response from its fifth spoken turn on ("at most 4 audio part(s) may be sent in
    one request"; an outside tester's run), its prompt a fifth of the context: truncation left items out for tokens
    only. Its oldest items are now left out for ``--limit-mm-per-prompt`` too (4 audio clips here); with truncation
    disabled the response still fails, naming the limit."""
    from gateway.config import DEFAULT_MM_LIMITS

    clips = DEFAULT_MM_LIMITS["audio"]
    with raw(cluster) as ws:
        next_of(ws, "session.created")
        ws.send(json.dumps({"type": "session.update", "session": {"max_output_tokens": 1, "temperature": 0}}))
        next_of(ws, "session.updated")
        outcomes = []
        for turn in range(clips + 2):
            ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [
                    {"type": "input_audio", "audio": base64.b64encode(pcm16(0.2, seed=60 + turn)).decode()}]}}))
            next_of(ws, "conversation.item.done")
            ws.send(json.dumps({"type": "response.create"}))
            done = next_of(ws, "response.done", timeout=120)["response"]
            outcomes.append((done["status"], done["usage"]["input_tokens"] if done.get("usage") else None,
                             (done.get("status_details") or {}).get("error")))
        assert all(status in ("completed", "incomplete") for status, _, _ in outcomes), outcomes
        assert outcomes[-1][1] <= outcomes[clips - 1][1], outcomes  # the oldest left out: no more than the first 4
        ws.send(json.dumps({"type": "session.update", "session": {"truncation": "disabled"}}))
        next_of(ws, "session.updated")
        ws.send(json.dumps({"type": "response.create"}))
        done = next_of(ws, "response.done", timeout=120)["response"]
        assert done["status"] == "failed" and "at most 4 audio" in json.dumps(done["status_details"]), done


def test_a_conversation_past_the_context_leaves_its_oldest_items_out(cluster):
    """``truncation: "auto"`` (OpenAI's default; refused before): a conversation that outgrows the tiny model's
    1,024-token context keeps answering, its prompt holding the newest items that fit (the answer's room kept);
    ``"disabled"`` then fails with ``context_length_exceeded``. At its item cap the conversation deletes the oldest
    item truncation left out (told as ``conversation.item.deleted``) instead of refusing the new one. With a
    ``retention_ratio`` the first truncation leaves out enough to fill only that share, and the next turns keep the
    same start (their prompts grow by what they add)."""
    from gateway.realtime import MAX_ITEMS

    turn = " ".join(f"word{i}" for i in range(30))  # ~150 tokens: seven of them overflow the context

    def respond(ws) -> dict:
        ws.send(json.dumps({"type": "response.create", "event_id": "go"}))
        done = next_of(ws, "response.done", timeout=120)["response"]
        assert done["status"] in ("completed", "incomplete"), done
        return done["usage"]

    def say(ws, text: str) -> str:
        ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
        return next_of(ws, "conversation.item.done")["item"]["id"]

    with raw(cluster) as ws:
        assert next_of(ws, "session.created")["session"]["truncation"] == "auto"
        ws.send(json.dumps({"type": "session.update", "session": {"max_output_tokens": 8, "temperature": 0}}))
        next_of(ws, "session.updated")
        inputs, turns = [], []
        for _ in range(8):
            turns.append(say(ws, turn))
            inputs.append(respond(ws)["input_tokens"])
        per_turn = inputs[1] - inputs[0]  # one user turn and one answer of at most 8 tokens
        assert per_turn > 100 and inputs[-1] < inputs[0] + 7 * per_turn, inputs  # truncated: less than all
        assert all(n <= 1024 - 8 for n in inputs) and max(inputs) > 1024 - 8 - per_turn - 16, inputs
        ws.send(json.dumps({"type": "session.update", "session": {"truncation": "disabled"}}))
        assert next_of(ws, "session.updated")["session"]["truncation"] == "disabled"
        ws.send(json.dumps({"type": "response.create", "event_id": "all"}))
        err = next_of(ws, "error", timeout=60)["error"]
        assert (err["code"], err["event_id"]) == ("context_length_exceeded", "all"), err
        # Filled to its item cap, the conversation makes room by deleting the oldest items truncation left out
        # (it was refused with conversation_too_long: a long voice session had to delete items itself).
        ws.send(json.dumps({"type": "session.update", "session": {"truncation": "auto"}}))
        next_of(ws, "session.updated")
        held = 16  # 8 turns and their 8 answers
        for _ in range(MAX_ITEMS - held):
            ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "."}]}}))
        for _ in range(MAX_ITEMS - held):
            next_of(ws, "conversation.item.done")
        ws.send(json.dumps({"type": "conversation.item.create", "item": {  # the 1,025th
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "one more"}]}}))
        event = json.loads(ws.recv(timeout=30))
        assert event["type"] == "conversation.item.deleted" and event["item_id"] == turns[0], event
        assert next_of(ws, "conversation.item.done")["item"]["content"][0]["text"] == "one more"

    ratio = {"type": "retention_ratio", "retention_ratio": 0.5}
    with raw(cluster) as ws:
        next_of(ws, "session.created")
        ws.send(json.dumps({"type": "session.update", "session": {
            "max_output_tokens": 8, "temperature": 0, "truncation": ratio}}))
        assert next_of(ws, "session.updated")["session"]["truncation"] == ratio
        inputs = []
        while len(inputs) < 2 or inputs[-1] > inputs[-2]:  # until the first truncation
            say(ws, turn)
            inputs.append(respond(ws)["input_tokens"])
            assert len(inputs) < 10, inputs
        assert inputs[-1] <= (1024 - 8) // 2, inputs
        say(ws, "and one more thing")
        after = respond(ws)["input_tokens"]
        # the same start: the answer and the new item added (a few dozen tokens), nothing left out again
        assert inputs[-1] < after < inputs[-1] + 60, (inputs, after)

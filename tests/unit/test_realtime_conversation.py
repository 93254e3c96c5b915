"""The Realtime conversation's bookkeeping (gateway/realtime.py), on a session with a stand-in socket: its byte limit
is counted once per item, not summed over the whole conversation at each create."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from gateway import realtime
from gateway.config import GatewayConfig
from gateway.realtime import EventError, RealtimeSession


class Socket:
    scope: dict = {}

    def __init__(self):
        self.sent: list[dict] = []

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))


def session(max_bytes: int) -> RealtimeSession:
    chat = SimpleNamespace(cfg=GatewayConfig(model_dir="m", redis_url="redis://x", max_body_bytes=max_bytes),
                           spec=SimpleNamespace(modalities=["image", "audio"], preprocess={}),
                           namespace=lambda tenant: "")
    return RealtimeSession(Socket(), chat, "m", 300.0)


def text_item(i: int, text: str) -> dict:
    return {"id": f"item_{i}", "type": "message", "role": "user", "status": "completed",
            "content": [{"type": "input_text", "text": text}]}


def test_each_create_counts_its_own_item_not_the_whole_conversation(monkeypatch):
    """Each create summed the bytes of every part of every item held, on the event loop: an outside tester's 100
    items of 30,000 parts took a second a create, every other connection waiting."""
    counted = []
    real = realtime._item_bytes
    monkeypatch.setattr(realtime, "_item_bytes", lambda item: counted.append(item["id"]) or real(item))
    s = session(10**6)

    async def go():
        for i in range(200):
            await s._add(text_item(i, "x" * 10))

    asyncio.run(go())
    assert len(counted) <= 3 * 200, f"{len(counted)} items counted for 200 creates"
    assert s.held == 200 * len("input_text" + "x" * 10)


def test_the_byte_limit_holds_across_creates_deletes_and_an_answer_that_grows():
    """Each item counts its parts' strings (``"input_text"`` itself: 10): 25 bytes for 15 x's. Truncation
    disabled: only the items it left out make room (the next test has it on)."""
    s = session(100)
    s.truncation = "disabled"

    async def go():
        for i in range(4):
            await s._add(text_item(i, "x" * 15))  # 100: full
        with pytest.raises(EventError, match="exceed 100 bytes"):
            await s._add(text_item(4, "y"))
        s._forget("item_1")
        await s._add(text_item(5, "y" * 15))  # its room again
        answer = {"id": "item_6", "type": "message", "role": "assistant", "status": "in_progress",
                  "content": [{"type": "output_text", "text": ""}]}
        s._forget("item_5")
        await s._add(answer, done=False)  # 75 + 11
        answer["content"] = [{"type": "output_text", "text": "z" * 9}]  # as a response fills it: 75 + 20
        s._resized(answer)
        with pytest.raises(EventError, match="exceed 100 bytes"):
            await s._add(text_item(7, "w"))  # 95 + 11
        s.left_out.add("item_0")  # truncation left it out: it goes first, told as deleted
        await s._add(text_item(8, "w"))

    asyncio.run(go())
    assert s.held == sum(realtime._item_bytes(it) for it in s.items) == 25 * 2 + 20 + 11
    assert [it["id"] for it in s.items] == ["item_2", "item_3", "item_6", "item_8"]
    assert {"type": "conversation.item.deleted", "item_id": "item_0"}.items() <= s.ws.sent[-3].items()


def test_with_truncation_on_a_full_conversation_deletes_its_oldest_items_to_make_room():
    """A voice session's 200 s turns filled the 32 MiB in three turns, their prompts a few hundred tokens (only the
    encoder's window of each turn reaches it): the third was refused, since only items truncation had left out could
    make room. With truncation on, the oldest items go, told as deleted, never an answer being written; with
    truncation disabled the conversation still refuses."""
    s = session(100)
    answer = {"id": "item_a", "type": "message", "role": "assistant", "status": "in_progress",
              "content": [{"type": "output_text", "text": "z" * 14}]}  # 25 bytes

    async def go():
        await s._add(answer, done=False)
        for i in range(3):
            await s._add(text_item(i, "x" * 15))  # 100: full
        await s._add(text_item(3, "y" * 40))  # 50 bytes: the two oldest that may go, go
        s.truncation = "disabled"
        with pytest.raises(EventError, match="exceed 100 bytes"):
            await s._add(text_item(4, "w"))
        s.truncation = "auto"
        with pytest.raises(EventError, match="exceed 100 bytes"):
            await s._add(text_item(5, "v" * 100))  # larger than the whole conversation may be: nothing deleted

    asyncio.run(go())
    assert [it["id"] for it in s.items] == ["item_a", "item_2", "item_3"]
    deleted = [e["item_id"] for e in s.ws.sent if e["type"] == "conversation.item.deleted"]
    assert deleted == ["item_0", "item_1"] and s.held == 25 + 25 + 50


def test_a_refused_create_deletes_nothing():
    """An outside tester filled the conversation to its 1,024 items, then created one after an item that does not
    exist (or after the oldest): the oldest item was deleted to make room, then the create refused. A refused event
    changes nothing; the item a create goes after is never the one deleted for it."""
    s = session(10**6)
    s.truncation = "auto"

    async def go():
        for i in range(realtime.MAX_ITEMS):
            await s._add(text_item(i, "x"))
        with pytest.raises(EventError, match="no item with id 'nope'"):
            await s._add(text_item(5000, "y"), "nope")
        assert len(s.items) == realtime.MAX_ITEMS and s.items[0]["id"] == "item_0"
        await s._add(text_item(5001, "y"), "item_0")  # room made by the next oldest, not item_0
        ids = [it["id"] for it in s.items]
        assert ids[:3] == ["item_0", "item_5001", "item_2"] and "item_1" not in ids
        s.truncation = "disabled"  # nothing may go: refused, and nothing deleted on the way
        before = list(s.items)
        with pytest.raises(EventError, match="holds 1024 items"):
            await s._add(text_item(5002, "z"))
        assert s.items == before

    asyncio.run(go())
    deleted = [e["item_id"] for e in s.ws.sent if e["type"] == "conversation.item.deleted"]
    assert deleted == ["item_1"]


def test_an_error_quotes_the_clients_values_clipped_and_a_session_logs_its_refusals_bounded(caplog):
    """A 31 MB key came back in a 62 MB error event (an outside tester), and one client looping a bad event wrote
    28.8 MB of log in 10 s."""
    import logging

    s = session(10**6)

    async def go():
        for _ in range(50):
            await s.error(EventError("unknown parameter " + "k" * 10**6, param="session." + "k" * 10**6),
                          "e" * 10**6)

    with caplog.at_level(logging.INFO, logger="gateway.realtime"):
        asyncio.run(go())
    err = s.ws.sent[0]["error"]
    assert len(err["message"]) < 2100 and len(err["param"]) < 300 and len(err["event_id"]) < 300, err
    assert len([r for r in caplog.records if r.getMessage() == "realtime event refused"]) == 1


def test_a_turn_committed_while_the_response_it_interrupted_is_ending_waits_for_it():
    """The commit checked for a running response right after cancelling it: the response was still ending, so the
    turn was committed and never answered (an outside tester, 2 runs of 4). It is now marked to be answered once that
    response has ended (``_respond``'s end calls ``_answer_turn``)."""
    import base64

    import numpy as np

    s = session(10**6)
    s.vad = realtime.ServerVad(silence_duration_ms=200)
    created = []

    async def fake_create(event):
        created.append(event)

    s.response_create = fake_create
    rng = np.random.default_rng(5)
    loud = (rng.standard_normal(7200) * 3000).astype("<i2").tobytes()
    quiet = (rng.standard_normal(14400) * 30).astype("<i2").tobytes()

    async def go():
        ending = asyncio.ensure_future(asyncio.sleep(30))  # a response still ending
        cancel = asyncio.Event()
        s.active = (ending, cancel, "resp_1")
        await s.audio_append({"audio": base64.b64encode(loud + quiet).decode()})
        assert cancel.is_set() and s.cancel_reason == "turn_detected"
        assert not created and s.turn_waiting  # committed, to be answered once the response has ended
        ending.cancel()
        s.active = None
        s.turn_waiting = False
        await s._answer_turn()
        assert created == [{"type": "response.create", "response": {}}]

    asyncio.run(go())
    assert [e["type"] for e in s.ws.sent if e["type"].startswith("input_audio_buffer")] == [
        "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed"]


def test_no_delta_is_sent_once_the_response_is_cancelled():
    """Tokens already on their way when a response is cancelled (new speech) were still sent: some twenty deltas
    after speech_started (an outside tester). The first delta after the cancel ends the response instead."""
    from gateway.chat import Delta

    s = session(10**6)
    cancelled = asyncio.Event()

    async def respond(rid, body, cancel, **kw):  # a generation that has tokens ready whatever the cancel
        for i in range(1000):
            if i == 3:
                cancelled.set()
            yield Delta(f"t{i} ", None, 5, i + 1)
            await asyncio.sleep(0)

    s.chat.respond = respond
    run = realtime.Run("resp_1", cancelled, False, None, None, None, [])
    asyncio.run(s._respond(run, b"{}", {}))
    deltas = [e["delta"] for e in s.ws.sent if e["type"] == "response.output_text.delta"]
    done = [e for e in s.ws.sent if e["type"] == "response.done"][0]["response"]
    assert deltas == ["t0 ", "t1 ", "t2 "] and done["status"] == "cancelled", (deltas, done["status"])


def test_a_model_without_an_audio_encoder_refuses_the_audio_buffer():
    """Appended and committed (or committed by server VAD), its item broke every later response of the session with
    a KeyError (an outside tester's, on LLaVA); refused at once, as an input_audio item is."""
    s = session(10**6)
    s.chat.spec.modalities = ["image"]

    async def go():
        for handler, event in ((s.audio_append, {"audio": "AAAA"}), (s._commit, None)):
            with pytest.raises(EventError) as refused:
                await (handler(event) if event is not None else handler())
            assert refused.value.code == "unsupported_modality", refused.value.message

    asyncio.run(go())
    assert not s.audio and not s.items


def test_server_vad_ends_a_turn_at_the_audio_limit_and_goes_on_listening():
    """A turn as long as the server takes was refused input_audio_buffer_full at every append, its silence included,
    so the detector never heard the turn end and the session stalled (an outside tester's 305 s of noise). The turn
    is cut there and committed; the audio after it is a turn of its own."""
    import base64

    import numpy as np

    s = session(10**8)
    s.vad = realtime.ServerVad(create_response=False)
    s.max_audio_bytes = 2 * realtime.PCM_RATE  # one second
    chunk = realtime.PCM_RATE // 10  # 100 ms
    loud = (np.random.default_rng(0).standard_normal(chunk) * 8000).astype("<i2").tobytes()
    quiet = np.zeros(chunk, dtype="<i2").tobytes()

    async def go():
        for pcm in [loud] * 15 + [quiet] * 8:  # 1.5 s of speech, then 0.8 s of silence
            await s.audio_append({"audio": base64.b64encode(pcm).decode()})

    asyncio.run(go())
    kinds = [e["type"] for e in s.ws.sent]
    assert "error" not in kinds, [e for e in s.ws.sent if e["type"] == "error"]
    assert kinds.count("input_audio_buffer.committed") == 2 and len(s.items) == 2, kinds
    assert s.speaking is None  # listening again


def test_an_audio_item_past_the_limit_is_refused_in_rests_words():
    import base64

    s = session(10**8)
    s.max_audio_bytes = 2 * realtime.PCM_RATE  # one second
    audio = base64.b64encode(b"\0\1" * (2 * realtime.PCM_RATE)).decode()  # two seconds
    event = {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_audio", "audio": audio}]}}
    with pytest.raises(EventError) as refused:
        asyncio.run(s.item_create(event))
    assert refused.value.code == "invalid_media" and refused.value.message == "audio of 2 s is longer than 1 s"


def test_turn_positions_are_the_same_whether_server_vad_was_on_from_the_start_or_turned_on_later():
    """A second of silence buffered, then server VAD turned on, then speech at 1.0-1.5 s: the turn was told at
    1,700-3,000 ms, against 700-2,000 ms (the 300 ms of prefix padding before the speech, to the end of the 500 ms
    of silence that ends it) with VAD on from the start (an outside tester's). Turning VAD on counted the buffered
    second twice."""
    import base64

    import numpy as np

    vad = {"type": "server_vad", "prefix_padding_ms": 300, "silence_duration_ms": 500, "create_response": False}
    silence = np.zeros(realtime.PCM_RATE, dtype="<i2")  # 1 s
    tone = np.sin(2 * np.pi * 440 * np.arange(realtime.PCM_RATE // 2) / realtime.PCM_RATE) * 12000  # 0.5 s
    speech = np.concatenate([tone.astype("<i2"), np.zeros(realtime.PCM_RATE * 7 // 10, dtype="<i2")])

    def append(pcm):
        return {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm.tobytes()).decode()}

    def positions(vad_first: bool) -> tuple[int, int]:
        s = session(10**8)
        update = {"type": "session.update", "session": {"audio": {"input": {"turn_detection": vad}}}}

        async def go():
            for event in ([update, append(silence)] if vad_first else [append(silence), update]) + [append(speech)]:
                await s.handle(event)

        asyncio.run(go())
        started, stopped = (next(e for e in s.ws.sent if e["type"] == f"input_audio_buffer.speech_{kind}")
                            for kind in ("started", "stopped"))
        return started["audio_start_ms"], stopped["audio_end_ms"]

    assert positions(vad_first=True) == (700, 2000)
    assert positions(vad_first=False) == (700, 2000)


def responding(s: RealtimeSession) -> list:
    """``s`` answering every response with three deltas (a response.create's checks need the model's context and
    text limit); the fits its responses make, counted."""
    from gateway.chat import Delta

    s.chat.spec.max_context = 4096
    s.chat.builder = SimpleNamespace(max_text_chars=10**6)

    async def respond(rid, body, cancel, **kw):
        for i in range(3):
            yield Delta(f"{rid} ", None, 5, i + 1)
            await asyncio.sleep(0.01)

    s.chat.respond = respond
    return []


async def until(cond) -> None:
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("never came")


def test_one_response_at_a_time_though_a_turn_is_answered_while_a_client_asks_for_another():
    """Speech interrupted response A and its turn ended while A was ending; as A ended, the turn's response was
    made (its fit, its JSON, on threads), and a response.create from the client meanwhile found no response running:
    both streamed, response.cancel could not reach the client's, and the first to end told the session none was
    running (an outside tester's fuzz). The turn's response holds the slot from its first step: the client's is
    refused, and a cancel stops the one that runs."""
    import base64

    import numpy as np

    s = session(10**6)
    fits = responding(s)
    gate = asyncio.Event()

    async def fit(*args):  # the items as they are
        fits.append(args)
        if len(fits) == 2:  # the turn's response, made as A ends: held here until the client's create is handled
            await gate.wait()
        return args[0]

    s._fit = fit
    rng = np.random.default_rng(5)
    loud = (rng.standard_normal(7200) * 3000).astype("<i2").tobytes()
    quiet = (rng.standard_normal(14400) * 30).astype("<i2").tobytes()
    speech = {"type": "input_audio_buffer.append", "audio": base64.b64encode(loud + quiet).decode()}

    async def go():
        await s._add(text_item(0, "hello"))
        s.vad = realtime.ServerVad(silence_duration_ms=200)
        await s.handle({"type": "response.create", "event_id": "A"})
        a = s.active[0]
        await s.handle(speech)  # interrupts A; the turn ends while A is ending
        assert s.turn_waiting
        await until(lambda: len(fits) == 2)  # A has ended; the turn's response is being made
        with pytest.raises(EventError) as refused:
            await s.handle({"type": "response.create", "event_id": "B"})
        assert refused.value.code == "conversation_already_has_active_response"
        gate.set()
        await until(lambda: s.active is not None and s.active[0] is not None)
        turn = s.active[0]
        await s.handle({"type": "response.cancel"})
        await asyncio.gather(a, turn)
        assert s.active is None

    asyncio.run(go())
    running, overlaps, done = None, [], []
    for e in s.ws.sent:
        if e["type"] == "response.created":
            overlaps += [(running, e["response"]["id"])] if running else []
            running = e["response"]["id"]
        elif e["type"] == "response.done":
            done.append(e["response"]["status"])
            running = None if running == e["response"]["id"] else running
    assert not overlaps and done == ["cancelled", "cancelled"], (overlaps, done)


def test_a_response_that_ends_gives_back_only_its_own_slot():
    s = session(10**6)
    responding(s)
    other = (None, asyncio.Event(), "resp_other")
    s.active = other
    run = realtime.Run("resp_1", asyncio.Event(), False, None, None, None, [])
    asyncio.run(s._respond(run, b"{}", {}))
    assert s.active is other


def test_an_item_deleted_while_the_fit_counts_its_tokens_fails_nothing_and_leaves_nothing_behind():
    """A conversation.item.delete handled while ``_fit`` counted a new item on a thread: the fit then read the counts
    of an item counted before, gone with it, a KeyError, and the VAD turn it was answering was never answered (an
    outside tester's fuzz). The fit goes on with what it read; nothing is kept for the items deleted."""
    import threading

    s = session(10**6)
    s.chat.spec.max_context = 4096
    s.chat.cfg.default_max_tokens = 16
    s.chat.builder = SimpleNamespace(conversation_tokens=lambda role: 3, message_tokens=lambda *a: 5, limits={})
    counting, counted = threading.Event(), threading.Event()

    def tokens(item):
        if item["id"] == "item_2":  # the new item: counted while the client deletes
            counting.set()
            assert counted.wait(5)
        return 5

    s._item_tokens = tokens

    async def go():
        for i in range(2):
            await s._add(text_item(i, "hi"))
        await s._fit(list(s.items), "", None, True)  # item_0 and item_1 counted
        await s._add(text_item(2, "hi"))
        fit = asyncio.ensure_future(s._fit(list(s.items), "", None, True))
        await asyncio.to_thread(counting.wait, 5)
        for gone in ("item_1", "item_2"):  # one counted before, the one being counted
            await s.item_delete({"type": "conversation.item.delete", "item_id": gone})
        counted.set()
        return await fit

    kept = asyncio.run(go())
    assert [it["id"] for it in kept] == ["item_0", "item_1", "item_2"]  # the conversation the response was asked of
    assert list(s.tokens) == list(s.media) == ["item_0"] and not s.left_out


def test_a_turn_that_cannot_be_answered_is_told_not_only_logged():
    s = session(10**6)

    async def broken(event):
        raise KeyError("item_1")

    s.response_create = broken
    asyncio.run(s._answer_turn())
    errors = [e["error"] for e in s.ws.sent if e["type"] == "error"]
    assert [(e["code"], e["type"]) for e in errors] == [("server_error", "server_error")], s.ws.sent


def test_an_item_cannot_take_the_id_root_and_a_whole_prompt_error_names_no_chat_field():
    """An outside tester's fuzz: an item created with the id "root" could never be named by ``previous_item_id``
    ("root" is the conversation's start); and a response refused for its whole prompt (too many media parts) named
    ``messages``, a field of the chat request the client never sent."""
    from gateway.errors import InvalidRequest

    s = session(10**6)
    with pytest.raises(EventError, match="cannot be 'root'") as refused:
        s._item({"type": "message", "role": "user", "id": "root",
                 "content": [{"type": "input_text", "text": "hi"}]}, "item")
    assert refused.value.param == "item.id"
    run = realtime.Run("resp_1", asyncio.Event(), True, None, None, "ev_1", ["item_1", "item_2"])
    whole = s._item_error(InvalidRequest("at most 4 audio part(s) per prompt", param="messages"), run)
    assert whole.param is None
    part = s._item_error(InvalidRequest("messages.1.content.0: bad", param="messages.1.content.0"), run)
    assert part.param == "item.content.0" and "item 'item_2', content 0" in part.message


def test_the_answer_being_written_is_retrieved_with_its_text_so_far():
    """conversation.item.retrieve of the assistant item a response was writing answered ``content: []`` after deltas
    had been sent (an outside tester's fuzz): it has the text so far."""
    from gateway.chat import Delta

    s = session(10**6)
    seen = []

    async def respond(rid, body, cancel, **kw):
        for i in range(3):
            yield Delta(f"t{i} ", None, 5, i + 1)
            item = next(it for it in s.items if it["role"] == "assistant")
            await s.item_retrieve({"item_id": item["id"]})
            seen.append(s.ws.sent[-1]["item"]["content"])

    s.chat.respond = respond
    run = realtime.Run("resp_1", asyncio.Event(), True, None, None, None, [])
    asyncio.run(s._respond(run, b"{}", {}))
    assert seen == [[{"type": "output_text", "text": t}] for t in ("t0 ", "t0 t1 ", "t0 t1 t2 ")]
    done = [e for e in s.ws.sent if e["type"] == "response.done"][0]["response"]
    assert done["output"][0]["content"] == [{"type": "output_text", "text": "t0 t1 t2 "}]

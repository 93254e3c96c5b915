"""Admitting an image request never stalls running streams: a queued plan's tensors are fetched ahead on their own
thread while the worker keeps stepping. A real Redis and the real worker loop, in this process so that the test can
hold one fetch back (as a slow network or a large tensor would)."""

from __future__ import annotations

import threading
import time
import uuid

import redis
import torch

from backbone.engine import load_engine
from backbone.worker import BackboneConfig, BackboneWorker
from cache.codec import encode_tensor
from cache.keys import Keys
from cache.streams import fields_payload, payload_fields
from router import messages as m
from tests.integration.procs import hold_lease

KEYS = Keys()


def reference(spec, ids: list[int], media: list[tuple[str, torch.Tensor]], n: int) -> list[int]:
    engine = load_engine(spec)
    seq = engine.new_sequence("ref", len(ids), m.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    engine.prefill(seq, ids, media)
    while seq.finish is None:
        engine.step([seq])
    return seq.output


def test_a_slow_media_fetch_never_stalls_running_streams(tiny_spec, redis_url):
    r = redis.Redis.from_url(redis_url)
    hidden = tiny_spec.config["text_config"]["hidden_size"]
    rows = torch.randn(16, hidden, generator=torch.Generator().manual_seed(3))
    key = KEYS.tensor(tiny_spec.encoder_id("image"), "slow-" + uuid.uuid4().hex)
    r.hset(key, mapping={"data": encode_tensor(rows), "n": 16})
    image_ids = [1, 40] + [tiny_spec.placeholder_ids["image"]] * 16 + [203]
    text_ids = [1, 20, 21, 22, 203]

    stop, gate = threading.Event(), threading.Event()
    worker = BackboneWorker(BackboneConfig(redis_url=redis_url, block_ms=100), load_engine(tiny_spec), stop)
    real_fetch = worker._fetch_media

    def slow_fetch(plan):
        if plan.media:
            gate.wait(60)  # held back until the test saw the stream go on
        return real_fetch(plan)

    worker._fetch_media = slow_fetch
    loop = threading.Thread(target=worker.run, daemon=True)
    loop.start()

    def send(rid: str, ids: list[int], n: int, media=()) -> None:
        plan = m.PromptPlan(request_id=rid, reply_to="reply:slow", token_ids=ids, media=list(media),
                            deadline=time.time() + 120,
                            sampling=m.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        r.xadd(KEYS.gen(), payload_fields(m.encode(plan)))

    seen: dict[str, list[m.TokenEvent]] = {"stream": [], "image": []}
    last = "0-0"

    def read_until(cond, timeout: float = 60) -> None:
        nonlocal last
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out; seen {[(k, len(v)) for k, v in seen.items()]}"
            for entry_id, fields in (r.xread({"reply:slow": last}, block=200) or [[None, []]])[0][1]:
                last = entry_id
                ev = m.decode(fields_payload(fields), m.TokenEvent)
                seen[ev.request_id].append(ev)

    def tokens(rid: str) -> list[int]:
        return [t for ev in seen[rid] for t in ev.token_ids]

    try:
        hold_lease(r, "reply:slow")
        send("stream", text_ids, 80)
        read_until(lambda: len(tokens("stream")) >= 3)
        send("image", image_ids, 6, [m.MediaRef(modality=m.Modality.IMAGE, tensor_key=key, num_tokens=16)])
        before = len(tokens("stream"))
        # The image plan is read and its fetch hangs; the stream must keep decoding meanwhile.
        read_until(lambda: len(tokens("stream")) >= before + 20)
        assert not seen["image"], "the image request ran before its tensors were fetched"
        gate.set()
        read_until(lambda: any(ev.finish for ev in seen["image"]) and any(ev.finish for ev in seen["stream"]))
    finally:
        gate.set()
        stop.set()
        loop.join(60)
    assert not loop.is_alive(), "the worker did not stop"
    assert seen["image"][-1].finish == m.FinishReason.LENGTH, seen["image"][-1]
    assert tokens("image") == reference(tiny_spec, image_ids, [("image", rows)], 6)
    assert tokens("stream") == reference(tiny_spec, text_ids, [], 80)


def test_a_plan_whose_tensors_cannot_be_fetched_does_not_hold_the_plans_behind_it(tiny_spec, redis_url):
    """The node holding one plan's tensors away (a Redis Cluster node down: its fetch fails): that plan stayed first
    in line, so a text-only plan behind it waited until its deadline (an outside tester's chaos run: 504s). Now it
    goes behind them and is fetched again; once its node is back it runs, with the same tokens."""
    r = redis.Redis.from_url(redis_url)
    hidden = tiny_spec.config["text_config"]["hidden_size"]
    rows = torch.randn(16, hidden, generator=torch.Generator().manual_seed(4))
    key = KEYS.tensor(tiny_spec.encoder_id("image"), "away-" + uuid.uuid4().hex)
    r.hset(key, mapping={"data": encode_tensor(rows), "n": 16})
    image_ids = [1, 40] + [tiny_spec.placeholder_ids["image"]] * 16 + [203]
    text_ids = [1, 20, 21, 22, 203]

    stop, away = threading.Event(), threading.Event()
    away.set()
    worker = BackboneWorker(BackboneConfig(redis_url=redis_url, block_ms=100), load_engine(tiny_spec), stop)
    real_fetch, tries = worker._fetch_media, []

    def fetch(plan):
        if plan.media and away.is_set():
            tries.append(time.monotonic())
            raise redis.ConnectionError("Error 111 connecting to the node holding this tensor")
        return real_fetch(plan)

    worker._fetch_media = fetch
    loop = threading.Thread(target=worker.run, daemon=True)
    loop.start()
    reply, last, seen = "reply:away", "0-0", {"image": [], "text": []}

    def send(rid: str, ids: list[int], n: int, media=()) -> None:
        plan = m.PromptPlan(request_id=rid, reply_to=reply, token_ids=ids, media=list(media),
                            deadline=time.time() + 120,
                            sampling=m.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        r.xadd(KEYS.gen(), payload_fields(m.encode(plan)))

    def read_until(cond, timeout: float = 60) -> None:
        nonlocal last
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out; seen {[(k, len(v)) for k, v in seen.items()]}"
            for entry_id, fields in (r.xread({reply: last}, block=200) or [[None, []]])[0][1]:
                last = entry_id
                ev = m.decode(fields_payload(fields), m.TokenEvent)
                seen[ev.request_id].append(ev)

    try:
        hold_lease(r, reply)
        send("image", image_ids, 6, [m.MediaRef(modality=m.Modality.IMAGE, tensor_key=key, num_tokens=16)])
        read_until(lambda: tries, 30)  # it is first in line, and its fetch fails
        send("text", text_ids, 40)
        read_until(lambda: any(ev.finish for ev in seen["text"]))
        assert not seen["image"] and away.is_set()  # the text plan ran while the image's node was away
        away.clear()
        read_until(lambda: any(ev.finish for ev in seen["image"]))
    finally:
        away.clear()
        stop.set()
        loop.join(60)
    assert not loop.is_alive(), "the worker did not stop"
    assert seen["image"][-1].finish == m.FinishReason.LENGTH, seen["image"][-1]
    assert [t for ev in seen["image"] for t in ev.token_ids] == reference(tiny_spec, image_ids, [("image", rows)], 6)
    assert [t for ev in seen["text"] for t in ev.token_ids] == reference(tiny_spec, text_ids, [], 40)

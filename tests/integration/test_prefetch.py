"""Admitting an image request never stalls running streams: a queued plan's tensors are fetched ahead on their own
thread while the worker keeps stepping. A real Redis and the real worker loop, in this process so that the test can
hold one fetch back (as a slow network or a large tensor would)."""

from __future__ import annotations

import threading
import time
import uuid
from contextlib import contextmanager

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


TEXT_IDS = [1, 20, 21, 22, 203]


def stored_image(spec, r, seed: int, tag: str, key: str | None = None) -> tuple[torch.Tensor, m.MediaRef, list[int]]:
    """An image's encoder output (seeded rows) stored as an encoder stores it (under ``key`` if given), its
    reference, and a prompt."""
    rows = torch.randn(16, spec.config["text_config"]["hidden_size"], generator=torch.Generator().manual_seed(seed))
    key = key or KEYS.tensor(spec.encoder_id("image"), f"{tag}-{uuid.uuid4().hex}")
    r.hset(key, mapping={"data": encode_tensor(rows), "n": 16})
    ref = m.MediaRef(modality=m.Modality.IMAGE, tensor_key=key, num_tokens=16)
    return rows, ref, [1, 40] + [spec.placeholder_ids["image"]] * 16 + [203]


class Gateway:
    """This test as the gateway of one reply stream: sends greedy plans and reads their events by request."""

    def __init__(self, r, reply: str, rids: list[str], keys: Keys = KEYS):
        self.r, self.reply, self.last, self.keys = r, reply, "0-0", keys
        self.seen: dict[str, list[m.TokenEvent]] = {rid: [] for rid in rids}
        self.told: set[str] = set()  # requests a worker said it holds, not started
        hold_lease(r, reply)

    def send(self, rid: str, ids: list[int], n: int, media=()) -> None:
        plan = m.PromptPlan(request_id=rid, reply_to=self.reply, token_ids=ids, media=list(media),
                            deadline=time.time() + 120,
                            sampling=m.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        self.r.xadd(self.keys.gen(), payload_fields(m.encode(plan)))

    def until(self, cond, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out; seen {[(k, len(v)) for k, v in self.seen.items()]}"
            for entry_id, fields in (self.r.xread({self.reply: self.last}, block=200) or [[None, []]])[0][1]:
                self.last = entry_id
                ev = m.decode(fields_payload(fields), m.TokenEvent)
                if ev.token_ids or ev.finish is not None:  # not the worker's notice that it holds the plan
                    self.seen[ev.request_id].append(ev)
                else:
                    self.told.add(ev.request_id)

    def tokens(self, rid: str) -> list[int]:
        return [t for ev in self.seen[rid] for t in ev.token_ids]

    def finished(self, rid: str) -> bool:
        return any(ev.finish for ev in self.seen[rid])


@contextmanager
def running(redis_url: str, spec, fetch=None, **cfg):
    """The backbone worker's loop on a thread of this process (its heartbeat and state in reach of the test), with
    ``fetch(real_fetch, plan)`` in place of its media fetch if given; stopped, and checked stopped, on the way out."""
    stop = threading.Event()
    worker = BackboneWorker(BackboneConfig(redis_url=redis_url, block_ms=100, **cfg), load_engine(spec), stop)
    if fetch is not None:
        real_fetch = worker._fetch_media
        worker._fetch_media = lambda plan: fetch(real_fetch, plan)
    loop = threading.Thread(target=worker.run, daemon=True)
    loop.start()
    try:
        yield worker
    finally:
        stop.set()
        loop.join(60)
    assert not loop.is_alive(), "the worker did not stop"


def test_a_slow_media_fetch_never_stalls_running_streams(tiny_spec, redis_url):
    r = redis.Redis.from_url(redis_url)
    rows, ref, image_ids = stored_image(tiny_spec, r, 3, "slow")
    gate = threading.Event()

    def slow_fetch(real_fetch, plan):
        if plan.media:
            gate.wait(60)  # held back until the test saw the stream go on
        return real_fetch(plan)

    gw = Gateway(r, "reply:slow", ["stream", "image"])
    with running(redis_url, tiny_spec, slow_fetch):
        try:
            gw.send("stream", TEXT_IDS, 80)
            gw.until(lambda: len(gw.tokens("stream")) >= 3)
            gw.send("image", image_ids, 6, [ref])
            before = len(gw.tokens("stream"))
            # The image plan is read and its fetch hangs; the stream must keep decoding meanwhile.
            gw.until(lambda: len(gw.tokens("stream")) >= before + 20)
            assert not gw.seen["image"], "the image request ran before its tensors were fetched"
            assert "image" in gw.told  # its gateway knows which worker holds it
            gate.set()
            gw.until(lambda: gw.finished("image") and gw.finished("stream"))
        finally:
            gate.set()
    assert gw.seen["image"][-1].finish == m.FinishReason.LENGTH, gw.seen["image"][-1]
    assert gw.tokens("image") == reference(tiny_spec, image_ids, [("image", rows)], 6)
    assert gw.tokens("stream") == reference(tiny_spec, TEXT_IDS, [], 80)


def test_a_plan_whose_tensors_cannot_be_fetched_does_not_hold_the_plans_behind_it(tiny_spec, redis_url):
    """The node holding one plan's tensors away (a Redis Cluster node down: its fetch fails): that plan stayed first
    in line, so a text-only plan behind it waited until its deadline (an outside tester's chaos run: 504s). Now it
    goes behind them and is fetched again; once its node is back it runs, with the same tokens."""
    r = redis.Redis.from_url(redis_url)
    rows, ref, image_ids = stored_image(tiny_spec, r, 4, "away")
    away, tries = threading.Event(), []
    away.set()

    def fetch(real_fetch, plan):
        if plan.media and away.is_set():
            tries.append(time.monotonic())
            raise redis.ConnectionError("Error 111 connecting to the node holding this tensor")
        return real_fetch(plan)

    gw = Gateway(r, "reply:away", ["image", "text"])
    with running(redis_url, tiny_spec, fetch):
        try:
            gw.send("image", image_ids, 6, [ref])
            gw.until(lambda: tries, 30)  # it is first in line, and its fetch fails
            gw.send("text", TEXT_IDS, 40)
            gw.until(lambda: gw.finished("text"))
            assert not gw.seen["image"] and away.is_set()  # the text plan ran while the image's node was away
            away.clear()
            gw.until(lambda: gw.finished("image"))
        finally:
            away.clear()
    assert gw.seen["image"][-1].finish == m.FinishReason.LENGTH, gw.seen["image"][-1]
    assert gw.tokens("image") == reference(tiny_spec, image_ids, [("image", rows)], 6)
    assert gw.tokens("text") == reference(tiny_spec, TEXT_IDS, [], 40)


def test_plans_start_in_arrival_order_while_their_fetches_are_on_their_way(tiny_spec, redis_url, monkeypatch):
    """Fetches run on several threads and may end out of order: a plan whose fetch is only on its way (not stalled,
    ``FETCH_STALLED_S``, raised here so that a slow machine cannot make it stall) holds the line, so a plan behind
    it never overtakes it by a few milliseconds (a preemption test failed when the newer request started first)."""
    import backbone.worker as worker_module

    monkeypatch.setattr(worker_module, "FETCH_STALLED_S", 30.0)
    r = redis.Redis.from_url(redis_url)

    def fetch(real_fetch, plan):
        if plan.request_id == "first":
            time.sleep(0.3)  # the second's fetch ends first
        return real_fetch(plan)

    gw = Gateway(r, "reply:order", ["first", "second"])
    with running(redis_url, tiny_spec, fetch):
        gw.send("first", TEXT_IDS, 4)
        gw.send("second", TEXT_IDS, 4)
        gw.until(lambda: gw.finished("first") and gw.finished("second"))
    order = []
    for _, fields in r.xrange("reply:order"):
        ev = m.decode(fields_payload(fields), m.TokenEvent)
        if ev.request_id not in order:
            order.append(ev.request_id)
    assert order == ["first", "second"], order

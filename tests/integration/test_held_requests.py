"""Requests the backbone holds. One it holds without producing tokens (preempted, parked until there is room to
recompute it) is told alive to its gateway: the gateway bounds the gap between a request's events (30 s), and an
outside tester saw streams cut, and non-streamed answers lost to a 504, when a preemption lasted longer. And one
whose events a full Redis refused is held until Redis takes them, every token delivered in order (they were counted
as sent and lost, and the request logged finished). The real worker loop on a real Redis, in this process so that
the interval can be shortened."""

from __future__ import annotations

import threading
import time

import redis

import backbone.worker as worker_module
from backbone.engine import load_engine
from backbone.worker import BackboneConfig, BackboneWorker
from cache.embedded import EmbeddedRedis
from cache.keys import Keys
from cache.streams import fields_payload, payload_fields
from router import messages as m
from tests.integration.procs import hold_lease
from tests.integration.test_prefetch import reference

KEYS = Keys()


def test_a_preempted_request_gets_events_while_it_is_parked_and_then_its_own_tokens(tiny_spec, redis_url,
                                                                                      monkeypatch):
    monkeypatch.setattr(worker_module, "HELD_EVENT_S", 0.02)
    # Both plans start in arrival order, so that the second is the one preempted: on a loaded machine the first's
    # fetch may pass FETCH_STALLED_S, and the second then starts first (and the first is preempted instead).
    monkeypatch.setattr(worker_module, "FETCH_STALLED_S", 30.0)
    r = redis.Redis.from_url(redis_url)
    hold_lease(r, "reply:held")
    # 18 blocks of 16: both prompts start; the first needs 18 blocks by its end, the second 10, so the second (the
    # newest) is preempted when both hold 9 and the first crosses a block boundary, and parked for the first's last
    # ~140 steps, until it is done (parked for only ~90 steps of a fast machine, it was once told nothing).
    stop = threading.Event()
    worker = BackboneWorker(BackboneConfig(redis_url=redis_url, block_ms=100), load_engine(tiny_spec, num_blocks=18),
                            stop)
    loop = threading.Thread(target=worker.run, daemon=True)
    loop.start()
    prompts = {"long": ([1, 286, 274, 203, 56], 280), "held": ([1, 20, 21, 22, 203], 150)}
    seen: dict[str, list[tuple[float, m.TokenEvent]]] = {rid: [] for rid in prompts}
    try:
        for rid, (ids, n) in prompts.items():
            plan = m.PromptPlan(request_id=rid, reply_to="reply:held", token_ids=ids, deadline=time.time() + 120,
                                sampling=m.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            r.xadd(KEYS.gen(), payload_fields(m.encode(plan)))
        last, deadline = "0-0", time.monotonic() + 120
        while not all(evs and evs[-1][1].finish for evs in seen.values()):
            assert time.monotonic() < deadline, {k: len(v) for k, v in seen.items()}
            for entry_id, fields in (r.xread({"reply:held": last}, block=200) or [[None, []]])[0][1]:
                last = entry_id
                ev = m.decode(fields_payload(fields), m.TokenEvent)
                seen[ev.request_id].append((time.monotonic(), ev))
    finally:
        stop.set()
        loop.join(60)
    assert not loop.is_alive()
    held = seen["held"]
    assert worker.engine.preemptions > 0
    empty = [ev for _, ev in held if not ev.token_ids and ev.finish is None]
    assert empty, "no event told the gateway the parked request was alive"
    # Each says where the request is (the gateway checks that no token was lost in between).
    tokens = 0
    for _, ev in held:
        assert ev.completion_tokens - len(ev.token_ids) == tokens
        tokens = ev.completion_tokens
    gaps = [b - a for (a, _), (b, _) in zip(held, held[1:])]
    assert max(gaps) < 5, gaps  # 0.02 s between events while held, not the whole wait
    for rid, (ids, n) in prompts.items():
        assert [t for _, ev in seen[rid] for t in ev.token_ids] == reference(tiny_spec, ids, [], n)


def test_events_a_full_redis_refused_are_sent_again_once_it_takes_writes(tiny_spec):
    with EmbeddedRedis(maxmemory="256mb") as server:  # its own: this test fills it
        r = redis.Redis.from_url(server.url)
        hold_lease(r, "reply:full")
        stop = threading.Event()
        worker = BackboneWorker(BackboneConfig(redis_url=server.url, block_ms=100), load_engine(tiny_spec), stop)
        loop = threading.Thread(target=worker.run, daemon=True)
        loop.start()
        ids, n = [1, 286, 274, 203, 56], 300
        plan = m.PromptPlan(request_id="full", reply_to="reply:full", token_ids=ids, deadline=time.time() + 120,
                            sampling=m.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        events: list[m.TokenEvent] = []
        last = "0-0"

        def read(until, timeout: float = 60) -> None:
            nonlocal last
            deadline = time.monotonic() + timeout
            while not until():
                assert time.monotonic() < deadline, [(e.completion_tokens, e.finish) for e in events][-5:]
                for entry_id, fields in (r.xread({"reply:full": last}, block=100) or [[None, []]])[0][1]:
                    last = entry_id
                    events.append(m.decode(fields_payload(fields), m.TokenEvent))

        try:
            r.xadd(KEYS.gen(), payload_fields(m.encode(plan)))
            read(lambda: events and events[-1].completion_tokens >= 10)
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", "1")  # every write refused for memory
            time.sleep(1.5)
            during = len(events)
            r.config_set("maxmemory", "256mb")
            read(lambda: events and events[-1].finish is not None)
        finally:
            stop.set()
            loop.join(60)
        assert not loop.is_alive()
    tokens = []
    for ev in events:  # no token skipped (each event starts at or before where the one before ended), as the
        start = ev.completion_tokens - len(ev.token_ids)  # gateway joins them
        assert start <= len(tokens), (start, len(tokens))
        tokens = tokens[:start] + ev.token_ids
    assert events[-1].finish == m.FinishReason.LENGTH and during < len(events)
    assert tokens == reference(tiny_spec, ids, [], n)

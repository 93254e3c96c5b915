"""The encoder tier on a Redis Cluster (three primaries) while one node does not answer (SIGSTOP: a hung host, a
partition): the sync client's pipelines keep that node's failure to its own commands, the publisher answers every
job whose keys sit elsewhere, and an encoder worker (a real process) goes on serving them, whichever node is away:
the one holding its tier's live set, or one holding some jobs' media. Jobs whose media sit on the node away fail
alone (``media_expired``: their gateways ask again)."""

from __future__ import annotations

import time
import uuid

import pytest

from cache.client import connect, lost_node
from cache.embedded import EmbeddedCluster
from cache.keys import ENCODER_GROUP, Keys, alive
from cache.streams import ensure_group, fields_payload, payload_fields
from cache.tensors import Answers, TensorPublisher
from router import messages as m
from tests.integration.procs import paused, start_tier, stop_tier
from tests.media import png_bytes


@pytest.fixture(scope="module")
def cluster():
    with EmbeddedCluster(primaries=3, replicas=0) as c:
        yield c




def on(cluster, node, make, n: int) -> list[str]:
    """``n`` names ``make(random hex)`` whose key sits on ``node``."""
    found = []
    while len(found) < n:
        name = uuid.uuid4().hex
        if cluster.primary_of(make(name)) is node:
            found.append(name)
    return found


def test_a_pipeline_keeps_a_node_that_does_not_answer_to_its_own_commands(cluster):
    """redis-py's cluster pipeline sent each command a node failed again on its own, with its own retries and
    timeouts, then raised: the other nodes' replies were lost, and every later round trip paid the same (measured
    with a 1 s socket timeout: 4-5 s a round trip, every one raising)."""
    r = connect(cluster.url, socket_timeout=1.0)
    away = cluster.live()[0]
    mine = [f"k:{{{t}}}" for t in on(cluster, away, lambda t: f"k:{{{t}}}", 6)]
    others = [f"k:{{{t}}}" for t in on(cluster, cluster.live()[1], lambda t: f"k:{{{t}}}", 3)
              + on(cluster, cluster.live()[2], lambda t: f"k:{{{t}}}", 3)]

    def round_trip(value) -> tuple[list, float]:
        pipe = r.pipeline(transaction=False)
        for key in mine + others:
            pipe.set(key, value)
        t0 = time.monotonic()
        return pipe.execute(raise_on_error=False), time.monotonic() - t0

    with paused(away):
        res, took = round_trip(1)
        assert all(map(lost_node, res[:6])) and res[6:] == [True] * 6, res
        assert took < 6, f"the round trip that found the node away took {took:.1f} s"
        res, took = round_trip(2)  # the node is not tried again until it answers a probe: no timeout paid
        assert all(map(lost_node, res[:6])) and res[6:] == [True] * 6, res
        assert took < 0.5, f"a round trip after the node was found away waited {took:.1f} s for it"
    assert [connect(cluster.url).get(k) for k in others] == [b"2"] * 6
    deadline = time.monotonic() + 10
    while True:  # back once it answers a probe
        res, _ = round_trip(3)
        if res == [True] * 12:
            break
        assert time.monotonic() < deadline, res
        time.sleep(0.2)
    r.close()


def test_a_batch_spread_over_the_shards_is_answered_but_for_the_jobs_on_the_node_away(cluster):
    """The publisher raised on the first error of its store round trip: the batch's jobs on the nodes that answered,
    already acked and their waiters taken, were never told (until their gateways' leases lapsed)."""
    r = connect(cluster.url, socket_timeout=1.0)
    keys = Keys(f"b{uuid.uuid4().hex[:6]}")
    jobs_node = cluster.primary_of(keys.jobs("image"))
    away = next(n for n in cluster.live() if n is not jobs_node)
    well = next(n for n in cluster.live() if n not in (jobs_node, away))
    gateway = keys.reply(on(cluster, jobs_node, keys.reply, 1)[0])
    r.set(alive(gateway), 1, ex=60)
    digests = on(cluster, well, keys.blob, 2) + on(cluster, away, keys.blob, 2)
    script_keys = [(keys.tensor("enc", d), keys.waiters("enc", d), keys.lease("enc", d), keys.blob(d))
                   for d in digests]
    for k in script_keys:
        r.set(k[2], "request", ex=60)
        r.set(k[3], b"media", ex=60)
    ensure_group(r, keys.jobs("image"), ENCODER_GROUP)
    entries = [r.xadd(keys.jobs("image"), payload_fields(f"job{i}".encode())) for i in range(4)]
    r.xreadgroup(ENCODER_GROUP, "worker", {keys.jobs("image"): ">"})
    batch = Answers()
    for i, (k, entry) in enumerate(zip(script_keys, entries)):
        batch.publish(k, entry, f"tensor{i}".encode(), 3, 60, f"done{i}".encode(), gateway, b"full",
                      f"lost{i}".encode())
    pub = TensorPublisher(r, keys.jobs("image"), ENCODER_GROUP)
    with paused(away):
        assert pub.execute(batch) == 4
        assert pub.lost == set(entries[2:]) and not pub.refused
        told = sorted(fields[b"m"] for _, fields in r.xrange(gateway))
        assert told == [b"done0", b"done1", b"lost2", b"lost3"], told
        assert [r.hget(k[0], "data") for k in script_keys[:2]] == [b"tensor0", b"tensor1"]
        assert r.xpending(keys.jobs("image"), ENCODER_GROUP)["pending"] == 0
    r.close()


def submit(r, keys: Keys, spec, digest: str, reply_to: str, data: bytes | None = None) -> m.EncodeJob:
    job = m.EncodeJob(request_id=f"req-{digest[:6]}", job_id=uuid.uuid4().hex, modality=m.Modality.IMAGE,
                      encoder_id=spec.encoder_id("image"), digest=digest, blob_key=keys.blob(digest),
                      reply_to=reply_to, deadline=time.time() + 120)
    if data is not None:
        r.set(job.blob_key, data, ex=120)
    r.xadd(keys.jobs("image"), payload_fields(m.encode(job)))
    return job


def replies(r, stream: str, n: int, timeout_s: float) -> dict[str, m.ReplyMessage]:
    """The next ``n`` replies on ``stream`` by job id (fewer if ``timeout_s`` passes first)."""
    out, deadline = {}, time.monotonic() + timeout_s
    while len(out) < n and (left := deadline - time.monotonic()) > 0:
        for _, entries in r.xread({stream: "0-0"}, count=n, block=max(1, int(min(left, 1.0) * 1000))) or []:
            for entry_id, fields in entries:
                r.xdel(stream, entry_id)
                msg = m.decode(fields_payload(fields), m.ReplyMessage)
                out[msg.job_id] = msg
    return out


def test_an_encoder_worker_serves_the_jobs_on_the_nodes_that_answer(cluster, tiny_model, tiny_spec):
    """A real encoder worker (5 s socket timeouts). With the node holding its live set away, its reclaim's calls
    held its loop about 15 s at a time; with a node holding some jobs' media away, its admission round trip raised
    and the batch was read again, and again: the jobs on the other nodes were not answered while the node was away."""
    keys = next(k for k in (Keys(f"e{i}") for i in range(10_000))
                if cluster.primary_of(k.jobs("image")) is cluster.primary_of(k.stats("encoder:image"))
                is not cluster.primary_of(k.live("encoder:image")))
    home = cluster.primary_of(keys.jobs("image"))  # jobs, counters and the test's reply stream: never paused
    live_node = cluster.primary_of(keys.live("encoder:image"))
    media_node = next(n for n in cluster.live() if n not in (home, live_node))
    r = connect(cluster.url)
    gateway = keys.reply(on(cluster, home, keys.reply, 1)[0])
    r.set(alive(gateway), 1, ex=600)
    data = png_bytes(40, 30, seed=3)
    worker = start_tier(["encoder", "--modality", "image", "--model", str(tiny_model), "--prefix", keys.prefix],
                        cluster.url, "encoder:image", keys=keys)
    try:
        # The live set's node away: jobs (media on the other two nodes) one after another, each answered at once.
        digests = on(cluster, home, keys.blob, 5) + on(cluster, media_node, keys.blob, 5)  # (asks a node)
        with paused(live_node):
            waits = []
            for digest in digests:
                job = submit(r, keys, tiny_spec, digest, gateway, data)
                t0 = time.monotonic()
                got = replies(r, gateway, 1, 30)
                waits.append(round(time.monotonic() - t0, 2))
                assert isinstance(got.get(job.job_id), m.EncodeDone), got
                time.sleep(0.8)  # reclaims come due about once a second
        assert max(waits) < 4, f"jobs waited {waits} s while the live set's node was away"

        # A node holding media away: the jobs whose media sit elsewhere are answered, the others fail alone. The
        # first round finds the node away (its media were stored before); the second knows it: nothing waits for it.
        healthy = [on(cluster, home, keys.blob, 2) for _ in range(2)]
        stranded = [on(cluster, media_node, keys.blob, 2) for _ in range(2)]
        for digest in stranded[0]:
            r.set(keys.blob(digest), data, ex=120)
        with paused(media_node):
            for round_ in range(2):
                sent = ([submit(r, keys, tiny_spec, d, gateway, data) for d in healthy[round_]]
                        + [submit(r, keys, tiny_spec, d, gateway) for d in stranded[round_]])
                t0 = time.monotonic()
                got = replies(r, gateway, 4, 40)
                took = time.monotonic() - t0
                assert all(isinstance(got.get(j.job_id), m.EncodeDone) for j in sent[:2]), got
                assert all(isinstance(got.get(j.job_id), m.EncodeFailed)
                           and got[j.job_id].code == m.ErrorCode.MEDIA_EXPIRED for j in sent[2:]), got
                assert took < (25 if round_ == 0 else 4), f"round {round_}: answered in {took:.1f} s"
        # Back: the node's jobs are encoded again once it answers a probe.
        digest = on(cluster, media_node, keys.blob, 1)[0]
        deadline = time.monotonic() + 20
        while True:
            job = submit(r, keys, tiny_spec, digest, gateway, data)
            got = replies(r, gateway, 1, 10).get(job.job_id)
            if isinstance(got, m.EncodeDone):
                break
            assert time.monotonic() < deadline, got
            time.sleep(0.5)
        code, out = stop_tier(worker)
        assert code == 0, out[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()
        r.close()

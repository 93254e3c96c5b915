"""The Redis layer on a real Redis Cluster (three primaries with a replica each, started by the test): the client
finds the cluster from one node's URL, every script and ordered pipeline stays in one slot, and the publisher's three
round trips answer each job once and tell every live waiter."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import redis
import redis.asyncio.cluster

from cache.client import CLUSTER_ENV, connect, connect_async, lost_node
from cache.embedded import EmbeddedCluster
from cache.keys import Keys, alive, cancel
from cache.streams import ensure_group, payload_fields, run_script, send_reply
from cache.tensors import Answers, TensorPublisher
from gateway import tiers
from gateway.config import GatewayConfig
from gateway.errors import Unavailable
from router import messages as m
from tests.integration.procs import paused

KEYS = Keys()


@pytest.fixture(scope="module")
def redis_cluster():
    with EmbeddedCluster(primaries=3, replicas=1) as c:
        yield c


@pytest.fixture
def r(redis_cluster):
    client = connect(redis_cluster.url)
    for node in redis_cluster.live():
        try:
            redis_cluster.client(node).flushall()
        except redis.ReadOnlyError:  # a replica follows its primary
            pass
    yield client
    client.close()


def slot(cluster, key: str) -> int:
    return int(cluster.client(cluster.live()[0]).execute_command("CLUSTER KEYSLOT", key))


def shard(cluster, key: str) -> tuple:
    """The primary serving ``key`` and its replica (to pause both: a shard away)."""
    primary = cluster.primary_of(key)
    replica = next(n for n in cluster.nodes[3:] if cluster.client(n).info("replication")["master_port"]
                   == primary.port)
    return primary, replica


def test_the_client_finds_the_cluster_from_any_node(redis_cluster, monkeypatch):
    for node in redis_cluster.live():
        assert isinstance(connect(node.url), redis.cluster.RedisCluster)
        assert isinstance(connect_async(node.url), redis.asyncio.cluster.RedisCluster)
    monkeypatch.setenv(CLUSTER_ENV, "no")  # the operator's word wins (and no question is asked)
    assert type(connect(redis_cluster.url)) is redis.Redis


def test_keys_that_meet_share_a_slot_and_the_rest_spread(redis_cluster):
    for digest in ("d1", "0123abcd" * 8):
        together = [KEYS.tensor("enc-image", digest), KEYS.waiters("enc-image", digest),
                    KEYS.lease("enc-image", digest), KEYS.blob(digest), KEYS.blob(digest, "features")]
        assert len({slot(redis_cluster, k) for k in together}) == 1, together
    reply = KEYS.reply("0f3a9c")
    assert slot(redis_cluster, reply) == slot(redis_cluster, alive(reply)) == slot(redis_cluster, cancel(reply, "r1"))
    # Different digests and gateways land all over the slot space (the point of a cluster).
    assert len({slot(redis_cluster, KEYS.tensor("e", f"{i:064x}")) for i in range(50)}) > 40
    assert len({redis_cluster.primary_of(KEYS.tensor("e", f"{i:064x}")).port for i in range(50)}) == 3


def test_publishing_across_slots_answers_once_and_tells_every_live_waiter(r, redis_cluster):
    stream = KEYS.jobs("image")
    ensure_group(r, stream, "encoders")
    entries = [r.xadd(stream, payload_fields(f"job{i}".encode())) for i in range(3)]
    r.xreadgroup("encoders", "worker", {stream: ">"})
    gateways = [KEYS.reply(f"gw{i}") for i in range(4)]  # gw3 is dead: its lease lapsed
    for g in gateways[:3]:
        r.set(alive(g), 1, ex=60)
    digests = [f"{i:064x}" for i in range(3)]
    script_keys = [(KEYS.tensor("enc", d), KEYS.waiters("enc", d), KEYS.lease("enc", d), KEYS.blob(d)) for d in digests]
    assert len({redis_cluster.primary_of(k[0]).port for k in script_keys}) >= 2, "the test wants several nodes"
    for keys in script_keys:
        r.sadd(keys[1], gateways[1], gateways[3])
        r.set(keys[2], "request", ex=60)
        r.set(keys[3], b"media", ex=60)
    pub = TensorPublisher(r, stream, "encoders")

    def batch(tag: bytes) -> Answers:
        a = Answers()
        a.publish(script_keys[0], entries[0], b"tensor0" + tag, 3, 60, b"done0" + tag, gateways[0])
        a.publish(script_keys[1], entries[1], b"tensor1" + tag, 5, 60, b"done1" + tag, gateways[2])
        a.fail(script_keys[2], entries[2], b"failed2" + tag, gateways[0])
        a.with_acks(lambda pipe: pipe.hincrby(KEYS.stats("encoder:image"), "encoder_calls", 2))
        return a

    # Each answer reaches its own gateway and the live waiter gw1, never the dead gw3.
    assert pub.execute(batch(b"")) == 6
    assert pub.execute(batch(b"-again")) == 0, "a job run twice answered twice"
    assert [f[b"m"] for _, f in r.xrange(gateways[0])] == [b"done0", b"failed2"]
    assert sorted(f[b"m"] for _, f in r.xrange(gateways[1])) == [b"done0", b"done1", b"failed2"]
    assert [f[b"m"] for _, f in r.xrange(gateways[2])] == [b"done1"]
    assert not r.exists(gateways[3])
    assert r.hgetall(script_keys[0][0]) == {b"data": b"tensor0", b"n": b"3"} and 0 < r.ttl(script_keys[0][0]) <= 60
    assert r.hgetall(script_keys[1][0]) == {b"data": b"tensor1", b"n": b"5"}
    assert not r.exists(script_keys[2][0]), "a failure writes no tensor"
    for keys in script_keys:  # waiters, lease and blob taken with the answer
        assert not any(r.exists(k) for k in keys[1:])
    assert r.hget(KEYS.stats("encoder:image"), "encoder_calls") == b"4"  # counted with each batch's acks
    assert r.xlen(stream) == 0 and r.xpending(stream, "encoders")["pending"] == 0


def test_scripts_and_pipelines_of_the_asyncio_cluster_client(r, redis_cluster):
    """The gateway's side: one ordered pipeline per slot (waiter, lease, look again), scripts on a pipeline, reads
    of a reply stream."""

    async def go():
        a = connect_async(redis_cluster.url)
        try:
            me = KEYS.reply("gw-async")
            pipe = a.pipeline(transaction=False)
            pipe.set(alive(me), 1, ex=30)
            for d in ("a" * 64, "b" * 64):
                pipe.sadd(KEYS.waiters("enc", d), me)
                pipe.set(KEYS.lease("enc", d), "req", nx=True, ex=30)
                pipe.hget(KEYS.tensor("enc", d), "n")
            send_reply(pipe, me, b"hello")
            run_script(pipe, "return redis.call('INCRBY', KEYS[1], ARGV[1])", [KEYS.stats("req")], [7])
            res = await pipe.execute()
            assert res[1:7] == [1, True, None, 1, True, None] and res[8] == 7
            reply = await a.xread({me: "0"}, count=10, block=100)
            assert [f[b"m"] for _, f in reply[0][1]] == [b"hello"]
        finally:
            await a.aclose()

    asyncio.run(go())


def test_the_gateways_monitor_reads_queue_waits_on_a_cluster(r, redis_cluster):
    """The monitor's beat on a cluster, with a backlog in streams on different nodes: the waits come from one
    single-key script per stream (a cluster pipeline takes no TIME), and the beat keeps the gateway's lease."""
    from cache.keys import BACKBONE_GROUP
    from gateway.config import GatewayConfig
    from gateway.monitor import ClusterMonitor

    sec, _ = r.time()
    ensure_group(r, KEYS.gen(), BACKBONE_GROUP)
    r.xadd(KEYS.gen(), {"m": b"old"}, id=f"{sec * 1000 - 70_000}-0")
    r.xadd(KEYS.jobs("audio"), {"m": b"old"}, id=f"{sec * 1000 - 20_000}-0")

    async def beat():
        monitor = ClusterMonitor(GatewayConfig(model_dir="m", redis_url=redis_cluster.url),
                                 ["backbone", "encoder:audio"], KEYS.reply("gw-mon"), lambda: None, lambda v: None)
        try:
            await monitor.beat()
            return monitor.view
        finally:
            await monitor.close()

    view = asyncio.run(beat())
    assert view.up and view.backlog == {"backbone": 1, "encoder:audio": 1}
    assert 69 <= view.wait["backbone"] <= 80 and 19 <= view.wait["encoder:audio"] <= 30


def test_the_gateways_monitor_sees_any_node_it_reads_die_and_comes_back_after_the_failover():
    """One beat reads keys on several nodes. The primary of one of them (not the lease's) killed: that beat's reads
    fail ("cannot connect": each reply may be an error, and was once parsed as data: a TypeError ended the beat, or a
    dead queue read as empty), but Redis is not down for this gateway: its lease was renewed, and the view keeps the
    live sets last read (a node away holding ``live:backbone`` made every request a 503: an outside tester's chaos
    run), while no worker may be found gone from them. After the failover every tier's view is read again. The
    cluster metrics' refresh makes no snapshot meanwhile (not a dead queue read as 0). Then the lease's primary
    killed: that is Redis down, until its failover."""
    from gateway.config import GatewayConfig
    from gateway.metrics import ClusterMetrics
    from gateway.monitor import ClusterMonitor

    tiers = ["backbone", "encoder:image", "encoder:audio"]
    reply = KEYS.reply("gw-dies")
    with EmbeddedCluster(primaries=3, replicas=1, node_timeout_ms=1000) as cluster:
        monitor = ClusterMonitor(GatewayConfig(model_dir="m", redis_url=cluster.url), tiers, reply,
                                 lambda: None, lambda v: None)
        metrics = ClusterMetrics(connect_async(cluster.url), KEYS, tiers, "gw-dies")
        leases = {cluster.primary_of(alive(reply)).port, cluster.primary_of(metrics.lease_key).port}
        read = [KEYS.live(t) for t in tiers] + [KEYS.queue(t)[0] for t in tiers]
        victim = next(cluster.primary_of(k) for k in read if cluster.primary_of(k).port not in leases)

        async def go():
            try:
                cluster.client(cluster.primary_of(KEYS.live("backbone"))).zadd(KEYS.live("backbone"),
                                                                               {"bb-1": time.time() + 600})
                await monitor.beat()
                await metrics.refresh()
                assert monitor.view.up and metrics.snapshot is not None
                assert monitor.view.live_count("backbone") == 1 and monitor.view.reads_failing is None
                victim.kill()
                await monitor.beat()  # raises nothing
                view = monitor.view  # the live sets, or a queue, unread: whichever the victim holds
                failing = ({view.reads_failing} - {None}) | set(view.unreadable.values())
                assert view.up and failing and failing <= {"cannot connect", "timed out"}, view
                assert view.live_count("backbone") == 1 and not view.steady()  # as last read; no worker gone
                await metrics.refresh()
                assert metrics.snapshot is None
                await asyncio.to_thread(cluster.wait_ok, 30)
                deadline = time.monotonic() + 15
                while monitor.view.reads_failing is not None or monitor.view.unreadable:
                    assert time.monotonic() < deadline, (monitor.view.reads_failing, monitor.view.unreadable)
                    await asyncio.sleep(0.25)
                    await monitor.beat()
                assert set(monitor.view.live) == set(tiers) and set(monitor.view.backlog) == set(tiers)
                await metrics.refresh()
                assert metrics.snapshot is not None
                cluster.primary_of(alive(reply)).kill()
                await monitor.beat()
                assert not monitor.view.up and monitor.view.reason in ("cannot connect", "timed out")
                await asyncio.to_thread(cluster.wait_ok, 30)
                deadline = time.monotonic() + 15
                while not monitor.view.up:
                    assert time.monotonic() < deadline, monitor.view.reason
                    await asyncio.sleep(0.25)
                    await monitor.beat()
            finally:
                await monitor.close()
                await metrics.r.aclose()

        asyncio.run(go())


def test_a_script_pipeline_rides_out_the_death_of_the_clients_default_node():
    """A worker's round trip (a pipeline with a script, as the backbone's and the encoders' publishers send) whose
    client's default node is the primary that dies. redis-py asked the default node for a script's keys (COMMAND
    GETKEYS) before routing, outside its slot-map refresh: once that node died every round trip failed for good (an
    outside tester's chaos run: the backbone never made another one). The keys are read from the command now."""
    with EmbeddedCluster(primaries=3, replicas=1, node_timeout_ms=1000) as cluster:
        victim = cluster.primary_of(KEYS.gen())
        client = connect(next(n for n in cluster.live() if n is not victim).url)
        client.set_default_node(client.get_node(host="127.0.0.1", port=victim.port))  # as a refresh may pick it

        def round_trip():
            pipe = client.pipeline(transaction=False)
            run_script(pipe, "return redis.call('XADD', KEYS[1], '*', 'm', ARGV[1])", [KEYS.gen()], ["plan"])
            pipe.get(KEYS.stats("x"))
            return pipe.execute()

        round_trip()
        victim.kill()
        cluster.wait_ok(30)
        errors, deadline = [], time.monotonic() + 20
        while True:
            try:
                round_trip()
                break
            except redis.RedisError as exc:
                errors.append(exc)
                assert time.monotonic() < deadline, f"still failing 20 s after the failover: {errors[-1]!r}"
                time.sleep(0.2)
        assert client.get_default_node().port != victim.port


def test_connections_the_servers_closed_are_not_a_node_away(r, redis_cluster):
    """Connections a node closed (its client timeout, a restart on the same address, a proxy's idle cut) are not a
    node away: redis-py finds them closed when it takes them from its pool and connects again, and no command of
    the pipeline fails (none is skipped for a probe either)."""
    keys = [f"stale:{{{i}}}" for i in range(12)]
    assert len({redis_cluster.primary_of(k).port for k in keys}) == 3

    def round_trip():
        pipe = r.pipeline(transaction=False)
        for k in keys:
            pipe.incr(k)
        return pipe.execute(raise_on_error=False)

    assert round_trip() == [1] * 12  # every node's connection is in the pool now
    for node in redis_cluster.live():
        redis_cluster.client(node).client_kill_filter(_type="normal", skipme=True)
    assert round_trip() == [2] * 12
    assert round_trip() == [3] * 12 and not r.health._down


def test_a_pipelines_commands_follow_a_dead_primarys_slots_to_its_replica():
    """A pipeline finding a primary dead before its replica took over marks that node away, and its commands are no
    longer sent to it, so none fails again to have the slot map read (as redis-py does on a failure): the node's
    probe reads it, and the commands go to the promoted replica once the failover is done."""
    with EmbeddedCluster(primaries=3, replicas=1, node_timeout_ms=1000) as cluster:
        key = "failover:{k}"
        victim = cluster.primary_of(key)
        client = connect(next(n for n in cluster.live() if n is not victim).url, socket_timeout=1.0)

        def round_trip():
            pipe = client.pipeline(transaction=False)
            pipe.set(key, "v")
            return pipe.execute(raise_on_error=False)

        assert round_trip() == [True]
        victim.kill()
        assert lost_node(round_trip()[0])  # before the failover: the node is away
        results, deadline = [], time.monotonic() + 30
        while (result := round_trip()[0]) is not True:  # only this client's pipelines: nothing else reads the map
            results.append(result)
            assert time.monotonic() < deadline, f"still failing 30 s after the kill: {results[-1]!r}"
            time.sleep(0.2)
        assert cluster.primary_of(key).port != victim.port
        client.close()


def test_a_heartbeat_is_one_nodes_round_trip(redis_cluster):
    """A worker's beat writes its tier's live set and reads the tier's thread budget. Both in one slot: a node
    holding neither, not answering, never fails a beat (the budget was elsewhere: one shard away made every worker
    look dead and the watchdog killed them all, in an outside tester's chaos run). A first beat that fails does not
    fail the worker's start either."""
    import signal

    from router.liveness import Heartbeat

    tier = "encoder:image"
    home = redis_cluster.primary_of(KEYS.live(tier))
    elsewhere = [n for n in redis_cluster.live() if n.port != home.port
                 and redis_cluster.client(n).execute_command("ROLE")[0] == b"master"]
    connect(redis_cluster.url).set(KEYS.budget(tier), 3)
    hb = Heartbeat(redis_cluster.url, KEYS, tier, "w-slot", on_threads=lambda n: None)
    hb.beat()  # its client knows the slot map
    for node in elsewhere:  # within the node timeout: no failover, they just do not answer
        node.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        hb.beat()
        assert time.monotonic() - t0 < 1 and hb.threads == 3
    finally:
        for node in elsewhere:
            node.proc.send_signal(signal.SIGCONT)
    away = Heartbeat("redis://127.0.0.1:1", KEYS, tier, "w-away").start()  # raises nothing: its thread retries
    away.stop()


def test_an_async_pipeline_on_a_stale_slot_map_is_retried_and_leaves_other_tasks_commands_alone():
    """After a failover the gateway's asyncio client still maps the dead node's slots to it: a pipeline there fails,
    refreshes the map and succeeds on the retry, while another task's blocking read on a live node goes on (redis-py
    closes the whole client before that retry; an outside tester's chaos run saw a 500 once, from an AttributeError
    inside redis-py in another request, which the gateway now answers as a Redis failure: a 503)."""
    with EmbeddedCluster(primaries=3, replicas=1, node_timeout_ms=1000) as cluster:
        victim = cluster.primary_of("victim-key")
        stream = next(f"stream-{i}" for i in range(100) if cluster.primary_of(f"stream-{i}").port != victim.port)
        a = connect_async(cluster.url)

        async def go():
            try:
                await a.set("victim-key", 1)
                await a.xadd(stream, {"m": b"x"})  # the slot map known, connections open to both nodes
                victim.kill()
                await asyncio.to_thread(cluster.wait_ok, 30)  # failed over; this client's map is stale
                reader = asyncio.create_task(a.xread({stream: "$"}, block=1500))  # in flight meanwhile
                await asyncio.sleep(0.2)
                pipe = a.pipeline(transaction=False)
                pipe.get("victim-key")  # to the dead node: fails, then retried on a fresh map
                got = await pipe.execute()
                return got, await reader
            finally:
                await a.aclose()

        got, read = asyncio.run(go())
        # The replica may have missed the last write (replication is asynchronous): the value or nothing
        assert got in ([b"1"], [None]) and not read  # nothing new in the stream: timed out as asked, not cut


def test_an_async_client_keeps_serving_the_live_shards_after_a_shard_is_lost():
    """A shard lost for good (its primary dead, no replica) stays listed as its slots' primary, and it may be the
    asyncio client's default node: redis-py read the command table from that node alone, and again on every
    slot-map refresh, so a client started then could not serve anything, and a running one failed every command
    after one failed (an outside tester's chaos run: the gateway refused every request while /ready said ok).
    Keys on the live shards keep working now, for both."""
    from redis.crc import key_slot

    with EmbeddedCluster(primaries=3, replicas=0) as cluster:
        lost_key = next(k for k in (f"k{i}" for i in range(1000)) if key_slot(k.encode()) < 100)
        victim = cluster.primary_of(lost_key)  # the first primary listed: the default after every refresh
        live_key = next(k for k in (f"k{i}" for i in range(1000)) if cluster.primary_of(k).port != victim.port)
        url = next(n for n in cluster.live() if n is not victim).url
        a = connect_async(url)

        async def go():
            b = None
            try:
                await a.set(live_key, 1)
                victim.kill()
                with pytest.raises(redis.RedisError):
                    await a.get(lost_key)  # fails, and asks for a fresh slot map
                got = [await a.get(live_key) for _ in range(3)]
                b = connect_async(url)  # a client started now (a restarted gateway): its first slot map lists
                return got + [await b.get(live_key)]  # the lost primary first, its default node
            finally:
                await a.aclose()
                if b is not None:
                    await b.aclose()

        assert asyncio.run(go()) == [b"1"] * 4


def test_workers_ride_out_the_death_of_the_node_they_first_asked(tmp_path):
    """A worker's loop (read its own pending entries, a pipeline, a blocking group read) on a stream whose primary
    is also the node the client was given, killed: after the failover every call works again. redis-py alone never
    recovered here (it asks that node for the keys of every XREADGROUP; cache/client.py parses them itself)."""
    from cache.streams import own_pending
    from encoders.batching import read_batch

    stream = "trib:jobs:image"
    with EmbeddedCluster(primaries=3, replicas=1) as cluster:
        home = cluster.primary_of(stream)
        client = connect(home.url)  # the node it starts from is the one that dies
        ensure_group(client, stream, "encoders")
        client.xadd(stream, payload_fields(b"job"))
        assert read_batch(client, "encoders", "me", stream, 8, 10, 100)
        # Replication is asynchronous: a write in the stream's slot, then WAIT until the replica has it, and so
        # everything before it (the stream, group and pending entry), or the promoted replica may lack them (not
        # what this test is about). WAIT counts the acks of this connection's own last write.
        fence = EmbeddedCluster.client(home)
        fence.set("{trib:jobs:image}:fence", 1)
        assert fence.execute_command("WAIT", 1, 5000) == 1
        home.kill()
        cluster.wait_ok(30)
        errors, deadline = [], time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                pending = own_pending(client, stream, "encoders", "me", 8)  # replicated before the kill
                pipe = client.pipeline(transaction=False)
                pipe.exists(alive(KEYS.reply("g")))
                pipe.get(KEYS.blob("d"))
                pipe.execute()
                read_batch(client, "encoders", "me", stream, 8, 10, 100)
                break
            except redis.ConnectionError as exc:
                errors.append(exc)
                time.sleep(0.2)  # the client refreshes its slot map after a connection error
        else:
            pytest.fail(f"still failing 30 s after the failover: {errors[-1]!r}")
        assert [f[b"m"] for _, f in pending] == [b"job"]


def test_a_requests_submission_to_a_node_that_does_not_answer_ends_within_its_bound(monkeypatch):
    """The node holding the plan queue paused (SIGSTOP: a hung host, a partition): each call to it waited for the
    socket timeout (10 s) and redis-py's cluster client retried it, and the calls after encoding had no bound of
    their own (an outside tester's chaos run: a 503 after 85 s). A request's round trip is now cut at its bound,
    with a 503 ``redis_unavailable`` (the bound is lowered here to keep the test short)."""
    monkeypatch.setattr(tiers, "ROUND_TRIP_S", 1.5)
    with EmbeddedCluster(primaries=3, replicas=0) as cluster:
        sync = connect(cluster.url)
        sync.zadd(KEYS.live("backbone"), {"w": time.time() + 600})
        paused = cluster.primary_of(KEYS.gen()).proc
        plan = m.PromptPlan(request_id="req-hung", reply_to=KEYS.reply("gw"), token_ids=[1, 7, 9],
                            deadline=time.time() + 60, sampling=m.SamplingParams(max_tokens=4))

        async def submit() -> tuple[float, Unavailable | None]:
            r = connect_async(cluster.url, socket_timeout=10)  # the gateway's
            client = tiers.TierClient(r, GatewayConfig(model_dir="unused", redis_url=cluster.url), None, None,
                                      KEYS.reply("gw"))
            await client.live_workers(["backbone"])  # connected: it knows the slot map
            os.kill(paused.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                async for _ in client.generate(plan, asyncio.Queue()):
                    pass
            except Unavailable as exc:
                return time.monotonic() - t0, exc
            finally:
                os.kill(paused.pid, signal.SIGCONT)
                await r.aclose()
            return time.monotonic() - t0, None

        took, error = asyncio.run(submit())
    assert error is not None and error.code == "redis_unavailable", error
    assert took < 5, took


def test_a_media_requests_round_trip_to_a_node_that_does_not_answer_ends_within_its_bound(monkeypatch, tiny_spec):
    """An image whose tensor (and lease, and waiters) sit on a paused node: the request's cache lookup waited for the
    socket timeout and redis-py's retries (an outside tester's chaos run: 503s after 30-31 s). Each of a media
    request's round trips is cut at its bound too (lowered here), with a 503 ``redis_unavailable``."""
    from gateway.encoding import MediaEncoder
    from gateway.media import MediaPart, content_digest
    from tests.media import png_bytes

    monkeypatch.setattr(tiers, "ROUND_TRIP_S", 1.5)
    data = png_bytes(20, 20, seed=8)
    digest = content_digest(tiny_spec.encoder_id("image"), tiny_spec.preprocess["image"], data)
    keys = Keys("bound")
    with EmbeddedCluster(primaries=3, replicas=0) as cluster:
        away = cluster.primary_of(keys.tensor(tiny_spec.encoder_id("image"), digest))
        cfg = GatewayConfig(model_dir="unused", redis_url=cluster.url, prefix=keys.prefix)

        async def go() -> tuple[float, Exception | None]:
            r = connect_async(cluster.url, socket_timeout=10)  # the gateway's
            media = MediaEncoder(r, cfg, tiny_spec, None, keys.reply("gw-b"), known_live=lambda tier: 1)
            part = MediaPart("image", data, "messages.0.content.0", digest)
            await r.get(keys.tensor(tiny_spec.encoder_id("image"), digest))  # connected: it knows the slot map
            os.kill(away.proc.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                await media.encode("req", [part], asyncio.Queue())
            except Unavailable as exc:
                return time.monotonic() - t0, exc
            finally:
                os.kill(away.proc.pid, signal.SIGCONT)
                await r.aclose()
            return time.monotonic() - t0, None

        took, error = asyncio.run(go())
    assert error is not None and error.code == "redis_unavailable", error
    assert took < 5, f"the request waited {took:.1f} s"


def test_a_rate_limit_round_trip_to_a_node_that_does_not_answer_ends_within_its_bound(monkeypatch):
    """A tenant's rate-limit keys on a paused node: the check waited for the socket timeout and redis-py's cluster
    retries (about 32 s, an outside reviewer's reading), outside every other round trip's bound. It is cut at the
    bound (lowered here) too, with a 503 ``redis_unavailable`` counted as a refusal, and a Redis error there is a
    503 too (it escaped the Realtime handshake unanswered)."""
    from gateway.auth import Tenant
    from gateway.chat import ChatService
    from gateway.ratelimit import RateLimiter

    monkeypatch.setattr(tiers, "ROUND_TRIP_S", 1.5)
    keys, tenant = Keys("rl"), Tenant("team", "team", rpm=100)
    refused = []
    with EmbeddedCluster(primaries=3, replicas=0) as cluster:
        svc = ChatService.__new__(ChatService)
        svc.metrics = type("Metrics", (), {"reject": lambda self, code: refused.append(code)})()

        async def go() -> tuple[float, Exception | None, dict]:
            r = connect_async(cluster.url, socket_timeout=10)  # the gateway's
            svc.limiter = RateLimiter(r, keys, rpm=100)
            first = await svc._rate(tenant, "req-1")  # connected: it knows the slot map
            t0 = time.monotonic()
            try:
                with paused(*cluster.nodes):  # every node: the window's key may move to another as a minute ends
                    await svc._rate(tenant, "req-2")
            except Unavailable as exc:
                return time.monotonic() - t0, exc, first
            finally:
                await r.aclose()
            return time.monotonic() - t0, None, first

        took, error, first = asyncio.run(go())
    assert first.headers["x-ratelimit-remaining-requests"] == "99"
    assert error is not None and error.code == "redis_unavailable", error
    assert took < 5, f"the rate-limit check waited {took:.1f} s"
    assert refused == ["redis_unavailable"]


def test_a_slot_map_refresh_stuck_on_a_node_that_does_not_answer_holds_other_commands_a_second_at_most(
        monkeypatch):
    """A shard away (its primary and its replica paused: a partition): a command to it fails, and the asyncio
    client refreshes its slot map, asking the nodes it knows one by one under a lock every command waits on. Asking
    the paused replica first cost the refresh a socket timeout, and every command on every shard waited for it (an
    outside tester's chaos run: the gateway queued nothing for 10 s, in about 1 run of 3). Now commands wait for
    the refresh 1 s at most (``REFRESH_WAIT_S``), and a pipeline's retry, which closes the client (redis-py's own
    ``aclose``), leaves the refresh running (ending it gave every waiting command a CancelledError: an outside
    tester's chaos run, the gateway's reply reader ended). redis-py shuffles the nodes it asks: the test puts the
    paused replica first."""
    aiocluster = redis.asyncio.cluster
    with EmbeddedCluster(primaries=3, replicas=1) as cluster:
        away_key = KEYS.gen()
        primary, replica = shard(cluster, away_key)
        healthy_key = next(k for k in (f"k{i}" for i in range(1000)) if cluster.primary_of(k) is not primary)
        monkeypatch.setattr(aiocluster.random, "shuffle",
                            lambda nodes: nodes.sort(key=lambda n: n.port != replica.port))

        async def go() -> tuple[float, list[float]]:
            r = connect_async(cluster.url, socket_timeout=5)
            await r.set(healthy_key, 1)
            await r.get(away_key)  # connected to both shards: it knows the slot map
            deadline = time.monotonic() + 10
            while replica.port not in {n.port for n in r.nodes_manager.startup_nodes.values()}:
                assert time.monotonic() < deadline, "the client never heard of the paused shard's replica"
                await asyncio.sleep(0.1)  # a node asked before the replica was in sync may not list it yet
                await r.nodes_manager.initialize()
            for node in (primary, replica):
                os.kill(node.proc.pid, signal.SIGSTOP)
            try:
                failing = asyncio.ensure_future(r.get(away_key))
                await asyncio.sleep(0.5)
                pipe = r.pipeline(transaction=False)  # its retry closes the client (redis-py's aclose) meanwhile
                pipe.get(away_key)
                piped = asyncio.ensure_future(pipe.execute())
                waits = []
                t0 = time.monotonic()
                while not (failing.done() and piped.done()):  # the refresh starts once a try timed out (5 s)
                    t = time.monotonic()
                    assert await r.get(healthy_key) == b"1"  # no CancelledError either
                    waits.append(time.monotonic() - t)
                    await asyncio.sleep(0.05)
                for command in (failing, piped):
                    with pytest.raises((redis.TimeoutError, redis.ConnectionError)):
                        await command
                return time.monotonic() - t0, waits
            finally:
                for node in (primary, replica):
                    os.kill(node.proc.pid, signal.SIGCONT)
                await r.aclose()

        took, waits = asyncio.run(go())
    assert took > 5, f"the command to the paused shard failed in {took:.1f} s: no refresh was tested"
    assert max(waits) < 2.5, f"a command to a shard that answers waited {max(waits):.1f} s"


def test_a_fresh_clients_first_concurrent_commands_all_succeed(redis_cluster):
    """redis-py's asyncio cluster client picked a node for a command before reading its first slot map: a fresh
    client's first concurrent commands went to random nodes, drew MOVED replies, and every fifth MOVED closed the
    client, cutting the connections of the commands in flight (AttributeErrors and "Connection closed by server":
    15 of 20 tries failed). A gateway starts under load: its first requests must not fail. Now the first map is
    read before any node is chosen."""
    keys = [f"fresh{i}" for i in range(15)]

    async def go() -> list:
        failures = []
        for _ in range(8):
            r = connect_async(redis_cluster.url)
            try:
                results = await asyncio.gather(*(r.set(k, 1) for k in keys), return_exceptions=True)
                failures += [repr(x) for x in results if isinstance(x, BaseException)]
            finally:
                await r.aclose()
        return failures

    failures = asyncio.run(go())
    assert not failures, failures[:3]


def test_commands_after_the_client_closed_itself_go_to_their_own_shard_while_a_refresh_is_stuck(monkeypatch):
    """redis-py's ``aclose`` (which its pipelines call after a failed node) drops the client's default node, and only
    a finished refresh of the slot map sets it again. Without one, redis-py sends a command to a random node instead of
    its key's (a node that answers says MOVED); while a shard is away and the refresh is stuck on it, one command in
    three went to the paused shard and waited out its socket timeouts (an outside tester's chaos run: a gateway's
    reply reader, whose stream was on a healthy shard, heard nothing for 10-21 s at a time, and text requests got a
    503 "during submitting"). The test closes the client as a pipeline's retry does, with the paused replica asked
    first by the refresh (redis-py shuffles the nodes it asks)."""
    aiocluster = redis.asyncio.cluster
    with EmbeddedCluster(primaries=3, replicas=1) as cluster:
        away_key = KEYS.gen()
        primary, replica = shard(cluster, away_key)
        healthy = [k for k in (f"k{i}" for i in range(1000)) if cluster.primary_of(k) is not primary][:15]
        monkeypatch.setattr(aiocluster.random, "shuffle",
                            lambda nodes: nodes.sort(key=lambda n: n.port != replica.port))

        async def timed(call) -> float:
            t = time.monotonic()
            assert await call == b"1"
            return time.monotonic() - t

        async def go() -> list[float]:
            r = connect_async(cluster.url, socket_timeout=4)
            for k in healthy:
                await r.set(k, 1)
            deadline = time.monotonic() + 10
            while replica.port not in {n.port for n in r.nodes_manager.startup_nodes.values()}:
                assert time.monotonic() < deadline, "the client never heard of the paused shard's replica"
                await asyncio.sleep(0.1)
                await r.nodes_manager.initialize()
            for node in (primary, replica):
                os.kill(node.proc.pid, signal.SIGSTOP)
            try:
                await r.aclose()  # as a pipeline's retry after a failed node does
                return [await timed(r.get(k)) for k in healthy]  # one at a time, while the refresh is stuck
            finally:
                for node in (primary, replica):
                    os.kill(node.proc.pid, signal.SIGCONT)
                await r.aclose()

        waits = asyncio.run(go())
    assert max(waits) < 2.5, f"commands to shards that answer waited up to {max(waits):.1f} s: {sorted(waits)}"


def test_the_client_refreshing_its_slot_map_leaves_the_commands_in_flight_alone(r, redis_cluster):
    """To have its slot map read again (a pipeline failed on a node, a cluster-down error, every fifth MOVED reply),
    redis-py closes the whole client, which cut every connection of every node with the commands in flight on them:
    other requests' commands, on shards that were fine, failed or were sent again (an outside tester's chaos run: an
    HTTP 500 from uvloop's "unable to perform operation on <TCPTransport closed=True>"). Now it only asks for the
    refresh. Five commands sent to a node that is not their key's draw five MOVED replies, and redis-py's refresh;
    a read blocked meanwhile on another shard stays on its connection and gets its entry."""
    stream = "inflight"
    home = redis_cluster.primary_of(stream)
    key = next(k for k in (f"m{i}" for i in range(1000)) if redis_cluster.primary_of(k) is not home)
    wrong = next(n for n in redis_cluster.live() if n is not home and n is not redis_cluster.primary_of(key)
                 and redis_cluster.client(n).execute_command("ROLE")[0] == b"master")

    def blocked_reads() -> set[int]:
        return {c["id"] for c in redis_cluster.client(home).client_list() if c["cmd"].startswith("xread")}

    async def go():
        c = connect_async(redis_cluster.url)
        try:
            await c.set(key, 1)
            await c.xadd(stream, {"a": 1})
            reader = asyncio.ensure_future(c.xread({stream: "$"}, block=3000))
            await asyncio.sleep(0.3)
            before = blocked_reads()
            node = c.get_node(host="127.0.0.1", port=wrong.port)
            for _ in range(5):  # redis-py refreshes every fifth MOVED (reinitialize_steps)
                assert await c.execute_command("GET", key, target_nodes=node) == b"1"
            assert c._initialize, "no refresh was asked for: the test tests nothing"
            await asyncio.sleep(0.2)
            after = blocked_reads()
            r.xadd(stream, {"b": 2})
            return before, after, await asyncio.wait_for(reader, 10)
        finally:
            await c.aclose()

    before, after, read = asyncio.run(go())
    assert len(before) == 1, before
    assert before == after, "the blocked read's connection was cut"
    assert read and read[0][1][0][1] == {b"b": b"2"}, read


def test_requests_are_refused_at_once_while_the_backbones_queue_does_not_answer():
    """The node holding the plan queue (``gen``) paused, the gateway's own keys elsewhere: every request waited for
    its submission's bound (10 s) to get its 503, and ``/ready`` said ready (an outside tester's chaos run). The
    monitor reads each queue in a round trip of its own: the backbone's unread is a 503 at admission, without a
    round trip, until a beat reads it again."""
    from gateway.monitor import ClusterMonitor, admit

    with EmbeddedCluster(primaries=3, replicas=0) as cluster:
        keys = next(k for k in (Keys(f"g{i}") for i in range(1000))
                    if cluster.primary_of(k.gen()) is not cluster.primary_of(k.live("backbone")))
        away = cluster.primary_of(keys.gen())
        reply = next(r for r in (keys.reply(f"gw{i}") for i in range(1000)) if cluster.primary_of(r) is not away)
        cfg = GatewayConfig(model_dir="unused", redis_url=cluster.url, prefix=keys.prefix)

        async def go():
            monitor = ClusterMonitor(cfg, ["backbone", "encoder:image"], reply, lambda: None, lambda v: None)
            await monitor.beat()
            admit(monitor.view, 0, cfg, ["backbone"])
            os.kill(away.proc.pid, signal.SIGSTOP)
            try:
                await monitor.beat()
                view = monitor.view
                assert view.up and "backbone" in view.unreadable and view.reads_failing is None, view
                t0 = time.monotonic()
                with pytest.raises(Unavailable) as refused:
                    admit(view, 0, cfg, ["backbone"])
                assert refused.value.code == "redis_unavailable" and time.monotonic() - t0 < 0.1
                admit(view, 0, cfg, ["encoder:image"])  # cached media need no encoder queue: not refused here
            finally:
                os.kill(away.proc.pid, signal.SIGCONT)
            deadline = time.monotonic() + 10
            while monitor.view.unreadable:
                assert time.monotonic() < deadline, monitor.view.unreadable
                await monitor.beat()
            admit(monitor.view, 0, cfg, ["backbone"])
            await monitor.close()

        asyncio.run(go())


def test_a_cached_image_is_served_while_the_node_holding_the_cache_counters_does_not_answer(tiny_spec):
    """A media request's lookup counts its hits and misses (``stats:*``), and waited for that write: with the
    counters' node paused, image and audio requests were held up to their encode bound (an outside tester's chaos
    run). The write now holds a request ``COUNT_WAIT_S`` at most and goes on behind it."""
    from gateway.encoding import COUNT_WAIT_S, MediaEncoder
    from gateway.media import MediaPart, content_digest
    from gateway.replies import ReplyRouter
    from tests.media import png_bytes

    data = png_bytes(20, 20, seed=7)
    digest = content_digest(tiny_spec.encoder_id("image"), tiny_spec.preprocess["image"], data)
    with EmbeddedCluster(primaries=3, replicas=0) as cluster:
        def placed(keys: Keys) -> bool:
            stats = cluster.primary_of(keys.stats("encoder:image"))
            return all(cluster.primary_of(k) is not stats for k in (
                keys.tensor(tiny_spec.encoder_id("image"), digest), keys.reply("gw-c"), keys.stats("tenant:t")))

        keys = next(k for k in (Keys(f"c{i}") for i in range(1000)) if placed(k))
        away = cluster.primary_of(keys.stats("encoder:image"))
        tensor = keys.tensor(tiny_spec.encoder_id("image"), digest)
        connect(cluster.url).hset(tensor, mapping={"n": 16})
        cfg = GatewayConfig(model_dir="unused", redis_url=cluster.url, prefix=keys.prefix)

        async def go():
            r = connect_async(cluster.url, socket_timeout=10)  # the gateway's
            replies = ReplyRouter(r, keys, "gw-c")
            media = MediaEncoder(r, cfg, tiny_spec, replies, keys.reply("gw-c"), known_live=lambda tier: 1)
            part = MediaPart("image", data, "messages.0.content.0", digest)
            await media.encode("warm", [part], replies.subscribe("warm"), tenant="t")
            os.kill(away.proc.pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                refs = await media.encode("req", [part], replies.subscribe("req"), tenant="t")
                return time.monotonic() - t0, refs
            finally:
                os.kill(away.proc.pid, signal.SIGCONT)
                await r.aclose()

        took, refs = asyncio.run(go())
    assert refs[0].tensor_key == tensor and refs[0].num_tokens == 16
    assert took < COUNT_WAIT_S + 1.0, f"the request waited {took:.1f} s for its cache counters"


def test_a_request_is_queued_while_the_node_holding_the_live_sets_does_not_answer(monkeypatch):
    """The node holding ``live:backbone`` paused, while the plan queue and the gateway's own keys answer: every
    request got a 503, text included (the monitor took any failed read for Redis away, and each submission read the
    live set itself: an outside tester's chaos run). Now the monitor keeps the live sets it last read, Redis stays up
    for this gateway, and a submission takes the live count from the monitor's view: the plan is queued at once."""
    from gateway.monitor import ClusterMonitor

    with EmbeddedCluster(primaries=3, replicas=0) as cluster:
        keys = next(k for k in (Keys(f"q{i}") for i in range(1000))
                    if cluster.primary_of(k.gen()) is not cluster.primary_of(k.live("backbone")))
        away = cluster.primary_of(keys.live("backbone"))
        reply = next(r for r in (keys.reply(f"gw{i}") for i in range(1000)) if cluster.primary_of(r) is not away)
        sync = connect(cluster.url)
        sync.zadd(keys.live("backbone"), {"bb-1": time.time() + 600})
        cfg = GatewayConfig(model_dir="unused", redis_url=cluster.url, prefix=keys.prefix)
        plan = m.PromptPlan(request_id="req-live", reply_to=reply, token_ids=[1, 7, 9], deadline=time.time() + 60,
                            sampling=m.SamplingParams(max_tokens=4))

        async def go() -> float:
            monitor = ClusterMonitor(cfg, ["backbone"], reply, lambda: None, lambda v: None)
            r = connect_async(cluster.url, socket_timeout=10)  # the gateway's
            client = tiers.TierClient(r, cfg, None, None, reply)
            client.view = monitor.view
            await monitor.beat()
            await r.xlen(keys.gen())  # connected: it knows the slot map
            os.kill(away.proc.pid, signal.SIGSTOP)
            try:
                await monitor.beat()
                assert monitor.view.up and monitor.view.reads_failing is not None, monitor.view
                t0 = time.monotonic()
                task = asyncio.ensure_future(client.generate(plan, asyncio.Queue()).__anext__())
                while not await r.xlen(keys.gen()):
                    assert time.monotonic() - t0 < 8, "the plan was not queued"
                    await asyncio.sleep(0.05)
                task.cancel()
                return time.monotonic() - t0
            finally:
                os.kill(away.proc.pid, signal.SIGCONT)
                await monitor.close()
                await r.aclose()

        took = asyncio.run(go())
    assert took < 2, took

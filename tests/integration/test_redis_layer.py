"""The Redis layer against a real server: embedded server, consumer groups, liveness, tensor entries (reclaiming:
test_reclaim.py)."""

from __future__ import annotations

import redis
import torch

from cache.codec import decode_tensor, encode_tensor
from cache.embedded import EmbeddedRedis
from cache.keys import Keys
from cache.streams import ensure_group
from router.liveness import Heartbeat, live_count_args, live_for_reclaim


def test_embedded_server_is_real_and_evicts_only_volatile_keys():
    with EmbeddedRedis(maxmemory="16mb") as server:
        r = redis.Redis.from_url(server.url)
        assert r.ping()
        assert r.config_get("maxmemory")["maxmemory"] == str(16 * 2**20)
        assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "volatile-lru"
        assert r.config_get("save")["save"] == ""
        # What must survive: a queue (stream) and plain keys, none with a TTL.
        stream = Keys().jobs("image")
        ids = [r.xadd(stream, {"m": f"job{i}".encode() * 100}) for i in range(50)]
        plain = {f"keep:{i}": bytes([i]) * 10_000 for i in range(20)}
        r.mset(plain)
        assert r.ttl(stream) == -1 and r.ttl("keep:0") == -1
        # What may go: volatile keys (like tensors and blobs), written to 2.5x maxmemory.
        volatile = [f"tensor:{i}" for i in range(400)]
        value = b"v" * 100_000
        for start in range(0, len(volatile), 20):
            pipe = r.pipeline(transaction=False)
            for key in volatile[start : start + 20]:
                pipe.set(key, value, ex=600)
            pipe.execute()  # raises on OOM: eviction must make room for every write
        evicted = int(r.info("stats")["evicted_keys"])
        remaining = sum(r.exists(key) for key in volatile)
        assert evicted > 0, "nothing was evicted past maxmemory"
        assert 0 < remaining < len(volatile), f"{remaining} of {len(volatile)} volatile keys remain"
        assert r.xlen(stream) == 50
        assert [e[0] for e in r.xrange(stream)] == ids
        assert r.xrange(stream)[7][1] == {b"m": b"job7" * 100}
        assert r.mget(list(plain)) == list(plain.values())
        assert r.ping() and r.set("after", 1, ex=60) and r.get("after") == b"1"
        pid = server.proc.pid
    assert server.proc.poll() is not None, f"server {pid} still running after stop"


def test_ensure_group_is_idempotent_and_creates_the_stream(redis_url):
    r = redis.Redis.from_url(redis_url)
    ensure_group(r, "s", "g")
    ensure_group(r, "s", "g")
    assert [g["name"] for g in r.xinfo_groups("s")] == [b"g"]


def test_heartbeat_registers_and_deregisters(redis_url):
    keys = Keys("t1")
    hb = Heartbeat(redis_url, keys, "encoder:image", "w1").start()
    r = redis.Redis.from_url(redis_url)
    assert r.zcount(*live_count_args(keys, "encoder:image")) == 1
    hb.stop()
    assert r.zcount(*live_count_args(keys, "encoder:image")) == 0


def test_tensor_entry_round_trips_with_ttl(redis_url):
    r = redis.Redis.from_url(redis_url)
    key = Keys().tensor("enc", "abc")
    t = torch.randn(5, 7)
    r.hset(key, mapping={"data": encode_tensor(t), "n": 5})
    r.expire(key, 60)
    assert 0 < r.ttl(key) <= 60
    assert int(r.hget(key, "n")) == 5
    assert torch.equal(decode_tensor(r.hget(key, "data")), t)


def test_workers_send_large_values_and_memoryviews_as_they_are(redis_url):
    """cache/client.py's packer: a command with a large value or a memoryview is packed the Python way (the value is
    one chunk of what goes to the socket, not copied into a packed buffer), others with hiredis when installed; both
    reach the server intact, in one pipeline."""
    from redis.connection import HIREDIS_AVAILABLE, Connection, SSLConnection, UnixDomainSocketConnection

    from cache.client import LARGE_VALUE, LargeValuePacker, connect, packing_class
    from cache.codec import tensor_payloads

    r = connect(redis_url)
    conn = r.connection_pool.get_connection()
    try:
        packer = conn._command_packer
        assert isinstance(packer, LargeValuePacker) and isinstance(conn, Connection)
        big = bytes(range(256)) * (LARGE_VALUE // 256 + 1)
        view = memoryview(big)[3 : 3 + LARGE_VALUE]
        for value in (big, view, memoryview(b"tiny")):
            chunks = packer.pack("HSET", "k", "data", value)
            assert any(c is value for c in chunks)  # handed over as it is
        small = packer.pack("HSET", "k", "data", b"x" * 100)
        assert len(small) == 1 and (not HIREDIS_AVAILABLE or b"x" * 100 in small[0])
    finally:
        r.connection_pool.release(conn)
    payloads = tensor_payloads([torch.randn(300, 64), torch.randn(2, 64).half()])
    pipe = r.pipeline(transaction=False)
    for i, p in enumerate(payloads):
        pipe.hset(f"t{i}", mapping={"data": p.data, "n": len(p.tensor)})
    pipe.set("small", b"s" * 10)
    pipe.execute()
    for i, p in enumerate(payloads):
        stored = r.hget(f"t{i}", "data")
        assert stored == bytes(p.data) and torch.equal(decode_tensor(stored), p.tensor)
    assert r.get("small") == b"s" * 10
    # TLS and Unix-socket URLs keep their connection class, with the packer.
    assert issubclass(packing_class(SSLConnection), SSLConnection)
    assert issubclass(packing_class(UnixDomainSocketConnection), UnixDomainSocketConnection)
    assert packing_class(SSLConnection) is packing_class(SSLConnection)


def test_more_concurrent_async_calls_than_connections_wait_for_one(redis_url):
    """The gateway's asyncio client under a burst: more calls at once than its pool holds (and than redis-py's
    default pool's 100) each wait for a free connection instead of failing as if Redis were down; the wait is
    bounded by the socket timeout."""
    import asyncio

    from cache.client import connect_async

    async def burst(client, n: int) -> list:
        # BLPOP with a timeout holds its connection ~0.2 s: n of them at once need n connections.
        return await asyncio.gather(*(client.blpop([f"burst:{i}"], timeout=0.2) for i in range(n)))

    async def main() -> None:
        default = connect_async(redis_url)
        try:
            assert await burst(default, 150) == [None] * 150
        finally:
            await default.aclose()
        small = connect_async(redis_url, socket_timeout=5.0, max_connections=8)
        try:
            t = asyncio.get_running_loop().time()
            assert await burst(small, 24) == [None] * 24
            assert asyncio.get_running_loop().time() - t >= 0.5  # three waves of 8, not 24 at once
        finally:
            await small.aclose()

    asyncio.run(main())


def test_the_gateways_monitor_rides_out_its_connection_being_closed(redis_url):
    """``CLIENT KILL TYPE normal`` (a proxy or failover dropping connections) closed the monitor's pooled
    connection: its next beat failed on it, and the gateway refused every request 503 "Redis unavailable: cannot
    connect" for a beat while Redis served (an outside tester: 27 of 614 requests over 6 kills). A closed
    connection is tried again once, on a fresh one."""
    import asyncio

    from gateway.config import GatewayConfig
    from gateway.monitor import ClusterMonitor

    async def beats():
        monitor = ClusterMonitor(GatewayConfig(model_dir="m", redis_url=redis_url), ["backbone"],
                                 Keys().reply("gw-kill"), lambda: None, lambda v: None)
        killer = redis.Redis.from_url(redis_url)
        try:
            await monitor.beat()
            ups = [monitor.view.up]
            for _ in range(3):
                assert killer.client_kill_filter(_type="normal", skipme=True) >= 1
                await monitor.beat()
                ups.append(monitor.view.up)
            return ups
        finally:
            await monitor.close()

    assert asyncio.run(beats()) == [True] * 4


def test_the_cluster_clock_is_redis_and_ignores_steps_of_this_hosts_clock(redis_url, monkeypatch):
    """router/clock.py: once synced, ``now()`` is Redis's time carried on the monotonic clock; a step of the host's
    clock (NTP, a VM resumed) moves nothing, and the next sync reads Redis again."""
    import asyncio
    import time

    from cache.client import connect_async
    from router import clock

    clock.reset()
    try:
        wall = time.time
        monkeypatch.setattr(time, "time", lambda: wall() - 30)  # this host 30 s behind Redis (the same host here)
        assert abs(clock.now() - (wall() - 30)) < 0.5  # not synced yet: the host's clock
        clock.sync(redis.Redis.from_url(redis_url))
        assert abs(clock.now() - wall()) < 0.05
        monkeypatch.setattr(time, "time", lambda: wall() + 40)  # stepped 70 s ahead
        assert abs(clock.now() - wall()) < 0.05

        async def sync_async():
            r = connect_async(redis_url)
            try:
                await clock.sync_async(r)
            finally:
                await r.aclose()

        clock.reset()
        asyncio.run(sync_async())
        assert abs(clock.now() - wall()) < 0.05
        assert clock.stepped_at() < 0  # a first reading is no step
        t = time.monotonic()  # Redis's clock read 8 s on (its host stepped): a step, and liveness waits a window
        clock._observe((int(wall() + 8), 0), t, t)
        assert time.monotonic() - clock.stepped_at() < 1 and abs(clock.now() - wall() - 8) < 1.1
        assert live_for_reclaim(redis.Redis.from_url(redis_url), Keys("clock"), "backbone", "me") is None
    finally:
        clock.reset()

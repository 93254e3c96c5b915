"""A gateway that finds its lease gone says why in its log, against a real server: Redis restarted since the lease
was renewed, Redis evicting keys at ``maxmemory`` (the lease has a TTL, so ``volatile-lru`` may take it when the
cache is far too small: an outside tester saw migrations blamed on "Redis restarted" while Redis ran on), or this
process not renewing it."""

from __future__ import annotations

import asyncio
import logging
import re
import time

import redis

from cache.embedded import EmbeddedRedis
from gateway.config import GatewayConfig
from gateway.monitor import ClusterMonitor


def up_for(r, seconds: int) -> None:
    """Wait until the server has run ``seconds`` (its uptime counts whole seconds)."""
    while int(r.info("server")["uptime_in_seconds"]) < seconds:
        time.sleep(0.2)


def lease_lost(url: str, caplog, prepare) -> tuple[int, str]:
    """Beat once (the lease taken), ``prepare(monitor, client)``, drop the lease, beat again: the resets and the
    monitor's error line."""
    resets = []

    async def run():
        monitor = ClusterMonitor(GatewayConfig(model_dir="m", redis_url=url), ["backbone"], "reply:gw",
                                 lambda: resets.append(1), lambda view: None)
        try:
            await monitor.beat()
            r = redis.Redis.from_url(url)
            prepare(monitor, r)
            r.delete(monitor.alive_key)
            with caplog.at_level(logging.ERROR, logger="gateway.monitor"):
                await monitor.beat()
        finally:
            await monitor.close()

    asyncio.run(run())
    lines = [rec.getMessage() for rec in caplog.records if "lease was gone" in rec.getMessage()]
    assert len(lines) == 1, lines
    return len(resets), lines[0]


def test_a_lease_lost_to_eviction_names_maxmemory(caplog):
    def fill(monitor, r):
        up_for(r, 2)
        monitor._renewed = time.monotonic()  # renewed just now, as every second
        used = int(r.info("memory")["used_memory"])
        r.config_set("maxmemory", used + 512 * 1024)
        for i in range(400):  # 4 KiB values with a TTL, as tensors are: past the limit some are evicted
            r.set(f"trib:t:{i}", b"x" * 4096, ex=600)
        assert int(r.info("stats")["evicted_keys"]) > 0

    with EmbeddedRedis(maxmemory="64mb") as server:
        resets, line = lease_lost(server.url, caplog, fill)
    assert resets == 1
    assert "evicting keys at maxmemory" in line and "give Redis more memory" in line, line


def test_a_lease_lost_after_a_burst_of_evictions_names_maxmemory_though_memory_is_under_it_again(caplog):
    """Right after a burst of evictions used memory is well under ``maxmemory``: 171 of 175 lease losses were
    blamed on the gateway (an outside tester's). Keys evicted since the last loss say Redis is evicting."""
    def fill(r, n: int, start: int = 0) -> None:
        for i in range(start, start + n):  # 4 KiB values with a TTL, as tensors are: past the limit some are evicted
            r.set(f"trib:t:{i}", b"x" * 4096, ex=600)

    async def run(url: str) -> list[str]:
        monitor = ClusterMonitor(GatewayConfig(model_dir="m", redis_url=url), ["backbone"], "reply:gw",
                                 lambda: None, lambda view: None)
        r = redis.Redis.from_url(url)
        try:
            await monitor.beat()
            up_for(r, 2)
            r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + 512 * 1024)
            with caplog.at_level(logging.ERROR, logger="gateway.monitor"):
                for start in (0, 400):
                    fill(r, 400, start)
                    if start:  # the burst over: memory well under the limit again
                        r.delete(*[f"trib:t:{i}" for i in range(800)])
                    monitor._renewed = time.monotonic()
                    r.delete(monitor.alive_key)
                    await monitor.beat()
        finally:
            await monitor.close()
        return [rec.getMessage() for rec in caplog.records if "lease was gone" in rec.getMessage()]

    with EmbeddedRedis(maxmemory="64mb") as server:
        first, second = asyncio.run(run(server.url))
    assert "evicting keys at maxmemory" in first, first
    assert "evicting keys at maxmemory" in second, second


def test_a_lease_lost_while_redis_ran_on_without_evicting_blames_the_process(redis_url, caplog):
    def stall(monitor, r):
        up_for(r, 12)
        monitor._renewed = time.monotonic() - 10  # as if the event loop had not come round for 10 s

    resets, line = lease_lost(redis_url, caplog, stall)
    assert resets == 1
    assert re.search(r"did not renew it for 1[01] s", line), line  # 10 s and the time the beat took, rounded


def test_a_lease_lost_while_redis_refused_the_renewals_says_so(redis_url, caplog):
    """Redis refusing writes at maxmemory (noeviction) for 75 s was blamed on the gateway ("it stalled"): an
    outside tester's. The beats that failed say why the lease lapsed."""
    def refuse(monitor, r):
        up_for(r, 12)
        monitor._renewed = time.monotonic() - 10
        monitor._down("out of memory: it refuses writes (maxmemory)", "OutOfMemoryError")
        monitor.view.since = time.monotonic() - 9

    resets, line = lease_lost(redis_url, caplog, refuse)
    assert resets == 1
    assert re.search(r"Redis did not take its renewals for 9 s: out of memory", line), line


def test_a_server_started_after_the_last_renewal_is_a_restart(caplog):
    with EmbeddedRedis(maxmemory="64mb") as server:  # up for less than a second
        resets, line = lease_lost(server.url, caplog, lambda monitor, r: setattr(monitor, "_renewed",
                                                                                 monitor._renewed - 5))
    assert resets == 1
    # Redis counts uptime in whole seconds of its clock (floor(now) - floor(start)): 1 once a second turned
    assert re.search(r"Redis restarted [01] s ago", line), line


def test_an_eviction_policy_that_endangers_accepted_work_is_named_once_and_cleared_when_changed(caplog, monkeypatch):
    """``allkeys-*`` may evict job streams and their groups (accepted requests lost); ``volatile-ttl`` evicts the
    short-lived leases first. The gateway reads the policy from INFO (managed services refuse CONFIG), logs it once
    at its level, shows it on the probes, and clears it when an operator changes the policy live."""
    import gateway.monitor as monitor_module

    monkeypatch.setattr(monitor_module, "POLICY_EVERY_S", 0.0)  # read at every beat

    async def run(url, r):
        monitor = ClusterMonitor(GatewayConfig(model_dir="m", redis_url=url), ["backbone"], "reply:gw",
                                 lambda: None, lambda view: None)
        seen = []
        try:
            with caplog.at_level(logging.WARNING, logger="gateway.monitor"):
                for policy in ("volatile-lru", "allkeys-lru", "allkeys-lru", "volatile-ttl", "noeviction"):
                    r.config_set("maxmemory-policy", policy)
                    await monitor.beat()
                    seen.append(monitor.view.redis_warning)
        finally:
            await monitor.close()
        return seen

    with EmbeddedRedis(maxmemory="64mb") as server:
        seen = asyncio.run(run(server.url, redis.Redis.from_url(server.url)))
    assert seen[0] is None and seen[4] is None, seen
    assert "allkeys-lru" in seen[1] and "losing requests already accepted" in seen[1] and seen[2] == seen[1]
    assert "volatile-ttl" in seen[3] and "leases" in seen[3]
    lines = [(rec.levelno, rec.getMessage()) for rec in caplog.records if "maxmemory-policy" in rec.getMessage()]
    assert [level for level, _ in lines] == [logging.ERROR, logging.WARNING], lines  # once per change

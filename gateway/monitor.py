"""The gateway's view of the cluster, refreshed once a second in one Redis round trip by one background task:

- **Redis health.** A failed or timed-out renewal of the lease (below) marks Redis down (with why) at once; while it
  is down, new requests get a 503 with ``Retry-After`` without touching Redis, and ``/ready`` says why. The first
  renewal that succeeds marks it up again. The reads below go in round trips of their own, beside it (the live sets;
  each queue): on a Redis Cluster their keys may live on another node, and a node that does not answer (a shard
  away) holding only a live set or a queue is not Redis being away for every request (an outside tester's chaos
  run: every request, text included, got a 503 while a shard holding ``live:backbone`` was paused). While a read
  fails the view keeps what it last read, and once the live sets are read again they are not trusted to show a
  worker gone until every worker has beaten since (as after an outage). The backbone's queue unread is a 503 at
  admission (every request queues there: each waited out its own round trip's bound before).
- **The gateway's lease** (``<reply stream>:alive``, see cache/keys.py): refreshed each beat with the reply stream's
  TTL. Workers write only to the reply streams of live gateways and cancel the work of dead ones. Finding the lease
  gone (a Redis restarted empty, or this process stalled past the lease) means the cluster may have dropped this
  gateway's queued work: every request in flight is told (``RESET``) and plans or re-queues its work.
- **Live workers** of each tier (for ``/ready``, and the backbone's to migrate requests whose worker died).
- **Backlog** of each tier's stream (unread entries: the group's lag) and **queue wait** (how long its oldest unread
  entry has waited, from its id's timestamp against the Redis server's clock), for admission control: a request that
  would queue behind jobs older than half its tier's timeout would time out after being accepted, so it is refused
  at once instead (``GatewayConfig.queue_wait_limit``). The wait is read only for streams with unread entries (a
  second round trip, under load only).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

from cache.client import connect_async, describe, eviction_hazard, failed_reply
from cache.keys import Keys, alive
from cache.streams import run_script
from gateway.config import GatewayConfig
from gateway.errors import Overloaded, Unavailable
from router import clock
from router.liveness import HEARTBEAT_S, LIVE_WINDOW_S
from router.logs import Throttle

log = logging.getLogger(__name__)

# One round trip slower than this counts as Redis being away. Not much less: the timer also counts the time the
# event loop takes to come back to this task, which under a burst of requests on a small machine reaches a second.
PROBE_TIMEOUT_S = 2.0
DOWN_EVERY_S = 0.25  # while Redis is away, how often it is tried again
POLICY_EVERY_S = 60.0  # how often Redis's maxmemory-policy is read again (an operator may change it live)


@dataclass
class ClusterView:
    up: bool = False
    reason: str = "not checked yet"
    since: float = field(default_factory=time.monotonic)  # when ``up`` last changed
    live: dict[str, set[str]] = field(default_factory=dict)  # tier -> live worker ids
    backlog: dict[str, int] = field(default_factory=dict)  # tier -> unread entries of its stream
    wait: dict[str, float] = field(default_factory=dict)  # tier -> seconds its oldest unread entry has waited
    outage_ended: float = -1e9  # monotonic time Redis (or the reads of the live sets) last came back
    read_at: float | None = None  # monotonic time the live sets were last read (None: never)
    reads_failing: str | None = None  # why the live sets' last read failed, while it does (Redis itself up)
    unreadable: dict[str, str] = field(default_factory=dict)  # tier -> why its queue's last read failed, while it does
    redis_warning: str | None = None  # what Redis's eviction policy risks (cache.client.eviction_hazard), if anything
    seen_live: dict[str, float] = field(default_factory=dict)  # tier -> monotonic time a read last found a live worker

    def steady(self) -> bool:
        """Up, and read, long enough that every live worker has beaten since: an absent one is really gone (and
        Redis's clock not stepped meanwhile: beats on two clocks, router/clock.py)."""
        return (self.up and self.reads_failing is None
                and time.monotonic() - max(self.since, self.outage_ended, clock.stepped_at())
                >= LIVE_WINDOW_S + HEARTBEAT_S)

    def away_s(self) -> float:
        """For how long Redis has been found away (0: up, or not checked yet)."""
        return 0.0 if self.up or self.reason == "not checked yet" else time.monotonic() - self.since

    def live_since(self, tier: str, start: float) -> bool:
        """Whether ``tier`` had a live worker at some read since ``start`` (monotonic)."""
        return self.seen_live.get(tier, -math.inf) >= start

    def heard_from(self, tier: str, worker: str) -> None:
        """``worker`` of ``tier`` just sent a request's event: it is live now, before the next read (up to a second
        away) finds its beat. A restarted backbone answered the plans queued during its restart while the gateway,
        still reading none, refused new requests no_live_worker for that second (a regression tester's)."""
        if self.read_at is not None and worker not in self.live.setdefault(tier, set()):
            self.live[tier].add(worker)
        self.seen_live[tier] = time.monotonic()

    def live_count(self, tier: str) -> int | None:
        """Live workers of ``tier`` as last read (at most a beat old unless the reads fail); None if never read."""
        return len(self.live[tier]) if self.read_at is not None and tier in self.live else None


class ClusterMonitor:
    def __init__(self, cfg: GatewayConfig, tiers: list[str], reply_stream: str, on_reset, on_beat):
        """``on_reset()``: the lease was found gone; ``on_beat(view)``: after each beat (``view.up``: whether it
        reached Redis)."""
        self.cfg, self.tiers, self.reply_stream = cfg, tiers, reply_stream
        self.keys = Keys(cfg.prefix)
        self.alive_key = alive(reply_stream)
        self.on_reset, self.on_beat = on_reset, on_beat
        self.view = ClusterView()
        # Its own connection, with a short timeout and one retry, of a connection that failed (never of a timeout):
        # it must notice an outage, not ride it out, but a pooled connection the server closed (CLIENT KILL, an
        # idle timeout, a proxy) is no outage, and made every request a 503 for a beat while Redis served.
        self.r = connect_async(cfg.redis_url, retries=1, socket_timeout=PROBE_TIMEOUT_S)
        self._first = True
        self._renewed = time.monotonic()  # when the lease was last renewed
        self._policy_read = -1e9  # monotonic time the eviction policy was last read
        self._policies: frozenset[str] = frozenset()  # as last read (every node's, on a cluster)
        self._evicted = 1 << 62  # Redis's evicted_keys when a lease was last found gone (none yet: never fewer)
        # tier -> (its stream, its group), whose backlog each beat reads
        self.queues = {t: self.keys.queue(t) for t in tiers}
        self._reads_throttle = Throttle()


    async def run(self) -> None:
        while True:
            try:
                await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 -- a bug in one beat must not end the lease's renewal for good
                log.exception("cluster monitor beat failed")
            await asyncio.sleep(HEARTBEAT_S if self.view.up else DOWN_EVERY_S)

    async def beat(self) -> None:
        if not clock.synced():  # the live sets' scores are on Redis's clock: learn it before reading them
            await self._sync_clock()
        now = clock.now()
        lease = self.r.pipeline(transaction=False)  # one slot: the gateway's (cache/keys.py)
        lease.set(self.alive_key, 1, ex=self.cfg.lease_s, get=True)
        lease.expire(self.reply_stream, self.cfg.lease_s)
        reads = self.r.pipeline(transaction=False)
        for tier in self.tiers:
            reads.zrangebyscore(self.keys.live(tier), now - LIVE_WINDOW_S, "+inf")
        queues = []  # each queue in a round trip of its own: which one does not answer is known
        for stream, _ in self.queues.values():
            queue = self.r.pipeline(transaction=False)
            queue.xlen(stream)
            queue.xinfo_groups(stream)
            queues.append(_round_trip(queue))
        res, read, _, *queued = await asyncio.gather(_round_trip(lease), _round_trip(reads), self._sync_clock(),
                                                     *queues, return_exceptions=True)
        if any(isinstance(x, asyncio.CancelledError) for x in (res, read, *queued)):
            raise asyncio.CancelledError
        if isinstance(res, BaseException):  # the lease not renewed: Redis is not serving this gateway
            self._down(describe(res), f"{type(res).__name__}: {res}" if str(res) else type(res).__name__)
            self.on_beat(self.view)
            return
        lease_was = res[0]
        view = self.view
        # Why the beats failed until now (Redis away, or refusing writes): the lease lapsed for that reason
        outage = (view.reason, view.away_s()) if view.away_s() else None
        if not view.up:
            if view.reason != "not checked yet":
                log.warning("redis is reachable again", extra={"down_s": round(time.monotonic() - view.since, 2)})
                view.outage_ended = time.monotonic()
            view.up, view.reason, view.since = True, "ok", time.monotonic()
            self._policy_read = -1e9  # Redis may be another server now: read its policy at once
        failed = [(what, x) for what, x in [("live sets", read), *zip(self.queues, queued)]
                  if isinstance(x, BaseException)]
        if failed and (view.reads_failing is None and not view.unreadable or self._reads_throttle.due()):
            log.warning("could not read some of the workers' live sets and queues; keeping the last ones read",
                        extra={"unread": [what for what, _ in failed], "error": f"{type(failed[0][1]).__name__}: "
                               f"{failed[0][1]}", "repeated": self._reads_throttle.held})
        if isinstance(read, BaseException):
            view.reads_failing = describe(read)
        else:
            if view.reads_failing is not None:
                log.warning("the workers' live sets are read again")
                view.reads_failing, view.outage_ended = None, time.monotonic()  # beats may have failed meanwhile
            view.live = {t: {m.decode() for m in members} for t, members in zip(self.tiers, read)}
            view.read_at = time.monotonic()
            view.seen_live.update((t, view.read_at) for t, members in view.live.items() if members)
        groups = {}
        for (tier, (_, group)), got in zip(self.queues.items(), queued):
            if isinstance(got, BaseException):  # its backlog as last read; its wait unknown (0: a stale one would
                view.unreadable[tier] = describe(got)  # refuse requests for good)
                continue
            if view.unreadable.pop(tier, None) is not None:
                log.warning("a queue is read again", extra={"tier": tier})
            view.backlog[tier], groups[tier] = _lag(group, *got), got[1]
        view.wait = await self._waits({t: view.backlog.get(t, 0) for t in groups}, groups)
        if lease_was is None and not self._first:
            cause = await self._why_lease_lost(time.monotonic() - self._renewed, outage)
            log.error(f"this gateway's lease was gone ({cause}): re-queueing the work of every request in flight")
            self.on_reset()
        self._first, self._renewed = False, time.monotonic()
        if time.monotonic() - self._policy_read >= POLICY_EVERY_S:
            await self._check_eviction_policy()
        self.on_beat(view)

    async def _sync_clock(self) -> None:
        """Read Redis's clock (router/clock.py) for the next beat, for this gateway's deadlines and rate limits too;
        a failure keeps the last reading (the lease's round trip says whether Redis is away)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(clock.sync_async(self.r, self.alive_key), PROBE_TIMEOUT_S)

    async def _check_eviction_policy(self) -> None:
        """Read Redis's ``maxmemory-policy`` (from INFO: managed Redis services often refuse CONFIG) and, when it
        changes to one that endangers accepted work or liveness, log why once and show it on the probes."""
        self._policy_read = time.monotonic()
        try:
            info = await asyncio.wait_for(self.r.info("memory"), PROBE_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- advice only: read again next time
            log.debug("redis eviction policy unread", extra={"error": f"{type(exc).__name__}: {exc}"})
            return
        nodes = [info] if "maxmemory_policy" in info else [v for v in info.values() if isinstance(v, dict)]
        policies = frozenset(str(n["maxmemory_policy"]) for n in nodes if "maxmemory_policy" in n)
        if policies == self._policies:
            return
        self._policies = policies
        hazards = sorted(filter(None, map(eviction_hazard, policies)), reverse=True)
        self.view.redis_warning = hazards[0][1] if hazards else None
        if hazards:
            log.log(hazards[0][0], hazards[0][1])

    async def _why_lease_lost(self, unrenewed_s: float, outage: tuple[str, float] | None = None) -> str:
        """Why the lease was gone, for the operator: Redis restarted, Redis not taking the renewals (``outage``: why
        the beats failed, and for how long: away, refusing writes at ``maxmemory``), Redis evicting keys at
        ``maxmemory`` (the lease has a TTL, so a ``volatile-*`` policy may evict it when the cache is far too small),
        or this process not renewing it. From the INFO of the node holding it; its words only when INFO cannot be
        read."""
        try:
            kw = {"target_nodes": self.r.get_node_from_key(self.alive_key)} if hasattr(self.r, "get_node_from_key") \
                else {}
            info = await asyncio.wait_for(self.r.info(**kw), PROBE_TIMEOUT_S)
            if "uptime_in_seconds" not in info and info and isinstance(next(iter(info.values())), dict):
                info = next(iter(info.values()))  # a cluster client's reply, by node
            uptime, evicted = int(info["uptime_in_seconds"]), int(info.get("evicted_keys", 0))
            used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 -- a diagnosis only
            return "Redis restarted empty, or this process stalled"
        # Evicting now: near the limit, or more keys evicted than at the last lease lost (right after a burst of
        # evictions used memory is well under it: 171 of 175 losses were blamed on this process, an outside tester's).
        # Noted whatever the cause found: a restarted Redis counts from 0 again.
        evicting = evicted and (used >= 0.9 * limit or evicted > self._evicted)
        self._evicted = evicted
        if uptime <= unrenewed_s + 1:  # started after the last renewal
            return f"Redis restarted {uptime} s ago"
        if outage is not None:
            return f"Redis did not take its renewals for {outage[1]:.0f} s: {outage[0]}"
        if limit and evicting:
            return (f"Redis is evicting keys at maxmemory ({used / 2**20:.0f} of {limit / 2**20:.0f} MiB used, "
                    f"{evicted} keys evicted since it started): the lease was evicted; give Redis more memory")
        return f"this process did not renew it for {unrenewed_s:.0f} s: it stalled, or the lease was evicted"

    async def _waits(self, backlog: dict[str, int], groups: dict[str, object]) -> dict[str, float]:
        """Seconds the oldest unread entry of each tier with a backlog has waited (one round trip; none when no tier
        has one). A failure leaves the waits unknown (0): the next beat judges Redis."""
        behind = [t for t in self.tiers if backlog.get(t)]
        if not behind:
            return {}
        waits = {}
        try:
            pipe = self.r.pipeline(transaction=False)
            for tier in behind:  # one single-key script per stream: a Redis Cluster pipeline takes no TIME
                stream, group = self.queues[tier]
                last = _last_delivered(group, groups[tier])
                run_script(pipe, _OLDEST_UNREAD, [stream], ["-" if last is None else f"({last}"])
            replies = await asyncio.wait_for(pipe.execute(raise_on_error=False), PROBE_TIMEOUT_S)
            for tier, reply in zip(behind, replies):
                if isinstance(reply, Exception) or not reply or len(reply) < 3:
                    continue
                seconds, micros, entry_id = reply
                ms = int((entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)).split("-")[0])
                waits[tier] = max(int(seconds) * 1000 + int(micros) // 1000 - ms, 0) / 1000
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- the waits stay unknown (0): the next beat judges Redis
            log.debug("queue waits unread", extra={"error": f"{type(exc).__name__}: {exc}"})
            return {}
        return waits

    def _down(self, reason: str, detail: str) -> None:
        """``reason``: words for clients and probes (no host or server text); ``detail``: the error, for the log."""
        view = self.view
        if view.up or view.reason == "not checked yet":
            log.error("redis unavailable", extra={"error": detail})
            view.since = time.monotonic()
        view.up, view.reason = False, reason

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.r.delete(self.alive_key), PROBE_TIMEOUT_S * 2)
        except Exception:  # noqa: BLE001 -- best effort: the lease lapses by itself
            pass
        await self.r.aclose()


async def _round_trip(pipe) -> list:
    """A pipeline's replies within ``PROBE_TIMEOUT_S``. Each may be an error (XINFO GROUPS of a stream not made yet
    is one); any other, on any key (on a cluster: any node), fails the round trip: a node dead mid-read, a timeout."""
    res = await asyncio.wait_for(pipe.execute(raise_on_error=False), PROBE_TIMEOUT_S)
    if failed := failed_reply(res):
        raise failed
    return res


class BusyHint:
    """The Retry-After of a refusal at the in-flight bound: how long a refused client should wait for a slot.

    A fixed second told 200 clients of a gateway finishing ~30 requests a second to come back at once, again and
    again: 37% of them gave up after five retries (an outside tester's overload run). The hint is 1 s plus the
    requests refused per request finished, smoothed over seconds (each second moves it 30% of the way to that
    second's figure), within [1, ``MAX_S``]: the deeper the overload, the longer the wait, without the runaway of a
    law that only grows while refusals last (the first version sat at its 30 s cap: a regression tester's run);
    seconds without any request take it back toward 1 s. Simulated against closed-loop clients (bench/retry_hint.py)
    it keeps 97% of the throughput at 100 clients for 25 requests a second, refuses 0.52 of tries instead of 0.66,
    and gives up 5% of requests instead of 14%. No Redis call; ``now`` for tests."""

    MAX_S = 30.0
    SMOOTH = 0.3  # the share of each second's figure in the hint

    def __init__(self):
        self.hint, self.refused, self.finished, self.since = 1.0, 0, 0, time.monotonic()

    def value(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        elapsed = now - self.since
        if elapsed >= 1.0:
            figure = 1.0 + self.refused / max(self.finished, 1)
            self.hint += self.SMOOTH * (figure - self.hint)
            if elapsed >= 2.0:  # seconds without a call to this: seconds without a refusal
                self.hint = 1.0 + (self.hint - 1.0) * (1 - self.SMOOTH) ** (elapsed - 1.0)
            self.hint = min(max(self.hint, 1.0), self.MAX_S)
            self.refused = self.finished = 0
            self.since = now
        return max(1, round(self.hint))


def admit(view: ClusterView, inflight: int | None, cfg: GatewayConfig, tiers: list[str], busy_retry: int = 1) -> None:
    """Admission control from the monitor's last view (no Redis call): a 503 with Retry-After at once when Redis is
    away, the gateway serves ``max_inflight`` requests already (``inflight`` None: not checked; Retry-After
    ``busy_retry``, see ``BusyHint``), or one of ``tiers``' queues holds more than ``max_backlog`` unread entries."""
    if not view.up:
        raise Unavailable(f"the queue (Redis) is unavailable: {view.reason}; retry later", code="redis_unavailable",
                          retry_after=2)
    # Every request queues for the backbone: its queue's Redis node not answering (a Redis Cluster node away) is a
    # 503 at once, not one after the request's own round trip timed out (10 s). An encoder's queue is not checked
    # here: media already cached do not need it, and a job's own wait is bounded.
    if "backbone" in tiers and (why := view.unreadable.get("backbone")) is not None:
        raise Unavailable(f"the backbone's queue (Redis) does not answer: {why}; retry later",
                          code="redis_unavailable", retry_after=2)
    if inflight is not None and inflight >= cfg.max_inflight:
        raise Overloaded(f"this gateway is serving its limit of {cfg.max_inflight} requests; retry later",
                         retry_after=busy_retry)
    for tier in tiers:
        if (lag := view.backlog.get(tier, 0)) > cfg.max_backlog:
            raise Overloaded(f"the {tier} queue holds {lag} requests (limit {cfg.max_backlog}); retry later")
        if (wait := view.wait.get(tier, 0.0)) > (limit := cfg.queue_wait_limit(tier)):
            raise Overloaded(f"the {tier} queue's oldest request has waited {wait:.0f} s (limit {limit:g} s): a new "
                             "one would wait as long; retry later", retry_after=min(max(int(wait / 10), 1), 30))


# KEYS: a stream. ARGV: the XRANGE start after the group's last-delivered id. The server's clock (the one that stamped
# the ids, on a cluster the stream's own node) and the oldest unread entry's id; nothing else when there is none.
_OLDEST_UNREAD = """
local t = redis.call('TIME')
local first = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', 1)
if #first == 0 then return {} end
return {t[1], t[2], first[1][1]}
"""


def _last_delivered(group: str, groups) -> str | None:
    """The id of the last entry delivered to ``group`` (None: no such group yet: every entry is unread)."""
    if isinstance(groups, Exception):
        return None
    for g in groups:
        name = g.get("name")
        if (name.decode() if isinstance(name, bytes) else name) == group:
            last = g.get("last-delivered-id")
            return last.decode() if isinstance(last, bytes) else last
    return None


def _lag(group: str, length, groups) -> int:
    """Unread entries of a stream for ``group``: its lag (Redis 7+), else the stream's length less the group's
    pending entries (exact because acked entries are deleted). 0 if the stream or group does not exist yet."""
    if isinstance(length, Exception) or isinstance(groups, Exception):
        return 0
    for g in groups:
        name = g.get("name")
        if (name.decode() if isinstance(name, bytes) else name) != group:
            continue
        lag = g.get("lag")
        if lag is not None:
            return int(lag)
        return max(int(length) - int(g.get("pending", 0)), 0)
    return int(length)

"""The gateway's Prometheus metrics (``GET /metrics``, no API key) and the cluster's queues, exported once.

**Requests** (:class:`GatewayMetrics`, observed in gateway/chat.py as token events arrive: one histogram observation
and one counter increment per event, nothing sent anywhere): ``tributary_time_to_first_token_seconds`` (arrival to
the first token), ``tributary_inter_token_latency_seconds`` (between two token events of a request),
``tributary_e2e_request_latency_seconds`` (arrival to the end), ``tributary_request_success_total{finished_reason}``
(``stop`` (a stop string too), ``length``, ``abort``: the client went away, ``error``: the gateway's 504s too),
``tributary_prompt_tokens_total``, ``tributary_generation_tokens_total``, ``tributary_request_migrations_total``,
``tributary_gateway_requests_in_flight``,
``tributary_realtime_connections`` (open Realtime sockets), and per modality ``tributary_encoder_cache_hits_total``
/ ``_misses_total`` (gateway/encoding.py). vLLM's names with a ``tributary_`` prefix; REST and Realtime requests
alike.

**Queues, once per cluster** (:class:`ClusterMetrics`). Every gateway sees the same streams, so if each exported
them, summing over gateways would count every queue once per gateway. Instead the gateways share a leader lease
(``<prefix>:metrics:leader``: taken when free with a life of three intervals and renewed by its holder every
``interval_s``, in one script), and only the holder exports, for each tier the served model needs:
``tributary_queue_length{tier}`` (XLEN), ``tributary_queue_pending{tier}`` (delivered, not acked: in flight; the
group's pending count from XINFO GROUPS, what XPENDING's summary counts), ``tributary_queue_lag{tier}`` (not yet
delivered: length - pending, exact because acked entries are deleted, cache/streams.py; Redis 6.2 has no lag
field), ``tributary_tier_live_workers{tier}`` and the cluster-wide counters of ``<prefix>:stats:<tier>`` as
``tributary_tier_stat{tier,stat}`` (as they are), and while ``tributary up --autoscale`` runs,
``tributary_autoscaler_replicas{tier}`` / ``tributary_autoscaler_recommended{tier}`` (what it runs and what the
policy recommended at its last poll, from ``<prefix>:autoscale``). The numbers come from a snapshot refreshed every
``interval_s`` by its own task (one pipelined round trip); a scrape never waits on Redis. Every gateway exports
``tributary_cluster_metrics_leader`` (1 on the holder). When the holder stops, its lease is released (or lapses) and
another gateway takes over within an interval or two. A snapshot older than three intervals (Redis away) is not
exported.

**Several processes.** With ``PROMETHEUS_MULTIPROC_DIR`` set (a gateway app run by several worker processes on one
port), the request metrics live in that directory's files and ``/metrics`` merges every process's
(prometheus_client's MultiProcessCollector; empty the directory before starting, as prometheus_client says). The
processes of one such set hold the lease as one (its owner is the host and the directory), so whichever of them
answers a scrape exports the queues.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cache.client import failed_reply
from cache.keys import Keys
from cache.streams import release_lease, run_script
from router.liveness import live_count_args

log = logging.getLogger(__name__)

# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards written for one read the other.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort", "error")
MODALITIES = ("image", "audio")
REJECT_CODES = ("rate_limit_exceeded", "server_overloaded", "redis_unavailable", "server_shutting_down",
                "no_live_worker")
CONTENT_TYPE = CONTENT_TYPE_LATEST
INTERVAL_S = 2.0  # how often the cluster snapshot is refreshed (and the leader lease renewed)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class GatewayMetrics:
    """One gateway process's metrics, in its own registry (in that directory's files under
    ``PROMETHEUS_MULTIPROC_DIR``)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.multiprocess = multiprocess_dir() is not None
        self.cluster: ClusterMetrics | None = None
        r = self.registry
        self.ttft = Histogram("tributary_time_to_first_token_seconds", "Seconds from a request's arrival to its "
                              "first token", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("tributary_inter_token_latency_seconds", "Seconds between two token events of a "
                             "request", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("tributary_e2e_request_latency_seconds", "Seconds from a request's arrival to its "
                             "end", buckets=E2E_BUCKETS, registry=r)
        finished = Counter("tributary_request_success", "Requests that ended, by finish reason (stop, length, "
                           "abort, error)", ["finished_reason"], registry=r)
        self.finished = {reason: finished.labels(reason) for reason in FINISH_REASONS}
        self.rejected = Counter("tributary_request_rejected", "Requests refused at admission before any work (429 "
                                "rate_limit_exceeded; 503 server_overloaded, redis_unavailable, server_shutting_down), "
                                "by code", ["code"], registry=r)
        for code in REJECT_CODES:  # exported at 0 from the start, so that a rate of them is defined
            self.rejected.labels(code)
        self.prompt_tokens = Counter("tributary_prompt_tokens", "Prompt tokens of requests that began generating",
                                     registry=r)
        self.generation_tokens = Counter("tributary_generation_tokens", "Tokens generated", registry=r)
        self.migrations = Counter("tributary_request_migrations", "Requests moved to another backbone replica "
                                  "(their worker died or went silent)", registry=r)
        self.in_flight = Gauge("tributary_gateway_requests_in_flight", "Requests this gateway is serving",
                               multiprocess_mode="livesum", registry=r)
        self.realtime = Gauge("tributary_realtime_connections", "Realtime WebSocket connections this gateway holds",
                              multiprocess_mode="livesum", registry=r)
        self.errors = Counter("tributary_request_errors", "Chat requests answered with an error before any token, by "
                              "HTTP status and error code (a 504's says which wait ran out)", ["status", "code"],
                              registry=r)
        self.redis_up = Gauge("tributary_redis_up", "1 while this gateway's last beat reached Redis, else 0 (the "
                              "queue and live-worker series are absent meanwhile)", multiprocess_mode="livemin",
                              registry=r)
        hits = Counter("tributary_encoder_cache_hits", "Media parts found in the tensor cache", ["modality"],
                       registry=r)
        misses = Counter("tributary_encoder_cache_misses", "Media parts not in the tensor cache (to encode)",
                         ["modality"], registry=r)
        self.cache_hits = {m: hits.labels(m) for m in MODALITIES}
        # The last minutes of TTFT and ITL, for the playground (gateway/dashboard.py); this process's requests.
        from gateway.dashboard import Recent

        self.recent = Recent()
        self.cache_misses = {m: misses.labels(m) for m in MODALITIES}

    def request(self, arrival: float) -> "RequestMetrics":
        """``arrival``: ``time.perf_counter()`` when the request came in."""
        return RequestMetrics(self, arrival)

    def reject(self, code: str | None) -> None:
        self.rejected.labels(code or "unknown").inc()

    def error(self, status: int, code: str | None) -> None:
        """An error answer (the codes are the server's own words, never a client's: the labels stay bounded)."""
        self.errors.labels(str(status), code or "none").inc()

    def cache(self, modality: str, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses)[modality].inc()

    def attach(self, cluster: "ClusterMetrics") -> None:
        """Export ``cluster``'s queue metrics too (in place of any attached before: a lifespan run again)."""
        if self.cluster is not None and not self.multiprocess:
            self.registry.unregister(self.cluster)
        self.cluster = cluster
        if not self.multiprocess:
            self.registry.register(cluster)

    def render(self) -> bytes:
        """The text exposition of this gateway's metrics (every process's, merged, in multiprocess mode)."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        if self.cluster is not None:
            registry.register(self.cluster)
        return generate_latest(registry)


class RequestMetrics:
    """One request's timings, fed by its token events."""

    __slots__ = ("m", "arrival", "last")

    def __init__(self, metrics: GatewayMetrics, arrival: float):
        self.m, self.arrival, self.last = metrics, arrival, None

    def tokens(self, n: int, prompt_tokens: int) -> None:
        """An event brought ``n`` new tokens (events without new tokens are not observed)."""
        if n <= 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self.m.ttft.observe(now - self.arrival)
            self.m.recent.observe("ttft", now - self.arrival)
            self.m.prompt_tokens.inc(prompt_tokens)
        else:
            self.m.itl.observe(now - self.last)
            self.m.recent.observe("itl", now - self.last)
        self.last = now
        self.m.generation_tokens.inc(n)

    def finish(self, reason: str) -> None:
        self.m.e2e.observe(time.perf_counter() - self.arrival)
        self.m.finished[reason].inc()


# KEYS: the lease. ARGV: owner, ms. Take it when free, renew it when ours; 1 if held by us now.
_LEASE = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


def lease_owner(gateway_id: str) -> str:
    """Who holds the leader lease: this process, or with PROMETHEUS_MULTIPROC_DIR the set of processes that merge
    one directory (they answer one scrape target)."""
    directory = multiprocess_dir()
    if directory is None:
        return gateway_id
    return f"{socket.gethostname()}:{os.path.realpath(directory)}"


class ClusterMetrics(Collector):
    """Per-tier queue metrics, exported only while this gateway holds the cluster's metrics leader lease."""

    def __init__(self, redis, keys: Keys, tiers: list[str], owner: str, interval_s: float = INTERVAL_S):
        self.r, self.keys, self.tiers, self.owner, self.interval_s = redis, keys, tiers, owner, interval_s
        self.lease_key = keys.metrics_leader()
        self.lease_ms = int(interval_s * 3 * 1000)
        self.leader = False
        self.snapshot: dict | None = None  # tier -> {length, pending, lag, live, stats}; exported by the leader
        self.view: dict = {}  # the same, read by every gateway (gateway/dashboard.py), at ``view_at``
        self.view_at = -1e9
        self.autoscale: dict[str, float] = {}  # the local autoscaler's state, when one runs
        self.at = -1e9  # monotonic time of the snapshot
        self._failing = False

    def stream(self, tier: str) -> tuple[str, str]:
        return self.keys.queue(tier)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.refresh()

    async def refresh(self) -> None:
        """Renew (or take) the lease and read every tier's queue, live set and stats: one round trip. Failures are
        logged once per outage; the snapshot then ages out."""
        pipe = self.r.pipeline(transaction=False)
        run_script(pipe, _LEASE, [self.lease_key], [self.owner, self.lease_ms])
        for tier in self.tiers:
            stream, _ = self.stream(tier)
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
            pipe.zcount(*live_count_args(self.keys, tier))
            pipe.hgetall(self.keys.stats(tier))
        pipe.hgetall(self.keys.autoscale())
        try:
            res = await asyncio.wait_for(pipe.execute(raise_on_error=False), self.interval_s * 2)
            # Any error but XINFO's for a stream not made yet (on a cluster: one node dead among live ones) makes
            # no snapshot: a dead node's queue read as empty would tell the autoscaler to scale its tier down.
            if failed := failed_reply(res):
                raise failed
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- Redis away: no leader, no snapshot (the monitor reports it)
            if not self._failing:
                log.warning("cluster metrics unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
            self._failing, self.leader, self.snapshot = True, False, None
            return
        self._failing = False
        self.leader = res[0] == 1
        snapshot = {}
        for i, tier in enumerate(self.tiers):
            length, groups, live, stats = res[1 + 4 * i : 5 + 4 * i]
            length = 0 if isinstance(length, Exception) else int(length)
            pending = _pending(self.stream(tier)[1], groups)
            stats = {} if isinstance(stats, Exception) else _numbers(stats)
            snapshot[tier] = {"length": length, "pending": pending, "lag": max(length - pending, 0),
                              "live": 0 if isinstance(live, Exception) else int(live), "stats": stats}
        scaled = res[1 + 4 * len(self.tiers)]
        self.autoscale = {} if isinstance(scaled, Exception) else _numbers(scaled)
        self.view, self.view_at = snapshot, time.monotonic()  # every gateway's own (the playground reads it)
        self.snapshot, self.at = (snapshot, self.view_at) if self.leader else (None, self.at)

    def fresh_view(self) -> dict | None:
        """The last snapshot this gateway read, leader or not, unless it is older than three intervals."""
        return self.view if time.monotonic() - self.view_at < 3 * self.interval_s else None

    async def close(self) -> None:
        """Hand the lease on at once (another gateway takes it at its next refresh)."""
        if not self.leader:
            return
        try:
            await asyncio.wait_for(release_lease(self.r, self.lease_key, self.owner), 2)
        except Exception:  # noqa: BLE001 -- best effort: the lease lapses by itself
            pass
        self.leader, self.snapshot = False, None

    def describe(self):
        return []

    def collect(self):
        snapshot = self.snapshot
        fresh = snapshot is not None and self.leader and time.monotonic() - self.at < 3 * self.interval_s
        yield GaugeMetricFamily("tributary_cluster_metrics_leader", "1 if this gateway exports the cluster's queue "
                                "metrics (it holds the metrics leader lease)", value=1 if fresh else 0)
        if not fresh:
            return
        families = {
            "length": GaugeMetricFamily("tributary_queue_length", "Entries in the tier's stream (unread and in "
                                        "flight)", labels=["tier"]),
            "pending": GaugeMetricFamily("tributary_queue_pending", "Entries delivered to a worker and not yet "
                                         "acked (in flight)", labels=["tier"]),
            "lag": GaugeMetricFamily("tributary_queue_lag", "Entries no worker has read yet", labels=["tier"]),
            "live": GaugeMetricFamily("tributary_tier_live_workers", "Workers of the tier seen in the last live "
                                      "window", labels=["tier"]),
        }
        stat = GaugeMetricFamily("tributary_tier_stat", "The tier's cluster-wide counters (<prefix>:stats:<tier>), "
                                 "as they are", labels=["tier", "stat"])
        for tier, values in snapshot.items():
            for name, family in families.items():
                family.add_metric([tier], values[name])
            for name, value in sorted(values["stats"].items()):
                stat.add_metric([tier, name], value)
        yield from families.values()
        yield stat
        if self.autoscale:
            replicas = GaugeMetricFamily("tributary_autoscaler_replicas", "Replicas tributary up --autoscale runs "
                                         "for the tier", labels=["tier"])
            recommended = GaugeMetricFamily("tributary_autoscaler_recommended", "Replicas the scaling policy "
                                            "recommended at its last poll (before stabilization and bounds)",
                                            labels=["tier"])
            for name, value in sorted(self.autoscale.items()):
                tier = name.removesuffix(":recommended")
                (recommended if name.endswith(":recommended") else replicas).add_metric([tier], value)
            yield replicas
            yield recommended


def _pending(group: str, groups) -> int:
    """The group's pending entries (what XPENDING's summary counts) from an XINFO GROUPS reply; 0 if the stream or
    the group does not exist yet."""
    if isinstance(groups, Exception):
        return 0
    for g in groups:
        name = g.get("name")
        if (name.decode() if isinstance(name, bytes) else name) == group:
            return int(g.get("pending", 0))
    return 0


def _numbers(raw: dict) -> dict[str, float]:
    out = {}
    for k, v in raw.items():
        try:
            out[k.decode() if isinstance(k, bytes) else k] = float(v)
        except (TypeError, ValueError):
            continue
    return out

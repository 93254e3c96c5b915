"""The playground's data (``GET /dashboard/state``, outside ``/v1``): the live state of every tier, as JSON, from the
same sources as the metrics (gateway/metrics.py).

- **Tiers** (one pipelined round trip, shared by every caller for ``CACHE_S``): each tier's live workers (the
  heartbeat set), restarts (``restarts`` in the tier's stats hash, counted by ``tributary up``), its queue (length,
  lag: not yet read, pending: read and not acked, i.e. in flight), and its counters: encoders' items, forward
  passes (their ratio is the mean batch) and encode seconds; the backbone's tokens.
- **Cache**: hits and misses per modality: the cluster's without API keys; with keys, the caller's tenant's only
  (``<prefix>:stats:tenant:<name>``, counted by gateway/encoding.py), so a tenant learns nothing of another's traffic.
- **Latency**: this gateway process's time to first token and inter-token latency over the last ``WINDOW_S``, in
  ``STEP_S`` buckets (mean, max, count), kept by :class:`Recent` as token events arrive (one dict update each). With
  several gateway processes each answers with its own requests.

Behind the API key check like every route but the probes and the page itself (gateway/auth.py). Never waits on Redis
longer than ``TIMEOUT_S``: with Redis away the answer says so and carries the latency it has.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from cache.keys import Keys
from gateway.metrics import _numbers, _pending
from router.liveness import live_count_args

WINDOW_S = 300  # latency kept: the last five minutes
STEP_S = 10  # ... reported in buckets of this many seconds
CACHE_S = 1.0  # one Redis round trip per second at most, however many pages poll
TIMEOUT_S = 2.0


class Recent:
    """Per-second sums of a few latency series over the last ``WINDOW_S`` seconds (O(1) per observation)."""

    def __init__(self, kinds=("ttft", "itl")):
        self.series: dict[str, deque] = {k: deque() for k in kinds}  # [second, count, sum, max], oldest first

    def observe(self, kind: str, seconds: float, now: float | None = None) -> None:
        second = int(time.time() if now is None else now)
        buckets = self.series[kind]
        if buckets and buckets[-1][0] == second:
            b = buckets[-1]
            b[1] += 1
            b[2] += seconds
            b[3] = max(b[3], seconds)
        else:
            buckets.append([second, 1, seconds, seconds])
        while buckets and buckets[0][0] <= second - WINDOW_S:
            buckets.popleft()

    def report(self, kind: str, now: float | None = None) -> list[dict]:
        """``STEP_S`` buckets over the window, oldest first: ``{"t": end (unix s), "mean_ms", "max_ms", "n"}``
        (empty buckets have n 0 and no figures)."""
        now = int(time.time() if now is None else now)
        start = now - WINDOW_S + 1
        steps = [[0, 0.0, 0.0] for _ in range(WINDOW_S // STEP_S)]
        for second, n, total, peak in list(self.series[kind]):
            if second >= start:
                s = steps[min((second - start) // STEP_S, len(steps) - 1)]
                s[0] += n
                s[1] += total
                s[2] = max(s[2], peak)
        out = []
        for i, (n, total, peak) in enumerate(steps):
            point = {"t": start + (i + 1) * STEP_S - 1, "n": n}
            if n:
                point.update(mean_ms=round(total / n * 1e3, 1), max_ms=round(peak * 1e3, 1))
            out.append(point)
        return out


class Dashboard:
    def __init__(self, redis, keys: Keys, tiers: list[str], model: str, recent: Recent, keys_required: bool):
        self.r, self.keys, self.tiers, self.model = redis, keys, tiers, model
        self.recent, self.keys_required = recent, keys_required
        self._cluster: tuple[float, dict] | None = None  # (monotonic time, tiers + cluster cache)
        self._lock = asyncio.Lock()

    def _stream(self, tier: str) -> tuple[str, str]:
        return self.keys.queue(tier)

    async def _read_cluster(self) -> dict:
        pipe = self.r.pipeline(transaction=False)
        for tier in self.tiers:
            stream, _ = self._stream(tier)
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
            pipe.zcount(*live_count_args(self.keys, tier))
            pipe.hgetall(self.keys.stats(tier))
        res = await asyncio.wait_for(pipe.execute(raise_on_error=False), TIMEOUT_S)
        tiers, cache = {}, {}
        for i, tier in enumerate(self.tiers):
            length, groups, live, stats = res[4 * i : 4 * i + 4]
            length = 0 if isinstance(length, Exception) else int(length)
            pending = _pending(self._stream(tier)[1], groups)
            stats = {} if isinstance(stats, Exception) else _numbers(stats)
            row = {"live": 0 if isinstance(live, Exception) else int(live), "restarts": int(stats.get("restarts", 0)),
                   "queue": {"length": length, "lag": max(length - pending, 0), "in_flight": pending}}
            if tier.startswith("encoder:"):
                calls, passes = stats.get("encoder_calls", 0), stats.get("forward_passes", 0)
                row.update(items=int(calls), batches=int(passes),
                           mean_batch=round(calls / passes, 2) if passes else None,
                           encode_ms_per_batch=round(stats.get("encode_seconds", 0) / passes * 1e3, 1)
                           if passes else None)
                cache[tier.split(":", 1)[1]] = {"hits": int(stats.get("cache_hits", 0)),
                                                "misses": int(stats.get("cache_misses", 0))}
            else:
                row.update(tokens=int(stats.get("tokens", 0)), cancelled=int(stats.get("cancelled", 0)))
            tiers[tier] = row
        return {"tiers": tiers, "cache": cache}

    async def _cluster_view(self) -> dict:
        async with self._lock:
            if self._cluster is None or time.monotonic() - self._cluster[0] > CACHE_S:
                self._cluster = (time.monotonic(), await self._read_cluster())
            return self._cluster[1]

    async def _tenant_cache(self, tenant: str) -> dict:
        raw = _numbers(await asyncio.wait_for(self.r.hgetall(self.keys.stats(f"tenant:{tenant}")), TIMEOUT_S))
        modalities = [t.split(":", 1)[1] for t in self.tiers if t.startswith("encoder:")]
        return {m: {"hits": int(raw.get(f"{m}_cache_hits", 0)), "misses": int(raw.get(f"{m}_cache_misses", 0))}
                for m in modalities}

    async def state(self, tenant: str | None) -> dict:
        out = {"model": self.model, "time": round(time.time(), 3), "keys_required": self.keys_required,
               "tenant": tenant, "redis": "ok",
               "latency": {k: self.recent.report(k) for k in self.recent.series}, "window_s": WINDOW_S,
               "step_s": STEP_S}
        try:
            view = await self._cluster_view()
            cache = await self._tenant_cache(tenant) if tenant else view["cache"]
        except Exception as exc:  # noqa: BLE001 -- Redis away or slow: say so, keep what this process knows
            out.update(redis=f"unavailable ({type(exc).__name__})", tiers={}, cache={})
            return out
        for c in cache.values():
            seen = c["hits"] + c["misses"]
            c["hit_rate"] = round(c["hits"] / seen, 3) if seen else None
        out.update(tiers=view["tiers"], cache=cache, cache_scope="tenant" if tenant else "cluster")
        return out

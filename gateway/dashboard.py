"""The playground's data (``GET /dashboard/state``, outside ``/v1``): the live state of every tier, as JSON, from the
same sources as the metrics (gateway/metrics.py).

- **Tiers** (the snapshot gateway/metrics.ClusterMetrics reads every 2 s on every gateway, in the round trip that
  renews the metrics lease: no Redis I/O of its own): each tier's live workers (the heartbeat set), restarts
  (``restarts`` in the tier's stats hash, counted by ``tributary up``), its queue (length, lag: not yet read,
  pending: read and not acked, i.e. in flight), and its counters: encoders' items, forward
  passes (their ratio is the mean batch) and encode seconds; the backbone's tokens.
- **Cache**: hits and misses per modality: the cluster's without API keys; with keys, the caller's tenant's only
  (``<prefix>:stats:tenant:<name>``, counted by gateway/encoding.py), so a tenant learns nothing of another's cache
  use here. (The tiers' figures and the latency below are every tenant's together, as is ``/metrics``, which needs
  no key: a tenant sees the cluster's load, not whose it is. Keep ``/metrics`` off the public network.)
- **Latency**: this gateway process's time to first token and inter-token latency over the last ``WINDOW_S``, in
  ``STEP_S`` buckets (mean, max, count), kept by :class:`Recent` as token events arrive (one dict update each): all
  tenants' requests. With several gateway processes each answers with its own requests.

Behind the API key check like every route but the probes and the page itself (gateway/auth.py). Reads Redis only for a
tenant's cache figures, for at most ``TIMEOUT_S``; with Redis away (no snapshot younger than three intervals) the
answer says so and carries the latency it has.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from cache.keys import Keys
from gateway.metrics import _numbers

WINDOW_S = 300  # latency kept: the last five minutes
STEP_S = 10  # ... reported in buckets of this many seconds
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
    def __init__(self, cluster, keys: Keys, model: str, recent: Recent, keys_required: bool):
        """``cluster``: this gateway's gateway/metrics.ClusterMetrics, whose every-2-s snapshot the tiers come from."""
        self.cluster, self.r, self.keys, self.model = cluster, cluster.r, keys, model
        self.recent, self.keys_required = recent, keys_required

    def _tiers(self, view: dict) -> tuple[dict, dict]:
        """Each tier's row, and the cluster's cache figures per modality, from a ClusterMetrics snapshot."""
        tiers, cache = {}, {}
        for tier, v in view.items():
            stats = v["stats"]
            row = {"live": v["live"], "restarts": int(stats.get("restarts", 0)),
                   "queue": {"length": v["length"], "lag": v["lag"], "in_flight": v["pending"]}}
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
        return tiers, cache

    async def _tenant_cache(self, tenant: str) -> dict:
        raw = _numbers(await asyncio.wait_for(self.r.hgetall(self.keys.stats(f"tenant:{tenant}")), TIMEOUT_S))
        modalities = [t.split(":", 1)[1] for t in self.cluster.tiers if t.startswith("encoder:")]
        return {m: {"hits": int(raw.get(f"{m}_cache_hits", 0)), "misses": int(raw.get(f"{m}_cache_misses", 0))}
                for m in modalities}

    async def state(self, tenant: str | None) -> dict:
        out = {"model": self.model, "time": round(time.time(), 3), "keys_required": self.keys_required,
               "tenant": tenant, "redis": "ok",
               "latency": {k: self.recent.report(k) for k in self.recent.series}, "window_s": WINDOW_S,
               "step_s": STEP_S}
        view = self.cluster.fresh_view()
        try:
            if view is None:
                raise ConnectionError("no fresh snapshot")
            tiers, cache = self._tiers(view)
            if tenant:
                cache = await self._tenant_cache(tenant)
        except Exception as exc:  # noqa: BLE001 -- Redis away or slow: say so, keep what this process knows
            out.update(redis=f"unavailable ({type(exc).__name__})", tiers={}, cache={})
            return out
        for c in cache.values():
            seen = c["hits"] + c["misses"]
            c["hit_rate"] = round(c["hits"] / seen, 3) if seen else None
        out.update(tiers=tiers, cache=cache, cache_scope="tenant" if tenant else "cluster")
        return out

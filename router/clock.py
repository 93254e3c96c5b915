"""The cluster's clock: Redis's. Times one process writes and another compares (worker heartbeats, the deadlines of
encode jobs and prompt plans, rate-limit windows) are read on it, so that hosts whose clocks disagree still agree on
them. On each host's own clock a worker 4.5 s behind its gateway looked dead to it (every request a 503
``no_live_worker``), a backbone 10 s ahead reclaimed a live one's plans every second, an encoder 70 s ahead dropped
every job as past its deadline, and two gateways a minute apart counted rate limits in each other's future (an
auditor's, with one process's clock shifted).

Each process learns Redis's time from a ``TIME`` round trip (:func:`sync`, :func:`sync_async`: taken halfway through
it) and keeps it on its own monotonic clock in between: a step of the host's clock (NTP, a VM resumed) changes nothing
here, and Redis's own is read again at the next sync. The workers sync at every heartbeat, the gateway at every
monitor beat. Before a process's first sync, and in one that never syncs, :func:`now` is the host's clock: the same
value wherever clocks agree, as they do on one host and under NTP.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

MAX_ROUND_TRIP_S = 0.5  # a slower TIME reading is too loose to be worth taking: the last one stays
STEP_S = 1.0  # a reading this far from the last is a step of Redis's clock (NTP, a failover to another host)

_offset: float | None = None  # Redis's time minus this process's monotonic clock, as last synced
_stepped = -1e9  # monotonic time this process last saw Redis's clock step


def now() -> float:
    """Seconds since the epoch on Redis's clock (the host's until the first sync)."""
    offset = _offset
    return time.time() if offset is None else time.monotonic() + offset


def synced() -> bool:
    return _offset is not None


def stepped_at() -> float:
    """Monotonic time this process last saw Redis's clock step (``STEP_S``). For a live window after it, beats are
    on two clocks, those written before the step and after (each process reads the new time at its own next sync):
    liveness judges no one meanwhile (gateway/monitor.ClusterView.steady, router/liveness.live_for_reclaim), or a
    step of +8 s had a backbone reclaim a live one's plans (an outside tester's)."""
    return _stepped


def sync(r, key: str | None = None) -> None:
    """Read Redis's clock through the client ``r`` (sync). On a Redis Cluster, from the node holding ``key`` (the
    keys the caller reads and writes next): a random node that does not answer would hold a heartbeat whose own
    node answers. Its errors are the caller's."""
    t0 = time.monotonic()
    reply = r.time(**_on(r, key))
    _observe(reply, t0, time.monotonic())


async def sync_async(r, key: str | None = None) -> None:
    """:func:`sync` through an asyncio client."""
    t0 = time.monotonic()
    reply = await r.time(**_on(r, key))
    _observe(reply, t0, time.monotonic())


def _on(r, key: str | None) -> dict:
    if not key or not hasattr(r, "get_node_from_key"):
        return {}
    try:
        return {"target_nodes": r.get_node_from_key(key)}
    except Exception:  # noqa: BLE001 -- an asyncio cluster client before its first command has no slot map yet
        return {}


def _observe(reply, t0: float, t1: float) -> None:
    global _offset, _stepped
    if isinstance(reply, dict):  # a cluster client may answer by node: any node's clock will do
        reply = next(iter(reply.values()), None)
    if t1 - t0 > MAX_ROUND_TRIP_S or not isinstance(reply, (tuple, list)) or len(reply) != 2:
        return
    seconds, micros = (int(x) for x in reply)
    offset = seconds + micros / 1e6 - (t0 + t1) / 2
    if _offset is not None and abs(offset - _offset) > STEP_S:
        _stepped = time.monotonic()
        log.warning("Redis's clock stepped; judging no worker's liveness for a live window",
                    extra={"step_s": round(offset - _offset, 3)})
    _offset = offset


def reset() -> None:
    """Forget the last sync (tests)."""
    global _offset, _stepped
    _offset, _stepped = None, -1e9

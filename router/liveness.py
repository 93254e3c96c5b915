"""Worker liveness through Redis: each worker scores itself in ``<prefix>:live:<tier>`` every second; the gateway
counts recent scores before it queues work, so a request whose tier has no live worker fails fast (503) instead of
waiting on a queue nobody reads. Scores are times on Redis's clock (router/clock.py), not each host's.

A beat vouches for the worker's busy loop, not merely its process: the loop calls :meth:`Heartbeat.tick` every time it
comes round, and the beating thread stays silent once the last tick is older than ``stall_s``. A loop stuck in a
deadlock, an endless wait or a hung device call thus stops looking live within ``stall_s + LIVE_WINDOW_S``, while a
long but progressing step (a big prefill, a large encoder batch on a CPU) does not: the thread, not the step, keeps
the one-second rhythm. ``stall_s`` must exceed the longest single step.

The beat also reads the tier's thread budget (``<prefix>:budget:<tier>``, written by ``tributary up``'s autoscaler as
it adds and removes processes): the worker's loop applies a changed budget at its next :meth:`Heartbeat.tick`, between
two steps, through the ``on_threads`` callback (``torch.set_num_threads``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from redis.exceptions import RedisClusterException, RedisError

from cache.client import connect
from cache.keys import Keys
from cache.streams import Claimed, reclaim_dead
from router import clock
from router.logs import Throttle

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
LIVE_WINDOW_S = 5.0  # a worker silent for longer is presumed dead
STALL_S = 60.0  # a busy loop that has not come round for this long is presumed stuck


def worker_id() -> str:
    """This process's name in its tier's live set and consumer group: ``<host>-<pid>-<tag>`` (the tag tells apart
    two workers of one process, or a pid reused)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def worker_pid(member: bytes | str, host: str | None = None) -> int | None:
    """The pid in a :func:`worker_id` (of ``host`` only, if given); None for a name of another form or host."""
    name = member.decode(errors="replace") if isinstance(member, bytes) else member
    at, _, pid = name.rpartition("-")[0].rpartition("-")
    return int(pid) if pid.isdigit() and host in (None, at) else None


class Heartbeat:
    """A daemon thread that keeps one worker registered as live until :meth:`stop` (which deregisters it)."""

    def __init__(self, redis_url: str, keys: Keys, tier: str, worker_id: str, stall_s: float = STALL_S,
                 on_threads=None, healthy=None):
        self.key, self.worker_id, self.stall_s = keys.live(tier), worker_id, stall_s
        self.healthy = healthy  # also beat only while this says so (a pipeline replica: its other shards beat)
        self.budget_key, self.on_threads = keys.budget(tier), on_threads
        self.threads: int | None = None  # the budget last read (None: none set)
        self._applied: int | None = None
        self._r = connect(redis_url)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{tier}", daemon=True)
        self._ticked = time.monotonic()
        self._stalled = False
        self._failures, self._failing = Throttle(), False  # heartbeat failures, logged a line per 10 s

    def tick(self) -> None:
        """Called by the worker's busy loop each time round: it is making progress."""
        self._ticked = time.monotonic()
        threads = self.threads
        if self.on_threads is not None and threads is not None and threads != self._applied:
            self._applied = threads
            self.on_threads(threads)
            log.info("thread budget applied", extra={"threads": threads})

    def live(self) -> bool:
        """Whether the loop came round within ``stall_s`` (a worker's ``/live``, router/metrics.py)."""
        return time.monotonic() - self._ticked <= self.stall_s

    def start(self) -> "Heartbeat":
        """The first beat now, then one a second on a thread. A first beat that fails (Redis, or the node holding
        the live set, away) is retried by the thread: a worker starting during an outage waits it out instead of
        exiting (restarted into the same outage, it crash-looped the cluster down: an outside tester's chaos run)."""
        try:
            self.beat()
        except Exception as exc:  # noqa: BLE001 -- the thread beats again in a second
            log.warning("first heartbeat failed; retrying", extra={"error": f"{type(exc).__name__}: {exc}"})
            self._failing = True
        self._thread.start()
        return self

    def beat(self) -> None:
        clock.sync(self._r, self.key)  # scores on Redis's clock: hosts whose clocks disagree still agree on who is live
        now = clock.now()
        pipe = self._r.pipeline(transaction=False)
        pipe.zadd(self.key, {self.worker_id: now})
        pipe.zremrangebyscore(self.key, "-inf", now - 10 * LIVE_WINDOW_S)  # forget long-dead workers
        if self.on_threads is not None:
            pipe.get(self.budget_key)
        replies = pipe.execute()
        if self.on_threads is not None and replies[-1] is not None:
            try:
                self.threads = max(1, int(replies[-1]))
            except ValueError:
                pass

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            stalled = not self.live()
            if stalled != self._stalled:
                self._stalled = stalled
                if stalled:
                    log.error("the worker loop has not come round for %.0f s: no longer heartbeating", self.stall_s)
                else:
                    log.warning("the worker loop is making progress again: heartbeating")
            if stalled or (self.healthy is not None and not self.healthy()):  # the latter says why itself
                continue
            try:
                self.beat()
            except Exception as exc:  # Redis briefly away: keep trying; the window tolerates a few misses
                if self._failures.due():  # a line per 10 s; a traceback only on the first of a run, and not
                    # for Redis saying why (away, full, read-only): its words are the error's
                    log.warning("heartbeat failed", exc_info=not self._failing and not isinstance(exc, RedisError),
                                extra={"error": f"{type(exc).__name__}: {exc}", "repeated": self._failures.held})
                self._failing = True
            else:
                self._failing = False

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * HEARTBEAT_S)
        try:
            self._r.zrem(self.key, self.worker_id)
        except Exception:
            log.warning("could not deregister worker", exc_info=True)


def live_members(r, keys: Keys, tier: str) -> set[str]:
    """The ids of a tier's workers that beat within the live window."""
    return {m.decode() for m in r.zrangebyscore(keys.live(tier), clock.now() - LIVE_WINDOW_S, "+inf")}


def live_for_reclaim(r, keys: Keys, tier: str, me: str) -> set[str] | None:
    """The live set, or None when this worker's own beat is stale: then the beats of the others may be just as late
    (Redis was paused while this worker was busy in a long step and made no call, so nothing told its ReclaimGate),
    and nobody should be presumed dead; None too for a live window after Redis's clock stepped (router/clock.py)."""
    if time.monotonic() - clock.stepped_at() < LIVE_WINDOW_S + HEARTBEAT_S:
        return None
    now = clock.now()
    scores = {m.decode(): s for m, s in r.zrangebyscore(keys.live(tier), now - LIVE_WINDOW_S, "+inf",
                                                        withscores=True)}
    if scores.get(me, 0.0) < now - 2 * HEARTBEAT_S - 0.5:
        return None
    return set(scores)


class ReclaimGate:
    """When a worker may reclaim the entries of consumers absent from its tier's live set.

    Only after Redis has answered it without a break for a whole live window (plus a beat): after an outage every
    worker's last beat is old, and each gets one beat's time to show it is alive before anyone treats it as dead.
    """

    def __init__(self, every_s: float = HEARTBEAT_S):
        self.every_s = every_s
        self.healthy_since = time.monotonic()
        self.last = 0.0

    def broken(self) -> None:
        """A Redis call failed: the clock starts again."""
        self.healthy_since = time.monotonic()

    def observe(self, seconds: float) -> None:
        """A round trip took ``seconds`` (beyond any BLOCK it asked for). One slower than a live window less a beat
        means Redis was away that long (paused, partitioned) even though the call succeeded: every worker's beats
        may have lapsed meanwhile, so the clock starts again as after a failure."""
        if seconds > LIVE_WINDOW_S - HEARTBEAT_S:
            self.broken()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.healthy_since < LIVE_WINDOW_S + HEARTBEAT_S or now - self.last < self.every_s:
            return False
        self.last = now
        return True


class Reclaimer:
    """Takes over the entries that consumers absent from a tier's live set left pending in its stream, on a thread of
    its own: its calls read the live set and claim other workers' entries, which on a Redis Cluster may sit on a node
    that does not answer while the stream the loop reads does (an outside tester's chaos runs: run on the loop, each
    reclaim held it 9-15 s while the live set's node was paused). The loop calls :meth:`poll` each round and never
    waits on it.

    ``then``, if given, runs on the thread with the entries claimed (the backbone tells their gateways there); the
    loop gets them from :meth:`poll` either way. Entries a reclaim claimed are pending on this consumer: while
    :attr:`busy`, a re-read of this consumer's own pending entries must wait, for they are the reclaim's own.
    """

    def __init__(self, r, keys: Keys, tier: str, stream: str, group: str, consumer: str, count: int,
                 gate: ReclaimGate, what: str, then: Callable[[list[Claimed]], None] | None = None,
                 justid: bool = False):
        self.r, self.keys, self.tier, self.stream, self.group = r, keys, tier, stream, group
        self.consumer, self.count, self.gate, self.what, self.then = consumer, count, gate, what, then
        self.justid = justid  # claim without delivering (cache/streams.py reclaim_dead)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="reclaim")
        self.future: Future | None = None  # the reclaim in flight, or done and its outcome not yet taken
        self.errors = Throttle()

    @property
    def busy(self) -> bool:
        return self.future is not None

    def poll(self, may_start: bool = True) -> list[Claimed] | Exception:
        """The outcome of a reclaim that ended since the last call (the entries it claimed, or what it failed with:
        logged here, and the gate's clock started again), else ``[]``, a reclaim started first if ``may_start`` and
        the gate says one is due."""
        if self.future is not None:
            if not self.future.done():
                return []
            outcome, self.future = self.future.result(), None
            if isinstance(outcome, Exception):
                self._failed(outcome)
                return outcome
            if outcome:
                log.warning(f"reclaimed {self.what} of dead consumers", extra={
                    "count": len(outcome), "from": sorted({c.consumer for c in outcome})})
                return outcome
        if may_start and self.gate.due():
            self.future = self.pool.submit(self._reclaim)
        return []

    def close(self, wait: bool) -> None:
        """``wait``: let a reclaim in flight end (its calls are bounded by the client's timeouts); else drop it (the
        entries it claimed are reclaimed by a live worker once this one leaves the live set)."""
        self.pool.shutdown(wait=wait, cancel_futures=True)

    def _reclaim(self) -> list[Claimed] | Exception:
        try:
            live = live_for_reclaim(self.r, self.keys, self.tier, self.consumer)
            if live is None:
                return []
            claimed = reclaim_dead(self.r, self.stream, self.group, self.consumer, live, self.count,
                                   justid=self.justid)
            if claimed and self.then is not None:
                self.then(claimed)
            return claimed
        except Exception as exc:  # Redis's failures, and any bug here: the loop goes on either way
            return exc

    def _failed(self, exc: Exception) -> None:
        self.gate.broken()  # reclaiming waits for a steady live window again
        if not isinstance(exc, RedisError | RedisClusterException):
            log.error(f"reclaiming the {self.what} of dead workers failed", exc_info=exc)
        elif self.errors.due():
            log.error(f"could not reclaim the {self.what} of dead workers; trying again later", extra={
                "error": f"{type(exc).__name__}: {exc}", "repeated": self.errors.held})


def live_count_args(keys: Keys, tier: str) -> tuple[str, float, str]:
    """Arguments of the ZCOUNT that counts a tier's live workers (run it in whatever client or pipeline)."""
    return keys.live(tier), clock.now() - LIVE_WINDOW_S, "+inf"

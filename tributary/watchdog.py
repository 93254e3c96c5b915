"""``tributary up``'s watchdog: a worker process that runs but no longer heartbeats is stuck; it is killed, and the
supervisor restarts it as it restarts a crashed one.

A worker's heartbeat vouches for its busy loop (router/liveness.py): once the loop has not come round for the
worker's ``--stall-timeout`` (a deadlock, an endless wait, a hung device call), it stops beating, its tier's other
workers take over its jobs and gateways stop counting it. Its process is still there, though, and the supervisor
restarts only processes that exit: the tier would stay a worker short for good. The watchdog reads the tiers' live
sets (one round trip per check) and kills a child whose beat has not moved for ``hang_s`` on this process's
monotonic clock (never comparing a beat's time with its own clock: a step of the host's clock is no silence).

Beats go stale for other reasons too, and those are not the worker's fault:

* Redis paused or away: every beat goes stale at once. The watchdog judges no one unless Redis has answered each of
  its checks for the whole of ``hang_s`` (and a check answered slowly counts as Redis away). Each check also writes
  (a key with a TTL): a Redis that answers reads but refuses writes (out of memory under ``noeviction``, a replica)
  refuses the workers' beats too, and counts as away.
* A worker starting up (loading a model) has never beaten: only a process seen beating can be found stuck. A
  (re)started worker that has not beaten ``load_s`` after its start (``tributary up --ready-timeout``, which bounds
  the first start the same way) is stuck loading, though (a hung filesystem, a deadlock at import): it is killed and
  restarted too. The group is judged: a pipeline replica beats through its first shard only.
* A worker draining or restarting is the supervisor's business: only children of groups that are neither are judged.

Members of a live set are the workers' ids (``router.liveness.worker_id``: host, pid, tag); the watchdog matches
them to its children by pid, on this host only.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request

from cache.client import connect
from cache.keys import Keys
from router.liveness import HEARTBEAT_S, worker_pid
from router.logs import say
from tributary.supervisor import Child, Group

log = logging.getLogger(__name__)

HANG_S = 30.0  # a worker whose last beat is this old (Redis answering all along) is stuck
SLOW_CHECK_S = 2.0  # a check slower than this counts as Redis away


class Watchdog:
    def __init__(self, redis_url: str, prefix: str, tiers: list[str], hang_s: float = HANG_S,
                 every_s: float = HEARTBEAT_S, load_s: float | None = None):
        self.url, self.keys, self.tiers = redis_url, Keys(prefix), list(tiers)
        self.hang_s, self.every_s, self.load_s = hang_s, every_s, load_s
        self.host = socket.gethostname()
        self.r = None
        self.healthy_since: float | None = None  # monotonic: Redis has answered every check since
        self.last_check = 0.0
        # pid -> (its latest beat's score, the monotonic time this watchdog first saw that score): a worker is
        # judged by how long its score has not moved here, never by comparing its clock with ours (one step of the
        # host's clock, +40 s, killed three healthy workers at once: an auditor's)
        self.beats: dict[int, tuple[float, float]] = {}
        self.seen: set[int] = set()  # pids of children seen beating at least once (judged stuck, not loading)

    def check(self, groups: list[Group]) -> list[Child]:
        """One look (at most every ``every_s``): the children killed as stuck."""
        now = time.monotonic()
        if now - self.last_check < self.every_s:
            return []
        self.last_check = now
        try:
            if self.r is None:
                self.r = connect(self.url, retries=0, socket_timeout=SLOW_CHECK_S)
            pipe = self.r.pipeline(transaction=False)
            pipe.set(f"{self.keys.prefix}:watchdog:{self.host}", 1, ex=10)  # the workers' beats are writes too
            for tier in self.tiers:
                pipe.zrange(self.keys.live(tier), 0, -1, withscores=True)
            _, *replies = pipe.execute()
        except Exception as exc:  # noqa: BLE001 -- Redis away: nobody is judged until it has been back a while
            if self.healthy_since is not None:
                log.warning("watchdog: Redis unavailable; judging no worker until it is back",
                            extra={"error": type(exc).__name__})
            self.healthy_since, self.r = None, None
            return []
        if time.monotonic() - now > SLOW_CHECK_S:
            self.healthy_since = None  # answered, but late: the workers' beats may be just as late
            return []
        if self.healthy_since is None:
            self.healthy_since = now
        for members in replies:
            for member, score in members:
                if (pid := worker_pid(member, self.host)) is not None:
                    if pid not in self.beats or score != self.beats[pid][0]:  # moved (back too: Redis's clock)
                        self.beats[pid] = (score, now)
                    self.seen.add(pid)
        judged = [c for g in groups if g.retire_by is None and g.restart_at is None for c in g.children
                  if c.proc is not None and c.exited is None]
        self.beats = {c.proc.pid: self.beats[c.proc.pid] for c in judged if c.proc.pid in self.beats}
        running = {c.proc.pid for g in groups for c in g.children if c.proc is not None and c.exited is None}
        self.seen &= running
        for child in judged:
            child.served = child.served or child.proc.pid in self.seen
        if now - self.healthy_since < self.hang_s:
            return []
        killed = []
        for child in judged:
            _, moved = self.beats.get(child.proc.pid, (None, now))
            if now - moved > self.hang_s:
                say(f"{child.name} is stuck (no heartbeat for {now - moved:.0f} s while Redis answered); killing it "
                    "(it will be restarted)", logging.ERROR, child=child.name, child_pid=child.proc.pid,
                    silent_s=round(now - moved, 1))
                child.proc.kill()
                self.beats.pop(child.proc.pid, None)
                killed.append(child)
        return killed + self._stuck_loading(groups, now)

    def _stuck_loading(self, groups: list[Group], now: float) -> list[Child]:
        """Groups of a watched tier none of whose processes has beaten ``load_s`` after they started: one of them
        killed (the supervisor restarts the group)."""
        if self.load_s is None:
            return []
        killed = []
        for g in groups:
            alive = [c for c in g.children if c.proc is not None and c.exited is None]
            if (g.tier not in self.tiers or g.retire_by is not None or g.restart_at is not None or not alive
                    or any(c.proc.pid in self.seen for c in alive)):  # one that has beaten is judged as stuck
                continue
            loading_s = now - max(c.started_at for c in alive)
            if loading_s > self.load_s:
                child = alive[0]
                say(f"{child.name} has not come up {loading_s:.0f} s after it started (no heartbeat); killing it "
                    "(it will be restarted)", logging.ERROR, child=child.name, child_pid=child.proc.pid,
                    loading_s=round(loading_s, 1))
                child.proc.kill()
                killed.append(child)
        return killed


class GatewayProbe:
    """The gateway has no heartbeat in Redis a watchdog could read: a thread asks its ``/health`` every ``every_s``
    (a stopped or deadlocked event loop does not answer) and :meth:`check` kills it once it has not answered for
    ``hang_s`` (the supervisor restarts it). A (re)started gateway has ``load_s`` to answer first."""

    def __init__(self, url: str, instance_id: str, hang_s: float, load_s: float, every_s: float = 2.0):
        self.url, self.instance_id = url.rstrip("/") + "/health", instance_id
        self.hang_s, self.load_s, self.every_s = hang_s, load_s, every_s
        self.answered: dict[int, float] = {}  # gateway pid -> monotonic time it last answered
        self.created = time.monotonic()  # up had seen the gateway then running answer /ready
        self.tried = self.created  # when the last probe ended (answered or not)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateway-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            asked = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=self.every_s) as resp:
                    body = json.load(resp)
                if body.get("instance") == self.instance_id and isinstance(body.get("pid"), int):
                    self.answered[body["pid"]] = time.monotonic()
            except urllib.error.HTTPError as exc:  # a 503 its connection cap answered: its event loop runs
                instance, _, pid = (exc.headers.get("x-served-by") or "").partition(" ")
                if exc.code == 503 and instance == self.instance_id and pid.isdigit():
                    self.answered[int(pid)] = time.monotonic()
            except Exception:  # noqa: BLE001 -- not answering is what this measures
                pass
            if time.monotonic() - asked <= 2 * self.every_s + 1:  # else paused mid-ask: it heard nothing, either way
                self.tried = time.monotonic()
            if self._stop.wait(self.every_s):
                return

    def check(self, group: Group) -> Child | None:
        """The gateway of ``group`` killed as hung, if it is."""
        child = group.children[0] if group.children else None
        if child is None or child.proc is None or child.exited is not None or group.restart_at is not None:
            return None
        now = time.monotonic()
        if now - self.tried > 2 * self.every_s + 1:
            # This process was not probing (up itself stopped, its host paused): a silence it did not hear is
            # nobody's; judged again once it has asked (it killed a healthy gateway at once after a pause of 2 min:
            # an outside tester's).
            return None
        last = self.answered.get(child.proc.pid)
        if last is None and child.started_at < self.created:
            last = self.created  # the gateway up waited for: it answered /ready just before this probe began
        child.served = child.served or last is not None
        silent = now - (last if last is not None else child.started_at)
        if silent <= (self.hang_s if last is not None else max(self.load_s, self.hang_s)):
            return None
        say(f"{child.name} has not answered /health for {silent:.0f} s; killing it (it will be restarted)",
            logging.ERROR, child=child.name, child_pid=child.proc.pid, silent_s=round(silent, 1))
        child.proc.kill()
        self.answered.pop(child.proc.pid, None)
        return child

    def close(self) -> None:
        self._stop.set()

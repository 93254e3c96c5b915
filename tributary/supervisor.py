"""Process supervision for ``tributary up``: start the tiers' processes, pass their output through while keeping
its last lines, and keep them running.

* Before the cluster is ready, any process that exits is fatal: the supervisor stops everything and reports that
  process's exit code and its last lines of output (its error), rather than waiting for a readiness that will
  never come.
* After that, a process that dies is restarted with its whole *group* (the shards of one pipeline replica cannot run
  without each other; every other tier is a group of one) after a backoff of 1, 2, 4 ... ``max_backoff_s`` seconds
  (by the group's crashes within the window). ``max_restarts`` crashes within ``window_s`` seconds, across the
  cluster, stop it with a non-zero exit: a crash loop is a fault to report, not to hide.
* Groups can be added and retired while the cluster runs (the local autoscaler, tributary/autoscaler.py). A
  retired group gets SIGTERM, drains (its workers stop reading, finish and ack their jobs) and is removed once every
  child has exited, or is killed after the grace period (its unacked jobs are then reclaimed by the tier's other
  workers); its exit is no crash.
* Every child runs in its own session (a terminal's Ctrl-C reaches only the supervisor, which then stops the
  children in order) and gets SIGTERM if the supervisor dies (Linux parent-death signal). Stopping sends SIGTERM
  (each worker drains), then SIGKILL after a grace period.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cache.embedded import die_with_parent, reap
from router.lifecycle import STOP_SIGNALS
from router.logs import say
from tributary.relay import write_line

log = logging.getLogger(__name__)

TAIL_LINES = 30  # output lines kept per process, shown when it fails


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str | None] = field(default_factory=dict)  # over ours; None: a variable of ours not passed on
    proc: subprocess.Popen | None = None
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    _reader: threading.Thread | None = None
    started_at: float = 0.0  # monotonic
    # Seen serving (a worker's heartbeat, the gateway answering /health: tributary/watchdog.py): a crash after that
    # is no start-up failure, and does not lengthen its group's crashes in a row.
    served: bool = False

    def start(self) -> None:
        env = {k: v for k, v in {**os.environ, **self.env}.items() if v is not None}
        self.proc = subprocess.Popen(self.argv, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
        self._reader = threading.Thread(target=self._pump, name=f"out-{self.name}", daemon=True)
        self._reader.start()
        self.started_at = time.monotonic()
        log.info("started", extra={"child": self.name, "child_pid": self.proc.pid})

    def _pump(self) -> None:
        """Pass the child's output through to ours (never blocking on it: tributary/relay.py), line by line,
        keeping the last TAIL_LINES."""
        for line in self.proc.stdout:
            self.tail.append(line.decode(errors="replace").rstrip("\n"))
            write_line(line)

    @property
    def exited(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def last_lines(self) -> str:
        if self._reader:
            self._reader.join(timeout=2)  # the child is gone: let the pump read what it wrote last
        return "\n".join(self.tail)

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)


@dataclass
class Group:
    """Processes started, stopped and restarted together. ``make`` builds fresh Child specs for every (re)start (a
    pipeline replica needs a new rendezvous port each time)."""

    name: str
    make: Callable[[], list[Child]]
    children: list[Child] = field(default_factory=list)
    crashes: list[float] = field(default_factory=list)  # monotonic times
    streak: int = 0  # crashes in a row, each before the process had run ``window_s``
    restart_at: float | None = None
    tier: str = ""  # the tier its processes serve ("" when not scaled)
    front: bool = False  # stopped first when everything stops (the gateway: the workers serve what it drains)
    retire_by: float | None = None  # monotonic deadline of a drain in progress (None: not retiring)

    def start(self) -> None:
        self.children = self.make()
        for child in self.children:
            child.start()

    def dead(self) -> Child | None:
        return next((c for c in self.children if c.exited is not None), None)


class CrashLoop(RuntimeError):
    pass


class Supervisor:
    def __init__(self, groups: list[Group], max_restarts: int = 5, window_s: float = 60.0,
                 grace_s: float = 35.0, max_backoff_s: float = 16.0, on_restart=None):
        """``on_restart(group)``: called after a dead group was started again (tributary up counts restarts per
        tier in Redis, where the metrics and the playground read them)."""
        self.groups, self.max_restarts, self.window_s = groups, max_restarts, window_s
        self.grace_s, self.max_backoff_s, self.on_restart = grace_s, max_backoff_s, on_restart

    @property
    def children(self) -> list[Child]:
        return [c for g in self.groups for c in g.children]

    def start(self) -> None:
        for group in self.groups:
            group.start()

    def add(self, group: Group) -> None:
        """Start a new group now (a replica the autoscaler adds)."""
        self.groups.append(group)
        group.start()
        log.info("replica added", extra={"group": group.name, "of_tier": group.tier})

    def retire(self, group: Group) -> None:
        """Drain ``group``: SIGTERM now (each worker finishes and acks the work in hand), removed by :meth:`tend`
        once its processes have exited, SIGKILLed past the grace period."""
        if group.retire_by is not None:
            return
        group.retire_by = time.monotonic() + self.grace_s
        group.restart_at = None
        for child in group.children:
            child.signal(signal.SIGTERM)
        log.info("draining replica", extra={"group": group.name, "of_tier": group.tier})

    def _tend_retiring(self, group: Group, now: float) -> bool:
        """True once a retiring group is gone (and was removed)."""
        if all(c.exited is not None for c in group.children):
            self.groups.remove(group)
            log.info("replica drained", extra={"group": group.name, "of_tier": group.tier,
                                               "codes": [c.exited for c in group.children]})
            return True
        if now > group.retire_by:
            log.warning("killing a draining replica past its grace period", extra={"group": group.name})
            for child in group.children:
                if child.proc and child.exited is None:
                    child.proc.kill()
            group.retire_by = now + 5.0
        return False

    def tier_groups(self, tier: str) -> list[Group]:
        """The tier's groups that are not being retired."""
        return [g for g in self.groups if g.tier == tier and g.retire_by is None]

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if c.exited is not None), None)

    def tend(self) -> None:
        """One round after start-up: notice dead groups, schedule and perform their restarts. CrashLoop when too
        many crashes fall within the window."""
        now = time.monotonic()
        for group in list(self.groups):
            if group.retire_by is not None:
                self._tend_retiring(group, now)
                continue
            if group.restart_at is None and (child := group.dead()) is not None:
                # Stopped cleanly (exit 0, a stop signal's default: someone else drained it, uvicorn re-raises
                # the signal it stopped on; or 128 + the signal: a second one ended the drain): restarted, not a
                # crash (a double SIGTERM counted toward --max-restarts).
                stopped = child.exited in (0, *(-s for s in STOP_SIGNALS), *(128 + s for s in STOP_SIGNALS))
                if not stopped:
                    group.crashes = [t for t in group.crashes if now - t < self.window_s] + [now]
                    # A process that loads for longer than the window / (limit + 1), restarted with backoff, never
                    # crashes often enough within the window: crashes in a row, each soon after its start, count too
                    # (a start-up failure: a checkpoint that cannot load). One that had served is none: a gateway
                    # killed as hung again and again by a client's requests must not stop the whole cluster.
                    group.streak = 0 if any(c.served for c in group.children) else (
                        group.streak + 1 if now - child.started_at < self.window_s else 1)
                recent = sum(1 for g in self.groups for t in g.crashes if now - t < self.window_s)
                say(f"{child.name} exited with code {child.exited}; last lines:\n{_indent(child.last_lines())}",
                    logging.INFO if stopped else logging.ERROR, child=child.name, code=child.exited)
                if not stopped and recent > self.max_restarts:
                    raise CrashLoop(f"{recent} crashes within {self.window_s:g} s (limit {self.max_restarts}); "
                                    f"last: {child.name} exited with code {child.exited}")
                if not stopped and group.streak > self.max_restarts:
                    raise CrashLoop(f"{child.name} crashed {group.streak} times in a row, each within "
                                    f"{self.window_s:g} s of its start (limit {self.max_restarts}); last exit code "
                                    f"{child.exited}")
                delay = 1.0 if stopped else min(2.0 ** (len(group.crashes) - 1), self.max_backoff_s)
                log.warning("restarting", extra={"group": group.name, "child": child.name, "code": child.exited,
                                                 "in_s": delay, "crashes_in_window": len(group.crashes)})
                self._stop_group(group, grace_s=5.0)  # its other members cannot go on without the dead one
                group.restart_at = now + delay
            if group.restart_at is not None and now >= group.restart_at:
                group.restart_at = None
                group.start()
                say(f"restarted {group.name}", group=group.name)
                if self.on_restart is not None:
                    self.on_restart(group)

    def stop(self) -> None:
        """Everything, in two waves: the front groups (gateways) first, so that the requests they finish while
        draining are served by workers still there; then the workers, which finish or hand back what they hold."""
        front = [c for g in self.groups if g.front for c in g.children]
        for wave in (front, [c for c in self.children if c not in front]):
            for child in wave:
                child.signal(signal.SIGTERM)
            self._wait(wave, self.grace_s)
        # Their last lines relayed before whatever the caller says next ("stopped" must be the last line), within
        # 2 s in all (a process left behind may hold a pipe open)
        deadline = time.monotonic() + 2
        for child in self.children:
            if child._reader is not None:
                child._reader.join(max(0.0, deadline - time.monotonic()))

    def kill(self) -> None:
        """Every process, at once (a second Ctrl-C): :meth:`stop`'s waits then end."""
        for child in self.children:
            child.signal(signal.SIGKILL)

    def _stop_group(self, group: Group, grace_s: float) -> None:
        for child in group.children:
            child.signal(signal.SIGTERM)
        self._wait(group.children, grace_s)

    @staticmethod
    def _wait(children: list[Child], grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        for child in children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("killing a process that did not stop in time", extra={"child": child.name})
                child.proc.kill()
                reap(child.proc, child.name)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines()) or "    (no output)"

"""``tributary up --autoscale``: each tier's worker processes follow the scaling policy (router/autoscale.py).

Once a poll (``--autoscale-poll``, 1 s) it reads every tier's queue from Redis in one round trip (stream length,
pending, the completed-jobs counter, live workers), asks each tier's ``TierScaler`` how many replicas it should run,
and starts or drains worker processes to match through the supervisor:

* a scale-up starts new replicas at once; the policy's cool-down gives them time to load before it looks again;
* a scale-down drains the newest replica: SIGTERM, the worker stops reading, finishes and acks the jobs in hand, and
  exits (tributary/supervisor.py ``retire``); nothing queued or in hand is lost;
* the machine bounds scale-ups: a replica is added only while the machine has idle cores for it (at least
  ``--autoscale-idle-cores``, 0.75 per process, idle on average over the last ``max(2 s, upscale delay)``, read from
  /proc/stat): on a machine whose cores are all busy another process adds no capacity, only contention (measured:
  bench/autoscale.py on 2 saturated cores, p99 TTFT 2.8x worse with a second image worker than without); compute
  processes (encoders and backbone shards, draining ones included) stay within ``--autoscale-max-procs`` (default
  twice the cores); and the memory available must stay above what the tier's largest process uses now, plus a
  reserve of a tenth of the machine's memory;
* with the CPU budget on, every change re-divides the cores (``CpuBudget`` over the new process counts): new replicas
  start with the new share, and running torch workers apply it between steps (the budget key each worker's
  heartbeat reads, router/liveness.py). ONNX Runtime sessions keep the thread count they were created with.

A Redis error skips the poll (nothing changes while the queues cannot be seen). With ``--autoscale-trace FILE`` the
observations and the replica counts are written to FILE as JSON (the unit tests replay such a recorded trace), on
every change and at least every ``TRACE_EVERY_S``, the last ``TRACE_KEEP`` polls. A scale-up the machine holds
back (cores, processes, memory) is logged with what held it, once a minute while it lasts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path

from redis.exceptions import RedisError

from cache.client import connect, lost_node
from cache.keys import Keys
from router import clock
from router.autoscale import ScalingPolicy, TierLoad, TierScaler
from router.liveness import live_count_args
from router.logs import say
from tributary.cluster import Cluster, CpuBudget
from tributary.supervisor import Supervisor

log = logging.getLogger(__name__)

BUDGET_TTL_S = 30  # the budget keys outlive a dead `tributary up` by this much at most
HELD_LOG_S = 60.0  # a scale-up held back by the machine is said again this often while it lasts
TRACE_EVERY_S = 10.0  # --autoscale-trace is written at least this often (and on every change, and at exit)
TRACE_KEEP = 3600  # polls --autoscale-trace keeps, the latest (an hour at the default poll); none kept without it


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty where there is none)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * 1024
    return out


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of the whole machine from /proc/stat (None where there is none)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return idle, sum(fields[:8])


class IdleCores:
    """The machine's idle cores, averaged over a window of polls."""

    def __init__(self, cores: int, window_s: float):
        self.cores, self.window_s = cores, window_s
        self._last = _cpu_times()
        self._samples: list[tuple[float, float]] = []

    def sample(self, now: float) -> None:
        cur = _cpu_times()
        if cur is None or self._last is None:
            return
        (idle0, total0), (idle1, total1) = self._last, cur
        self._last = cur
        if total1 > total0:
            self._samples.append((now, self.cores * (idle1 - idle0) / (total1 - total0)))
        self._samples = [(t, v) for t, v in self._samples if now - t <= self.window_s]

    def average(self) -> float | None:
        """None until a sample exists (or where /proc/stat is missing: no check)."""
        return sum(v for _, v in self._samples) / len(self._samples) if self._samples else None


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _number(value) -> float:
    """A stats counter as read (absent, or not a number another writer left: 0)."""
    try:
        number = float(value) if value is not None else 0.0
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


class LocalAutoscaler:
    def __init__(self, cluster: Cluster, sup: Supervisor, policies: dict[str, ScalingPolicy], poll_s: float = 1.0,
                 max_procs: int = 0, trace_path: str | None = None, idle_cores: float = 0.75):
        self.cluster, self.sup, self.poll_s = cluster, sup, poll_s
        self.keys = Keys(cluster.prefix)
        self.r = connect(cluster.redis_url)
        self.cores = os.cpu_count() or 1
        self.max_procs = max_procs or 2 * self.cores
        self.idle_per_proc = idle_cores  # 0: no idle-core check
        self.idle = IdleCores(self.cores, max([2.0] + [p.upscale_delay_s for p in policies.values()]))
        self.scalers = {t: TierScaler(p, len(sup.tier_groups(t))) for t, p in policies.items()}
        self.policies = policies
        self.trace_path = trace_path
        # What --autoscale-trace writes: bounded (a run of days grew the supervisor by 180 MB a day, and each write
        # took longer, on the loop that also watches the workers: an outside auditor's), and kept only for it.
        keep = TRACE_KEEP if trace_path else 0
        self.trace: dict[str, deque[dict]] = {t: deque(maxlen=keep) for t in policies}
        self.history: dict[str, deque[tuple[float, int]]] = {t: deque(maxlen=keep) for t in policies}
        self.idle_trace: deque[tuple[float, float | None]] = deque(maxlen=keep)
        self.t0 = time.monotonic()
        self.t0_unix = time.time()  # the traces' time origin, for lining them up with a client's clock
        self._next_poll = 0.0
        self._held: dict[str, tuple[float, str]] = {}  # tier -> (when its held-back scale-up was last logged, why)
        self._traced = time.monotonic()  # when the trace was last written

    # ------------------------------------------------------------------------------------------------- reading

    def _stream(self, tier: str) -> tuple[str, str]:
        return self.keys.queue(tier)

    def read(self, now: float) -> dict[str, TierLoad]:
        """Every tier's load in one round trip (and one to read Redis's clock: the live sets are on it)."""
        clock.sync(self.r, self.keys.live(next(iter(self.scalers))) if self.scalers else None)
        pipe = self.r.pipeline(transaction=False)
        for tier in self.scalers:
            stream, group = self._stream(tier)
            pipe.xlen(stream)
            pipe.xpending(stream, group)
            # Jobs finished and seconds busy (the backbone keeps neither: 0s; its load counts what it serves).
            pipe.hmget(self.keys.stats(tier), "encoder_calls", "busy_seconds")
            pipe.zcount(*live_count_args(self.keys, tier))
        replies = pipe.execute(raise_on_error=False)
        if lost := next((x for x in replies if lost_node(x)), None):  # one Cluster node away: no reading, not 0s
            raise lost
        loads = {}
        for i, tier in enumerate(self.scalers):
            xlen, pending, done, live = replies[4 * i: 4 * i + 4]
            if isinstance(xlen, Exception) or isinstance(live, Exception):
                raise xlen if isinstance(xlen, Exception) else live
            pending = pending.get("pending", 0) if isinstance(pending, dict) else 0  # NOGROUP: nothing read yet
            done, busy = (_number(v) for v in (done if isinstance(done, list) else [None, None]))
            loads[tier] = TierLoad(round(now - self.t0, 3), int(xlen), int(pending), int(done), int(live), busy)
        return loads

    # ------------------------------------------------------------------------------------------------ capacity

    def _procs(self) -> int:
        """Compute processes running or draining (the gateway excluded)."""
        return sum(len(g.children) for g in self.sup.groups if g.tier)

    def limit(self, tier: str) -> tuple[int, str, str]:
        """The most replicas ``tier`` may run now, given the cores and the memory left; what sets it in words (for
        the log line of a scale-up it holds back), and which bound that is: ``max-procs``, ``idle-cores`` or
        ``memory`` (the first of them on a tie)."""
        per = self.cluster.procs_per_replica(tier)
        procs = self._procs()
        bounds = [(max(0, self.max_procs - procs) // per,
                   f"{procs} of --autoscale-max-procs {self.max_procs} processes run", "max-procs")]
        idle = self.idle.average()
        if self.idle_per_proc > 0 and idle is not None:
            bounds.append((int(idle / (self.idle_per_proc * per)),
                           f"{idle:.2f} cores idle, {self.idle_per_proc:g} needed per process (--autoscale-idle-cores)",
                           "idle-cores"))
        mem = _meminfo()
        rss = max((_rss(c.proc.pid) for g in self.sup.tier_groups(tier) for c in g.children if c.proc), default=0)
        if mem.get("MemAvailable") and rss:
            spare = mem["MemAvailable"] - mem.get("MemTotal", 0) // 10
            bounds.append((max(0, spare) // (rss * per), f"{mem['MemAvailable'] >> 20} MiB available, a replica uses "
                           f"{rss * per >> 20} MiB and a tenth of the memory stays free", "memory"))
        more, why, bound = min(bounds, key=lambda b: b[0])
        return len(self.sup.tier_groups(tier)) + more, why, bound

    # ------------------------------------------------------------------------------------------------ acting

    def budget(self) -> CpuBudget:
        return self._budget_with("", 0)

    def _publish_budget(self, budget: CpuBudget) -> None:
        if not self.cluster.cpu_budget:
            return
        pipe = self.r.pipeline(transaction=False)
        for tier in self.cluster.tiers():
            pipe.set(self.keys.budget(tier), budget.backbone if tier == "backbone" else budget.encoder,
                     ex=BUDGET_TTL_S)
        pipe.execute()

    def tick(self) -> None:
        """Called from ``tributary up``'s loop; polls at most once per ``poll_s``."""
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + self.poll_s
        self.idle.sample(now)
        try:
            loads = self.read(now)
        except (RedisError, OSError) as exc:
            log.warning("autoscaler: cannot read the queues; no change this poll", extra={"error": type(exc).__name__})
            return
        changed = False
        self.idle_trace.append((round(now - self.t0, 3), self.idle.average()))
        state: dict[str, int] = {}
        for tier, load in loads.items():
            ceiling, why, bound = self.limit(tier)
            decision = self.scalers[tier].observe(load, ceiling)
            self._held_back(tier, decision, ceiling, why, bound)
            self.trace[tier].append(asdict(load))
            groups = self.sup.tier_groups(tier)
            if decision.replicas != len(groups):
                changed = True
                self._resize(tier, groups, decision.replicas, decision.reason)
            replicas = len(self.sup.tier_groups(tier))
            self.history[tier].append((load.t, replicas))
            state[tier], state[f"{tier}:recommended"] = replicas, decision.recommended
        try:
            self._publish_budget(self.budget())
            pipe = self.r.pipeline(transaction=False)
            pipe.hset(self.keys.autoscale(), mapping=state)  # the metrics leader exports it (gateway/metrics.py)
            pipe.expire(self.keys.autoscale(), BUDGET_TTL_S)
            pipe.execute()
        except (RedisError, OSError):
            pass
        if changed or now - self._traced >= TRACE_EVERY_S - self.poll_s:  # polled: the next poll would be late
            self.write_trace()

    def _held_back(self, tier: str, decision, ceiling: int, why: str, bound: str) -> None:
        """Say when the machine holds back a scale-up the demand asks for (and again each ``HELD_LOG_S`` while it
        does, or when another bound holds it), and when it no longer does (for ``HELD_LOG_S``): without it a backlog
        that never gets its replicas looked like the autoscaler ignoring it (an outside tester's autoscaling round)."""
        last, now = self._held.get(tier), time.monotonic()
        if decision.held is None:  # the policy's cooldown: no decision, nothing to say
            return
        if not decision.held:
            # Said once the demand is met or gone for HELD_LOG_S: a demand that flickers with the queue's length
            # between polls said "held back" and "no longer" in pairs (a regression tester's log).
            if last is not None and now - last[0] >= HELD_LOG_S:
                del self._held[tier]
                say(f"{tier}: scale-up no longer held back", of_tier=tier)
            return
        if last is not None and last[1] == bound and now - last[0] < HELD_LOG_S:
            return
        self._held[tier] = (now, bound)
        say(f"{tier}: demand for {decision.held} replica(s) held back at {ceiling}: {why}", logging.WARNING,
            of_tier=tier, wanted=decision.held, ceiling=ceiling, reason=why)

    def _resize(self, tier: str, groups: list, target: int, reason: str) -> None:
        before = len(groups)
        if target > before:
            budget = self._budget_with(tier, target - before)
            for _ in range(target - before):
                # The lowest index no group of the tier (draining ones included) has: names, and with them worker
                # metrics ports, are reused rather than growing without end.
                taken = {g.name for g in self.sup.groups if g.tier == tier}
                index = next(i for i in range(1, 10**6) if self.cluster.replica_name(tier, i) not in taken)
                self.sup.add(self.cluster.replica_group(tier, index, budget))
        else:
            for group in sorted(groups, key=lambda g: g.name, reverse=True)[: before - target]:
                self.sup.retire(group)
        say(f"{tier}: {before} -> {target} replica(s) ({reason})", of_tier=tier, reason=reason,
            **{"from": before, "to": target})

    def _budget_with(self, tier: str, extra: int) -> CpuBudget:
        """The budget once ``extra`` more replicas of ``tier`` run (what a replica about to start should get)."""
        encoders = sum(len(self.sup.tier_groups(t)) for t in self.cluster.tiers() if t.startswith("encoder:"))
        backbone = len(self.sup.tier_groups("backbone"))
        if tier == "backbone":
            backbone += extra
        elif tier:
            encoders += extra
        return CpuBudget.split(self.cores, encoders, max(1, backbone * self.cluster.shards))

    def write_trace(self) -> None:
        self._traced = time.monotonic()
        if not self.trace_path:
            return
        data = {"poll_s": self.poll_s, "t0_unix": self.t0_unix,
                "policies": {t: asdict(p) for t, p in self.policies.items()},
                "tiers": {t: list(v) for t, v in self.trace.items()},
                "replicas": {t: list(v) for t, v in self.history.items()}, "idle_cores": list(self.idle_trace)}
        tmp = Path(self.trace_path + ".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.trace_path)

    def close(self) -> None:
        self.write_trace()
        try:
            self.r.delete(*(self.keys.budget(t) for t in self.cluster.tiers()), self.keys.autoscale())
        except (RedisError, OSError):
            pass


def _per_tier(spec: str, flag: str, kind=int) -> dict[str, float]:
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in ("image", "audio", "backbone"):
            raise ValueError(f"{flag}: expected image=N, audio=N or backbone=N items (got {part!r})")
        try:
            out[name.strip()] = kind(value)
        except ValueError:
            raise ValueError(f"{flag}: {value!r} is not a number") from None
    return out


def policies_from_args(args, cluster: Cluster) -> dict[str, ScalingPolicy]:
    """Each tier's policy from ``tributary up``'s flags; ValueError (the message names the flag) on a bad one. The
    backbone is scaled only when ``--autoscale-max backbone=N`` asks for more than ``--backbone-replicas``."""
    lo = _per_tier(args.autoscale_min, "--autoscale-min")
    hi = _per_tier(args.autoscale_max, "--autoscale-max")
    target = _per_tier(args.scale_target, "--scale-target", float)
    policies = {}
    for tier in cluster.tiers():
        key = tier.split(":", 1)[-1]
        base = cluster.replicas if key == "backbone" else 1
        policy = ScalingPolicy(
            min_replicas=int(lo.get(key, base)), max_replicas=int(hi.get(key, base if key == "backbone" else 4)),
            target_ongoing=target.get(key, 16.0 if key == "backbone" else float(args.encoder_max_batch)),
            target_drain_s=args.scale_drain_s, target_utilization=args.scale_utilization,
            upscale_delay_s=args.scale_up_delay,
            downscale_delay_s=args.scale_down_delay, cooldown_s=args.scale_cooldown)
        if not policy.min_replicas <= base <= policy.max_replicas:
            raise ValueError(f"--autoscale-min/--autoscale-max: {key} starts with {base} replica(s), outside "
                             f"[{policy.min_replicas}, {policy.max_replicas}]")
        if policy.max_replicas > policy.min_replicas or key != "backbone":
            policies[tier] = policy
    return policies

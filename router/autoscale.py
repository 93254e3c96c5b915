"""The scaling policy: from what a tier's queue shows, how many replicas it should have.

Inputs, read from Redis once per poll for each tier (``TierLoad``): the entries in the tier's stream (acked entries are
deleted, so ``XLEN`` is exactly the queued plus the in-flight jobs on any Redis version), how many of them are pending
(delivered to a worker, not yet acked), the live workers, the tier's completed-jobs counter (its measured service
rate) and its busy-seconds counter (the seconds its workers held a batch: preprocessing, encoding or publishing).

The recommendation is the larger of two demands:

* **load**: ``ceil((queued + in_flight) / target_ongoing)``: each replica should carry about ``target_ongoing``
  jobs (Ray Serve's ``target_ongoing_requests``; for an encoder about its batch size);
* **drain**: ``ceil(queued / (rate_per_replica * target_drain_s))``: with the service rate one replica was measured
  at, the queue should empty within ``target_drain_s``. It needs a measured rate; until then only *load* counts.

It is held up by a third, which only ever keeps replicas:

* **busy**: ``min(replicas, ceil(busy_replicas / target_utilization))``, where ``busy_replicas`` is a moving average
  of the busy-seconds counter's growth per second (how many replicas' worth of time the tier spent working). An
  encoder acks a job as soon as it is answered, so a tier that keeps up holds a short queue however much it serves:
  by queue length alone, three replicas each 70% busy can read as demand for one, and a scale-down follows, the
  queue grows, and the tier scales back up (the throughput-blind scale-down). Busy time is what the Kubernetes HPA's CPU
  utilization target measures. It does not scale up on its own: a tier that is fully busy with a short queue meets
  its ``target_ongoing``; a queue that grows is what adds replicas. Tiers without the counter (the backbone, whose
  plans stay in its stream until their last token, so its *load* already counts what it serves) report 0.

Stabilization, as the Kubernetes HPA and KEDA do it (and Ray Serve's ``upscale_delay_s`` / ``downscale_delay_s``):
a scale-up goes to the *smallest* recommendation of the last ``upscale_delay_s`` (the demand must have held that
long), a scale-down to the *largest* of the last ``downscale_delay_s`` (a short lull does not drain a worker that a
moment later would be missed). After any change the tier holds still for ``cooldown_s`` (a new worker needs time to
start and read; its effect must be seen before the next decision), and one decision adds at most ``max_step_up`` and
removes at most ``max_step_down`` replicas. The result stays within ``[min_replicas, max_replicas]`` and below the
``ceiling`` the caller passes (the cores and memory left on the machine).

Scale-from-zero is not supported: ``min_replicas`` is at least 1. A tier with no live worker has its requests
refused at once (``no_live_worker``), so no queue would ever build to wake it.

Pure: no Redis and no clock of its own (times come with the observations), so recorded traces replay exactly in
tests.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ScalingPolicy:
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing: float = 8.0  # queued + in-flight jobs one replica should carry
    target_drain_s: float = 2.0  # the queue should empty within this at the measured service rate
    upscale_delay_s: float = 2.0  # a higher recommendation must hold this long before replicas are added
    downscale_delay_s: float = 30.0  # a lower one must hold this long before a replica is drained
    cooldown_s: float = 5.0  # after any change, no other change for this long
    max_step_up: int = 2  # replicas added by one decision at most
    max_step_down: int = 1  # replicas drained by one decision at most
    rate_halflife_s: float = 10.0  # the measured service rate and busy time are moving averages with this half-life
    target_utilization: float = 0.75  # a replica should be busy at most this fraction of its time (keeps replicas)

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas (got {self.min_replicas}, {self.max_replicas});"
                             " scale-from-zero is not supported")
        if self.target_ongoing <= 0 or self.target_drain_s <= 0 or self.rate_halflife_s <= 0:
            raise ValueError("target_ongoing, target_drain_s and rate_halflife_s must be > 0")
        if not 0 < self.target_utilization <= 1:
            raise ValueError(f"target_utilization must be in (0, 1] (got {self.target_utilization})")
        if min(self.upscale_delay_s, self.downscale_delay_s, self.cooldown_s) < 0:
            raise ValueError("delays and cooldown must be >= 0")
        if self.max_step_up < 1 or self.max_step_down < 1:
            raise ValueError("max_step_up and max_step_down must be >= 1")

    def with_bounds(self, lo: int | None = None, hi: int | None = None) -> ScalingPolicy:
        from dataclasses import replace

        return replace(self, min_replicas=self.min_replicas if lo is None else lo,
                       max_replicas=self.max_replicas if hi is None else hi)


@dataclass(frozen=True)
class TierLoad:
    """One observation of a tier, at ``t`` (seconds, any monotonic origin)."""

    t: float
    entries: int  # XLEN of the tier's stream: queued + in flight
    pending: int  # delivered to a worker and not yet acked (in flight)
    completed: int  # the tier's monotonically increasing count of finished jobs
    live: int  # workers beating in the tier's live set
    busy_s: float = 0.0  # the tier's monotonically increasing seconds its workers held a batch (0: not counted)

    @property
    def queued(self) -> int:
        return max(0, self.entries - self.pending)


@dataclass(frozen=True)
class Decision:
    replicas: int  # what the tier should run now
    recommended: int  # this observation's raw recommendation, before stabilization and bounds
    reason: str  # why it changed (or "" when it did not)
    held: int | None = 0  # replicas it would run had the ``ceiling`` allowed (0: none held back; None: in cooldown,
    # no decision made)


class TierScaler:
    """The policy's state for one tier: recent recommendations, the last change, the measured service rate."""

    def __init__(self, policy: ScalingPolicy, replicas: int):
        self.policy = policy
        self.replicas = max(policy.min_replicas, min(policy.max_replicas, replicas))
        self._recs: collections.deque[tuple[float, int]] = collections.deque()
        self._last_change = -math.inf
        self._last: TierLoad | None = None
        self.rate_per_replica = 0.0  # jobs/s one replica finishes, while busy (moving average)
        self.busy_replicas = 0.0  # replicas' worth of busy time per second (moving average)
        self._busy_samples = 0

    def _measure(self, obs: TierLoad) -> None:
        last, self._last = self._last, obs
        if last is None or obs.t <= last.t:
            return
        done, dt = obs.completed - last.completed, obs.t - last.t
        busy = max(1, min(obs.live, self.replicas))
        w = 0.5 ** (dt / self.policy.rate_halflife_s)
        # Only busy intervals measure capacity: an idle tier finishing nothing says nothing about its speed.
        if done > 0 and (last.entries > 0 or obs.entries > 0):
            sample = done / dt / busy
            self.rate_per_replica = sample if self.rate_per_replica == 0 else (
                w * self.rate_per_replica + (1 - w) * sample)
        # Busy time counts idle intervals too (as 0): it measures how much of the tier's time the work takes. Each
        # live worker is busy at most all of its time; a counter that went back (its hash lost) is no sample.
        worked = obs.busy_s - last.busy_s
        if worked >= 0:
            sample = min(worked / dt, float(max(obs.live, 1)))
            self.busy_replicas = sample if self._busy_samples == 0 else w * self.busy_replicas + (1 - w) * sample
            self._busy_samples += 1

    def recommend(self, obs: TierLoad) -> int:
        p = self.policy
        load = math.ceil(obs.entries / p.target_ongoing)
        drain = math.ceil(obs.queued / (self.rate_per_replica * p.target_drain_s)) if self.rate_per_replica else 0
        busy = min(self.replicas, math.ceil(round(self.busy_replicas / p.target_utilization, 6)))
        return max(load, drain, busy)

    def observe(self, obs: TierLoad, ceiling: int | None = None) -> Decision:
        """Feed one observation; returns the replica count the tier should run now. ``ceiling``: the most replicas
        the machine can hold for this tier right now (cores, memory); scale-downs are never limited by it."""
        p = self.policy
        self._measure(obs)
        rec = self.recommend(obs)
        self._recs.append((obs.t, rec))
        horizon = max(p.upscale_delay_s, p.downscale_delay_s)
        # Keep one entry at or past the horizon: it proves the history covers the whole window.
        while len(self._recs) > 1 and obs.t - self._recs[1][0] >= horizon:
            self._recs.popleft()
        if obs.t - self._last_change < p.cooldown_s:
            return Decision(self.replicas, rec, "", None)
        up = self._stable(obs.t, p.upscale_delay_s, min)
        down = self._stable(obs.t, p.downscale_delay_s, max)
        target, reason, held = self.replicas, "", 0
        if up is not None and up > self.replicas:
            hi = p.max_replicas if ceiling is None else min(p.max_replicas, max(ceiling, self.replicas))
            target = min(up, self.replicas + p.max_step_up, hi)
            wanted = min(up, self.replicas + p.max_step_up, p.max_replicas)
            held = wanted if wanted > target else 0
            reason = (f"{obs.entries} jobs ({obs.queued} queued) for {self.replicas} replica(s) "
                      f"for {p.upscale_delay_s:g} s")
        elif down is not None and down < self.replicas:
            target = max(down, self.replicas - p.max_step_down, p.min_replicas)
            reason = f"demand of at most {down} replica(s) for {p.downscale_delay_s:g} s"
        if target != self.replicas:
            self.replicas, self._last_change = target, obs.t
            return Decision(target, rec, reason, held)
        return Decision(self.replicas, rec, "", held)

    def _stable(self, now: float, window: float, pick) -> int | None:
        """``pick`` (min or max) of the recommendations within the last ``window`` seconds, once the history covers
        the window (None before: a demand seen for less than the delay has not held yet)."""
        if window > 0 and now - self._recs[0][0] < window:
            return None
        recs = [r for t, r in self._recs if now - t <= window]
        return pick(recs) if recs else None

"""The scaling policy (router/autoscale.py) replayed on traces: each observation as the local autoscaler reads it
from Redis (stream length, pending, completed counter, live workers), at its poll interval."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.autoscale import ScalingPolicy, TierLoad, TierScaler

DATA = Path(__file__).parent / "data"
POLICY = ScalingPolicy(min_replicas=1, max_replicas=4, target_ongoing=8, target_drain_s=2, upscale_delay_s=2,
                       downscale_delay_s=10, cooldown_s=3, max_step_up=2, max_step_down=1)


def _burst_trace(step=0.5):
    """Idle 5 s, 40 jobs in the queue for 15 s (3 finished per poll), idle for 40 s."""
    out, done, t = [], 0, 0.0
    while t < 60:
        busy = 5 <= t < 20
        done += 3 if busy else 0
        out.append(TierLoad(t, entries=40 if busy else 0, pending=8 if busy else 0, completed=done, live=1))
        t += step
    return out


def _replay(scaler, trace, ceiling=None):
    return [(obs.t, scaler.observe(obs, ceiling).replicas) for obs in trace]


def _first(series, n):
    return next(t for t, r in series if r == n)


def test_burst_scales_up_after_the_delay_and_back_down_one_by_one():
    series = _replay(TierScaler(POLICY, 1), _burst_trace())
    assert max(r for _, r in series) == 4
    assert _first(series, 3) == 7.0  # the demand held 2 s; one decision adds at most 2
    assert _first(series, 4) == 10.0  # after the 3 s cooldown
    # The burst ends at 20 s: the lower demand must hold 10 s, then one replica per cooldown.
    down = [(t, r) for t, r in series if t >= 20]
    assert [r for t, r in down if t < 30] == [4] * 20
    assert _first(down, 3) == 30.0 and _first(down, 2) == 33.0 and _first(down, 1) == 36.0
    assert series[-1][1] == 1


def test_no_change_within_the_cooldown():
    series = _replay(TierScaler(POLICY, 1), _burst_trace())
    changes = [t for (t, r), (_, prev) in zip(series[1:], series) if r != prev]
    assert all(b - a >= POLICY.cooldown_s for a, b in zip(changes, changes[1:]))


def test_a_flapping_queue_never_scales():
    trace = [TierLoad(i * 0.5, entries=40 if i % 2 else 0, pending=0, completed=0, live=1) for i in range(200)]
    assert {r for _, r in _replay(TierScaler(POLICY, 1), trace)} == {1}


def test_a_short_spike_does_not_scale_up():
    trace = [TierLoad(i * 0.5, entries=40 if 10 <= i < 13 else 0, pending=0, completed=0, live=1) for i in range(60)]
    assert {r for _, r in _replay(TierScaler(POLICY, 1), trace)} == {1}


def test_ceiling_limits_scale_up_but_not_scale_down():
    series = _replay(TierScaler(POLICY, 1), _burst_trace(), ceiling=2)
    assert max(r for _, r in series) == 2
    scaler = TierScaler(POLICY, 4)
    idle = [TierLoad(i * 0.5, 0, 0, 0, 4) for i in range(80)]
    assert _replay(scaler, idle, ceiling=1)[-1][1] == 1


def test_a_decision_says_what_the_ceiling_held_back():
    scaler = TierScaler(POLICY, 1)
    decisions = [scaler.observe(obs, 2) for obs in _burst_trace()]
    assert not any(d.held for d in decisions if d.recommended <= 1)  # no demand past one: nothing held
    held = [d for d in decisions if d.held]
    # First 3 (one step up from 1), then the policy's maximum of 4; the ceiling gave 2 each time.
    assert [d.held for d in held][:2] == [3, 4] and {d.held for d in held} == {3, 4}
    assert {d.replicas for d in held} == {2}
    assert any(d.held is None for d in decisions)  # a cooldown decides nothing, so holds nothing back
    free = TierScaler(POLICY, 1)
    assert not any(free.observe(obs).held for obs in _burst_trace())  # no ceiling: nothing held back


def test_drain_rule_scales_on_a_slow_tier_whose_queue_is_short():
    # Each job takes ~1 s: 6 queued jobs would wait 6 s on one replica; the target is to drain within 2 s.
    policy = ScalingPolicy(target_ongoing=100, target_drain_s=2, upscale_delay_s=1, cooldown_s=0, max_replicas=8,
                           max_step_up=8)
    scaler = TierScaler(policy, 1)
    trace = [TierLoad(t, entries=7, pending=1, completed=t, live=1) for t in range(12)]
    series = _replay(scaler, trace)
    assert scaler.rate_per_replica == pytest.approx(1.0)
    assert series[-1][1] == 3  # ceil(6 queued / (1 job/s * 2 s))


def test_idle_time_does_not_dilute_the_measured_rate():
    scaler = TierScaler(POLICY, 1)
    for t in range(5):
        scaler.observe(TierLoad(t, entries=10, pending=2, completed=4 * t, live=1))
    busy = scaler.rate_per_replica
    for t in range(5, 50):
        scaler.observe(TierLoad(t, entries=0, pending=0, completed=16, live=1))
    assert scaler.rate_per_replica == busy == pytest.approx(4.0)


def _steady(replicas, busy_each, seconds=120, served=30):
    """A tier that keeps up: ``served`` jobs a second, a queue of 3 at each poll (1 queued, 2 in flight), each of
    its ``replicas`` workers busy ``busy_each`` of its time."""
    return [TierLoad(float(t), entries=3, pending=2, completed=served * t, live=replicas,
                     busy_s=replicas * busy_each * t) for t in range(seconds)]


def test_a_busy_tier_that_keeps_up_is_not_scaled_down_by_its_short_queue():
    # Three replicas each 70% busy: their short queue alone is demand for one (the throughput-blind scale-down);
    # the busy time holds all three (2.1 replicas' worth / 0.75 = 2.8).
    series = _replay(TierScaler(POLICY, 3), _steady(3, 0.7))
    assert {r for _, r in series} == {3}
    uncounted = [TierLoad(o.t, o.entries, o.pending, o.completed, o.live) for o in _steady(3, 0.7)]
    assert _replay(TierScaler(POLICY, 3), uncounted)[-1][1] == 1  # without the busy counter: down to one


def test_a_tier_busy_less_than_its_target_still_scales_down_to_what_holds_it():
    # Three replicas each 20% busy: 0.6 replicas' worth is one replica at 60%.
    series = _replay(TierScaler(POLICY, 3), _steady(3, 0.2))
    assert series[-1][1] == 1
    scaler = TierScaler(POLICY, 3)
    _replay(scaler, _steady(3, 0.2))
    assert scaler.busy_replicas == pytest.approx(0.6, rel=0.01)


def test_busy_time_never_scales_up_on_its_own():
    # One replica busy all of its time with a short queue meets its target_ongoing: no scale-up from busy time.
    series = _replay(TierScaler(POLICY, 1), _steady(1, 1.0))
    assert {r for _, r in series} == {1}


def test_busy_time_is_bounded_by_the_live_workers_and_a_lost_counter_is_no_sample():
    scaler = TierScaler(POLICY, 2)
    scaler.observe(TierLoad(0, 3, 2, 0, live=2, busy_s=100.0))
    scaler.observe(TierLoad(1, 3, 2, 10, live=2, busy_s=150.0))  # 50 s in 1 s: two workers are busy 2 s at most
    assert scaler.busy_replicas <= 2
    before = scaler.busy_replicas
    scaler.observe(TierLoad(2, 3, 2, 20, live=2, busy_s=0.0))  # the stats hash was lost: no sample
    assert scaler.busy_replicas == before


@pytest.mark.parametrize("kwargs", [dict(min_replicas=0), dict(min_replicas=3, max_replicas=2),
                                    dict(target_ongoing=0), dict(cooldown_s=-1), dict(max_step_up=0),
                                    dict(target_utilization=0), dict(target_utilization=1.5)])
def test_policy_refuses_bad_settings(kwargs):
    with pytest.raises(ValueError):
        ScalingPolicy(**kwargs)


def test_recorded_trace_from_a_real_burst():
    """Observations the local autoscaler recorded for the image tier while bench/autoscale.py sent its burst (the
    autoscaler's --autoscale-trace file), replayed through the same policy: it scales up during the burst, within
    its bounds, and is back at its minimum after the burst."""
    rec = json.loads((DATA / "autoscale_trace.json").read_text())
    policy = ScalingPolicy(**rec["policies"]["encoder:image"])
    trace = [TierLoad(**o) for o in rec["tiers"]["encoder:image"]]
    series = _replay(TierScaler(policy, policy.min_replicas), trace)
    peak = max(r for _, r in series)
    assert 1 < peak <= policy.max_replicas
    assert series[-1][1] == policy.min_replicas
    busy_until = max(o.t for o in trace if o.entries)
    assert all(r == policy.min_replicas for t, r in series if t < trace[0].t + policy.upscale_delay_s)
    assert _first(series, peak) <= busy_until

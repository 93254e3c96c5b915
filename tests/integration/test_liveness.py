"""router/liveness.py on a real Redis: a heartbeat vouches for the worker's loop, so a loop that stops coming round
stops looking live, and looks live again once it moves."""

from __future__ import annotations

import time

import redis

from cache.keys import Keys
from router.liveness import HEARTBEAT_S, Heartbeat


def score(r, keys: Keys, worker: str) -> float | None:
    return r.zscore(keys.live("backbone"), worker)


def beats_again(r, keys: Keys, worker: str, hb: Heartbeat, first: float | None) -> float | None:
    """Tick the loop until the worker's score moves past ``first`` (or ten beats pass); return the score."""
    deadline = time.monotonic() + 10 * HEARTBEAT_S
    while score(r, keys, worker) == first and time.monotonic() < deadline:
        hb.tick()
        time.sleep(0.1)  # the beating thread runs once per HEARTBEAT_S
    return score(r, keys, worker)


def test_a_stalled_loop_stops_heartbeating_and_resumes_when_it_moves(redis_url):
    r, keys = redis.Redis.from_url(redis_url), Keys("live-test")
    hb = Heartbeat(redis_url, keys, "backbone", "w1", stall_s=0.5).start()
    try:
        first = score(r, keys, "w1")
        assert first is not None  # registered at start
        # No tick: the loop is "stuck". The thread must not refresh the score any more.
        time.sleep(3 * HEARTBEAT_S)
        assert score(r, keys, "w1") == first
        # The loop moves again: within a beat or two the score is fresh.
        assert beats_again(r, keys, "w1", hb, first) > first
    finally:
        hb.stop()
    assert score(r, keys, "w1") is None  # deregistered


def test_a_ticking_loop_keeps_heartbeating(redis_url):
    r, keys = redis.Redis.from_url(redis_url), Keys("live-test-2")
    hb = Heartbeat(redis_url, keys, "backbone", "w2", stall_s=0.5).start()
    try:
        first = score(r, keys, "w2")
        assert beats_again(r, keys, "w2", hb, first) > first
    finally:
        hb.stop()


def test_a_loop_that_ticks_beats_only_while_its_health_check_says_so(redis_url):
    """A pipeline's shard 0 beats for its replica only while every other shard beats (backbone/pipeline.Peers): a
    frozen shard made the replica look live for 70-100 s while it answered nothing (an outside tester's)."""
    r, keys = redis.Redis.from_url(redis_url), Keys("live-test-3")
    healthy = [False]
    hb = Heartbeat(redis_url, keys, "backbone", "w3", stall_s=30, healthy=lambda: healthy[0]).start()
    try:
        first = score(r, keys, "w3")
        end = time.monotonic() + 3 * HEARTBEAT_S
        while time.monotonic() < end:
            hb.tick()
            time.sleep(0.1)
        assert score(r, keys, "w3") == first  # ticking, but not healthy: no beat
        healthy[0] = True
        assert beats_again(r, keys, "w3", hb, first) > first
    finally:
        hb.stop()

"""gateway/dashboard.py's latency window: per-second sums reported in STEP_S buckets over the last WINDOW_S."""

from __future__ import annotations

import pytest

from gateway.dashboard import STEP_S, WINDOW_S, Recent


def test_buckets_hold_mean_max_and_count_and_old_seconds_fall_out():
    r = Recent()
    now = 1_000_000
    r.observe("ttft", 0.1, now - 5)
    r.observe("ttft", 0.3, now - 5)
    r.observe("ttft", 0.2, now - 1)
    r.observe("itl", 0.02, now - 1)
    report = r.report("ttft", now)
    assert len(report) == WINDOW_S // STEP_S and report[-1]["t"] == now
    last = report[-1]
    assert last["n"] == 3 and last["mean_ms"] == pytest.approx(200.0) and last["max_ms"] == pytest.approx(300.0)
    assert all(p["n"] == 0 and "mean_ms" not in p for p in report[:-1])
    assert r.report("itl", now)[-1]["n"] == 1
    r.observe("ttft", 0.5, now + WINDOW_S)  # five minutes on: the old seconds are gone
    assert [s[0] for s in r.series["ttft"]] == [now + WINDOW_S]
    assert sum(p["n"] for p in r.report("ttft", now + WINDOW_S)) == 1


def test_one_bucket_per_step():
    r = Recent()
    now = 2_000_000
    for k in range(WINDOW_S):
        r.observe("itl", 0.01, now - k)
    report = r.report("itl", now)
    assert [p["n"] for p in report] == [STEP_S] * (WINDOW_S // STEP_S)

"""gateway/monitor.py ``admit`` and ``_lag``: the admission decision from the monitor's last view, and how a tier's
backlog is read from XLEN / XINFO GROUPS on Redis 6.2 (no lag field) and 7+."""

from __future__ import annotations

import pytest

from gateway.config import GatewayConfig
from gateway.errors import Overloaded, Unavailable
from gateway.monitor import ClusterView, _lag, admit


def cfg(**kw) -> GatewayConfig:
    return GatewayConfig(model_dir="m", redis_url="redis://x", **{"max_inflight": 4, "max_backlog": 10, **kw})


def view(up=True, backlog=None) -> ClusterView:
    return ClusterView(up=up, reason="ok" if up else "TimeoutError", backlog=backlog or {})


def test_within_bounds_is_admitted():
    admit(view(backlog={"backbone": 10, "encoder:image": 3}), 3, cfg(), ["backbone", "encoder:image"])


def test_redis_away_is_a_503_with_retry_after_and_why():
    with pytest.raises(Unavailable) as exc:
        admit(view(up=False), 0, cfg(), ["backbone"])
    assert exc.value.code == "redis_unavailable" and exc.value.retry_after >= 1
    assert "TimeoutError" in exc.value.message
    assert exc.value.response().headers["retry-after"] == str(exc.value.retry_after)


def test_in_flight_bound_is_server_overloaded():
    with pytest.raises(Overloaded) as exc:
        admit(view(), 4, cfg(), ["backbone"])
    assert exc.value.status == 503 and exc.value.code == "server_overloaded" and exc.value.retry_after >= 1


def test_backlog_bound_names_the_tier_and_only_tiers_the_request_needs_count():
    v = view(backlog={"backbone": 2, "encoder:audio": 11})
    admit(v, 0, cfg(), ["backbone", "encoder:image"])  # a text + image request does not wait on the audio queue
    with pytest.raises(Overloaded, match="encoder:audio queue holds 11"):
        admit(v, 0, cfg(), ["backbone", "encoder:audio"])


def test_lag_from_7_plus_from_6_2_and_when_nothing_exists():
    assert _lag("g", 9, [{"name": b"g", "pending": 3, "lag": 4}]) == 4  # 7+: the server's own lag
    assert _lag("g", 9, [{"name": b"g", "pending": 3}]) == 6  # 6.2: length less pending (acked entries are deleted)
    assert _lag("g", 9, [{"name": b"other", "pending": 1, "lag": 0}]) == 9  # the group is not there yet
    assert _lag("g", Exception("no such key"), Exception("no such key")) == 0


def test_the_second_check_of_an_admitted_request_does_not_count_it_again():
    """Once its media are known a request is checked again for the encoders' backlog; it is itself in flight by
    then, so at max_inflight - 1 others it must still pass (the bound is max_inflight requests, not one fewer)."""
    admit(view(), None, cfg(), ["backbone", "encoder:image"])
    with pytest.raises(Overloaded):
        admit(view(backlog={"encoder:image": 11}), None, cfg(), ["encoder:image"])

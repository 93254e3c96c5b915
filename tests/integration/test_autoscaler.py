"""The local autoscaler's parts against real processes and a real Redis: the supervisor's drain of a retired replica,
the CPU budget re-divided as replicas come and go, and a worker's heartbeat applying a new budget."""
from __future__ import annotations

import os
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import redis

from cache.keys import Keys
from router.liveness import Heartbeat
from tests.integration.procs import wait_handles
from tributary.autoscaler import LocalAutoscaler, policies_from_args
from tributary.cluster import Cluster
from tributary.supervisor import Child, Group, Supervisor

# Exits 0 a moment after SIGTERM, as a worker that finishes its jobs does.
DRAINS = ("import signal, sys, time\n"
          "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(0.3), sys.exit(0)))\n"
          "print('ready', flush=True)\n"
          "while True: time.sleep(0.1)\n")
IGNORES = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(0.1)\n"


def _group(name: str, code: str, tier: str = "encoder:image") -> Group:
    return Group(name, lambda: [Child(name, [sys.executable, "-c", code])], tier=tier)


def _until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_retired_group_drains_and_is_removed_without_counting_a_crash():
    base, extra = _group("encoder:image", DRAINS), _group("encoder:image.1", DRAINS)
    sup = Supervisor([base], max_restarts=0, grace_s=5)
    sup.start()
    try:
        sup.add(extra)
        assert [g.name for g in sup.tier_groups("encoder:image")] == ["encoder:image", "encoder:image.1"]
        for g in (base, extra):  # both children up, their handlers installed
            wait_handles(g.children[0].proc.pid)
        sup.retire(extra)
        assert [g.name for g in sup.tier_groups("encoder:image")] == ["encoder:image"]  # no longer counted
        assert _until(lambda: (sup.tend(), extra not in sup.groups)[1])  # max_restarts=0: a crash would raise
        assert extra.children[0].exited == 0
        assert base.children[0].exited is None and base.crashes == []
    finally:
        sup.stop()


def test_a_replica_that_ignores_sigterm_is_killed_after_the_grace_period():
    stuck = _group("encoder:image.1", IGNORES)
    sup = Supervisor([], max_restarts=0, grace_s=0.5)
    try:
        sup.add(stuck)
        wait_handles(stuck.children[0].proc.pid)  # ignored, not yet the default action
        sup.retire(stuck)
        assert _until(lambda: (sup.tend(), stuck not in sup.groups)[1], timeout=15)
        assert stuck.children[0].exited == -9
    finally:
        sup.stop()


def _args(**kw):
    base = dict(autoscale_min="", autoscale_max="", scale_target="", scale_drain_s=2.0, scale_up_delay=2.0,
                scale_down_delay=30.0, scale_cooldown=10.0, encoder_max_batch=8, scale_utilization=0.75)
    return Namespace(**{**base, **kw})


def test_policies_from_flags():
    cluster = Cluster(Path("/m"), "redis://x", modalities=("image", "audio"))
    pol = policies_from_args(_args(autoscale_max="image=6", scale_target="audio=2"), cluster)
    assert set(pol) == {"encoder:image", "encoder:audio"}  # the backbone is not scaled unless asked
    assert pol["encoder:image"].max_replicas == 6 and pol["encoder:image"].target_ongoing == 8
    assert pol["encoder:audio"].max_replicas == 4 and pol["encoder:audio"].target_ongoing == 2
    pol = policies_from_args(_args(autoscale_max="backbone=3"), cluster)
    assert pol["backbone"].min_replicas == 1 and pol["backbone"].max_replicas == 3
    for bad in (dict(autoscale_max="video=2"), dict(autoscale_max="image=x"), dict(autoscale_min="image=0"),
                dict(autoscale_min="image=5")):
        with pytest.raises(ValueError):
            policies_from_args(_args(**bad), cluster)


def test_budget_is_redivided_as_replicas_come_and_go_and_workers_apply_it(redis_server):
    prefix = "budget-test"
    cluster = Cluster(Path("/m"), redis_server.url, prefix=prefix, modalities=("image", "audio"))
    sup = Supervisor([_group("encoder:image", DRAINS), _group("encoder:audio", DRAINS, "encoder:audio"),
                      _group("backbone", DRAINS, "backbone")])
    scaler = LocalAutoscaler(cluster, sup, policies_from_args(_args(), cluster))
    scaler.cores = 16
    b = scaler.budget()
    assert (b.encoder, b.backbone) == (4, 8)  # 16 // (2 * 1 + 2), the backbone the rest
    sup.groups += [_group("encoder:image.1", DRAINS), _group("encoder:image.2", DRAINS)]
    b = scaler.budget()
    assert (b.encoder, b.backbone) == (2, 8)  # 16 // (2 + 4)
    assert scaler._budget_with("encoder:image", 1).encoder == 2  # 16 // 7
    scaler._publish_budget(b)
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_server.url)
    assert int(r.get(keys.budget("encoder:image"))) == 2 and int(r.get(keys.budget("backbone"))) == 8
    assert 0 < r.ttl(keys.budget("encoder:image")) <= 30

    applied = []
    hb = Heartbeat(redis_server.url, keys, "encoder:image", "w1", on_threads=applied.append).start()
    try:
        hb.tick()
        assert applied == [2]  # read at the first beat, applied at the loop's next tick
        r.set(keys.budget("encoder:image"), 3)
        assert _until(lambda: (hb.tick(), applied == [2, 3])[1], timeout=5)
        hb.tick()
        assert applied == [2, 3]  # applied once per change
    finally:
        hb.stop()
        scaler.close()
    assert r.get(keys.budget("encoder:image")) is None  # gone with the cluster


def test_no_scale_up_without_idle_cores(redis_server):
    """A saturated machine gets no new process: the ceiling is the current count while no core is idle."""
    cluster = Cluster(Path("/m"), redis_server.url, prefix="idle-test", modalities=("image",))
    sup = Supervisor([_group("encoder:image", DRAINS)])
    scaler = LocalAutoscaler(cluster, sup, policies_from_args(_args(), cluster), idle_cores=0.75)
    scaler.cores, scaler.max_procs = 2, 8
    scaler.idle._samples = [(0.0, 0.2)]  # 0.2 of 2 cores idle
    assert scaler.limit("encoder:image")[0] == 1
    assert "0.20 cores idle" in scaler.limit("encoder:image")[1]  # what a held-back scale-up's log line names
    scaler.idle._samples = [(0.0, 1.6)]  # 1.6 idle cores: two more processes of 0.75 each
    assert scaler.limit("encoder:image")[0] == 3
    scaler.idle_per_proc = 0  # the check off: only --autoscale-max-procs (8, none running) bounds it
    assert scaler.limit("encoder:image")[0] == 9
    assert "--autoscale-max-procs 8" in scaler.limit("encoder:image")[1]
    scaler.close()


def test_a_held_back_scale_up_is_said_once_while_it_lasts_and_when_it_ends(redis_server, capsys, monkeypatch):
    from router.autoscale import Decision
    from tributary import autoscaler

    cluster = Cluster(Path("/m"), redis_server.url, prefix="held-test", modalities=("image",))
    scaler = LocalAutoscaler(cluster, Supervisor([_group("encoder:image", DRAINS)]),
                             policies_from_args(_args(), cluster))
    capsys.readouterr()
    held = Decision(replicas=1, recommended=3, reason="", held=3)
    for idle in (0.2, 0.25, 0.3, 0.1, 0.2):  # five polls held back by the same bound (its figure varies): one line
        scaler._held_back("encoder:image", held, 1, f"{idle:.2f} cores idle", "idle-cores")
        scaler._held_back("encoder:image", Decision(1, 1, ""), 1, "", "idle-cores")  # a flicker between polls
    scaler._held_back("encoder:image", held, 1, "900 MiB available", "memory")  # another bound: said again
    scaler._held_back("encoder:image", Decision(2, 3, "up"), 2, "", "memory")  # not held: said only a minute on
    later = time.monotonic() + 61
    monkeypatch.setattr(autoscaler.time, "monotonic", lambda: later)
    scaler._held_back("encoder:image", Decision(2, 2, ""), 2, "", "memory")
    scaler._held_back("encoder:image", Decision(2, 2, ""), 2, "", "memory")
    lines = [x for x in capsys.readouterr().err.splitlines() if "held back" in x]
    assert lines == ["tributary: encoder:image: demand for 3 replica(s) held back at 1: 0.20 cores idle",
                     "tributary: encoder:image: demand for 3 replica(s) held back at 1: 900 MiB available",
                     "tributary: encoder:image: scale-up no longer held back"]
    scaler.close()


def test_idle_cores_are_read_from_proc_stat():
    from tributary.autoscaler import IdleCores

    idle = IdleCores(cores=os.cpu_count() or 1, window_s=5)
    time.sleep(0.3)
    idle.sample(1.0)
    value = idle.average()
    assert value is not None and 0 <= value <= (os.cpu_count() or 1)


def test_every_worker_process_gets_its_own_metrics_port_kept_by_name():
    cluster = Cluster(Path("/m"), "redis://x", modalities=("image",), shards=2, worker_metrics_port=9100)
    groups = {g.name: g for g in cluster.groups()}
    argv = {c.name: c.argv for g in groups.values() for c in g.make()}
    port = {name: a[a.index("--metrics-port") + 1] for name, a in argv.items() if "--metrics-port" in a}
    assert port == {"encoder:image": "9100", "backbone:0": "9101", "backbone:1": "9102"}
    assert "--metrics-port" not in argv["gateway"]  # the gateway's /metrics is on its own port
    assert all("--shard" in argv[f"backbone:{i}"] for i in (0, 1))
    budget = cluster.budget
    again = cluster.replica_group("encoder:image", 1, budget).make()[0].argv
    assert again[again.index("--metrics-port") + 1] == "9103"
    assert cluster.replica_group("encoder:image", 1, budget).make()[0].argv == again  # the same name, the same port
    off = Cluster(Path("/m"), "redis://x", modalities=("image",))
    child = off.replica_group("encoder:image", 0, off.budget).make()[0]
    assert child.argv[child.argv.index("--metrics-port") + 1] == "0"


def test_each_tier_is_read_with_its_finished_jobs_and_busy_seconds(redis_server):
    """The encoders' counters as the policy sees them (the backbone keeps neither: 0s); a value another writer left
    that is not a number reads as 0 rather than stopping the autoscaler."""
    prefix = "read-test"
    cluster = Cluster(Path("/m"), redis_server.url, prefix=prefix, modalities=("image", "audio"))
    sup = Supervisor([])
    scaler = LocalAutoscaler(cluster, sup, policies_from_args(_args(autoscale_max="backbone=2"), cluster))
    keys, r = Keys(prefix), redis.Redis.from_url(redis_server.url)
    r.hset(keys.stats("encoder:image"), mapping={"encoder_calls": 12, "busy_seconds": "3.25"})
    r.hset(keys.stats("encoder:audio"), mapping={"encoder_calls": "x", "busy_seconds": "nan"})
    try:
        loads = scaler.read(time.monotonic())
    finally:
        scaler.close()
    assert (loads["encoder:image"].completed, loads["encoder:image"].busy_s) == (12, 3.25)
    assert (loads["encoder:audio"].completed, loads["encoder:audio"].busy_s) == (0, 0.0)
    assert (loads["backbone"].completed, loads["backbone"].busy_s) == (0, 0.0)


def test_the_trace_is_kept_only_for_its_file_and_bounded(redis_server, tmp_path, monkeypatch):
    """What --autoscale-trace writes grew by a poll's worth forever, with or without the flag (an outside auditor
    measured 180 MB a day): kept only for the file, the last TRACE_KEEP polls."""
    import json

    import tributary.autoscaler as autoscaler

    monkeypatch.setattr(autoscaler, "TRACE_KEEP", 3)
    cluster = Cluster(Path("/m"), redis_server.url, prefix="trace-test", modalities=("image",))
    path = tmp_path / "trace.json"
    traced = LocalAutoscaler(cluster, Supervisor([]), policies_from_args(_args(), cluster), trace_path=str(path))
    untraced = LocalAutoscaler(cluster, Supervisor([]), policies_from_args(_args(), cluster))
    try:
        for _ in range(5):
            for scaler in (traced, untraced):
                scaler._next_poll = 0.0
                scaler.tick()
        traced.write_trace()
        written = json.loads(path.read_text())
        assert len(written["tiers"]["encoder:image"]) == len(written["replicas"]["encoder:image"]) == 3
        assert len(written["idle_cores"]) == 3
        assert not untraced.trace["encoder:image"] and not untraced.history["encoder:image"]
        assert not untraced.idle_trace
    finally:
        traced.close()
        untraced.close()

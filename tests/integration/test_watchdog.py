"""tributary/watchdog.py with the real supervisor, real child processes heartbeating through router/liveness.py,
and a real Redis of its own (SIGSTOPped in one test): a worker whose loop stops coming round is killed and restarted;
while Redis is paused no worker is judged, and one that has never beaten (still loading) is left alone."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from cache.embedded import EmbeddedRedis
from tests.integration.procs import wait_handles
from tributary.supervisor import Child, Group, Supervisor
from tributary.watchdog import Watchdog

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "wd"
TIER = "encoder:image"

# A worker's loop as far as liveness goes: tick for ``tick_s`` seconds (forever if negative), then hang.
WORKER = """
import sys, time
from cache.keys import Keys
from router.liveness import Heartbeat, worker_id
url, tick_s = sys.argv[1], float(sys.argv[2])
hb = Heartbeat(url, Keys("%s"), "%s", worker_id(), stall_s=1.0).start()
end = time.monotonic() + tick_s
while True:
    if tick_s < 0 or time.monotonic() < end:
        hb.tick()
    time.sleep(0.1)
""" % (PREFIX, TIER)

LOADING = "import time\ntime.sleep(600)\n"  # a worker still loading its model: alive, never beating


@pytest.fixture
def server():
    """A dedicated server: one test SIGSTOPs it."""
    with EmbeddedRedis(maxmemory="64mb") as s:
        yield s


def group(name: str, code: str, *args: str) -> Group:
    env = {"PYTHONPATH": str(ROOT)}
    return Group(name, lambda: [Child(name, [sys.executable, "-c", code, *args], env)], tier=TIER)


def run(sup: Supervisor, dog: Watchdog, seconds: float, until=None) -> list[Child]:
    """The cluster loop of tributary/cluster.py for ``seconds`` (or until ``until()``): the children killed."""
    killed, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and until()):
        killed += dog.check(sup.groups)
        sup.tend()
        time.sleep(0.1)
    return killed


def test_a_worker_that_stops_heartbeating_is_killed_and_restarted(server):
    stuck = group("stuck", WORKER, server.url, "1.5")  # ticks 1.5 s, then hangs: beats stop 1 s later
    sup = Supervisor([stuck], max_restarts=5, max_backoff_s=0.5)
    sup.start()
    first = stuck.children[0]
    try:
        # load_s too: the worker killed as stuck is not killed again as one that never came up
        dog = Watchdog(server.url, PREFIX, [TIER], hang_s=2.0, every_s=0.2, load_s=3.0)
        killed = run(sup, dog, 30, until=lambda: stuck.children[0] is not first and stuck.children[0].proc)
        assert killed == [first] and first.exited == -signal.SIGKILL
        assert stuck.children[0] is not first and stuck.children[0].exited is None  # restarted
        assert len(stuck.crashes) == 1  # a stuck worker counts as a crash (a hang loop is a crash loop)
    finally:
        sup.stop()


# WORKER on a host whose clock is off by argv[3] seconds (no NTP, a VM resumed): Redis's is right.
SKEWED = "import sys, time\n_wall = time.time\ntime.time = lambda: _wall() + float(sys.argv[3])\n" + WORKER


def test_a_worker_on_a_host_whose_clock_is_off_is_live_and_never_judged_stuck(server, monkeypatch):
    """Liveness compared each host's own clock: a worker 4.5 s behind looked dead to every gateway (each request a
    503 ``no_live_worker``), and one step of the host's clock killed healthy workers as stuck (an auditor's). Beats
    are on Redis's clock (router/clock.py), and the watchdog judges how long a beat has not moved."""
    import redis

    from cache.keys import Keys
    from router.liveness import live_count_args

    behind = group("behind", SKEWED, server.url, "-1", "-40")
    sup = Supervisor([behind], max_backoff_s=0.5)
    sup.start()
    first = behind.children[0]
    try:
        dog = Watchdog(server.url, PREFIX, [TIER], hang_s=2.0, every_s=0.2)
        assert run(sup, dog, 60, until=lambda: first.proc.pid in dog.beats) == []
        assert run(sup, dog, 4) == [] and first.exited is None
        r = redis.Redis.from_url(server.url)
        assert r.zcount(*live_count_args(Keys(PREFIX), TIER)) == 1  # live, as a gateway counts
        wall = time.time
        monkeypatch.setattr(time, "time", lambda: wall() + 40)  # and now this host's clock steps 40 s ahead
        assert run(sup, dog, 3) == [] and first.exited is None
    finally:
        sup.stop()


def test_no_worker_is_judged_while_redis_is_paused_nor_one_still_loading(server):
    healthy = group("healthy", WORKER, server.url, "-1")
    loading = group("loading", LOADING)
    sup = Supervisor([healthy, loading], max_backoff_s=0.5)
    sup.start()
    pids = [g.children[0].proc.pid for g in (healthy, loading)]
    try:
        dog = Watchdog(server.url, PREFIX, [TIER], hang_s=2.0, every_s=0.2)
        assert run(sup, dog, 60, until=lambda: pids[0] in dog.beats) == []  # the healthy one was seen beating
        assert run(sup, dog, 3) == []
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            assert run(sup, dog, 5) == []  # every beat goes stale; Redis does not answer the watchdog either
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert run(sup, dog, 4) == []  # Redis back: the beats resume before the watchdog judges anyone again
        assert [g.children[0].proc.pid for g in (healthy, loading)] == pids
        assert all(g.children[0].exited is None for g in (healthy, loading))
    finally:
        sup.stop()


def test_no_worker_is_judged_while_redis_refuses_writes(server):
    """A Redis out of memory under noeviction answers reads (the live sets) but refuses the workers' beats: that is
    Redis' fault, not the workers'. Nobody is killed, and the beats resume once it takes writes again."""
    import redis

    healthy = group("healthy", WORKER, server.url, "-1")
    sup = Supervisor([healthy], max_backoff_s=0.5)
    sup.start()
    pid = healthy.children[0].proc.pid
    r = redis.Redis.from_url(server.url)
    try:
        dog = Watchdog(server.url, PREFIX, [TIER], hang_s=2.0, every_s=0.2, load_s=3.0)
        run(sup, dog, 30, until=lambda: pid in dog.beats)
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", "1")  # below what is used: every write is refused with OOM
        try:
            with pytest.raises(redis.ResponseError, match="maxmemory"):
                r.set("probe", 1)
            assert run(sup, dog, 6) == []  # the beats go stale, and so does the watchdog's own write
        finally:
            r.config_set("maxmemory", "64mb")
            r.config_set("maxmemory-policy", "volatile-lru")  # as the fixture started it
        assert run(sup, dog, 4) == []
        assert healthy.children[0].proc.pid == pid and healthy.children[0].exited is None
    finally:
        sup.stop()


def test_a_restarted_worker_stuck_loading_is_killed_after_the_load_timeout_but_not_a_beating_replica(server):
    """A (re)started worker that never comes up (a hung filesystem, a deadlock at import) would leave its tier down
    for good: past ``load_s`` without a beat it is killed and restarted. A pipeline replica is judged as a group: its
    later shards never beat themselves."""
    loading = group("loading", LOADING)
    env = {"PYTHONPATH": str(ROOT)}
    replica = Group("replica", lambda: [Child("replica", [sys.executable, "-c", WORKER, server.url, "-1"], env),
                                        Child("replica.1", [sys.executable, "-c", LOADING], env)], tier=TIER)
    sup = Supervisor([loading, replica], max_restarts=5, max_backoff_s=0.5)
    sup.start()
    first, shards = loading.children[0], list(replica.children)
    try:
        # hang_s above the beat's 1 s period with room (at 1.0 a healthy replica's next beat, due just after 1 s,
        # could be judged late)
        dog = Watchdog(server.url, PREFIX, [TIER], hang_s=2.5, every_s=0.2, load_s=3.0)
        killed = run(sup, dog, 30, until=lambda: loading.children[0] is not first and loading.children[0].proc)
        assert killed == [first] and first.exited == -signal.SIGKILL
        assert loading.children[0].exited is None and len(loading.crashes) == 1
        assert replica.children == shards and all(c.exited is None for c in shards)
    finally:
        sup.stop()


STOPS = """
import signal, sys, time
def term(*_):
    time.sleep(float(sys.argv[3]))
    with open(sys.argv[1], "a") as f:
        f.write(sys.argv[2] + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
while True:
    time.sleep(0.05)
"""


def test_stopping_everything_stops_the_front_first(tmp_path):
    """tributary up's Ctrl-C: the gateway drains while the workers that serve its requests are still there."""
    log = tmp_path / "stopped"
    front = Group("gateway", lambda: [Child("gateway", [sys.executable, "-c", STOPS, str(log), "gateway", "1.0"])],
                  front=True)
    worker = Group("worker", lambda: [Child("worker", [sys.executable, "-c", STOPS, str(log), "worker", "0"])],
                   tier=TIER)
    sup = Supervisor([worker, front], grace_s=10)
    sup.start()
    for child in (front.children[0], worker.children[0]):  # both running their handlers
        wait_handles(child.proc.pid)
    sup.stop()
    assert log.read_text().split() == ["gateway", "worker"]
    assert all(c.exited == 0 for c in sup.children)


DOUBLE_SIGTERM = """import os, signal, time
from router.lifecycle import stop_on_signals
stop = stop_on_signals()
time.sleep(0.3)
os.kill(os.getpid(), signal.SIGTERM)  # the drain begins
stop.wait(5)
os.kill(os.getpid(), signal.SIGTERM)  # a second one ends it
time.sleep(5)
"""


@pytest.mark.parametrize("code", ["import time, sys\ntime.sleep(0.3)\nsys.exit(0)\n", DOUBLE_SIGTERM],
                         ids=["exit-0", "double-sigterm"])
def test_a_worker_that_stops_cleanly_is_restarted_without_counting_as_a_crash(code):
    """An operator draining one worker (SIGTERM, exit 0) must not bring the cluster nearer its crash-loop limit; nor
    one that cuts the drain short with a second SIGTERM (it exited 1, counted a crash: an outside tester's)."""
    clean = Group("clean", lambda: [Child("clean", [sys.executable, "-c", code])], tier=TIER)
    sup = Supervisor([clean], max_restarts=1, max_backoff_s=0.5)
    sup.start()
    starts = set()
    try:
        deadline = time.monotonic() + 20
        while len(starts) < 4 and time.monotonic() < deadline:  # three clean exits: past max_restarts=1
            if clean.children[0].proc is not None:
                starts.add(clean.children[0].proc.pid)
            sup.tend()
            time.sleep(0.05)
        assert len(starts) >= 4 and clean.crashes == []
    finally:
        sup.stop()


def test_crashes_in_a_row_each_soon_after_start_stop_the_cluster_though_the_window_never_fills():
    """A worker that loads longer than the window allows (with the restart backoff) never crashes ``max_restarts``
    + 1 times within the window, so --max-restarts never fired (an outside tester: 8 crashes in 120 s, the cluster
    kept going). Crashes in a row, each before the process had run a window, count too."""
    from tributary.supervisor import CrashLoop

    code = "raise SystemExit(3)\n"  # dies at once, well within the window of its start
    crashing = Group("crashing", lambda: [Child("crashing", [sys.executable, "-c", code])], tier=TIER)
    # The window (1 s) is shorter than the time between two crashes (the 1 s backoff, then the start): it never
    # holds more than one crash.
    sup = Supervisor([crashing], max_restarts=2, window_s=1.0)
    sup.start()
    try:
        deadline = time.monotonic() + 30
        with pytest.raises(CrashLoop, match="crashed 3 times in a row"):
            while time.monotonic() < deadline:
                sup.tend()
                time.sleep(0.05)
    finally:
        sup.stop()


def test_crashes_of_a_worker_that_had_served_are_no_start_up_failures(server):
    """Crashes in a row count toward stopping the cluster only as start-up failures: a process seen serving (here:
    beating) that then dies, again and again, is restarted each time (a gateway a client's requests hung, killed
    by the probe five times, stopped the whole cluster: a previous note). One that never served still stops it
    (the test above)."""
    from tributary.supervisor import CrashLoop

    serves_then_dies = WORKER.replace("while True:", "while time.monotonic() < end + 0.5:") + "raise SystemExit(3)\n"
    worker = group("worker", serves_then_dies, server.url, "0.5")  # dies 1 s into its loop, within the window
    # ...and the window (3 s) never holds three crashes (each is 1 s of backoff and a start apart): only the crashes
    # in a row could stop the cluster.
    sup = Supervisor([worker], max_restarts=2, window_s=3.0)
    dog = Watchdog(server.url, PREFIX, [TIER], hang_s=30, every_s=0.1)
    sup.start()
    try:
        starts = []
        try:
            run(sup, dog, 40, until=lambda: (starts.append(worker.children[0].proc.pid), len(set(starts)) > 4)[1])
        except CrashLoop as exc:
            pytest.fail(f"a worker that had served stopped the cluster: {exc}")
        assert len(set(starts)) > 4 and worker.streak == 0
    finally:
        sup.stop()


def test_a_worker_starting_while_redis_refuses_writes_waits_for_it(server):
    """A worker (re)started into a Redis that refuses writes waits to create its group instead of exiting (a crash
    the supervisor would count, for a fault that is not the worker's); SIGTERM still ends the wait."""
    import threading

    import redis

    from cache.streams import ensure_group_patiently

    r = redis.Redis.from_url(server.url)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", "1")
    stop, result = threading.Event(), []
    try:
        t = threading.Thread(target=lambda: result.append(ensure_group_patiently(r, "s", "g", stop, "test")))
        t.start()
        time.sleep(1.5)
        assert t.is_alive() and not r.exists("s")  # still waiting, not raised
    finally:
        r.config_set("maxmemory", "64mb")
    t.join(10)
    assert result == [True] and r.xinfo_groups("s")[0]["name"] == b"g"
    r.config_set("maxmemory", "1")
    try:
        stopping = threading.Event()
        stopping.set()
        assert ensure_group_patiently(r, "s2", "g", stopping, "test") is False  # stopped: gives up at once
    finally:
        r.config_set("maxmemory", "64mb")

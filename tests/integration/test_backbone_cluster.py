"""The backbone worker on a real Redis Cluster with one primary paused (SIGSTOP: as a hung host or a partition looks
to its clients): what needs that node waits for it, bounded, and nothing else does. The worker loop runs in this
process (as in test_prefetch.py) so that the test can watch its heartbeat; the cluster is three primaries without
replicas, so the paused node is not failed over."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
from redis.crc import REDIS_CLUSTER_HASH_SLOTS as SLOTS
from redis.crc import key_slot

from cache.client import connect
from cache.embedded import EmbeddedCluster
from cache.keys import BACKBONE_GROUP, Keys
from gateway.tiers import Generation
from router import messages as m
from tests.integration.procs import paused
from tests.integration.test_prefetch import TEXT_IDS, Gateway, reference, running, stored_image

PRIMARIES = 3


@pytest.fixture(scope="module")
def cluster():
    with EmbeddedCluster(primaries=PRIMARIES, replicas=0, node_timeout_ms=1000) as c:
        yield c


def node_of(key: str) -> int:
    """The index of the primary serving ``key`` (EmbeddedCluster splits the slots evenly, in order)."""
    return key_slot(key.encode()) * PRIMARIES // SLOTS


@dataclass
class Layout:
    keys: Keys  # a prefix whose worker keys (its queue, heartbeat, stats) avoid the paused node
    paused: int  # the node to pause


def layout(seen: set[str]) -> Layout:
    """A fresh prefix (each test its own queue) whose backbone keys live on two nodes; the third is paused."""
    for i in range(10_000):
        keys = Keys(f"p{i}")
        used = {node_of(keys.gen()), node_of(keys.live("backbone")), node_of(keys.stats("backbone"))}
        if keys.prefix not in seen and len(used) < PRIMARIES:
            seen.add(keys.prefix)
            return Layout(keys, next(n for n in range(PRIMARIES) if n not in used))
    raise AssertionError("no layout")


def layout_alone(key) -> tuple[Layout, int]:
    """A fresh prefix of which ``key(keys)``, alone of the worker's keys (its queue, live set, stats), sits on a node
    of its own: that node, to pause."""
    for _ in range(100):
        lay = layout(PREFIXES)
        worker_keys = [lay.keys.gen(), lay.keys.live("backbone"), lay.keys.stats("backbone")]
        node = node_of(key(lay.keys))
        if all(node_of(k) != node for k in worker_keys if k != key(lay.keys)):
            return lay, node
    raise AssertionError("no layout")


def pick(make, where) -> str:
    return next(k for k in (make(f"x{i}") for i in range(10_000)) if where(node_of(k)))


PREFIXES: set[str] = set()


def warmed(gw: Gateway, rid: str = "warm") -> None:
    """One short request served first: the worker is up and reading, and its clients know the slot map."""
    gw.send(rid, TEXT_IDS, 4)
    gw.until(lambda: gw.finished(rid))


def served_in(gw: Gateway, rid: str, max_tokens: int, timeout: float = 60) -> float:
    """Seconds from sending a text request to its last token."""
    sent = time.monotonic()
    gw.send(rid, TEXT_IDS, max_tokens)
    gw.until(lambda: gw.finished(rid), timeout)
    return time.monotonic() - sent


def test_a_plan_whose_tensors_sit_on_a_node_that_does_not_answer_does_not_hold_the_plans_behind_it(cluster,
                                                                                                      tiny_spec):
    """An image plan whose tensor lives on the paused node waited for that node's socket timeouts first in line,
    and its one prefetch thread held the fetches behind it, so a text-only plan behind it waited too (an outside
    tester's chaos run: admission stalled for 100 s). Its fetch now stalls alone; the text plan is answered at
    once, the image once its node is back."""
    lay = layout(PREFIXES)
    reply = pick(lay.keys.reply, lambda n: n != lay.paused)
    tensor = pick(lambda d: lay.keys.tensor(tiny_spec.encoder_id("image"), d), lambda n: n == lay.paused)
    r = connect(cluster.url)
    rows, ref, image_ids = stored_image(tiny_spec, r, 5, "hung", key=tensor)
    gw = Gateway(r, reply, ["image", "text"], lay.keys)
    with running(cluster.url, tiny_spec, prefix=lay.keys.prefix) as worker:
        warmed(gw, "text")
        with paused(cluster.nodes[lay.paused]):
            gw.send("image", image_ids, 6, [ref])
            # It read the image plan, whose fetch hangs.
            gw.until(lambda: any(plan.request_id == "image" for _, plan in list(worker.waiting)), 30)
            gw.seen["text"] = []
            # One fetch of the image's tensor takes the fetch client's socket timeout (3 s) and its retry; before,
            # it took the step client's three (15 s), and the text plan's fetch waited behind it (20 s in all).
            took = served_in(gw, "text", 40)
            assert took < 15, f"the text plan waited {took:.1f} s behind the image's fetch"
            assert not gw.seen["image"]
        gw.until(lambda: gw.finished("image"))
    assert gw.seen["image"][-1].finish == m.FinishReason.LENGTH, gw.seen["image"][-1]
    assert gw.tokens("image") == reference(tiny_spec, image_ids, [("image", rows)], 6)
    assert gw.tokens("text") == reference(tiny_spec, TEXT_IDS, [], 40)


def test_the_loop_keeps_coming_round_while_a_running_requests_gateway_node_does_not_answer(cluster, tiny_spec):
    """The paused node holds a running request's reply stream, so every step's round trip writes there. One round
    trip held the loop for 15-35 s (redis-py's cluster client retries and refreshes its slot map), so the loop
    stopped coming round and its heartbeat went stale (an outside tester's chaos run). A round trip is now cut at
    ``round_trip_timeout_s`` (lowered here, with ``stall_s``, to keep the test short): the loop holds the request,
    keeps beating, and once the node is back the request goes on with no token lost or repeated."""
    lay = layout(PREFIXES)
    reply = pick(lay.keys.reply, lambda n: n == lay.paused)
    r = connect(cluster.url)
    gw = Gateway(r, reply, ["long"], lay.keys)
    with running(cluster.url, tiny_spec, prefix=lay.keys.prefix, round_trip_timeout_s=1.0, stall_s=4.0) as worker:
        gw.send("long", TEXT_IDS, 400)
        gw.until(lambda: len(gw.tokens("long")) >= 3)
        with paused(cluster.nodes[lay.paused]):
            until, held = time.monotonic() + 12, False
            while time.monotonic() < until:
                assert worker.heartbeat.live(), "the loop stopped coming round"
                held = held or worker.outage_since is not None or held_requests(worker) > 0
                time.sleep(0.1)
            assert held, "nothing was held: the node was not in the round trip"
        gw.until(lambda: gw.finished("long"), 90)
    assert gw.seen["long"][-1].finish == m.FinishReason.LENGTH, gw.seen["long"][-1]
    # Events the cut round trips sent may land too, and the held ones go again: the gateway takes each token by its
    # position (gateway/tiers.Generation), so its client sees each once, in order, none missing.
    gen = Generation(None, None)
    assert all(gen.take(ev) is not None for ev in gw.seen["long"]), "tokens were lost"
    assert gen.tokens == reference(tiny_spec, TEXT_IDS, [], 400)


def held_requests(worker) -> int:
    """How many running requests wait for their gateway's node (read from the test's thread: the loop may be
    changing the dict)."""
    try:
        return sum(run.undelivered_since is not None for run in list(worker.running.values()))
    except RuntimeError:
        return 0


def test_requests_stream_on_while_another_requests_gateway_node_does_not_answer(cluster, tiny_spec):
    """The step's round trip carries every running request's events, to each one's gateway's reply stream. With
    one gateway's node paused, the whole round trip was taken for failed: every request of the backbone was held
    until the node came back (an outside tester's chaos run). Now only the requests whose streams that node holds
    wait (their tokens go once it answers, none lost or repeated); the others stream on."""
    lay = layout(PREFIXES)
    r = connect(cluster.url)
    far = Gateway(r, pick(lay.keys.reply, lambda n: n == lay.paused), ["far"], lay.keys)
    near = Gateway(r, pick(lay.keys.reply, lambda n: n != lay.paused), ["warm", "near"], lay.keys)
    with running(cluster.url, tiny_spec, prefix=lay.keys.prefix) as worker:
        warmed(near)
        far.send("far", TEXT_IDS, 400)
        far.until(lambda: len(far.tokens("far")) >= 3)
        with paused(cluster.nodes[lay.paused]):
            took = served_in(near, "near", 40)
            # The round trip that finds the node away waits for its socket timeout (5 s) once; before, the near
            # request waited for the node to come back.
            assert took < 12, f"the near request took {took:.1f} s"
            assert worker.outage_since is None and held_requests(worker) == 1
        far.until(lambda: far.finished("far"), 90)
    assert near.tokens("near") == reference(tiny_spec, TEXT_IDS, [], 40)
    gen = Generation(None, None)
    assert all(gen.take(ev) is not None for ev in far.seen["far"]), "tokens were lost"
    assert gen.tokens == reference(tiny_spec, TEXT_IDS, [], 400)


def test_a_request_whose_gateways_node_stays_away_is_dropped_after_the_hold(cluster, tiny_spec):
    """Its events are kept for ``outage_hold_s`` (lowered here), then the request is dropped as a whole outage's
    are failed: its KV blocks freed, its plan acked (the plan queue's node answers)."""
    lay = layout(PREFIXES)
    r = connect(cluster.url)
    far = Gateway(r, pick(lay.keys.reply, lambda n: n == lay.paused), ["far"], lay.keys)
    with running(cluster.url, tiny_spec, prefix=lay.keys.prefix, outage_hold_s=2.0) as worker:
        free = worker.engine.pool.free
        far.send("far", TEXT_IDS, 400)
        far.until(lambda: len(far.tokens("far")) >= 3)
        with paused(cluster.nodes[lay.paused]):
            deadline = time.monotonic() + 20
            while worker.running or r.xpending(lay.keys.gen(), BACKBONE_GROUP)["pending"]:
                assert time.monotonic() < deadline, "the request was not dropped"
                time.sleep(0.2)
            assert worker.engine.pool.free == free


def test_a_reclaim_whose_live_set_sits_on_a_node_that_does_not_answer_does_not_hold_the_loop(cluster, tiny_spec):
    """Reclaiming dead workers' plans reads the tier's live set; with its node paused, each reclaim held the loop
    for the fetch client's timeouts and retries (an outside tester's chaos run: the backbone idle 35 s of a 60 s
    outage, in stretches of 9-10 s). The reclaim now runs on its own thread: a plan sent while it hangs is served at
    once, and the failed reclaim is still seen (the reclaim gate starts its clock again)."""
    lay, live = layout_alone(lambda keys: keys.live("backbone"))
    reply = pick(lay.keys.reply, lambda n: n != live)
    r = connect(cluster.url)
    gw = Gateway(r, reply, ["warm", "text"], lay.keys)
    with running(cluster.url, tiny_spec, prefix=lay.keys.prefix) as worker:
        warmed(gw)
        with paused(cluster.nodes[live]):
            forced = time.monotonic()
            worker.gate.healthy_since, worker.gate.last = forced - 100, 0.0  # a reclaim is due: the loop starts it
            time.sleep(0.5)
            took = served_in(gw, "text", 40)
            # Before, the text plan waited in the stream until the reclaim gave up (9-10 s).
            assert took < 4, f"the text plan waited {took:.1f} s behind the reclaim"
            gw.until(lambda: worker.gate.healthy_since > forced, 30)  # the reclaim failed, and the loop saw it
    assert gw.tokens("text") == reference(tiny_spec, TEXT_IDS, [], 40)


def test_requests_stream_on_while_the_node_holding_the_stats_does_not_answer(cluster, tiny_spec):
    """The step's round trip wrote the stats counters (tokens, cancellations) with its events: with their node
    paused, every running request was held (an outside tester's chaos run: no token for the 40 s a shard was
    paused). They are now written on a thread of their own once a second: a request streams on, and the counts
    it made land once the node is back."""
    lay, stats = layout_alone(lambda keys: keys.stats("backbone"))
    reply = pick(lay.keys.reply, lambda n: n != stats)
    r = connect(cluster.url)
    gw = Gateway(r, reply, ["warm", "text"], lay.keys)
    with running(cluster.url, tiny_spec, prefix=lay.keys.prefix) as worker:
        warmed(gw)
        with paused(cluster.nodes[stats]):
            took = served_in(gw, "text", 40)
            # Before, the step's round trip waited for the paused node (cut at 10 s, then held as an outage).
            assert took < 4, f"the request took {took:.1f} s with the stats' node paused"
            assert worker.outage_since is None
        gw.until(lambda: int(r.hget(lay.keys.stats("backbone"), "tokens") or 0) >= 44, 30)
    assert gw.tokens("text") == reference(tiny_spec, TEXT_IDS, [], 40)

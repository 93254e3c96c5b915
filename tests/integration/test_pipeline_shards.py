"""Backbone pipeline shards as real processes linked by torch.distributed (gloo): token for token the same as one
shard holding every layer, with requests batched together, with micro-batches in flight together (the default) or
one step at a time; each shard read only its own tensors."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time

import pytest
import redis

from backbone.engine import load_engine
from backbone.loader import load_shard
from backbone.worker import even_layers
from cache.embedded import free_port
from cache.keys import BACKBONE_GROUP, Keys
from cache.keys import cancel as cancel_key
from cache.streams import fields_payload, payload_fields
from router import messages as m
from tests.integration.procs import hold_lease, paused, start_tier, stop_tier
from tests.integration.test_backbone_worker import events, plan

KEYS = Keys()
PROMPTS = [[1, 20, 21, 22, 203], [1, 30, 31, 203, 1, 288, 87], [1, 40], [1, 50, 51, 52, 53, 54, 55, 56, 57, 203]]


def reference(spec, ids: list[int], n: int) -> list[int]:
    engine = load_engine(spec)
    seq = engine.new_sequence("ref", len(ids), m.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    engine.prefill(seq, ids, [])
    while seq.finish is None:
        engine.step([seq])
    return seq.output


@pytest.fixture(params=[(2, 2), (3, 3), (2, 0)], ids=["2-shards", "3-shards", "2-shards-cpu-default"])
def shards(request, tiny_model, redis_server):
    """(shards, micro-batches: one per shard, or 0: the CPU default, one step at a time), shard 0's process, the
    others."""
    redis.Redis.from_url(redis_server.url).flushall()
    (n, micro), url = request.param, f"tcp://127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(
        [*start_cmd(tiny_model, redis_server.url), "--shard", str(i), "--num-shards", str(n), "--dist-url", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(n - 1, 0, -1)]
    try:
        head = start_tier(["backbone", "--model", str(tiny_model), "--shard", "0", "--num-shards", str(n),
                           "--dist-url", url, "--micro-batches", str(micro)], redis_server.url, "backbone")
        procs.append(head)
        yield n, micro, head, procs[:-1]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def start_cmd(model, redis_url: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "tributary.cli", "backbone", "--model", str(model), "--redis-url", redis_url]


def test_shards_match_one_shard_with_concurrent_requests(shards, tiny_spec, redis_server):
    n, micro, head, others = shards
    r = redis.Redis.from_url(redis_server.url)
    for i, ids in enumerate(PROMPTS):
        hold_lease(r, "reply:pipe")
        r.xadd(KEYS.gen(), payload_fields(m.encode(plan(f"p{i}", "reply:pipe", ids, 8 + i, temperature=0.0))))
    got = events(r, "reply:pipe", {f"p{i}" for i in range(len(PROMPTS))})
    for i, ids in enumerate(PROMPTS):
        tokens = [t for ev in got if ev.request_id == f"p{i}" for t in ev.token_ids]
        assert tokens == reference(tiny_spec, ids, 8 + i), f"request {i} with {n} shards"
    code, out = stop_tier(head)
    assert code == 0
    stopped = [rec for rec in map(json.loads, filter(lambda line: line.startswith("{"), out.splitlines()))
               if rec.get("msg") == "backbone stopped"]
    assert stopped and stopped[0]["steps"] > 0, out[-2000:]
    if micro == 0:
        assert stopped[0]["overlapped_steps"] == 0, "one step at a time (the CPU default), yet steps overlapped"
    else:  # the requests were dealt into n micro-batches whose steps were in flight together
        assert stopped[0]["overlapped_steps"] > 0, "no step was sent while another was in flight"
    for p in others:
        assert p.wait(30) == 0, "a shard did not stop with shard 0"


def test_cancelling_a_request_in_flight_leaves_the_others_exact(shards, tiny_spec, redis_server):
    """With steps in flight across shards, a cancelled request's blocks go back while its last step may still be
    on a later shard: the shards run steps in order, so the requests that take those blocks next are unharmed."""
    n, micro, head, _ = shards
    r = redis.Redis.from_url(redis_server.url)
    hold_lease(r, "reply:cut")
    r.xadd(KEYS.gen(), payload_fields(m.encode(plan("cut", "reply:cut", [1, 20, 21], 1000, temperature=0.0))))
    for i, ids in enumerate(PROMPTS):
        r.xadd(KEYS.gen(), payload_fields(m.encode(plan(f"k{i}", "reply:cut", ids, 40, temperature=0.0))))
    seen: list[m.TokenEvent] = []
    last, deadline = "0-0", time.monotonic() + 60
    while sum(ev.completion_tokens for ev in seen if ev.request_id == "cut") < 5:  # the long one is decoding
        assert time.monotonic() < deadline, "the long request never got going"
        for entry_id, fields in (r.xread({"reply:cut": last}, block=1000) or [[None, []]])[0][1]:
            last = entry_id
            seen.append(m.decode(fields_payload(fields), m.TokenEvent))
    r.set(cancel_key("reply:cut", "cut"), 1, ex=60)
    # Later requests take the cancelled one's blocks while the survivors decode on.
    for i, ids in enumerate(PROMPTS):
        r.xadd(KEYS.gen(), payload_fields(m.encode(plan(f"after{i}", "reply:cut", ids, 12, temperature=0.0))))
    wanted = {"cut"} | {f"k{i}" for i in range(len(PROMPTS))} | {f"after{i}" for i in range(len(PROMPTS))}
    got = events(r, "reply:cut", wanted)  # the whole stream again, from its start
    ends = {ev.request_id: ev for ev in got if ev.finish is not None}
    assert ends["cut"].finish == m.FinishReason.CANCELLED and ends["cut"].completion_tokens < 1000
    for i, ids in enumerate(PROMPTS):
        for rid, count in ((f"k{i}", 40), (f"after{i}", 12)):
            tokens = [t for ev in got if ev.request_id == rid for t in ev.token_ids]
            assert tokens == reference(tiny_spec, ids, count), f"{rid} with {n} shards, micro-batches {micro}"
    assert r.xpending(KEYS.gen(), BACKBONE_GROUP)["pending"] == 0
    code, _ = stop_tier(head)
    assert code == 0


def test_each_shard_reads_only_its_tensors(tiny_spec):
    text = tiny_spec.config["text_config"]
    layers = text["num_hidden_layers"]
    seen = []
    for i in range(3):
        rng = even_layers(layers, 3, i)
        _, names = load_shard(tiny_spec.path, text, rng)
        own = {f"language_model.model.layers.{k}." for k in rng}
        assert all(any(n.startswith(p) for p in own) or not n.startswith("language_model.model.layers.")
                   for n in names)
        assert ("language_model.model.embed_tokens.weight" in names) == (i == 0)
        assert ("language_model.lm_head.weight" in names) == (i == 2)
        assert ("language_model.model.norm.weight" in names) == (i == 2)
        assert not any(n.startswith(("vision_tower", "audio_tower", "multi_modal_projector", "audio_projector"))
                       for n in names)
        seen += names
    assert len(seen) == len(set(seen)), "a tensor was read by two shards"
    whole = load_shard(tiny_spec.path, text)[1]
    assert sorted(seen) == whole


def test_even_layers_cover_every_layer_once():
    for total in (2, 3, 7, 80):
        for shards in range(1, min(total, 5) + 1):
            ranges = [even_layers(total, shards, i) for i in range(shards)]
            assert [k for r in ranges for k in r] == list(range(total))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(ValueError):
        even_layers(2, 3, 0)


@contextlib.contextmanager
def decoding_replica(tiny_model, redis_url: str, reply: str, max_tokens: int, *flags: str):
    """A 2-shard replica (both shards given ``flags``) decoding one greedy request ``long`` (PROMPTS[0]) into the
    stream ``reply``: yields (the Redis client, shard 1, shard 0); both processes are killed on the way out if still
    running."""
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    url = f"tcp://127.0.0.1:{free_port()}"
    last = subprocess.Popen([*start_cmd(tiny_model, redis_url), "--shard", "1", "--num-shards", "2",
                             "--dist-url", url, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    head = None
    try:
        head = start_tier(["backbone", "--model", str(tiny_model), "--shard", "0", "--num-shards", "2",
                           "--dist-url", url, *flags], redis_url, "backbone")
        hold_lease(r, reply)
        r.xadd(KEYS.gen(), payload_fields(m.encode(plan("long", reply, PROMPTS[0], max_tokens, temperature=0.0))))
        seen, cursor, deadline = [], "0-0", time.monotonic() + 60
        while sum(ev.completion_tokens for ev in seen) < 2:  # decoding
            assert time.monotonic() < deadline, "the request never got going"
            for entry_id, fields in (r.xread({reply: cursor}, block=1000) or [[None, []]])[0][1]:
                cursor = entry_id
                seen.append(m.decode(fields_payload(fields), m.TokenEvent))
        yield r, last, head
    finally:
        for p in (last, head):
            if p is not None and p.poll() is None:
                p.kill()


def test_a_later_shard_told_to_stop_drains_its_whole_replica(tiny_spec, tiny_model, redis_server):
    """SIGTERM to a shard other than 0 (its own pod, in Kubernetes): it cannot leave the pipe alone, so shard 0
    drains the replica (the running request finishes) and stops every shard, all exiting 0."""
    with decoding_replica(tiny_model, redis_server.url, "reply:drain", 300) as (r, last, head):
        last.send_signal(signal.SIGTERM)
        assert last.wait(90) == 0 and head.wait(30) == 0
        out, _ = head.communicate()
        assert "a shard asked for a drain" in out, out[-2000:]
        got = events(r, "reply:drain", {"long"})
        assert [t for ev in got for t in ev.token_ids] == reference(tiny_spec, PROMPTS[0], 300)  # finished whole


def test_a_killed_shard_hands_the_replicas_requests_back_and_its_peer_exits_with_one_line(tiny_model, redis_server):
    """kill -9 of shard 1 mid-answer: shard 0 hands the running request back to its gateway (``worker_lost``, so it
    moves to another replica) and exits non-zero with one log line saying what happened and what to do (it exited
    with gloo's multi-line traceback)."""
    with decoding_replica(tiny_model, redis_server.url, "reply:gone", 900) as (r, last, head):
        last.kill()
        assert head.wait(60) != 0
        out, _ = head.communicate()
        assert "the pipeline is broken" in out and "Traceback" not in out, out[-3000:]
        finish = [ev for ev in events(r, "reply:gone", {"long"}) if ev.finish is not None]
        assert finish and finish[-1].code == m.ErrorCode.WORKER_LOST, finish


def test_a_replica_holding_requests_through_a_redis_outage_keeps_its_pipe_alive(tiny_spec, tiny_model, redis_server):
    """Redis away while shard 0 holds a running request: its loop took the outage path, where nothing went down the
    pipe (the no-op was sent only when idle), so shard 1 gave the replica up as broken after --pipeline-timeout and
    both shards exited (an outside reviewer's reading): a Redis outage restarted every multi-shard replica with
    work. The shards now outlive an outage longer than that timeout, and serve once Redis is back."""
    with decoding_replica(tiny_model, redis_server.url, "reply:outage", 2000, "--pipeline-timeout", "15") as (
            r, last, head):
        with paused(redis_server):
            time.sleep(35)
            assert last.poll() is None, f"shard 1 exited with {last.returncode} during the outage"
        hold_lease(r, "reply:after")
        r.xadd(KEYS.gen(), payload_fields(m.encode(plan("after", "reply:after", PROMPTS[1], 8, temperature=0.0))))
        got = events(r, "reply:after", {"after"}, timeout=90)
        assert [t for ev in got for t in ev.token_ids] == reference(tiny_spec, PROMPTS[1], 8)
        assert last.poll() is None and head.poll() is None

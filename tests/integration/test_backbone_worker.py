"""A backbone worker as a real process on a real Redis: token events equal the in-process engine's, cancellation
frees the slot, a later request streams while an earlier one is still generating, SIGTERM drains."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request

import msgspec
import pytest
import redis

from backbone.engine import load_engine
from cache.embedded import free_port
from cache.keys import BACKBONE_GROUP, Keys
from cache.keys import cancel as cancel_key
from cache.streams import fields_payload, payload_fields
from router import messages as m
from tests.integration.procs import hold_lease, start_tier, stop_tier

KEYS = Keys()


@pytest.fixture(scope="module")
def backbone(tiny_model, redis_server):
    # One torch thread: on a loaded 2-core machine two threads per step wait on each other and decoding gets ~5x
    # slower than with one (400 tokens beside two busy loops: 9.1 s vs 1.7 s); the drain test needs a steady pace.
    port = free_port()
    proc = start_tier(["backbone", "--model", str(tiny_model), "--threads", "1", "--metrics-port", str(port)],
                      redis_server.url, "backbone")
    proc.metrics_port = port
    yield proc
    if proc.poll() is None:
        proc.kill()


def plan(rid: str, reply_to: str, ids: list[int], max_tokens: int, **sampling) -> m.PromptPlan:
    return m.PromptPlan(request_id=rid, reply_to=reply_to, token_ids=ids, deadline=time.time() + 60,
                        sampling=m.SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling))


def events(r, stream: str, until_finished: set[str], timeout: float = 60) -> list[m.TokenEvent]:
    out, last, deadline = [], "0-0", time.monotonic() + timeout
    while until_finished and time.monotonic() < deadline:
        for _, entries in r.xread({stream: last}, block=1000) or []:
            for entry_id, fields in entries:
                last = entry_id
                ev = m.decode(fields_payload(fields), m.TokenEvent)
                out.append(ev)
                if ev.finish is not None:
                    until_finished.discard(ev.request_id)
    assert not until_finished, f"no finish event for {until_finished}"
    return out


class Reader:
    """Reads one reply stream incrementally: ``until`` returns the first new event matching a condition (bounded)."""

    def __init__(self, r, stream: str):
        self.r, self.stream, self.last, self.seen = r, stream, "0-0", []

    def until(self, cond, what: str, timeout: float = 60) -> m.TokenEvent:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, entries in self.r.xread({self.stream: self.last}, block=500) or []:
                for entry_id, fields in entries:
                    self.last = entry_id
                    ev = m.decode(fields_payload(fields), m.TokenEvent)
                    self.seen.append(ev)
                    if cond(ev):
                        return ev
        raise AssertionError(f"{what} within {timeout}s; events so far: "
                             f"{[(e.request_id, e.completion_tokens, e.finish) for e in self.seen][-20:]}")

    def drain(self) -> list[m.TokenEvent]:
        """Every event in the stream right now (no waiting)."""
        for _, entries in self.r.xread({self.stream: self.last}) or []:
            for entry_id, fields in entries:
                self.last = entry_id
                self.seen.append(m.decode(fields_payload(fields), m.TokenEvent))
        return self.seen


def test_tokens_equal_the_in_process_engine(backbone, redis_server, tiny_spec):
    r = redis.Redis.from_url(redis_server.url)
    ids = [1, 286, 274, 203, 56, 76, 73, 272, 2, 203, 1, 288, 87, 203]
    hold_lease(r, "reply:bb1")
    r.xadd(KEYS.gen(), payload_fields(m.encode(plan("bb-1", "reply:bb1", ids, 10, temperature=0.0))))
    got = events(r, "reply:bb1", {"bb-1"})
    tokens = [t for ev in got for t in ev.token_ids]
    assert got[-1].finish == m.FinishReason.LENGTH and got[-1].completion_tokens == 10
    assert got[-1].prompt_tokens == len(ids)

    engine = load_engine(tiny_spec)
    seq = engine.new_sequence("x", len(ids), m.SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    engine.prefill(seq, ids, [])
    while seq.finish is None:
        engine.step([seq])
    assert tokens == seq.output
    assert r.xpending(KEYS.gen(), BACKBONE_GROUP)["pending"] == 0


def test_an_undecodable_plan_is_dropped_to_the_dead_letter_stream_and_the_next_one_runs(backbone, redis_server):
    """A plan no version of this worker reads (another version's, a hand-made entry) is acked away, logged, and kept
    in the dead-letter stream for the operator (it was only logged); the worker goes on."""
    r = redis.Redis.from_url(redis_server.url)
    hold_lease(r, "reply:bb-dead")
    before = r.xlen(KEYS.dead_letter()) if r.exists(KEYS.dead_letter()) else 0
    bad = r.xadd(KEYS.gen(), {"m": b"\x01not msgpack"})
    r.xadd(KEYS.gen(), payload_fields(m.encode(plan("bb-after", "reply:bb-dead", [1, 286, 274], 2))))
    last = events(r, "reply:bb-dead", {"bb-after"})[-1]
    assert last.finish == m.FinishReason.LENGTH, last
    dead = r.xrange(KEYS.dead_letter())[before:]
    assert [(f[b"entry"], f[b"m"]) for _, f in dead] == [(bad, b"\x01not msgpack")], dead
    assert dead[0][1][b"reason"].startswith(b"undecodable")


def test_a_plan_naming_a_key_of_another_type_fails_alone_and_the_line_goes_on(backbone, redis_server):
    """A plan whose cancellation key holds another type (WRONGTYPE: another version's layout, a hand-made entry) was
    taken for a Redis outage: it stayed first in line until its deadline, each retry holding the worker half a
    second (an outside auditor's: text requests went from 0.05 s to 0.8 s). It fails alone, at once."""
    r = redis.Redis.from_url(redis_server.url)
    hold_lease(r, "reply:bb-wrongtype")
    r.hset(cancel_key("reply:bb-wrongtype", "bb-wrong"), "not", "a string")
    bad = msgspec.structs.replace(plan("bb-wrong", "reply:bb-wrongtype", [1, 286, 274], 2),
                                  deadline=time.time() + 3600)
    r.xadd(KEYS.gen(), payload_fields(m.encode(bad)))
    r.xadd(KEYS.gen(), payload_fields(m.encode(plan("bb-right", "reply:bb-wrongtype", [1, 286, 274], 2))))
    t0 = time.monotonic()
    got = {ev.request_id: ev for ev in events(r, "reply:bb-wrongtype", {"bb-wrong", "bb-right"}, timeout=30)
           if ev.finish is not None}
    assert got["bb-wrong"].finish == m.FinishReason.ERROR and got["bb-wrong"].code == m.ErrorCode.INTERNAL
    assert "WRONGTYPE" in got["bb-wrong"].error, got["bb-wrong"].error
    assert got["bb-right"].finish == m.FinishReason.LENGTH
    assert time.monotonic() - t0 < 10  # not its hour-long deadline
    assert r.xpending(KEYS.gen(), BACKBONE_GROUP)["pending"] == 0
    r.delete(cancel_key("reply:bb-wrongtype", "bb-wrong"))


def test_a_continuation_whose_generated_tokens_hold_placeholder_ids_goes_on(backbone, redis_server, tiny_spec):
    """A migrated request (gateway/tiers.py) resumes with the tokens generated so far at the end of its prompt. A
    model may sample a media placeholder id: those tokens are text, and the continuation runs; a continuation that
    does not fit fails as the service's fault, never as the client's."""
    r = redis.Redis.from_url(redis_server.url)
    ids = [1, 286, 274, 203, 56, 76, 73, 272, 2, 203]
    generated = [tiny_spec.placeholder_ids["image"], 87, tiny_spec.placeholder_ids["audio"]]
    hold_lease(r, "reply:bbc")
    cont = msgspec.structs.replace(plan("bb-c", "reply:bbc", ids + generated, 4, temperature=0.0),
                                   resumed=len(generated))
    r.xadd(KEYS.gen(), payload_fields(m.encode(cont)))
    got = events(r, "reply:bbc", {"bb-c"})
    assert got[-1].finish == m.FinishReason.LENGTH, got[-1]
    assert (got[-1].prompt_tokens, got[-1].completion_tokens) == (len(ids), len(generated) + 4)
    # The prompt's own placeholder without its encoder rows: refused, as internal for a continuation.
    bad = msgspec.structs.replace(plan("bb-d", "reply:bbc", ids + generated[:1] + [9], 4), resumed=1)
    bad = msgspec.structs.replace(bad, token_ids=[tiny_spec.placeholder_ids["image"], *bad.token_ids])
    r.xadd(KEYS.gen(), payload_fields(m.encode(bad)))
    last = events(r, "reply:bbc", {"bb-d"})[-1]
    assert last.finish == m.FinishReason.ERROR and last.code == m.ErrorCode.INTERNAL, last
    assert "could not continue" in last.error


def test_cancel_frees_the_slot_and_a_later_request_interleaves(backbone, redis_server):
    r = redis.Redis.from_url(redis_server.url)
    cancelled_before = int(r.hget(KEYS.stats("backbone"), "cancelled") or 0)
    reader = Reader(r, "reply:bb2")
    hold_lease(r, "reply:bb2")
    r.xadd(KEYS.gen(), payload_fields(m.encode(plan("long", "reply:bb2", [1, 20, 21], 1000))))
    reader.until(lambda ev: ev.request_id == "long", "the long request never started", timeout=30)
    hold_lease(r, "reply:bb2")
    r.xadd(KEYS.gen(), payload_fields(m.encode(plan("short", "reply:bb2", [1, 5, 6], 3))))
    reader.until(lambda ev: ev.request_id == "short", "the short request never started")
    short_first = len(reader.seen) - 1
    short_done = reader.until(lambda ev: ev.request_id == "short" and ev.finish is not None,
                              "the short request never finished")
    assert short_done.finish == m.FinishReason.LENGTH and short_done.completion_tokens == 3
    long_so_far = [ev for ev in reader.seen if ev.request_id == "long"]
    # When the short one finished, the long one had been streaming and was still running...
    assert all(ev.finish is None for ev in long_so_far), "the short one waited for the long one"
    long_at_short_done = long_so_far[-1].completion_tokens
    assert long_at_short_done < 1000
    # ...it advanced while the short one was generating (one batch, not one request after the other)...
    before = [ev.completion_tokens for ev in reader.seen[:short_first] if ev.request_id == "long"]
    during = [ev.completion_tokens for ev in reader.seen[short_first:] if ev.request_id == "long"]
    assert during and max(during) > max(before), "the long request made no progress while the short one ran"
    # ...and keeps producing new tokens after the short one is gone.
    later = reader.until(lambda ev: ev.request_id == "long" and ev.completion_tokens > long_at_short_done,
                         "the long request stopped producing tokens after the short one finished")
    assert later.finish is None

    r.set(cancel_key("reply:bb2", "long"), 1, ex=60)
    end = reader.until(lambda ev: ev.request_id == "long" and ev.finish is not None, "the long request never ended")
    assert end.finish == m.FinishReason.CANCELLED
    assert later.completion_tokens <= end.completion_tokens < 1000
    deadline = time.monotonic() + 10  # the stats are written once a second, behind the events
    while int(r.hget(KEYS.stats("backbone"), "cancelled") or 0) != cancelled_before + 1:
        assert time.monotonic() < deadline, r.hget(KEYS.stats("backbone"), "cancelled")
        time.sleep(0.1)
    assert r.xpending(KEYS.gen(), BACKBONE_GROUP)["pending"] == 0, "the cancelled plan was not acknowledged"


def scrape(port: int) -> dict[str, float]:
    """The worker's --metrics-port, as {sample name (with its labels, if any): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {s.name + ("{" + ",".join(f'{k}="{v}"' for k, v in s.labels.items()) + "}" if s.labels else ""): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_the_metrics_port_reports_the_running_request_and_its_kv_blocks(backbone, redis_server):
    r = redis.Redis.from_url(redis_server.url)
    reader = Reader(r, "reply:bbm")
    hold_lease(r, "reply:bbm")
    before = scrape(backbone.metrics_port)  # the module's earlier requests' steps are in the totals too
    r.xadd(KEYS.gen(), payload_fields(m.encode(plan("metered", "reply:bbm", [1, 20, 21], 1000))))
    reader.until(lambda ev: ev.request_id == "metered", "the request never started", timeout=30)
    during = scrape(backbone.metrics_port)
    r.set(cancel_key("reply:bbm", "metered"), 1, ex=60)
    reader.until(lambda ev: ev.request_id == "metered" and ev.finish is not None, "the request never ended")
    deadline = time.monotonic() + 10
    while (after := scrape(backbone.metrics_port))["tributary_num_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.1)  # its blocks are released when the round trip that carried its end is applied
    assert during["tributary_num_requests_running"] == 1 and during["tributary_num_requests_waiting"] == 0
    assert 0 < during["tributary_kv_cache_usage_perc"] <= 1
    assert during["tributary_backbone_steps_total"] > 0
    assert after["tributary_num_requests_running"] == 0 and after["tributary_kv_cache_usage_perc"] == 0
    # Its prompt's step ran after ``before`` (a counter that moves). Not ``after > during``: the cancel may be seen
    # before another step launches (a slow machine: that failed in CI).
    assert after["tributary_backbone_steps_total"] >= during["tributary_backbone_steps_total"] \
        > before["tributary_backbone_steps_total"]
    # The step accounting for this request alone: its 3-position prompt, then one decode position per step after
    # its first token.
    def grew(name: str) -> float:
        return after[name] - before[name]

    assert grew('tributary_backbone_positions_total{kind="prompt"}') == 3
    assert grew('tributary_backbone_positions_total{kind="decode"}') >= grew("tributary_backbone_steps_total") - 1
    assert after["tributary_backbone_timed_steps_total"] >= 1 and after["tributary_backbone_step_seconds_total"] > 0
    assert after["tributary_backbone_step_budget_tokens"] >= 1


DRAIN_TOKENS = 400  # the tiny model on one thread decodes ~2.5 ms/token here (1 s), far from done when SIGTERM
# arrives (sent on its first token); beside two busy loops it took 1.7 s, and it must finish inside the worker's 30 s
# drain timeout; prompt 3 + 400 fits the tiny model's 1024-position context


def test_sigterm_drains_running_requests(backbone, redis_server, tiny_spec):
    assert 3 + DRAIN_TOKENS <= tiny_spec.config["text_config"]["max_position_embeddings"]
    r = redis.Redis.from_url(redis_server.url)
    reader = Reader(r, "reply:bb3")
    hold_lease(r, "reply:bb3")
    r.xadd(KEYS.gen(), payload_fields(m.encode(plan("drain", "reply:bb3", [1, 20, 21], DRAIN_TOKENS))))
    reader.until(lambda ev: ev.request_id == "drain" and ev.completion_tokens >= 1, "the request never started",
                 timeout=30)
    backbone.send_signal(signal.SIGTERM)
    # Everything in the stream right after the signal was sent: the request had not finished by then.
    at_signal = reader.drain()
    assert all(ev.finish is None for ev in at_signal), "the request finished before SIGTERM; make it longer"
    tokens_at_signal = max(ev.completion_tokens for ev in at_signal)
    assert tokens_at_signal < DRAIN_TOKENS
    try:
        out, _ = backbone.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        backbone.kill()
        raise AssertionError("the backbone did not exit within 60 s of SIGTERM") from None
    assert backbone.returncode == 0, out[-2000:]

    end = reader.until(lambda ev: ev.request_id == "drain" and ev.finish is not None,
                       "the running request got no finish event", timeout=5)
    after = [ev.completion_tokens for ev in reader.seen if ev.completion_tokens > tokens_at_signal]
    assert after, "no token was generated after SIGTERM"
    assert end.finish == m.FinishReason.LENGTH and end.completion_tokens == DRAIN_TOKENS, (
        f"{end.finish} after {max(after)} tokens ({tokens_at_signal} at SIGTERM): {end.error}")
    logs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    draining = [rec for rec in logs if rec.get("msg") == "draining"]
    assert draining and draining[0]["running"] >= 1, f"no 'draining' log with a running request: {out[-2000:]}"
    finished = [i for i, rec in enumerate(logs) if rec.get("msg") == "finished" and rec.get("request_id") == "drain"]
    assert finished and finished[0] > logs.index(draining[0]), "the request did not finish after draining began"


def test_a_pool_smaller_than_the_load_finishes_every_request(tiny_model, tiny_spec, redis_url):
    """A worker whose KV pool holds 7 blocks of 16 tokens (--kv-cache-gb), a 6-token step budget, and 6 concurrent
    requests that need 3 blocks each at the end: admission waits for blocks, prompts go in chunks, decodes preempt
    the newest sequences when the pool runs out, and every request finishes with its tokens alone (up to a near
    tie, see tests/unit/test_scheduling.py); one whose prompt + max_tokens exceeds the whole pool is refused."""
    from backbone.loader import load_shard
    from tests.unit.test_scheduling import params, reference, same_tokens

    block = 2 * 4 * 16 * 2 * 16 * 4  # layers x slots x kv heads x head dim x fp32, K and V
    proc = start_tier(["backbone", "--model", str(tiny_model), "--threads", "1", "--kv-cache-gb",
                       str(7.5 * block / 2**30), "--max-batched-tokens", "6"], redis_url, "backbone")
    try:
        r = redis.Redis.from_url(redis_url)
        hold_lease(r, "reply:pool")
        prompts = [[1, 20 + i, 21, 22, 203, 40 + i, 41, 7][: 5 + i % 4] for i in range(6)]
        for i, ids in enumerate(prompts):
            r.xadd(KEYS.gen(), payload_fields(m.encode(plan(f"p{i}", "reply:pool", ids, 40 - len(ids),
                                                            temperature=0.0))))
        r.xadd(KEYS.gen(), payload_fields(m.encode(plan("huge", "reply:pool", [1, 2, 3], 200, temperature=0.0))))
        got = events(r, "reply:pool", {f"p{i}" for i in range(6)} | {"huge"}, timeout=120)
        huge = [ev for ev in got if ev.request_id == "huge"]
        assert huge[-1].finish == m.FinishReason.ERROR and "KV blocks" in huge[-1].error
        assert huge[-1].code == m.ErrorCode.BAD_PLAN and huge[-1].limit == "budget"  # the gateway's 400 names it
        model = load_shard(tiny_spec.path, tiny_spec.config["text_config"])[0]
        compared = 0
        for i, ids in enumerate(prompts):
            tokens = [t for ev in got if ev.request_id == f"p{i}" for t in ev.token_ids]
            assert [ev.finish for ev in got if ev.request_id == f"p{i}"][-1] == m.FinishReason.LENGTH
            compared += same_tokens(tokens, *reference(model, tiny_spec, ids, params(40 - len(ids))))
        assert compared >= 100
        code, out = stop_tier(proc)
        assert code == 0 and "preempted" in out  # the pool did run out, and sequences were recomputed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_plan_past_its_deadline_is_refused_while_it_waits_for_kv_blocks(tiny_model, redis_url):
    """A plan waiting at the head of the queue for KV blocks was checked against its deadline only once it could
    start, so one its gateway had given up on held every plan behind it until the blocks were free (an outside
    reviewer's reading). Here a long request holds the pool, and a plan whose deadline passes while it waits is
    refused before the long request finishes."""
    block = 2 * 4 * 16 * 2 * 16 * 4  # layers x slots x kv heads x head dim x fp32, K and V
    proc = start_tier(["backbone", "--model", str(tiny_model), "--threads", "1", "--kv-cache-gb",
                       str(16.5 * block / 2**30)], redis_url, "backbone")
    try:
        r = redis.Redis.from_url(redis_url)
        hold_lease(r, "reply:late")
        hog = plan("hog", "reply:late", [1] + list(range(20, 59)), 200, temperature=0.0)  # 15 of 16 blocks at the end
        late = msgspec.structs.replace(plan("late", "reply:late", [1] + [30 + i % 50 for i in range(219)], 1,
                                            temperature=0.0), deadline=time.time() + 0.3)  # 14 blocks: not yet
        for p in (hog, late):
            r.xadd(KEYS.gen(), payload_fields(m.encode(p)))
        got = events(r, "reply:late", {"hog", "late"})
        order = [ev.request_id for ev in got if ev.finish is not None]
        told, refused = [ev for ev in got if ev.request_id == "late"]
        assert refused.code == m.ErrorCode.DEADLINE and order == ["late", "hog"], order
        # First its gateway was told which worker holds it, not started (no token, no finish): the gateway moves it
        # to another replica should this worker leave the live set (``BackboneWorker._tell_waiting``).
        assert told.worker and not told.token_ids and told.finish is None and told.completion_tokens == 0
        assert stop_tier(proc)[0] == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_overlapped_and_synchronous_round_trips_give_the_same_tokens(tiny_model, redis_url):
    """The default worker sends step N's events (and reads cancellations and plans) while step N+1 computes;
    ``--sync-io`` does it between steps. Same plans, same tokens, both fully acknowledged."""
    r = redis.Redis.from_url(redis_url)
    prompts = [[1, 286, 274, 203, 56], [1, 20, 21, 22, 203, 7], [1, 40, 41]]

    def run(tag: str, flags: list[str]) -> list[list[int]]:
        proc = start_tier(["backbone", "--model", str(tiny_model), "--threads", "1", *flags], redis_url, "backbone")
        try:
            hold_lease(r, f"reply:{tag}")
            for i, ids in enumerate(prompts):
                r.xadd(KEYS.gen(), payload_fields(m.encode(plan(f"{tag}{i}", f"reply:{tag}", ids, 12 + i,
                                                                temperature=0.0))))
            got = events(r, f"reply:{tag}", {f"{tag}{i}" for i in range(len(prompts))})
            assert stop_tier(proc)[0] == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        assert r.xpending(KEYS.gen(), BACKBONE_GROUP)["pending"] == 0
        return [[t for ev in got if ev.request_id == f"{tag}{i}" for t in ev.token_ids] for i in range(len(prompts))]

    overlapped = run("ov", [])
    assert [len(t) for t in overlapped] == [12, 13, 14]
    assert run("sy", ["--sync-io"]) == overlapped


def test_a_lost_group_that_redis_refuses_to_recreate_is_waited_out_as_an_outage(tiny_model):
    """The plan stream deleted (an ``allkeys-*`` eviction, an operator) while Redis refuses writes at ``maxmemory``
    (``noeviction``): the worker's ``XGROUP CREATE`` is refused, and it tried again at once, every read: 9,000
    warnings and two cores busy in 10 s (an outside tester's). It waits and logs as in any outage, and recreates the
    group once Redis takes writes again."""
    from cache.embedded import EmbeddedRedis

    with EmbeddedRedis(maxmemory="64mb") as server:
        r = redis.Redis.from_url(server.url)
        proc = start_tier(["backbone", "--model", str(tiny_model), "--threads", "1"], server.url, "backbone")
        try:
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + 256 * 1024)
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                for i in range(1000):
                    r.set(f"fill:{i}", b"x" * 4096)
            r.delete(Keys().gen())
            time.sleep(4)
            r.config_set("maxmemory", "64mb")
            deadline = time.monotonic() + 20
            while not (r.exists(Keys().gen()) and r.xinfo_groups(Keys().gen())):
                assert time.monotonic() < deadline, "the backbone group was not recreated"
                time.sleep(0.2)
        finally:
            code, out = stop_tier(proc)
    lines = [line for line in out.splitlines() if "group" in line or "redis unavailable" in line]
    assert len(lines) <= 4, f"{len(lines)} lines, the first: {lines[:3]}"
    assert code == 0, out[-2000:]

"""gateway/tiers.py ``TierClient._migrate`` on a real Redis: what a continuation plan holds, what happens to the
orphaned plan and to older attempts, and the ``migration_limit`` (0 turns migration off)."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
import redis

from cache.client import connect_async
from cache.keys import BACKBONE_GROUP, CANCEL_ALL, Keys
from cache.keys import cancel as cancel_key
from cache.streams import ensure_group, fields_payload, payload_fields
from gateway.config import GatewayConfig
from gateway.errors import Unavailable
from gateway.tiers import Generation, TierClient
from router import messages as m

KEYS = Keys()


def original_plan() -> m.PromptPlan:
    return m.PromptPlan(request_id="req-mig", reply_to=KEYS.reply("gw"), token_ids=[1, 7, 9], deadline=time.time(),
                        sampling=m.SamplingParams(max_tokens=10, temperature=0.7, seed=99))


async def scenario(redis_url: str, limit: int, streamed: list[int], moves: int, read: bool = True,
                   cancel_first: bool = False):
    """Queue the plan as a backbone would hold it (``read``: a replica read it, then died), stream ``streamed``
    tokens, then migrate ``moves`` times (``cancel_first``: the client went away just before)."""
    sync = redis.Redis.from_url(redis_url)
    ensure_group(sync, KEYS.gen(), BACKBONE_GROUP)
    r = connect_async(redis_url)
    cfg = GatewayConfig(model_dir="unused", redis_url=redis_url, migration_limit=limit)
    tiers = TierClient(r, cfg, None, None, KEYS.reply("gw"))
    plan = original_plan()
    gen = Generation(plan, asyncio.Queue())
    gen.entry_id = await r.xadd(KEYS.gen(), payload_fields(m.encode(plan)))
    if read:
        sync.xreadgroup(BACKBONE_GROUP, "dead-worker", {KEYS.gen(): ">"})  # the replica that then died
    gen.tokens = list(streamed)
    error = None
    if cancel_first:
        await tiers.cancel(plan.request_id)
    try:
        for _ in range(moves):
            await tiers._migrate(gen, "backbone worker dead-worker left the live set")
    except Unavailable as exc:
        error = exc
    finally:
        await r.aclose()
    return gen, error


def queued_plans(r) -> list[m.PromptPlan]:
    return [m.decode(fields_payload(f), m.PromptPlan) for _, f in r.xrange(KEYS.gen())]


def test_a_continuation_carries_the_streamed_tokens_and_the_rest_of_the_budget(redis_url):
    r = redis.Redis.from_url(redis_url)
    gen, error = asyncio.run(scenario(redis_url, limit=3, streamed=[40, 41, 42, 43], moves=1))
    assert error is None
    cont, = queued_plans(r)  # the orphan was acked and deleted: only the continuation is queued
    assert cont.token_ids == [1, 7, 9, 40, 41, 42, 43] and cont.resumed == 4 and cont.attempt == 1
    assert cont.sampling.max_tokens == 6 and cont.sampling.seed == 99 and cont.sampling.temperature == 0.7
    assert cont.deadline > time.time()
    assert r.xpending(KEYS.gen(), BACKBONE_GROUP)["pending"] == 0
    assert r.get(cancel_key(KEYS.reply("gw"), "req-mig")) == b"1"  # attempt 0, wherever it still runs, stops
    assert gen.attempt == 1 and gen.worker == ""


def test_past_the_limit_the_request_fails_clearly_and_the_plan_is_dead_lettered(redis_url):
    r = redis.Redis.from_url(redis_url)
    gen, error = asyncio.run(scenario(redis_url, limit=1, streamed=[40], moves=2))
    assert isinstance(error, Unavailable) and error.code == "worker_lost" and error.retry_after
    assert "after 1 migration" in error.message
    # The continuation nobody read yet stays queued (unread entries are never deleted) but is cancelled: its reader
    # will drop it.
    assert [p.attempt for p in queued_plans(r)] == [1] and r.xpending(KEYS.gen(), BACKBONE_GROUP)["pending"] == 0
    assert r.get(cancel_key(KEYS.reply("gw"), "req-mig")) == str(CANCEL_ALL).encode()
    (_, dead), = r.xrange(KEYS.dead_letter())
    assert m.decode(dead[b"m"], m.PromptPlan).request_id == "req-mig" and b"left the live set" in dead[b"reason"]


def test_migration_limit_0_turns_migration_off(redis_url):
    r = redis.Redis.from_url(redis_url)
    _, error = asyncio.run(scenario(redis_url, limit=0, streamed=[40, 41], moves=1))
    assert isinstance(error, Unavailable) and error.code == "worker_lost"
    assert queued_plans(r) == []


def test_an_unread_superseded_plan_stays_for_its_reader_to_skip_and_a_cancel_is_never_undone(redis_url):
    """A plan withdrawn before any replica read it is acked but not deleted (deleting unread entries would break the
    group's lag); its attempt is below the cancel key, so the backbone that reads it drops it. A migration racing the
    client's cancellation does not lower the key."""
    r = redis.Redis.from_url(redis_url)
    asyncio.run(scenario(redis_url, limit=3, streamed=[40], moves=1, read=False, cancel_first=True))
    assert [p.attempt for p in queued_plans(r)] == [0, 1]
    assert r.get(cancel_key(KEYS.reply("gw"), "req-mig")) == str(CANCEL_ALL).encode()


def test_lost_after_its_last_token_the_request_is_finished_not_moved(redis_url):
    r = redis.Redis.from_url(redis_url)
    gen, error = asyncio.run(scenario(redis_url, limit=3, streamed=list(range(40, 50)), moves=1))
    assert error is None and gen.done and gen.attempt == 0
    assert queued_plans(r) == []


@pytest.mark.parametrize("bad", [-1])
def test_a_negative_limit_is_refused(bad):
    with pytest.raises(ValueError, match="migration_limit"):
        GatewayConfig(model_dir="m", redis_url="redis://x", migration_limit=bad)


async def silent_worker(redis_url: str, live: set[str], limit: int = 3, duplicate: bool = False
                        ) -> tuple[list, list[m.PromptPlan], Exception | None]:
    """A plan whose worker ("w-stuck") streams 2 tokens, then goes silent while still live (it beats: a hung
    pipeline shard). ``live``: the backbones the monitor sees; ``duplicate``: a second run of the same attempt
    (the plan queued twice) streams on meanwhile, every 0.15 s for 6 s. Returns the tokens yielded, the plans
    queued, and the error the generation ended with."""
    from gateway.monitor import ClusterView

    sync = redis.Redis.from_url(redis_url)
    ensure_group(sync, KEYS.gen(), BACKBONE_GROUP)
    for w in live:
        sync.zadd(KEYS.live("backbone"), {w: time.time() + 60})
    r = connect_async(redis_url)
    cfg = GatewayConfig(model_dir="unused", redis_url=redis_url, token_timeout_s=0.5, migration_limit=limit)
    tiers = TierClient(r, cfg, None, None, KEYS.reply("gw"))
    tiers.view = ClusterView(up=True, live={"backbone": set(live)})
    plan = original_plan()
    queue: asyncio.Queue = asyncio.Queue()
    queue.put_nowait(m.TokenEvent(request_id=plan.request_id, token_ids=[40, 41], prompt_tokens=3,
                                  completion_tokens=2, worker="w-stuck"))
    got, error = [], None

    async def healthy_replica() -> None:  # answers the continuation, once one is queued
        while len(sync.xrange(KEYS.gen())) < 2:
            await asyncio.sleep(0.05)
        queue.put_nowait(m.TokenEvent(request_id=plan.request_id, token_ids=[42], prompt_tokens=3,
                                      completion_tokens=3, attempt=1, worker="w-ok",
                                      finish=m.FinishReason.LENGTH))

    async def second_run() -> None:  # its events are skipped: one worker's tokens only
        for i in range(3, 43):
            await asyncio.sleep(0.15)
            queue.put_nowait(m.TokenEvent(request_id=plan.request_id, token_ids=[40 + i], prompt_tokens=3,
                                          completion_tokens=i, worker="w-dup"))

    helpers = [asyncio.create_task(healthy_replica())] if len(live) > 1 and limit else []
    helpers += [asyncio.create_task(second_run())] if duplicate else []
    try:
        async for ev in tiers.generate(plan, queue):
            got.append(ev.token_ids)
    except Exception as exc:  # noqa: BLE001
        error = exc
    finally:
        for helper in helpers:
            helper.cancel()
        await r.aclose()
    return got, queued_plans(sync), error


def test_a_worker_silent_mid_answer_but_still_beating_loses_the_request_to_another_replica(redis_url):
    got, plans, error = asyncio.run(silent_worker(redis_url, {"w-stuck", "w-ok"}))
    assert error is None and got == [[40, 41], [42]]
    cont = plans[-1]
    assert cont.attempt == 1 and cont.token_ids[-2:] == [40, 41] and cont.resumed == 2
    # The stuck attempt is cancelled.
    assert redis.Redis.from_url(redis_url).get(cancel_key(KEYS.reply("gw"), "req-mig")) == b"1"


@pytest.mark.parametrize("live,limit", [({"w-stuck"}, 3), ({"w-stuck", "w-ok"}, 0)], ids=["alone", "no-migration"])
def test_a_silent_worker_alone_or_without_migration_times_out_as_before(redis_url, live, limit):
    from gateway.errors import Timeout

    got, plans, error = asyncio.run(silent_worker(redis_url, live, limit))
    assert got == [[40, 41]] and isinstance(error, Timeout) and len(plans) == 1
    assert error.code == "token_timeout"  # a 504 says which wait ran out (its code was null)


def test_events_the_request_skips_do_not_restart_its_token_timeout(redis_url):
    """The --token-timeout ran from the last message, skipped ones included: a silent worker's request waited as
    long as a second run of its plan kept streaming (12.5 s for a 1 s timeout, in a reviewer's test)."""
    from gateway.errors import Timeout

    start = time.monotonic()
    got, _, error = asyncio.run(silent_worker(redis_url, {"w-stuck"}, duplicate=True))
    took = time.monotonic() - start
    assert got == [[40, 41]] and isinstance(error, Timeout) and took < 3, took  # 0.5 s, not the 6 s run


def test_a_plan_a_worker_said_it_holds_moves_as_soon_as_that_worker_leaves(redis_url):
    """A backbone tells a plan's gateway as it reads it (an event with no token): should it die before starting it,
    the gateway moves the request at once, as it does one that had begun, instead of waiting for a replacement to
    reclaim it (first token 13-14 s after the kill in an outside tester's run, against 7 s for the others)."""
    from gateway.monitor import ClusterView

    async def run():
        sync = redis.Redis.from_url(redis_url)
        ensure_group(sync, KEYS.gen(), BACKBONE_GROUP)
        sync.zadd(KEYS.live("backbone"), {"w-ok": time.time() + 60})
        r = connect_async(redis_url)
        tiers = TierClient(r, GatewayConfig(model_dir="unused", redis_url=redis_url), None, None, KEYS.reply("gw"))
        tiers.view = ClusterView(up=True, live={"backbone": {"w-held", "w-ok"}})
        plan = original_plan()
        queue: asyncio.Queue = asyncio.Queue()
        queue.put_nowait(m.TokenEvent(request_id=plan.request_id, token_ids=[], prompt_tokens=3, completion_tokens=0,
                                      worker="w-held"))  # read, not started

        async def monitor_then_replica() -> None:
            await asyncio.sleep(0.3)
            tiers.check_workers({"w-ok"})  # w-held left the live set
            while len(sync.xrange(KEYS.gen())) < 2:
                await asyncio.sleep(0.05)
            queue.put_nowait(m.TokenEvent(request_id=plan.request_id, token_ids=[42], prompt_tokens=3,
                                          completion_tokens=1, attempt=1, worker="w-ok",
                                          finish=m.FinishReason.LENGTH))

        helper = asyncio.create_task(monitor_then_replica())
        got = []
        try:
            async for ev in tiers.generate(plan, queue):
                got.append(ev.token_ids)
        finally:
            helper.cancel()
            await r.aclose()
        return got, queued_plans(sync)

    got, plans = asyncio.run(run())
    assert got == [[42]] and plans[-1].attempt == 1 and plans[-1].resumed == 0


def test_a_request_that_arrived_while_a_backbone_was_live_is_queued_though_none_is_live_now(redis_url):
    """A request's media took 18 s to encode while the backbone restarted: its plan met an empty live set and got a
    503 ``no_live_worker``, its work thrown away (an outside tester's). A request that arrived while a backbone was
    live is queued (its first-token timeout bounds it); one that arrived with none live for a while is refused at
    once, as before."""
    from gateway.monitor import ClusterView

    async def run():
        sync = redis.Redis.from_url(redis_url)
        ensure_group(sync, KEYS.gen(), BACKBONE_GROUP)
        r = connect_async(redis_url)
        tiers = TierClient(r, GatewayConfig(model_dir="unused", redis_url=redis_url), None, None, KEYS.reply("gw"))
        now = time.monotonic()
        tiers.view = ClusterView(up=True, live={"backbone": set()}, read_at=now, since=now - 60,
                                 seen_live={"backbone": now - 20})  # the last live backbone was seen 20 s ago
        queued = len(sync.xrange(KEYS.gen()))
        try:
            await tiers._submit(original_plan(), started=now - 25)  # it arrived before: queued
            assert len(sync.xrange(KEYS.gen())) == queued + 1
            for started in (now - 5, None):  # arrived with none live (or not said): refused at once
                with pytest.raises(Unavailable) as info:
                    await tiers._submit(original_plan(), started=started)
                assert info.value.code == "no_live_worker"
            # Before its media are encoded (their work would be thrown away), by the same rule: no Redis call.
            tiers.require_backbone(now - 25)
            with pytest.raises(Unavailable) as info:
                tiers.require_backbone(now - 5)
            assert info.value.code == "no_live_worker"
            tiers.view.live["backbone"] = {"w-back"}  # one is live again
            tiers.require_backbone(now - 5)
        finally:
            await r.aclose()

    asyncio.run(run())


def test_a_continuation_asks_no_more_than_the_budget_a_backbone_lowered_it_to(redis_url, tiny_spec):
    """A backbone whose KV pool holds less than the context lowers a default budget to fit, and its events say so;
    a continuation asked for the gateway's whole default, which a replica that does not lower budgets (an older
    version, mid-upgrade) refused: the request failed mid-stream (an outside tester's rolling upgrade)."""
    from backbone.engine import load_engine
    from backbone.worker import Running

    engine = load_engine(tiny_spec, num_blocks=1)  # 16 tokens
    plan = m.PromptPlan(request_id="req-mig", reply_to=KEYS.reply("gw"), token_ids=[1, 7, 9], deadline=time.time(),
                        sampling=m.SamplingParams(max_tokens=10, default_budget=True))
    seq = engine.new_sequence("req-mig", 3, plan.sampling)
    told = Running(seq, plan, b"0-1").event("w", [])
    named = Running(seq, msgspec.structs.replace(plan, sampling=m.SamplingParams(max_tokens=5)), b"0-1").event("w", [])
    assert (seq.max_tokens, told.budget, named.budget) == (10, None, None)  # 3 + 10 fits 16: not lowered
    plan = msgspec.structs.replace(plan, sampling=msgspec.structs.replace(plan.sampling, max_tokens=100))
    seq = engine.new_sequence("req-mig", 3, plan.sampling)
    assert Running(seq, plan, b"0-1").event("w", []).budget == 13  # 100 asked by default, 13 fit

    r = redis.Redis.from_url(redis_url)
    ensure_group(r, KEYS.gen(), BACKBONE_GROUP)

    async def migrate() -> None:
        a = connect_async(redis_url)
        tiers = TierClient(a, GatewayConfig(model_dir="unused", redis_url=redis_url), None, None, KEYS.reply("gw"))
        gen = Generation(original_plan(), asyncio.Queue())
        gen.budget, gen.tokens = 7, [40, 41, 42, 43]  # 10 asked, 7 fit, 4 streamed
        await tiers._migrate(gen, "test")
        await a.aclose()

    asyncio.run(migrate())
    cont, = queued_plans(r)
    assert cont.sampling.max_tokens == 3 and cont.resumed == 4


def test_a_cancellation_redis_failed_to_take_is_posted_again_once_it_answers(redis_url, monkeypatch):
    """A request answered 503 while Redis was paused left its queued plan to run for nobody once Redis came back:
    its one cancellation had failed (an outside tester's). It is posted again until Redis takes it."""
    from gateway import tiers as tiers_module

    monkeypatch.setattr(tiers_module, "ROUND_TRIP_S", 0.3)
    sync = redis.Redis.from_url(redis_url)
    key = cancel_key(KEYS.reply("gw"), "req-paused")

    async def cancel_while_paused() -> float:
        r = connect_async(redis_url)
        tiers = TierClient(r, GatewayConfig(model_dir="unused", redis_url=redis_url), None, None, KEYS.reply("gw"))
        sync.execute_command("CLIENT", "PAUSE", 1500, "WRITE")  # writes wait: the first tries time out
        start = time.monotonic()
        try:
            await asyncio.wait_for(tiers.cancel("req-paused"), 30)
        finally:
            await r.aclose()
        return time.monotonic() - start

    took = asyncio.run(cancel_while_paused())
    assert sync.get(key) is not None and took >= 1.0, took  # taken after the pause, by a later try


def test_plans_lost_unread_with_their_stream_are_queued_again(tiny_model, tiny_spec, redis_url):
    """The plan stream deleted with unread plans in it (``allkeys-*`` eviction, an operator's DEL) while the backbone
    was paused: it recreated its group on resuming, and its 6 requests waited out their first-token timeout, 120 s,
    for plans nobody would read (an outside tester's). Each request waiting on a plan no worker said it holds finds
    its entry gone at two looks in a row and queues it again. A real backbone, paused (SIGSTOP) as in that run; this
    test is the gateway (its TierClient and reply reader, a prefix of its own), with a 6 s first-token timeout."""
    import os
    import signal

    from cache.keys import alive
    from gateway.app import stop_tasks
    from gateway.errors import Timeout
    from gateway.replies import ReplyRouter
    from tests.integration.procs import start_tier, stop_tier

    keys = Keys("lostgen")
    backbone = start_tier(["backbone", "--model", str(tiny_model), "--threads", "1", "--prefix", keys.prefix],
                          redis_url, "backbone", keys=keys)

    async def run() -> tuple[dict, list[bytes]]:
        r = connect_async(redis_url)
        reply = keys.reply("gw")
        await r.set(alive(reply), 1, ex=600)  # the backbone writes only to a live gateway's stream
        replies = ReplyRouter(r, keys, "gw")
        reader = asyncio.create_task(replies.run())
        cfg = GatewayConfig(model_dir=str(tiny_model), redis_url=redis_url, prefix=keys.prefix,
                            first_token_timeout_s=6)
        tiers = TierClient(r, cfg, tiny_spec, replies, reply)

        async def request(i: int) -> tuple[list[int], str] | Exception:
            plan = m.PromptPlan(request_id=f"req-lost-{i}", reply_to=reply, token_ids=[1, 7, 9 + i],
                                deadline=time.time() + 60,
                                sampling=m.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
            tokens, finish = [], None
            try:
                async for ev in tiers.generate(plan, replies.subscribe(plan.request_id)):
                    tokens += ev.token_ids
                    finish = ev.finish
            except Timeout as exc:
                return exc
            return tokens, finish

        os.kill(backbone.pid, signal.SIGSTOP)
        try:
            tasks = [asyncio.create_task(request(i)) for i in range(3)]
            while await r.xlen(keys.gen()) < 3:
                await asyncio.sleep(0.05)
            await r.delete(keys.gen())  # the 3 plans, unread
        finally:
            os.kill(backbone.pid, signal.SIGCONT)
        try:
            results = await asyncio.wait_for(asyncio.gather(*tasks), 20)
            return dict(enumerate(results)), [f[b"m"] for _, f in await r.xrange(keys.gen())]
        finally:
            await stop_tasks([reader], timeout_s=5)
            await r.aclose()

    try:
        results, left = asyncio.run(run())
    finally:
        stop_tier(backbone)
    for i, result in results.items():  # a request that waited out its first-token timeout is a Timeout here
        assert not isinstance(result, Exception), f"request {i}: {result!r}"
        tokens, finish = result
        assert len(tokens) == 3 and finish == m.FinishReason.LENGTH, result
    assert left == []  # the plans queued again were run and acked


def test_requeues_for_redis_losing_the_request_do_not_count_toward_the_migration_limit(redis_url):
    """Each time Redis may have lost the gateway's work (its lease found gone: RESET) every request in flight is
    queued again. Those moves were counted as lost backbones: a lease evicted five times in 40 s failed long streams
    with ``worker_lost`` (an outside tester's). Only lost backbones count."""
    from gateway.monitor import ClusterView
    from gateway.tiers import RESET

    sync = redis.Redis.from_url(redis_url)
    sync.delete(KEYS.gen())
    ensure_group(sync, KEYS.gen(), BACKBONE_GROUP)
    sync.zadd(KEYS.live("backbone"), {"w-ok": time.time() + 60})

    async def go() -> tuple[list, Exception | None]:
        r = connect_async(redis_url)
        tiers = TierClient(r, GatewayConfig(model_dir="unused", redis_url=redis_url, migration_limit=1), None, None,
                           KEYS.reply("gw"))
        tiers.view = ClusterView(up=True, live={"backbone": {"w-ok"}})
        queue: asyncio.Queue = asyncio.Queue()
        queue.put_nowait(m.TokenEvent(request_id="req-mig", token_ids=[40], prompt_tokens=3, completion_tokens=1,
                                      worker="w-ok"))
        for _ in range(3):
            queue.put_nowait(RESET)
        queue.put_nowait(m.TokenEvent(request_id="req-mig", token_ids=[41], prompt_tokens=3, completion_tokens=2,
                                      attempt=3, worker="w-ok", finish=m.FinishReason.LENGTH))
        got, error = [], None
        try:
            async for ev in tiers.generate(original_plan(), queue):
                got.append(ev.token_ids)
        except Exception as exc:  # noqa: BLE001
            error = exc
        finally:
            await r.aclose()
        return got, error

    got, error = asyncio.run(go())
    assert error is None and got == [[40], [41]], error
    assert [p.attempt for p in queued_plans(sync)][-1] == 3

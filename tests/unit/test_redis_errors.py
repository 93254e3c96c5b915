"""A Redis call that fails while a request runs is a 503 ``redis_unavailable`` wherever it fails: before the first
token (the REST route's answer), mid-stream (the SSE error event; an outside tester saw a generic "internal error"
there when a migration's requeue hit a Redis out of memory), and for the Realtime caller of ``respond``.

The service is built bare (``ChatService.__new__``) around a tier whose generation yields a token event, then
raises what redis-py raises: this tests the gateway's mapping, not Redis (the integration tests run the real one)."""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cache.keys import Keys
from gateway.chat import ChatService
from gateway.errors import Unavailable, redis_failure, redis_unavailable
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import RateLimiter
from gateway.schemas import parse_chat_request
from router import messages as m

FAILURES = [RedisConnectionError("Connection refused"), RedisTimeoutError("Timeout reading from socket"),
            OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
            ResponseError("OOM command not allowed when used memory > 'maxmemory'. script: ...")]  # a script's


def inside_redis() -> Exception:
    """An error raised inside redis-py's own code (as a connection another task's retry closed once gave)."""
    from redis.crc import key_slot

    try:
        key_slot(None)
    except AttributeError as exc:
        return exc
    raise AssertionError("redis-py accepted None as a key")


def beneath_redis() -> Exception:
    """An error raised in code that redis-py called, below its own frames: uvloop's transport refusing a write on a
    connection another task closed (an outside tester's chaos run once got a 500 from it). The key's ``find``
    stands in for uvloop's write: redis-py calls it, and it raises in a frame that is not redis-py's."""
    from redis.crc import key_slot

    class ClosedTransport(bytes):
        def find(self, *args):
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

    try:
        key_slot(ClosedTransport(b"trib:gen"))
    except RuntimeError as exc:
        return exc
    raise AssertionError("the stand-in transport did not raise")


def test_failures_of_the_redis_path_are_told_from_the_gateways_own_bugs():
    from redis.exceptions import SlotNotCoveredError

    assert all(map(redis_failure, FAILURES)) and redis_failure(SlotNotCoveredError("no node for slot 7"))
    assert redis_failure(inside_redis())
    assert redis_failure(beneath_redis())
    try:
        raise AttributeError("the gateway's own")
    except AttributeError as ours:
        assert not redis_failure(ours)


def test_every_redis_failure_is_a_503_and_out_of_memory_says_so():
    for exc in FAILURES:
        err = redis_unavailable(exc)
        assert isinstance(err, Unavailable) and err.status == 503 and err.code == "redis_unavailable"
        assert ("out of memory" in err.message) == (exc in FAILURES[2:])
        assert err.body()["error"]["type"] == "service_unavailable"


class FailingTiers:
    """Generation that gives one token, then fails as Redis does under it."""

    def __init__(self, exc: Exception):
        self.exc, self.cancelled = exc, []

    async def generate(self, plan, queue, encode_again, started=None):
        if getattr(self.exc, "code", None) != "no_live_worker":  # that one is raised before the plan is queued
            yield m.TokenEvent(request_id=plan.request_id, token_ids=[5], prompt_tokens=3, completion_tokens=1)
        raise self.exc

    async def cancel(self, rid):
        self.cancelled.append(rid)


def service(tokenizer, tiers) -> ChatService:
    svc = ChatService.__new__(ChatService)
    svc.builder = SimpleNamespace(tokenizer=tokenizer)
    svc.spec = SimpleNamespace(name="tiny", system_fingerprint_with=lambda dtype: "fp_0")
    svc.metrics, svc.tiers, svc._tasks = GatewayMetrics(), tiers, set()
    svc.limiter = RateLimiter(None, Keys("t"))
    return svc


def plan(rid: str) -> m.PromptPlan:
    return m.PromptPlan(request_id=rid, reply_to="r", token_ids=[1, 2, 3], media=[],
                        sampling=m.SamplingParams(max_tokens=8), deadline=0.0)


def cluster_failure():
    from redis.exceptions import SlotNotCoveredError

    return SlotNotCoveredError("no node for slot 7")


@pytest.mark.parametrize("exc", [*FAILURES, cluster_failure(), inside_redis()],
                         ids=["refused", "timeout", "oom", "script-oom", "cluster", "inside-redis-py"])
def test_a_redis_failure_mid_stream_ends_the_stream_with_a_503_event(tiny_spec, exc):
    tiers = FailingTiers(exc)
    svc = service(tiny_spec.load_tokenizer(), tiers)
    req = parse_chat_request(json.dumps({"model": "tiny", "stream": True,
                                         "messages": [{"role": "user", "content": "hi"}]}).encode())

    async def run() -> list[bytes]:
        deltas = svc._deltas("rid1", req, plan("rid1"), None, None)
        first = await anext(deltas)
        out = [chunk async for chunk in svc._sse("rid1", req, first, deltas)]
        await asyncio.gather(*svc._tasks)
        return out

    chunks = asyncio.run(run())
    assert chunks[-1] == b"data: [DONE]\n\n"
    error = json.loads(chunks[-2].removeprefix(b"data: "))["error"]
    assert error["code"] == "redis_unavailable" and error["type"] == "service_unavailable", error
    assert ("out of memory" in error["message"]) == (exc in FAILURES[2:])
    assert tiers.cancelled == ["rid1"]  # the backbone slot is freed as for any failed answer


def test_a_request_refused_before_its_plan_was_queued_posts_no_cancellation(tiny_spec):
    """``no_live_worker`` comes before anything is queued: a cancellation for it only left a key for ten minutes
    (an outside tester's count of them)."""
    tiers = FailingTiers(Unavailable("no live backbone worker", code="no_live_worker"))
    svc = service(tiny_spec.load_tokenizer(), tiers)
    req = parse_chat_request(json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}).encode())

    async def run() -> None:
        with pytest.raises(Unavailable):
            await anext(svc._deltas("rid2", req, plan("rid2"), None, None))
        await asyncio.gather(*svc._tasks)

    asyncio.run(run())
    assert tiers.cancelled == []


def test_a_failed_background_task_of_a_request_is_logged(tiny_spec, caplog):
    """A cancel posted after the answer that fails with something else than Redis (a bug) is one error line naming
    it; it was only dropped."""
    class BrokenCancel(FailingTiers):
        async def cancel(self, rid):
            raise KeyError(rid)

    svc = service(tiny_spec.load_tokenizer(), BrokenCancel(Unavailable("gone", code="worker_lost")))

    async def run() -> None:
        svc._spawn(svc.tiers.cancel("rid3"))
        await asyncio.gather(*svc._tasks, return_exceptions=True)
        await asyncio.sleep(0)  # the done callbacks

    with caplog.at_level(logging.ERROR, logger="gateway.chat"):
        asyncio.run(run())
    said = [r for r in caplog.records if r.getMessage() == "a request's background task failed"]
    assert len(said) == 1 and "KeyError" in said[0].error and "cancel" in said[0].task
    assert not svc._tasks


def test_a_redis_failure_reaches_the_realtime_caller_as_a_503(tiny_spec):
    """``respond`` (the Realtime session's path): a RedisError while preparing becomes the same 503."""
    svc = service(tiny_spec.load_tokenizer(), FailingTiers(RedisConnectionError("gone")))
    svc.closing, svc.inflight = False, 0
    svc.admit = lambda *a, **k: None

    async def prepare(body, tenant, namespace=None):
        raise RedisConnectionError("Connection refused")

    svc._prepare = prepare

    async def run():
        svc._closed = asyncio.Event()  # the graceful period's end (never, here)
        async for _ in svc.respond("rid2", b"{}", asyncio.Event(), via="realtime"):
            pass

    with pytest.raises(Unavailable) as caught:
        asyncio.run(run())
    assert caught.value.code == "redis_unavailable" and svc.inflight == 0

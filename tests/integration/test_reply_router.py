"""gateway/replies.py's reader against a real Redis: one entry it cannot deliver must not end the process's only
reply reader (every request would then wait out its timeout while /health said ok)."""

from __future__ import annotations

import asyncio

from cache.client import connect_async
from cache.keys import Keys
from cache.streams import payload_fields
from gateway.replies import ReplyRouter
from router import messages as m

KEYS = Keys("trib")


def event(rid: str) -> m.TokenEvent:
    return m.TokenEvent(request_id=rid, token_ids=[7], prompt_tokens=3, completion_tokens=1)


def test_an_entry_that_cannot_be_delivered_is_dropped_and_the_reader_goes_on(redis_url):
    async def scenario() -> m.TokenEvent:
        r = connect_async(redis_url)
        router = ReplyRouter(r, KEYS, "gw-test")
        stuck = router.queues["stuck"] = asyncio.Queue(maxsize=1)  # a queue that refuses: put_nowait raises
        stuck.put_nowait(None)
        fine = router.subscribe("fine")
        for rid in ("stuck", "fine"):
            await r.xadd(router.stream, payload_fields(m.encode(event(rid))))
        reader = asyncio.create_task(router.run())
        try:
            return await asyncio.wait_for(fine.get(), 10)
        finally:
            assert not reader.done(), "the reader ended"
            reader.cancel()
            await r.aclose()

    got = asyncio.run(scenario())
    assert got.request_id == "fine" and got.token_ids == [7]


def test_a_cancelled_error_raised_inside_the_client_does_not_end_the_reader(redis_url):
    """redis-py's cluster client could raise a CancelledError into a command that nobody cancelled (it ended a
    refresh other commands waited on): the reader took it for its own stop and ended, and every request of that
    gateway timed out after (an outside tester's chaos run). Only a cancel of the reader's own task stops it."""
    async def scenario() -> m.TokenEvent:
        r = connect_async(redis_url)
        router = ReplyRouter(r, KEYS, "gw-cancelled")
        real_xread, raised = r.xread, []

        async def xread(*args, **kwargs):
            if not raised:
                raised.append(True)
                raise asyncio.CancelledError()
            return await real_xread(*args, **kwargs)

        r.xread = xread
        fine = router.subscribe("fine")
        await r.xadd(router.stream, payload_fields(m.encode(event("fine"))))
        reader = asyncio.create_task(router.run())
        try:
            return await asyncio.wait_for(fine.get(), 10)
        finally:
            assert raised and not reader.done(), "the reader ended"
            reader.cancel()
            await r.aclose()

    got = asyncio.run(scenario())
    assert got.request_id == "fine"

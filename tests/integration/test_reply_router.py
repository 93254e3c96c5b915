"""gateway/replies.py's reader against a real Redis: one entry it cannot deliver must not end the process's only
reply reader (every request would then wait out its timeout while /health said ok)."""

from __future__ import annotations

import asyncio

from cache.client import connect_async
from cache.keys import Keys
from cache.streams import payload_fields
from gateway.app import stop_tasks
from gateway.replies import ReplyRouter
from router import messages as m

KEYS = Keys("trib")


def event(rid: str) -> m.TokenEvent:
    return m.TokenEvent(request_id=rid, token_ids=[7], prompt_tokens=3, completion_tokens=1)


async def stop(reader: asyncio.Task) -> None:
    """The gateway's own bounded stop (a cancel redis-py swallows is sent again), so no test hangs in its end."""
    await stop_tasks([reader], timeout_s=5)
    assert reader.done(), "the reader did not stop"


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
            await stop(reader)
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
            await stop(reader)
            await r.aclose()

    got = asyncio.run(scenario())
    assert got.request_id == "fine"


def test_a_cancel_the_client_swallows_still_stops_the_reader(redis_url):
    """redis-py, cancelled while it connects, can carry on with the command (or turn the cancel into a
    ConnectionError): the reader, cancelled once, looped on for good (a test hung 600 s in asyncio.run's end). The
    task's own pending cancel stops it at its next round."""
    async def scenario() -> bool:
        r = connect_async(redis_url)
        router = ReplyRouter(r, KEYS, "gw-swallowed", block_ms=50)
        real_xread, swallowed = r.xread, []

        async def xread(*args, **kwargs):
            try:
                return await real_xread(*args, **kwargs)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(True)
                return []  # what a client that carries on does: the cancel is gone

        r.xread = xread
        reader = asyncio.create_task(router.run())
        await asyncio.sleep(0.2)
        reader.cancel()  # once, as asyncio.run's end and a plain shutdown do
        await asyncio.wait([reader], timeout=3)
        stopped = reader.done()
        if not stopped:
            await stop(reader)  # clean up all the same; the assertion below says what happened
        await r.aclose()
        return stopped

    assert asyncio.run(scenario()), "the reader went on after its cancel"

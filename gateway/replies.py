"""The gateway process's one reader of its reply stream, demultiplexing messages to the requests waiting on them.

Encoders and the backbone XADD to ``<prefix>:reply:<gateway_id>``; this task XREADs it, hands each message to the
queue of its request, and trims the stream up to what it has consumed (MINID), so a slow reader loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time

from cache.keys import Keys
from cache.streams import fields_payload
from router import messages as m

log = logging.getLogger(__name__)

TRIM_EVERY_S = 0.5  # consumed entries are trimmed at most this often, and whenever the stream goes quiet


class ReplyRouter:
    def __init__(self, redis, keys: Keys, gateway_id: str, block_ms: int = 1000):
        self.r, self.stream, self.block_ms = redis, keys.reply(gateway_id), block_ms
        self.queues: dict[str, asyncio.Queue] = {}  # request id -> its queue (token events)
        self.watchers: dict[str, set[asyncio.Queue]] = {}  # tensor key -> queues of requests waiting on it
        self.last_id = b"0-0"
        self.trimmed_id = b"0-0"
        self.trimmed_at = 0.0
        self.failing = False

    def subscribe(self, request_id: str) -> asyncio.Queue:
        """The queue that receives this request's token events (and whatever it watches)."""
        q = self.queues[request_id] = asyncio.Queue()
        return q

    def unsubscribe(self, request_id: str) -> None:
        self.queues.pop(request_id, None)

    def watch(self, tensor_key: str, queue: asyncio.Queue) -> None:
        """Also deliver encode results for ``tensor_key`` to ``queue`` (several requests may wait on one key)."""
        self.watchers.setdefault(tensor_key, set()).add(queue)

    def unwatch(self, tensor_key: str, queue: asyncio.Queue) -> None:
        queues = self.watchers.get(tensor_key)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self.watchers[tensor_key]

    async def run(self) -> None:
        me = asyncio.current_task()
        while True:
            if me.cancelling():  # a cancel of this task that the Redis client swallowed (it may carry on, or turn
                raise asyncio.CancelledError()  # it into a ConnectionError): stop all the same, not loop on for good
            try:
                reply = await self.r.xread({self.stream: self.last_id}, count=512, block=self.block_ms)
            except asyncio.CancelledError as exc:
                if me.cancelling():
                    raise  # this reader is being stopped
                # Raised inside the Redis client, not a cancel of this task (one ended every request of a gateway
                # for good in an outside tester's chaos run): a failed read like any other.
                await self._read_failed(f"CancelledError inside the Redis client: {exc}")
                continue
            except Exception as exc:  # Redis away: keep the loop alive (logged once per outage)
                await self._read_failed(f"{type(exc).__name__}: {exc}")
                continue
            if self.failing:
                log.warning("reply stream readable again")
                self.failing = False
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    self.last_id = entry_id
                    try:
                        self._dispatch(fields)
                    except Exception:  # a bug with one entry: this process's only reader must go on for the rest
                        log.exception("reply could not be dispatched; dropped", extra={"entry_id": entry_id})
            now = time.monotonic()
            if self.last_id != self.trimmed_id and (now - self.trimmed_at >= TRIM_EVERY_S or not reply):
                # Not after every read: a trim per read doubled the Redis commands per streamed token.
                try:
                    await self.r.xtrim(self.stream, minid=self.last_id, approximate=False)
                except Exception:  # noqa: BLE001 -- Redis away: trimmed next time
                    continue
                self.trimmed_id, self.trimmed_at = self.last_id, now

    async def _read_failed(self, error: str) -> None:
        if not self.failing:
            log.error("reply stream read failed; retrying", extra={"error": error})
        self.failing = True
        await asyncio.sleep(0.5)

    def _dispatch(self, fields: dict) -> None:
        try:
            msg = m.decode(fields_payload(fields), m.ReplyMessage)
        except (m.WireError, KeyError) as exc:
            log.error("undecodable reply dropped", extra={"error": str(exc)})
            return
        if isinstance(msg, m.TokenEvent):
            targets = [q] if (q := self.queues.get(msg.request_id)) is not None else []
        else:  # encode results go to every request of this process waiting on that tensor
            targets = list(self.watchers.get(msg.tensor_key, ()))
        if not targets:  # the request already ended (timeout, client gone): nothing waits for it
            log.debug("reply nobody waits for", extra={"request_id": msg.request_id})
        for q in targets:
            q.put_nowait(msg)

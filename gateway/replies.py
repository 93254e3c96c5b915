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
        self.queues: dict[str, asyncio.Queue] = {}
        self.last_id = b"0-0"
        self.trimmed_id = b"0-0"
        self.trimmed_at = 0.0

    def subscribe(self, request_id: str) -> asyncio.Queue:
        q = self.queues[request_id] = asyncio.Queue()
        return q

    def unsubscribe(self, request_id: str) -> None:
        self.queues.pop(request_id, None)

    async def run(self) -> None:
        while True:
            try:
                reply = await self.r.xread({self.stream: self.last_id}, count=512, block=self.block_ms)
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis away: the retry policy backs off inside; keep the loop alive
                log.exception("reply stream read failed")
                await asyncio.sleep(0.5)
                continue
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    self.last_id = entry_id
                    self._dispatch(fields)
            now = time.monotonic()
            if self.last_id != self.trimmed_id and (now - self.trimmed_at >= TRIM_EVERY_S or not reply):
                # Not after every read: a trim per read doubled the Redis commands per streamed token.
                await self.r.xtrim(self.stream, minid=self.last_id, approximate=False)
                self.trimmed_id, self.trimmed_at = self.last_id, now

    def _dispatch(self, fields: dict) -> None:
        try:
            msg = m.decode(fields_payload(fields), m.ReplyMessage)
        except (m.WireError, KeyError) as exc:
            log.error("undecodable reply dropped", extra={"error": str(exc)})
            return
        q = self.queues.get(msg.request_id)
        if q is None:  # the request already ended (timeout, client gone): nothing waits for it
            log.debug("reply for a finished request", extra={"request_id": msg.request_id})
            return
        q.put_nowait(msg)

"""The gateway's side of the backbone protocol: dispatch the prompt plan and yield its token events, each wait
bounded; post cancellations. (Media goes through gateway/encoding.py.)

Before queueing it counts the backbone's live workers (router.liveness) so that a request nobody would serve gets a
503 at once rather than a timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from redis.exceptions import RedisError

from cache.keys import Keys
from cache.streams import payload_fields
from gateway.config import GatewayConfig
from gateway.errors import Timeout, Unavailable
from gateway.replies import ReplyRouter
from models.spec import ModelSpec
from router import messages as m
from router.liveness import live_count_args

log = logging.getLogger(__name__)

DISCONNECTED = object()  # put on a request's queue when its client goes away


class ClientGone(Exception):
    """The client disconnected; its generation is cancelled."""


class TierClient:
    def __init__(self, redis, cfg: GatewayConfig, spec: ModelSpec, replies: ReplyRouter, reply_stream: str):
        self.r, self.cfg, self.spec, self.replies = redis, cfg, spec, replies
        self.keys = Keys(cfg.prefix)
        self.reply_stream = reply_stream

    async def live_workers(self, tiers: list[str]) -> dict[str, int]:
        pipe = self.r.pipeline(transaction=False)
        for tier in tiers:
            pipe.zcount(*live_count_args(self.keys, tier))
        return dict(zip(tiers, await pipe.execute()))

    async def generate(self, plan: m.PromptPlan, queue: asyncio.Queue) -> AsyncIterator[m.TokenEvent]:
        """Dispatch the plan and yield its token events until one carries a finish reason."""
        if not (await self.live_workers(["backbone"]))["backbone"]:
            raise Unavailable("no live backbone worker", code="no_live_worker")
        await self.r.xadd(self.keys.gen(), payload_fields(m.encode(plan)))
        timeout, what = self.cfg.first_token_timeout_s, "waiting for the first token"
        while True:
            msg = await self._next(queue, timeout, what)
            if not isinstance(msg, m.TokenEvent):
                continue
            timeout, what = self.cfg.token_timeout_s, "waiting for the next token"
            yield msg
            if msg.finish is not None:
                return

    async def cancel(self, request_id: str) -> None:
        try:
            await self.r.set(self.keys.cancel(request_id), 1, ex=self.cfg.cancel_ttl_s)
        except RedisError:
            log.warning("could not post a cancellation", extra={"request_id": request_id}, exc_info=True)

    @staticmethod
    async def _next(queue: asyncio.Queue, timeout: float, what: str):
        try:
            msg = await asyncio.wait_for(queue.get(), timeout=max(timeout, 0.0))
        except asyncio.TimeoutError:
            raise Timeout(f"timed out {what}") from None
        if msg is DISCONNECTED:
            raise ClientGone()
        return msg

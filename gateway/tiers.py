"""The gateway's side of the tier protocol: get every media part encoded (cache first), dispatch the prompt plan,
and yield the backbone's token events, each wait bounded.

Before queueing to a tier it counts that tier's live workers (router.liveness) so that a request nobody would serve
gets a 503 at once rather than a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

from redis.exceptions import RedisError

from cache.keys import Keys
from cache.streams import payload_fields
from gateway.config import GatewayConfig
from gateway.errors import InvalidRequest, Timeout, Unavailable
from gateway.media import MediaPart
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

    async def encode(self, request_id: str, parts: list[MediaPart], queue: asyncio.Queue) -> list[m.MediaRef]:
        """A MediaRef for every part, in order: cache hits at once (TTL refreshed), misses through the encoders."""
        if not parts:
            return []
        keys = [self.keys.tensor(self.spec.encoder_id(p.modality), p.digest) for p in parts]
        tiers = sorted({f"encoder:{p.modality}" for p in parts})
        pipe = self.r.pipeline(transaction=False)
        for key in keys:
            pipe.hget(key, "n")
            pipe.expire(key, self.cfg.tensor_ttl_s)
        for tier in tiers:
            pipe.zcount(*live_count_args(self.keys, tier))
        res = await pipe.execute()
        counts: list[int | None] = [int(n) if n is not None else None for n in res[0 : 2 * len(keys) : 2]]
        live = dict(zip(tiers, res[2 * len(keys) :]))
        misses = {i for i, n in enumerate(counts) if n is None}
        for i in misses:
            if not live[f"encoder:{parts[i].modality}"]:
                raise Unavailable(f"no live {parts[i].modality} encoder worker", code="no_live_worker")
        if misses:
            await self._submit(request_id, parts, keys, misses, queue, counts)
        return [m.MediaRef(modality=m.Modality(p.modality), tensor_key=k, num_tokens=n)
                for p, k, n in zip(parts, keys, counts)]

    async def _submit(self, request_id, parts, keys, misses, queue, counts) -> None:
        deadline = time.time() + self.cfg.encode_timeout_s
        jobs: dict[str, int] = {}
        pipe = self.r.pipeline(transaction=False)
        for i in sorted(misses):
            part, job_id = parts[i], uuid.uuid4().hex
            jobs[job_id] = i
            blob_key = self.keys.blob(part.digest)
            pipe.set(blob_key, part.data, ex=self.cfg.blob_ttl_s)
            job = m.EncodeJob(request_id=request_id, job_id=job_id, modality=m.Modality(part.modality),
                              encoder_id=self.spec.encoder_id(part.modality), digest=part.digest,
                              blob_key=blob_key, reply_to=self.reply_stream, deadline=deadline)
            pipe.xadd(self.keys.jobs(part.modality), payload_fields(m.encode(job)))
        await pipe.execute()
        while jobs:
            msg = await self._next(queue, deadline - time.time(), "waiting for the encoders")
            if not isinstance(msg, (m.EncodeDone, m.EncodeFailed)) or msg.job_id not in jobs:
                continue
            i = jobs.pop(msg.job_id)
            if isinstance(msg, m.EncodeFailed):
                if msg.code == m.ErrorCode.BAD_MEDIA:
                    raise InvalidRequest(f"{parts[i].modality} could not be decoded: {msg.error}",
                                         param=parts[i].param, code="invalid_media")
                raise Unavailable(f"{parts[i].modality} encoding failed: {msg.error}", param=parts[i].param)
            counts[i] = msg.num_tokens

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

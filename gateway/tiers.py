"""The gateway's side of the backbone protocol: dispatch the prompt plan and yield its token events, each wait
bounded; migrate the request when its backbone dies; post cancellations. (Media goes through gateway/encoding.py.)

Before queueing it counts the backbone's live workers (router.liveness) so that a request nobody would serve gets a
503 at once rather than a timeout.

Migration (as NVIDIA Dynamo's frontend does): the gateway keeps every token it has received for a request. When the
replica running it is lost (the monitor sees its worker leave the live set, another replica reclaims its plan and
says ``worker_lost``, a worker hands it back on shutdown, or Redis lost the gateway's work), the gateway queues a
continuation plan: the prompt followed by those tokens, the ``max_tokens`` left, the sampler resuming at that draw
(backbone/sampling.py), ``attempt`` one higher. It acks and deletes the orphaned plan and marks older attempts
cancelled (``cancel:<request>`` holds the lowest attempt wanted). Events of older attempts are ignored, and tokens
are taken by position (each event says how many tokens the request has in all), so the client sees no token twice
and none missing. ``migration_limit`` bounds the moves; past it the plan goes to the dead-letter stream and the
request fails with a 503 ``worker_lost``.

A plan no worker has said it holds is looked for in ``gen`` at each look (``GONE_LOOK_S``): an entry leaves the stream
only as a worker acks it, after the event that says it holds it, so one gone twice in a row with no such event was
lost unread (the stream deleted or evicted) and is queued again, as a migration.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec

from cache.keys import BACKBONE_GROUP, CANCEL_ALL, Keys
from cache.keys import cancel as cancel_key
from cache.streams import ack_delete_if_pending, payload_fields, run_script
from gateway.config import GatewayConfig
from gateway.errors import APIError, Internal, Timeout, Unavailable, redis_failure, redis_too_slow
from gateway.replies import ReplyRouter
from models.spec import ModelSpec
from router import clock
from router import messages as m
from router.liveness import HEARTBEAT_S, LIVE_WINDOW_S, live_count_args

log = logging.getLogger(__name__)

DISCONNECTED = object()  # put on a request's queue when its client goes away
_RAISE_CANCEL = """
-- KEYS: cancel key. ARGV: attempt, ttl. Set the lowest attempt still wanted, never lowering it.
if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '-1') then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
return 0
"""
# One of a request's own round trips (its submission, a migration, a cancellation) is bounded as a whole, not only by
# the client's socket timeout (10 s) and redis-py's retries: a Redis Cluster node that does not answer costs 10-20 s a
# call, and several calls in a row made one request wait 85 s for its 503 (an outside tester's chaos run).
ROUND_TRIP_S = 10.0
GONE_LOOK_S = 1.0  # a request no worker has looks this often whether its tier has one at all (TierClient.gone)
# and whether its plan is still queued (TierClient._plan_lost): each look is one round trip, cut at this (a node away:
# the first-token timeout still stands behind it).
LOOK_TIMEOUT_S = 1.0
MEDIA_RETRIES = 2  # how often one request's media may be encoded again when its cached tensors are gone
# A cancellation Redis failed to take is posted again (backoff up to 5 s) for this long: a request answered 503 while
# Redis was paused had its queued plan run to its end for nobody once Redis came back (an outside tester's).
CANCEL_RETRY_S = 120.0
RESET = object()  # put on every queue when Redis may have lost this gateway's queued work (gateway/monitor.py)


@dataclass(frozen=True)
class WorkerLost:
    """Put on a request's queue by the monitor when the backbone running ``attempt`` left the live set."""

    attempt: int
    worker: str


def _no_backbone(since: str = "") -> Unavailable:
    return Unavailable(f"no live backbone worker{since}", code="no_live_worker", retry_after=2)


class ClientGone(Exception):
    """The client disconnected; its generation is cancelled."""


@dataclass
class Generation:
    """One request's generation as the gateway tracks it across attempts."""

    plan: m.PromptPlan  # the original plan (attempt 0)
    queue: asyncio.Queue
    entry_id: bytes | None = None  # the current attempt's entry in ``gen``
    attempt: int = 0
    worker: str = ""  # the backbone running the current attempt, once an event named it
    lost_told: int = -1  # the attempt the monitor last reported lost (once per attempt)
    missing: bytes | None = None  # the entry the last look did not find in ``gen`` (TierClient._plan_lost)
    done: bool = False  # every token was received, only the finish was lost with its worker
    migrations: int = 0  # moves counted toward migration_limit
    media_retries: int = 0
    tokens: list[int] = field(default_factory=list)  # every token received, in order
    budget: int | None = None  # the completion tokens a backbone said the request may reach (TokenEvent.budget)
    # When the wait's bound last started: the current attempt's start, or the last event taken. Not the last
    # message: one skipped (a second run's tokens, an older attempt's) restarted it, and a silent worker's request
    # waited as long as a duplicate run kept streaming (12.5 s for a 1 s bound, in a reviewer's test).
    heard: float = field(default_factory=time.monotonic)

    def take(self, ev: m.TokenEvent) -> list[int] | None:
        """The event's tokens not seen yet (events carry their end position: ``completion_tokens``); None if the
        event starts past what we have (tokens were lost in between)."""
        start = ev.completion_tokens - len(ev.token_ids)
        have = len(self.tokens)
        if start > have:
            return None
        new = ev.token_ids[have - start :] if ev.completion_tokens > have else []
        self.tokens.extend(new)
        return new


async def bounded(call, what: str, request_id: str):
    """``await call`` (a request's Redis round trip) within ``ROUND_TRIP_S``, else a 503: a Redis Cluster node paused
    or partitioned away holds a call for its socket timeout, and redis-py's cluster client retries it (outside
    testers' chaos runs: 503s after 30-85 s). A cut call may still have run (the request's cancellation, posted when
    it fails, stops what it queued)."""
    try:
        return await asyncio.wait_for(call, ROUND_TRIP_S)
    except TimeoutError:
        log.warning("redis did not answer in time", extra={"request_id": request_id, "during": what,
                                                           "waited_s": ROUND_TRIP_S})
        raise redis_too_slow() from None


class TierClient:
    def __init__(self, redis, cfg: GatewayConfig, spec: ModelSpec, replies: ReplyRouter, reply_stream: str):
        self.r, self.cfg, self.spec, self.replies = redis, cfg, spec, replies
        self.keys = Keys(cfg.prefix)
        self.reply_stream = reply_stream
        self.inflight: dict[str, Generation] = {}  # request id -> its generation (the monitor checks their workers)
        self.migrations = 0  # requests moved to another replica by this gateway (for logs and benches)
        self.on_migrate = lambda: None  # and the metric
        self.reset_at = -1e9  # monotonic time the monitor last found this gateway's lease gone
        self.view = None  # the monitor's ClusterView, once there is a monitor

    async def live_workers(self, tiers: list[str]) -> dict[str, int]:
        pipe = self.r.pipeline(transaction=False)
        for tier in tiers:
            pipe.zcount(*live_count_args(self.keys, tier))
        return dict(zip(tiers, await pipe.execute()))

    def liveness_unknown(self) -> bool:
        """Just after Redis came back from an outage, or lost this gateway's lease (a restart), the workers' beats
        may have lapsed meanwhile and the live sets look empty until each beats again: an empty one then proves
        nothing, and work is queued rather than refused."""
        return self.settling_s() > 0

    def settling_s(self) -> float:
        """How long the live sets prove nothing yet (see :meth:`liveness_unknown`); 0 once they do."""
        since = max(self.reset_at, self.view.outage_ended if self.view is not None else -1e9)
        return max(0.0, LIVE_WINDOW_S + HEARTBEAT_S - (time.monotonic() - since))

    def check_workers(self, live: set[str]) -> None:
        """Called by the monitor with the backbone's live set (only when Redis has been steady for a live window):
        tell each generation whose worker is gone."""
        for gen in self.inflight.values():
            if gen.worker and gen.worker not in live and gen.lost_told != gen.attempt:
                gen.lost_told = gen.attempt
                gen.queue.put_nowait(WorkerLost(gen.attempt, gen.worker))

    async def generate(self, plan: m.PromptPlan, queue: asyncio.Queue, encode_again=None, started: float | None = None
                       ) -> AsyncIterator[m.TokenEvent]:
        """Dispatch the plan and yield its token events (only new tokens) until one carries a finish reason.

        ``encode_again()`` (optional) re-encodes the request's media: when the backbone finds a cached tensor gone
        (expired between the lookup and the prefill, or lost with a restarted Redis), the request is encoded again
        and re-queued from where it is, up to ``MEDIA_RETRIES`` times. ``started``: when the request arrived
        (monotonic; see :meth:`_submit`)."""
        gen = Generation(plan, queue)
        gen.entry_id = await bounded(self._submit(plan, started), "submitting", plan.request_id)
        gen.heard = time.monotonic()  # the first attempt's wait starts once it is queued
        self.inflight[plan.request_id] = gen
        try:
            while True:
                if gen.done:  # lost after its last token, before its finish: it is finished
                    yield m.TokenEvent(request_id=plan.request_id, token_ids=[], attempt=gen.attempt,
                                       prompt_tokens=len(plan.token_ids) - plan.resumed,
                                       completion_tokens=plan.resumed + len(gen.tokens), finish=m.FinishReason.LENGTH)
                    return
                limit, what, code = self._bound(gen)
                left = gen.heard + limit - time.monotonic()
                look = not gen.worker and left > GONE_LOOK_S  # no worker has it: is there one to take it?
                try:
                    msg = await self._next(queue, GONE_LOOK_S if look else left, what, code)
                except Timeout:
                    if look:
                        if self.gone("backbone"):
                            log.warning("gave up waiting: no backbone is live", extra={
                                "request_id": plan.request_id, "attempt": gen.attempt,
                                "no_worker_timeout_s": self.cfg.no_worker_timeout_s})
                            raise _no_backbone(f" for {self.cfg.no_worker_timeout_s:g} s") from None
                        if await self._plan_lost(gen):
                            await self._migrate(gen, "its queued plan was lost unread (the stream deleted or "
                                                     "evicted)", counted=False)
                        continue
                    # A worker that went silent mid-answer but still beats (a hung pipeline shard, a stuck device
                    # call: its loop's stall timeout is longer than this) is stuck for this request: it moves to
                    # another live replica, as from a dead one, instead of failing. Alone, or with no migration
                    # left, it fails (504).
                    if (not gen.worker or gen.migrations >= self.cfg.migration_limit
                            or not self._others_live(gen.worker)):
                        log.warning("gave up waiting for the backbone", extra={
                            "request_id": plan.request_id, "worker": gen.worker, "attempt": gen.attempt,
                            "tokens": len(gen.tokens), "waited_s": limit})
                        raise
                    await self._migrate(gen, f"no token from backbone worker {gen.worker} for "
                                             f"{self.cfg.token_timeout_s:g} s")
                    continue
                if msg is RESET:  # not a lost backbone: not counted toward migration_limit (a lease evicted five
                    # times in 40 s failed long streams with worker_lost: an outside tester's)
                    await self._migrate(gen, "Redis may have lost the request (its lease was gone)", counted=False)
                    continue
                if isinstance(msg, WorkerLost):
                    if msg.attempt == gen.attempt:
                        await self._migrate(gen, f"backbone worker {msg.worker} left the live set")
                    continue
                if not isinstance(msg, m.TokenEvent) or msg.attempt != gen.attempt:
                    continue  # encode results, or an older attempt's events
                if gen.worker and msg.worker and msg.worker != gen.worker:
                    continue  # a second run of this attempt (a plan queued twice): one worker's tokens only
                gen.heard = time.monotonic()
                gen.worker = msg.worker or gen.worker
                if msg.worker and self.view is not None:
                    self.view.heard_from("backbone", msg.worker)
                gen.budget = msg.budget if msg.budget is not None else gen.budget
                new = gen.take(msg)
                if new is None:
                    await self._migrate(gen, "token events were lost")
                    continue
                if (msg.code == m.ErrorCode.MEDIA_EXPIRED and encode_again is not None and plan.media
                        and gen.media_retries < MEDIA_RETRIES):
                    gen.media_retries += 1
                    log.info("a cached tensor is gone; encoding again", extra={"request_id": plan.request_id})
                    await self._refresh_media(gen, await encode_again())
                    continue
                lost = msg.finish == m.FinishReason.ERROR and msg.code == m.ErrorCode.WORKER_LOST
                if new or (msg.finish is not None and not lost):
                    yield msgspec.structs.replace(msg, token_ids=new, finish=None if lost else msg.finish,
                                                  code=None if lost else msg.code)
                if lost:
                    await self._migrate(gen, msg.error or "the backbone worker was lost")
                    continue
                if msg.finish is not None:
                    return
        finally:
            self.inflight.pop(plan.request_id, None)

    def known_live(self, tier: str) -> int | None:
        """Live workers of ``tier`` as the monitor last read them (None: not read yet, or no monitor). Requests
        take it from there rather than read the live set themselves: on a Redis Cluster that set may be on a node
        away, while the queue and the reply stream answer."""
        return self.view.live_count(tier) if self.view is not None else None

    async def _submit(self, plan: m.PromptPlan, started: float | None = None) -> bytes:
        """Queue the plan (its stream entry id), unless no backbone is live and none has been since the request
        arrived at ``started`` (a 503 at once). A request that arrived while one was (its media then encoded for
        seconds, meanwhile the backbone restarted or was paused) is queued all the same, within its first-token
        timeout: it had been accepted, and a 503 after it waited 19 s threw its work away (an outside tester's)."""
        live = self.known_live("backbone")
        if live is None:
            live = (await self.live_workers(["backbone"]))["backbone"]
        if not live and self._none_since(started):
            raise _no_backbone()
        return await self.r.xadd(self.keys.gen(), payload_fields(m.encode(plan)))

    def require_backbone(self, started: float) -> None:
        """``no_live_worker`` at once when no backbone is live, as the monitor last read, and none has been since
        the request arrived at ``started``: before its media are encoded, whose work it would throw away (with the
        encoder stalled, the 503 came only once the encode ended: a regression tester's)."""
        if self.known_live("backbone") == 0 and self._none_since(started):
            raise _no_backbone()

    def gone(self, tier: str) -> bool:
        """Whether ``tier`` has had no live worker for ``no_worker_timeout_s`` (Redis steady): a request queued
        there gives up (503 ``no_live_worker``) rather than wait out its own timeout for a worker that is not
        coming."""
        return (not self.liveness_unknown() and self.view is not None and self.known_live(tier) == 0
                and not self.view.live_since(tier, time.monotonic() - self.cfg.no_worker_timeout_s))

    def _none_since(self, started: float | None) -> bool:
        """Whether an empty backbone live set proves it: Redis steady (``liveness_unknown``) and no read since the
        request arrived at ``started`` (monotonic) found one."""
        return not self.liveness_unknown() and not (
            started is not None and self.view is not None and self.view.live_since("backbone", started - HEARTBEAT_S))

    async def _plan_lost(self, gen: Generation) -> bool:
        """Whether the current attempt's plan, no worker having said it holds it, is gone from ``gen`` at this look
        and the last (one round trip). Deleting the stream, as ``allkeys-*`` eviction or an operator may, lost every
        unread plan in it: the backbone recreated its group and nobody told the gateway, whose requests waited out
        their first-token timeout, 120 s (an outside tester's). A worker deletes an entry only as it acks it, after
        the event saying it holds it (``BackboneWorker._tell_waiting``), in the same round trip at the soonest: a
        first miss may be that event on its way, a second with none is a loss."""
        try:
            found = await asyncio.wait_for(self.r.xrange(self.keys.gen(), gen.entry_id, gen.entry_id),
                                           LOOK_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 -- not answered: the next look asks again
            if not (isinstance(exc, TimeoutError) or redis_failure(exc)):
                raise
            return False
        if found or gen.missing != gen.entry_id:
            gen.missing = None if found else gen.entry_id
            return False
        log.warning("a queued plan was lost unread; queueing it again", extra={
            "request_id": gen.plan.request_id, "attempt": gen.attempt})
        return True

    def _others_live(self, worker: str) -> bool:
        """Whether a backbone other than ``worker`` is live (as of the monitor's last beat)."""
        return self.view is not None and bool(self.view.live.get("backbone", set()) - {worker})

    def _bound(self, gen: Generation) -> tuple[float, str, str]:
        """How long the next wait may last, what it waits for, and the code of its 504: ``first_token_timeout_s``
        until the current attempt's worker is heard from (queueing + prefill), then ``token_timeout_s`` between
        events."""
        if gen.worker:
            return self.cfg.token_timeout_s, "waiting for the next token", "token_timeout"
        if gen.attempt:
            return self.cfg.first_token_timeout_s, "waiting for a backbone after a migration", "first_token_timeout"
        return self.cfg.first_token_timeout_s, "waiting for the first token", "first_token_timeout"

    async def _refresh_media(self, gen: Generation, refs: list[m.MediaRef]) -> None:
        """Requeue ``gen`` with fresh tensor keys for its media (the same content: the same placeholder counts)."""
        if [r.num_tokens for r in refs] != [r.num_tokens for r in gen.plan.media]:
            raise Internal("the media encoded again to a different number of tokens")
        gen.plan = msgspec.structs.replace(gen.plan, media=refs)
        await self._migrate(gen, "a cached tensor was gone; encoded again", counted=False)

    async def _migrate(self, gen: Generation, reason: str, counted: bool = True) -> None:
        """Queue the continuation of ``gen`` (one round trip), or fail it past ``migration_limit``. The orphaned
        plan is acked (and deleted if it had been read: an unread one stays, and its reader skips it as cancelled);
        older attempts are cancelled. ``counted``: a lost backbone, counted toward the limit (the request may be what
        kills them); not a move for Redis's sake (a lease or a plan it lost, a cached tensor gone)."""
        plan, rid = gen.plan, gen.plan.request_id
        pipe = self.r.pipeline(transaction=False)
        if gen.entry_id is not None:
            ack_delete_if_pending(pipe, self.keys.gen(), BACKBONE_GROUP, gen.entry_id)
        left = (plan.sampling.max_tokens if gen.budget is None else gen.budget) - len(gen.tokens)
        if left < 1:  # the worker died between the last token and its finish event
            self._cancel_from(pipe, rid, CANCEL_ALL)
            await bounded(pipe.execute(), "migrating", rid)
            gen.done = True
            return
        if counted and gen.migrations >= self.cfg.migration_limit:
            self._cancel_from(pipe, rid, CANCEL_ALL)
            pipe.xadd(self.keys.dead_letter(), {"m": m.encode(plan), "stream": self.keys.gen(), "reason": reason,
                                                "deliveries": gen.attempt + 1}, maxlen=10_000, approximate=True)
            await bounded(pipe.execute(), "migrating", rid)
            log.error("request lost its backbone; not migrating again", extra={
                "request_id": rid, "attempt": gen.attempt, "reason": reason,
                "migration_limit": self.cfg.migration_limit})
            raise Unavailable(f"the backbone serving this request was lost ({reason}) after "
                              f"{gen.migrations} migration(s); retry the request", code="worker_lost", retry_after=1)
        gen.attempt += 1
        gen.migrations += counted
        gen.worker = ""
        cont = msgspec.structs.replace(
            plan, token_ids=plan.token_ids + gen.tokens, resumed=len(gen.tokens), attempt=gen.attempt,
            sampling=msgspec.structs.replace(plan.sampling, max_tokens=left),
            deadline=clock.now() + self.cfg.first_token_timeout_s)
        self._cancel_from(pipe, rid, gen.attempt)  # older attempts stop
        pipe.xadd(self.keys.gen(), payload_fields(m.encode(cont)))
        *_, gen.entry_id = await bounded(pipe.execute(), "migrating", rid)
        gen.heard = time.monotonic()  # the new attempt's wait starts
        self.migrations += 1
        self.on_migrate()
        log.warning("migrating request", extra={"request_id": rid, "attempt": gen.attempt, "reason": reason,
                                                "resumed_tokens": len(gen.tokens), "max_tokens_left": left})

    def _cancel_from(self, pipe, request_id: str, attempt: int) -> None:
        """Queue: attempts of the request below ``attempt`` are cancelled. The key only ever rises, so a migration
        racing a client's cancellation (on another connection) cannot revive the request."""
        run_script(pipe, _RAISE_CANCEL, [cancel_key(self.reply_stream, request_id)],
                   [attempt, self.cfg.cancel_ttl_s])

    async def cancel(self, request_id: str) -> None:
        """Post the request's cancellation (every attempt), again and again while Redis fails, for CANCEL_RETRY_S
        at most: best effort, but a plan queued before the failure would otherwise run for nobody."""
        give_up, delay = time.monotonic() + CANCEL_RETRY_S, 0.5
        while True:
            try:
                pipe = self.r.pipeline(transaction=False)
                self._cancel_from(pipe, request_id, CANCEL_ALL)
                await asyncio.wait_for(pipe.execute(), ROUND_TRIP_S)
                return
            except Exception as exc:  # noqa: BLE001 -- best effort, re-raised unless Redis (or redis-py) failed
                if not (redis_failure(exc) or isinstance(exc, TimeoutError)):
                    raise
                if time.monotonic() + delay > give_up:
                    log.warning("could not post a cancellation", extra={"request_id": request_id}, exc_info=True)
                    return
                log.info("could not post a cancellation yet; trying again", extra={
                    "request_id": request_id, "in_s": delay, "error": f"{type(exc).__name__}: {exc}"})
            await asyncio.sleep(delay)
            delay = min(2 * delay, 5.0)

    @staticmethod
    async def _next(queue: asyncio.Queue, timeout: float, what: str, code: str):
        try:  # a message already queued is taken even with the bound spent (wait_for(..., 0) would not)
            msg = queue.get_nowait() if not queue.empty() else await asyncio.wait_for(queue.get(), max(timeout, 0.0))
        except asyncio.TimeoutError:
            raise Timeout(f"timed out {what}", code=code) from None
        if msg is DISCONNECTED:
            raise ClientGone()
        if isinstance(msg, APIError):  # the request is ended from outside (the gateway shutting down)
            raise msg
        return msg

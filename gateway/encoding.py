"""Media parts to cached encoder tensors: cache first, single-flight across every gateway, bounded waits.

For each distinct part (content digest):

1. one round trip looks every part up (``HGET n``, refreshing the TTL of hits) and counts live encoders;
2. for misses, one round trip registers this gateway as a waiter (``SADD waiters``), tries to take the encode lease
   (``SET lease NX EX``) and looks again (a tensor written since step 1 is a hit, and a lease taken with it is
   given back);
3. the lease holder alone queues the job (blob + ``XADD``); everyone else just waits;
4. the encoder writes the tensor, then takes the waiters set and notifies *every* waiter (cache/tensors.py): a
   gateway that registered after the take sees the tensor when it looks again (step 2 registers before it looks),
   so identical misses from any number of gateway processes are encoded once.

A waiter that hears nothing for ``lease_ttl_s`` retries step 2: if the holder died, the lease has expired and the
waiter takes it and queues the job itself (a live holder renews its lease while its job waits in the stream, so a
backlog longer than the lease is not queued twice); it retries at once when the monitor reports that Redis lost this
gateway's work (a restart). Every ``CHECK_EVERY_S`` of silence a request also looks for what no message tells:
an encoding stored whose answer was lost (its reply stream's node was away), and a job it queued whose entry is
gone with no tensor stored, twice in a row (a failover lost the entry before any encoder read it); it queues that
job again at once rather than after its lease lapses. A job whose worker died is reclaimed by another worker
(encoders/worker.py). An encoder that finds the blob expired reports it and the part is queued again (the gateway
still holds the bytes). Undecodable media is a 400 naming the part.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

from cache.keys import Keys
from cache.streams import payload_fields, release_lease, renew_lease
from gateway.config import GatewayConfig
from gateway.errors import APIError, Internal, InvalidRequest, Timeout, Unavailable, redis_failure, redis_too_slow
from gateway.media import MediaPart, undecodable
from gateway.replies import ReplyRouter
from gateway.tiers import DISCONNECTED, RESET, ClientGone, bounded
from models.spec import ModelSpec
from router import clock
from router import messages as m
from router.liveness import live_count_args
from router.logs import Throttle

log = logging.getLogger(__name__)

# A job dropped for its deadline with more than this left of the request's own encode time was another request's
# (queued earlier, with an earlier deadline): queued again rather than failing this one.
DEADLINE_SLACK_S = 1.0
# The whole of a request's encoding (cache lookup, claims, waits) ends this long after its encode timeout at the
# latest: the waits on the encoders are bounded by the timeout itself, but each Redis round trip only by the socket
# timeout and redis-py's retries (a Cluster node that does not answer: 10-20 s a call, 45 s for one request in an
# outside tester's chaos run, past a 30 s encode timeout).
ENCODE_SLACK_S = 5.0
# A request waits this long at most for its cache counters (``stats:*``) to be written; past it they are written
# behind it (a Redis Cluster node away holding them held media requests up to their encode bound: an outside
# tester's chaos run). At most COUNTING_MAX such writes are in flight; past that, counts are dropped.
COUNT_WAIT_S = 0.5
COUNTING_MAX = 256
# A request that hears nothing about its media for this long looks for an answer lost or a job lost (the module
# docstring); each look is one round trip, cut at CHECK_TIMEOUT_S (a node away: the lease's lapse still stands behind).
CHECK_EVERY_S = 2.0
CHECK_TIMEOUT_S = 2.0


def _taken(task: asyncio.Task) -> None:
    """Retrieve what ``task`` ended with: it has no one left to raise it to."""
    if not task.cancelled():
        task.exception()


class MediaEncoder:
    def __init__(self, redis, cfg: GatewayConfig, spec: ModelSpec, replies: ReplyRouter, reply_stream: str,
                 liveness_unknown=lambda: False, metrics=None, known_live=lambda tier: None, gone=lambda tier: False):
        self.r, self.cfg, self.spec, self.replies = redis, cfg, spec, replies
        self.metrics = metrics  # gateway/metrics.GatewayMetrics: cache hits and misses per modality (None: not kept)
        self.gone = gone  # tier -> whether it has had no live worker for --no-worker-timeout (TierClient.gone)
        self.keys = Keys(cfg.prefix)
        self.reply_stream = reply_stream
        self.liveness_unknown = liveness_unknown  # TierClient.liveness_unknown: just after a Redis restart
        self.known_live = known_live  # TierClient.known_live: live workers as the monitor last read them
        self.counting: set[asyncio.Task] = set()  # cache counters being written (see COUNT_WAIT_S)
        self._count_errors = Throttle()  # one line per 10 s about counters not written

    async def encode(self, request_id: str, parts: list[MediaPart], queue: asyncio.Queue, namespace: str = "",
                     tenant: str = "") -> list[m.MediaRef]:
        """A MediaRef per part, in order; ``namespace``: the tenant's (their digests already include it);
        ``tenant``: whose cache hits and misses these are (counted apart too, for the playground). Within the encode
        timeout and ``ENCODE_SLACK_S``: past that, a Redis round trip did not answer (a 503)."""
        if not parts:
            return []
        encoding = asyncio.ensure_future(self._encode(request_id, parts, queue, namespace, tenant))
        try:
            return await asyncio.wait_for(encoding, self.cfg.encode_timeout_s + ENCODE_SLACK_S)
        except TimeoutError:  # not the encoders' wait (a Timeout, raised inside at the encode timeout): Redis's
            log.warning("redis did not answer in time while encoding", extra={"request_id": request_id})
            raise redis_too_slow() from None
        except asyncio.CancelledError:
            # The request cut (a Realtime response cancelled): wait_for cancels the encoding and, on Python 3.11,
            # drops what it ends with. A cancel that comes just as the encoding's own wait on the queue is answered
            # (DISCONNECTED: the client gone) is lost in that inner wait_for, and the encoding ends with ClientGone
            # instead: logged at error level as "Task exception was never retrieved" (an outside tester's,
            # cancelling responses with media). Taken here.
            encoding.add_done_callback(_taken)
            raise

    async def _encode(self, request_id: str, parts: list[MediaPart], queue: asyncio.Queue, namespace: str,
                      tenant: str) -> list[m.MediaRef]:
        await self._resolve_ids(request_id, parts, namespace)
        keys = [self.tensor_key(p) for p in parts]
        counts = await self._lookup(request_id, parts, keys, tenant)
        missing = {k: p for k, p, n in zip(keys, parts, counts) if n is None}
        if missing:
            found = await self._encode_missing(request_id, missing, queue)
            counts = [found.get(k, n) for k, n in zip(keys, counts)]
        return [m.MediaRef(modality=m.Modality(p.modality), tensor_key=k, num_tokens=n)
                for p, k, n in zip(parts, keys, counts)]

    async def _count(self, pipe) -> None:
        """Writes the cache counters, waiting ``COUNT_WAIT_S`` at most: counters are not worth a request's time (nor
        its failure: a Redis error here is logged, not answered)."""
        if len(self.counting) >= COUNTING_MAX:
            if self._count_errors.due():
                log.warning("cache counters dropped: too many writes in flight",
                            extra={"repeated": self._count_errors.held})
            return
        task = asyncio.ensure_future(pipe.execute())
        self.counting.add(task)
        task.add_done_callback(self._counted)
        await asyncio.wait({task}, timeout=COUNT_WAIT_S)

    def _counted(self, task: asyncio.Task) -> None:
        self.counting.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None and self._count_errors.due():
            log.warning("cache counters not written", extra={"error": f"{type(exc).__name__}: {exc}",
                                                              "repeated": self._count_errors.held})

    def tensor_key(self, part: MediaPart) -> str:
        return self.keys.tensor(self.spec.encoder_id(part.modality), part.digest)

    async def _resolve_ids(self, request_id: str, parts: list[MediaPart], namespace: str) -> None:
        """Parts sent as a bare ``uuid`` take the digest it was registered with (and refresh its life); parts with
        both register it, first writer wins (``SET NX``: a later request cannot remap a uuid to other media)."""
        pipe = self.r.pipeline(transaction=False)
        lookups = []
        for i, p in enumerate(parts):
            if p.uuid is None:
                continue
            key = self.keys.media_id(self.spec.encoder_id(p.modality), p.uuid, namespace)
            if p.data:
                pipe.set(key, p.digest, ex=self.cfg.cache_ttl_s, nx=True)
                pipe.expire(key, self.cfg.cache_ttl_s)
            else:
                pipe.execute_command("GETEX", key, "EX", self.cfg.cache_ttl_s)
                lookups.append((i, len(pipe) - 1))
        if not len(pipe):
            return
        res = await bounded(pipe.execute(), "looking up media ids", request_id)
        for i, at in lookups:
            if res[at] is None:
                raise InvalidRequest(f"unknown {parts[i].modality} uuid {parts[i].uuid!r} and no media sent "
                                     "(it was never sent with its media, or it expired)", param=parts[i].param,
                                     code="unknown_media_id")
            parts[i] = parts[i].with_digest(res[at].decode())

    async def _lookup(self, request_id: str, parts: list[MediaPart], keys: list[str], tenant: str = ""
                      ) -> list[int | None]:
        live = {mod: self.known_live(f"encoder:{mod}") for mod in sorted({p.modality for p in parts})}
        unread = [mod for mod, n in live.items() if n is None]  # no monitor's view yet: read here
        pipe = self.r.pipeline(transaction=False)
        for key in keys:
            pipe.hget(key, "n")
            pipe.expire(key, self.cfg.cache_ttl_s)
        for mod in unread:
            pipe.zcount(*live_count_args(self.keys, f"encoder:{mod}"))
        res = await bounded(pipe.execute(raise_on_error=False), "looking up the tensor cache", request_id)
        for failed in res[1 : 2 * len(keys) : 2] + res[2 * len(keys) :]:
            if isinstance(failed, Exception):
                raise failed
        found = res[0 : 2 * len(keys) : 2]
        counts = [self._count_of(key, n, request_id) for key, n in zip(keys, found)]
        live.update(zip(unread, res[2 * len(keys) :]))
        damaged = [key for key, n, raw in zip(keys, counts, found) if n is None and raw is not None]
        if damaged:  # dropped, so that the encoding written anew lands (a key of another type would refuse it)
            pipe = self.r.pipeline(transaction=False)
            for key in damaged:
                pipe.delete(key)
            await bounded(pipe.execute(), "dropping damaged tensor cache entries", request_id)
        pipe = self.r.pipeline(transaction=False)
        for p, n in zip(parts, counts):
            pipe.hincrby(self.keys.stats(f"encoder:{p.modality}"), "cache_hits" if n is not None else "cache_misses")
            if tenant:
                pipe.hincrby(self.keys.stats(f"tenant:{tenant}"), f"{p.modality}_cache_"
                             + ("hits" if n is not None else "misses"))
        await self._count(pipe)  # counted even when the request is refused below
        if self.metrics is not None:
            for p, n in zip(parts, counts):
                self.metrics.cache(p.modality, n is not None)
        for p, n in zip(parts, counts):
            if n is None and not live[p.modality] and not self.liveness_unknown():
                raise Unavailable(f"no live {p.modality} encoder worker", code="no_live_worker", retry_after=2)
            if n is None and not p.data:
                raise InvalidRequest(f"the encoding registered for uuid {p.uuid!r} expired; send the media again",
                                     param=p.param, code="unknown_media_id")
        return counts

    def _count_of(self, key: str, n, request_id: str) -> int | None:
        """A cache entry's row count; None when it is missing, or damaged (not a hash, or a count no encoding has):
        a damaged entry is a miss, encoded again, where it failed every request sending that media (a 500, a 503
        "Redis unavailable") and each lookup kept it alive (an outside tester's). 0 is a count: an audio clip too
        short for one token (20 ms for Qwen2-Audio, as its own processor counts) was encoded again at every send."""
        if n is None:
            return None
        try:
            count = int(n) if not isinstance(n, Exception) else None
        except ValueError:
            count = None
        if count is None or not 0 <= count <= self.spec.max_context:
            log.warning("a tensor cache entry was damaged; encoding again", extra={
                "request_id": request_id, "key": key, "count": n if isinstance(n, bytes) else type(n).__name__})
            return None
        return count

    async def _encode_missing(self, request_id: str, missing: dict[str, MediaPart], queue) -> dict[str, int]:
        deadline = time.monotonic() + self.cfg.encode_timeout_s
        for key in missing:
            self.replies.watch(key, queue)
        w = _Wait(request_id, dict(missing))
        try:
            await self._claim(w, list(w.pending))
            heard = time.monotonic()  # the last message about this request's media, or the last claim
            while w.pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout("timed out waiting for the encoders", code="encode_timeout")
                try:
                    msg = await asyncio.wait_for(queue.get(), timeout=min(left, CHECK_EVERY_S))
                except asyncio.TimeoutError:
                    # Its encoder tier gone for --no-worker-timeout: a 503, not the whole encode timeout's wait (an
                    # outside tester's audio request waited 60 s after its only encoder died).
                    for mod in {p.modality for p in w.pending.values()}:
                        if self.gone(f"encoder:{mod}"):
                            log.warning("gave up waiting: no encoder is live", extra={
                                "request_id": request_id, "modality": mod,
                                "no_worker_timeout_s": self.cfg.no_worker_timeout_s})
                            raise Unavailable(f"no live {mod} encoder worker for {self.cfg.no_worker_timeout_s:g} s",
                                              code="no_live_worker", retry_after=2)
                    await self._check(w)  # renews the leases of this request's jobs still waiting
                    if w.pending and time.monotonic() - heard >= self.cfg.lease_ttl_s:  # the holder may have died
                        await self._claim(w, list(w.pending))
                        heard = time.monotonic()
                    continue
                heard = time.monotonic()
                if msg is DISCONNECTED:
                    raise ClientGone()
                if isinstance(msg, APIError):  # the request is ended from outside (the gateway shutting down)
                    raise msg
                if msg is RESET:  # Redis may have lost the jobs, waiters and leases: claim (and queue) again
                    await self._claim(w, list(w.pending))
                    continue
                if not isinstance(msg, (m.EncodeDone, m.EncodeFailed)) or msg.tensor_key not in w.pending:
                    continue
                part = w.pending[msg.tensor_key]
                if isinstance(msg, m.EncodeDone):
                    w.take(msg.tensor_key, msg.num_tokens)
                elif msg.code == m.ErrorCode.BAD_MEDIA:
                    raise undecodable(part, msg.error)
                elif msg.code in (m.ErrorCode.MEDIA_EXPIRED, m.ErrorCode.CANCELLED):
                    # The blob expired (or could not be read, or the tensor not stored: a Redis node away), or the
                    # job was dropped as its queuing gateway died: queue it again. A lease this request still holds
                    # (the encoder could not take it: its node was away) is given up first, or the job would wait
                    # for it to lapse (an outside tester's chaos run: images 30 s late after a node came back).
                    log.info("encode job not run; queueing it again", extra={"request_id": request_id,
                                                                             "code": msg.code.value})
                    await self._queue_again(w, [msg.tensor_key])
                elif msg.code == m.ErrorCode.DEADLINE and deadline - time.monotonic() > DEADLINE_SLACK_S:
                    # Another request's job (this one only waited on it) was dropped for that request's deadline:
                    # with time left, queue it again under this one's.
                    log.info("an encode job waited on was dropped for its own deadline; queueing it again",
                             extra={"request_id": request_id})
                    await self._queue_again(w, [msg.tensor_key], release=False)
                elif msg.code == m.ErrorCode.DEADLINE:
                    raise Timeout(f"{part.modality} waited too long for an encoder", param=part.param,
                                  code="encode_timeout")
                elif msg.code == m.ErrorCode.CACHE_FULL:
                    raise Unavailable(f"{part.param}: {msg.error}", param=part.param, code="cache_full",
                                      retry_after=5)
                else:  # INTERNAL: the worker logged it; the client gets a 500 naming the part
                    raise Internal(f"{part.param}: encoding the {part.modality} failed: {msg.error}",
                                   param=part.param, code="encoder_error")
            return w.found
        finally:
            for key in missing:
                self.replies.unwatch(key, queue)

    async def _queue_again(self, w: _Wait, keys: list[str], release: bool = True) -> None:
        """Claim the parts of ``keys`` again at once (a tensor stored meanwhile is found: no longer pending).
        ``release``: a lease this request holds is given up first, or the claim would wait for it to lapse."""
        if release:
            for key in keys:
                part = w.pending[key]
                await bounded(release_lease(self.r, self.keys.lease(self.spec.encoder_id(part.modality),
                                                                    part.digest), w.request_id),
                              "giving up an encode lease", w.request_id)
        await self._claim(w, keys)

    async def _check(self, w: _Wait) -> None:
        """One round trip: the pending parts' tensors (stored, their answer lost: taken as found) and the entries
        of the jobs this request queued (gone at two checks in a row with no tensor stored: lost, queued again;
        an encoder deletes an entry only as it answers, so a first miss may be an answer on its way)."""
        keys = list(w.pending)
        mine = [k for k in keys if k in w.queued]
        pipe = self.r.pipeline(transaction=False)
        for key in keys:
            pipe.hget(key, "n")
        for key in mine:
            stream, entry_id = w.queued[key]
            pipe.xrange(stream, entry_id, entry_id)
        for key in mine:  # its job still waits (a backlog): the lease is renewed, or a waiter's claim after
            # --lease-ttl of silence queued the media again, and again (an auditor: 4 jobs for one image)
            part = w.pending[key]
            renew_lease(pipe, self.keys.lease(self.spec.encoder_id(part.modality), part.digest), w.request_id,
                        self.cfg.lease_ttl_s)
        try:
            res = await asyncio.wait_for(pipe.execute(raise_on_error=False), CHECK_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 -- a node away: the lease's lapse still stands behind this
            if not (isinstance(exc, TimeoutError) or redis_failure(exc)):
                raise
            return
        for key, n in zip(keys, res):
            if (count := self._count_of(key, n, w.request_id)) is not None:
                log.info("an encoding was found stored, its answer lost", extra={"request_id": w.request_id})
                w.take(key, count)
        lost, missing = [], set()
        for key, entries in zip(mine, res[len(keys) : len(keys) + len(mine)]):
            if key not in w.pending or isinstance(entries, Exception) or entries:
                continue
            if w.queued[key][1] in w.gone:
                lost.append(key)
            else:
                missing.add(w.queued[key][1])
        w.gone = missing
        if lost:
            log.warning("encode job lost (its entry is gone and no tensor was stored); queueing it again",
                        extra={"request_id": w.request_id, "jobs": len(lost)})
            await self._queue_again(w, lost)

    async def _claim(self, w: _Wait, keys: list[str]) -> None:
        """Steps 2 and 3 for the pending parts of ``keys``: register as waiter, try the lease, look again; queue
        the jobs whose lease we took (their entries noted in ``w.queued``)."""
        pipe = self.r.pipeline(transaction=False)
        for key in keys:
            part = w.pending[key]
            encoder_id = self.spec.encoder_id(part.modality)
            waiters = self.keys.waiters(encoder_id, part.digest)
            pipe.sadd(waiters, self.reply_stream)
            pipe.expire(waiters, int(self.cfg.encode_timeout_s) + 60)
            pipe.set(self.keys.lease(encoder_id, part.digest), w.request_id, nx=True, ex=self.cfg.lease_ttl_s)
            pipe.hget(key, "n")
        res = await bounded(pipe.execute(), "claiming encodes", w.request_id)
        submit = self.r.pipeline(transaction=False)
        jobs = []  # (tensor key, stream): the XADD of each is the second command of its pair
        release = self.r.pipeline(transaction=False)
        for key, (_, _, leased, n) in zip(keys, _quads(res)):
            part = w.pending[key]
            if (count := self._count_of(key, n, w.request_id)) is not None:  # damaged meanwhile: encoded again
                w.take(key, count)
                if leased:  # stored between the lookup and the claim: the lease taken is given back, or the next
                    # request to miss this media (the entry evicted) waited for it to lapse (an auditor's)
                    release_lease(release, self.keys.lease(self.spec.encoder_id(part.modality), part.digest),
                                  w.request_id)
            elif leased:
                jobs.append((key, self._queue_job(submit, w.request_id, part)))
        if len(release):
            await bounded(release.execute(), "giving up an encode lease", w.request_id)
        if jobs:
            res = await bounded(submit.execute(), "queueing encode jobs", w.request_id)
            for (key, stream), entry_id in zip(jobs, res[1::2]):
                w.queued[key] = (stream, entry_id)

    def _queue_job(self, pipe, request_id: str, part: MediaPart) -> str:
        """Queue the blob and the job (two commands) on ``pipe``; returns the jobs stream."""
        kind = m.JobInput.FEATURES if part.features is not None else m.JobInput.MEDIA
        blob_key = self.keys.blob(part.digest, kind.value)  # apart: another gateway may queue the media itself
        pipe.set(blob_key, part.features if part.features is not None else part.data, ex=self.cfg.blob_ttl_s)
        job = m.EncodeJob(request_id=request_id, job_id=uuid.uuid4().hex, modality=m.Modality(part.modality),
                          encoder_id=self.spec.encoder_id(part.modality), digest=part.digest, blob_key=blob_key,
                          reply_to=self.reply_stream, deadline=clock.now() + self.cfg.encode_timeout_s, input=kind,
                          ttl_s=0 if self.cfg.media_cache else self.cfg.cache_ttl_s)
        stream = self.keys.jobs(part.modality)
        pipe.xadd(stream, payload_fields(m.encode(job)))
        return stream


@dataclass
class _Wait:
    """One request's encodes in flight (``MediaEncoder._encode_missing``)."""

    request_id: str
    pending: dict[str, MediaPart]  # tensor key -> part: not encoded yet
    found: dict[str, int] = field(default_factory=dict)  # tensor key -> its token count
    queued: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # tensor key -> (stream, entry id) queued here
    gone: set[bytes] = field(default_factory=set)  # the job entries the last check did not find

    def take(self, key: str, num_tokens: int) -> None:
        """The tensor of ``key`` is stored: no longer pending."""
        self.found[key] = num_tokens
        del self.pending[key]
        self.queued.pop(key, None)


def _quads(res: list) -> list[tuple]:
    return [tuple(res[i : i + 4]) for i in range(0, len(res), 4)]

"""``POST /v1/chat/completions``: one request from body to answer, streamed (SSE) or whole.

Steps: read the body (size-capped) -> parse and build the prompt in a worker thread (JSON, template, tokenizer,
media headers, hashes) -> check the context length with the counts the headers give -> encode media (cache first)
-> expand placeholders into a PromptPlan -> dispatch -> detokenize events into the OpenAI response shape. The
streamed and the whole answer come from the same generator, so at temperature 0 they are the same text.

Request identity: every request gets a server-generated id (``RequestIds``), the one key of its queues, replies, KV
cache and cancellation in every tier, returned as ``x-request-id`` and in the completion id. A client's own id
(``X-Client-Request-Id``, the OpenAI API's header, or ``X-Request-Id``) never routes anything: it is logged beside
the server's and echoed as ``x-client-request-id``, so two requests that reuse one client id stay apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from cache.keys import Keys
from gateway.config import GatewayConfig
from gateway.detokenize import Detokenizer
from gateway.encoding import MediaEncoder
from gateway.errors import (
    APIError,
    Internal,
    InvalidRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Timeout,
    Unavailable,
    UnsupportedMediaType,
    redis_failure,
    redis_unavailable,
)
from gateway.metrics import GatewayMetrics
from gateway.monitor import BusyHint, ClusterMonitor, admit
from gateway.prompt import Prompt, PromptBuilder, expand_placeholders
from gateway.ratelimit import Admission, RateLimited, RateLimiter, Reservation
from gateway.remote import RemoteMedia
from gateway.replies import ReplyRouter
from gateway.schemas import ChatCompletionRequest, parse_chat_request
from gateway.tiers import DISCONNECTED, ClientGone, TierClient, bounded
from router import clock
from router import messages as m

log = logging.getLogger(__name__)

# Bodies being received at once, in bytes, at most this many maximal bodies' worth (32 MiB each by default): the
# memory bound for clients still sending, who hold no in-flight slot. A slow sender holds almost nothing.
RECEIVING_BODIES = 16
# A body of at most this (and a 16th of --max-body-bytes) is never refused for that bound: clients sending large
# bodies slowly cannot shut out the small requests (an outside reviewer's reading), whose memory is no concern.
SMALL_BODY = 256 * 1024
# Bodies past this are parsed one at a time. Parsing and validating holds the GIL (json's and the schema's C code:
# ~2 us a value); six clients sending 100,000-value bodies at once had the event loop wait behind six such threads,
# the other requests slowed to seconds (an outside tester's run). One at a time, the loop waits behind one.
LARGE_PARSE = 64 * 1024
# The error codes answered only before a request runs (a refusal): its rate count is given back.
REFUSALS = ("rate_limit_exceeded", "server_overloaded", "no_live_worker")
TENANT_SHARE = 4  # with API keys, a tenant holds at least 1/TENANT_SHARE of max_inflight (``tenant_share``)
_CLIENT_ID = re.compile(r"^[\x21-\x7e]{1,512}$")  # printable ASCII, as the OpenAI API accepts


@dataclass
class Delta:
    text: str
    finish: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those the backbone's prefix cache held
    media_tokens: tuple[int, int] = (0, 0)  # of the prompt tokens, (image, audio): the encoders' outputs
    backbone_dtype: str = ""  # what the backbone computes in (the answer's system_fingerprint; "": not said)


@dataclass(frozen=True)
class RequestIds:
    server: str  # routes everything; unguessable, so only the owning gateway can name (and cancel) the request
    client: str | None  # the client's own id, for logs and the echo header only
    rate: tuple = ()  # the tenant's x-ratelimit-* headers (gateway/ratelimit.py), once counted

    @classmethod
    def of(cls, request: Request) -> "RequestIds":
        given = request.headers.get("x-client-request-id") or request.headers.get("x-request-id") or ""
        return cls(uuid.uuid4().hex, given if _CLIENT_ID.match(given) else None)

    def headers(self) -> dict[str, str]:
        return {"x-request-id": self.server, **({"x-client-request-id": self.client} if self.client else {}),
                **dict(self.rate)}

    def reserved(self, reservation: Reservation | None) -> "RequestIds":
        """These ids, their tokens remaining counting the request's own reservation (as OpenAI's do)."""
        if reservation is None or not self.rate:
            return self
        return replace(self, rate=tuple({**dict(self.rate),
                                         "x-ratelimit-remaining-tokens": str(reservation.remaining)}.items()))


class ChatService:
    def __init__(self, cfg: GatewayConfig, builder: PromptBuilder, media: MediaEncoder, tiers: TierClient,
                 replies: ReplyRouter, monitor: ClusterMonitor, limiter: RateLimiter | None = None,
                 metrics: GatewayMetrics | None = None):
        self.cfg, self.builder, self.media, self.tiers, self.replies = cfg, builder, media, tiers, replies
        self.metrics = metrics or GatewayMetrics()
        self.limiter = limiter or RateLimiter(None, Keys(cfg.prefix))  # no limits: never touches Redis
        self.remote = RemoteMedia.of(cfg.allowed_media_domains, cfg.max_media_bytes, cfg.media_fetch_timeout_s)
        self.monitor = monitor
        self.spec = builder.spec
        self.inflight = 0  # requests admitted and not yet answered in full
        self.inflight_by_tenant: dict[str, int] = {}  # the same, per API key's tenant (see ``tenant_share``)
        self.tenants = lambda: 1  # how many tenants the keys in force name (gateway/auth.KeyRing.tenant_count)
        self.closing = False  # the server's graceful period is ending: requests are refused, those in flight ended
        self._closed = asyncio.Event()  # set with ``closing``: ends the waits of requests not yet queued anywhere
        self.receiving = 0  # bytes of request bodies being received (not yet counted in ``inflight``)
        self.receiving_by_tenant: dict[str, int] = {}  # the same, by tenant (API keys)
        self.bodies_by_tenant: dict[str, int] = {}  # requests receiving their bodies, by tenant: toward its share
        self.large_parse = asyncio.Semaphore(1)  # see LARGE_PARSE
        self._tasks: set[asyncio.Task] = set()  # hard references: the loop keeps only weak ones

    @property
    def inflight(self) -> int:
        return self._inflight

    @inflight.setter
    def inflight(self, n: int) -> None:  # every change is also the gauge's (a file write under multiprocess mode)
        self._inflight = n
        self.metrics.in_flight.set(n)

    @functools.cached_property
    def busy(self) -> BusyHint:
        """The Retry-After of refusals at ``max_inflight`` (gateway/monitor.py)."""
        return BusyHint()

    def admit(self, tiers: list[str], counted: bool = False, arrived: float | None = None) -> None:
        """``counted``: this request is already among ``inflight`` (a second check, once its media are known).
        ``arrived`` (its arrival, perf_counter): also ``no_live_worker`` when the encoders of ``tiers`` are live but
        no backbone has been since it arrived, before its media are encoded, whose work would be thrown away (with
        the encoder stalled, the 503 came once the encode ended: a regression tester's; see
        ``TierClient.require_backbone``). An encoder with none live is named first, by the encode. A refusal (503)
        is counted in the metrics' rejected requests."""
        full = not counted and self.inflight >= self.cfg.max_inflight
        try:
            if self.closing:
                raise _shutting_down()
            admit(self.monitor.view, None if counted else self.inflight, self.cfg, tiers, self.busy.value())
            if arrived is not None and all(self.tiers.known_live(t) != 0 for t in tiers):
                self.tiers.require_backbone(_monotonic(arrived))
        except APIError as exc:
            self.metrics.reject(exc.code)
            if full and exc.code == "server_overloaded":
                self.busy.refused += 1
            raise

    def _admit_media(self, prompt: Prompt, arrival: float) -> None:
        """The second admission, once a request's media are known (text alone checks the backbone as it queues)."""
        tiers = sorted({f"encoder:{p.modality}" for p in prompt.media})
        self.admit(tiers, counted=True, arrived=arrival if tiers else None)

    def _enter(self, tenant, count: bool = True) -> None:
        """Count a request admitted in flight, refusing it (429) past its tenant's share of ``max_inflight``: one
        key's slow requests (remote media on a slow host, long generations) took every slot, and every other key
        was refused 503 (an outside tester's finding). ``count=False``: only the check."""
        if tenant is not None:
            held = self.inflight_by_tenant.get(tenant.name, 0) + self.bodies_by_tenant.get(tenant.name, 0)
            share = tenant_share(self.cfg, self.tenants())
            # A key alone holds the whole gateway: its refusal is the gateway's (503, with its busy Retry-After),
            # not a 429 for a share (its requests sending bodies counted: it came first, with 1 s: a regression
            # tester's 142 of 575 refusals).
            if held >= share and share < self.cfg.max_inflight:
                self.metrics.reject("rate_limit_exceeded")
                raise RateLimited(f"this key has {held} requests in flight (or sending their bodies), its share of "
                                  f"this gateway's {self.cfg.max_inflight}; retry when one ends", 1, {}, "requests")
            if count:
                count_by(self.inflight_by_tenant, tenant.name, 1)
        if count:
            self.inflight += 1

    def _refused_after_count(self, exc: BaseException, tenant, admission: Admission) -> None:
        """A request counted toward its tenant's rate, then refused: for load (its share, the gateway's: 429, 503),
        its count is given back, as a refusal for load before it is counted never counts (an outside tester's
        burst of 12 was counted 21 times); an APIError answers with the tenant's rate headers."""
        if isinstance(exc, APIError):
            exc.rate = tuple(admission.headers.items())
            if exc.status in (429, 503):
                self.limiter.uncount(tenant, admission)

    def _refused_before_run(self, exc: BaseException, tenant, admission: Admission | None) -> None:
        """A request counted toward its tenant's rate and refused once its prompt was built, before it ran: past its
        tokens per minute (429), an encoder queue's backlog (503), no live worker (503). Its count is given back,
        as for every refusal: a client retrying a tpm 429 used up its requests per minute with its refusals and was
        locked out for the minute (an outside tester's: six refusals, then a request that fitted got "6 requests
        per minute")."""
        if admission is not None and isinstance(exc, APIError) and exc.code in REFUSALS:
            self.limiter.uncount(tenant, admission)

    def _sending(self, tenant, n: int) -> None:
        """Count (1) or uncount (-1) a request of ``tenant`` receiving its body (toward its share: ``_enter``)."""
        if tenant is not None:
            count_by(self.bodies_by_tenant, tenant.name, n)

    def _leave(self, tenant) -> None:
        self.inflight -= 1
        self.busy.finished += 1
        if tenant is not None:
            count_by(self.inflight_by_tenant, tenant.name, -1)

    def end_in_flight(self) -> int:
        """End every request in flight with a 503 ``server_shutting_down`` (an error event for a stream that has
        begun), cancelling its generation, and refuse new ones; those still receiving their body or preparing end
        the same way (``_or_closing``). For the end of the server's graceful period (gateway/server.py): the
        requests still running then would otherwise be cut without an answer (a Realtime answer too: its session
        closes its socket once the answer's events are sent). Returns how many queued requests were ended."""
        self.closing = True
        self._closed.set()  # requests still receiving their body or preparing (a remote fetch) end too
        queues = list(self.replies.queues.values())
        for queue in queues:
            queue.put_nowait(_shutting_down())
        if queues:
            log.warning("ending requests still in flight: the gateway is shutting down",
                        extra={"requests": len(queues)})
        return len(queues)

    async def _or_closing(self, awaitable):
        """``awaitable``'s result, unless the gateway's graceful period ends first (``end_in_flight``): then a 503
        ``server_shutting_down`` (the awaitable cancelled)."""
        if self.closing:
            raise _shutting_down()
        work = asyncio.ensure_future(awaitable)
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({work, closed}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            work.cancel()
            raise
        finally:
            closed.cancel()
        if not work.done():
            work.cancel()
            raise _shutting_down()
        try:
            return work.result()
        finally:  # a raised result's traceback holds this frame: without ``work`` in it, no cycle keeps it alive
            del work

    async def _rate(self, tenant, request_id: str = "") -> Admission:
        """The tenant's rate-limit state, or a 429 (``RateLimiter.admit``)."""
        return await self._limited(self.limiter.admit(tenant), "checking the rate limit", request_id)

    async def _reserve(self, tenant, tokens: int, request_id: str) -> Reservation | None:
        """``tokens`` reserved in the tenant's window, or a 429 (``RateLimiter.reserve``)."""
        return await self._limited(self.limiter.reserve(tenant, tokens), "reserving tokens", request_id)

    async def _limited(self, call, what: str, request_id: str):
        """A rate limiter's round trip, bounded as every other of a request's (``tiers.bounded``); Redis failing is
        a 503, and a refusal is counted in the metrics' rejected requests."""
        try:
            try:
                return await bounded(call, what, request_id)
            except Exception as exc:
                if not redis_failure(exc):
                    raise
                log.warning("redis failed", extra={"request_id": request_id, "during": what,
                                                   "error": f"{type(exc).__name__}: {exc}"})
                raise redis_unavailable(exc) from exc
        except APIError as exc:
            self.metrics.reject(exc.code)
            raise

    async def handle(self, request: Request, ids: RequestIds) -> Response:
        arrival = time.perf_counter()
        # Refused for load before it counts toward its tenant's rate (a client retrying a 503 would otherwise spend
        # its requests per minute on refusals), and before the body is read: refused at once.
        self.admit(["backbone"])
        tenant = getattr(request.state, "tenant", None)
        self._enter(tenant, count=False)  # past its share (bodies being received too): refused before it is counted
        # A client still sending its body holds no slot of ``max_inflight`` (slow senders would take them all: a
        # slowloris); the bodies being received are bounded in bytes instead (``_read_body``), and a key's count
        # toward its share, from the instant its share is checked (a burst arriving together passed the check all
        # at once when they were counted after the rate's round trip: a regression tester's 29 of 29 admitted).
        self._sending(tenant, 1)
        admission = None
        try:
            admission = await self._rate(tenant, ids.server)  # a 429
            ids = replace(ids, rate=tuple(admission.headers.items()))
            body = await self._or_closing(self._read_body(request, tenant))
            self.admit(["backbone"])
        except BaseException as exc:
            if admission is not None:
                self._refused_after_count(exc, tenant, admission)
            raise
        finally:
            self._sending(tenant, -1)
        try:
            self._enter(tenant)
        except BaseException as exc:
            self._refused_after_count(exc, tenant, admission)
            raise
        streaming = False
        try:
            response = await self._handle(request, body, ids, arrival)
            streaming = isinstance(response, ReleasingStream)
            return response
        except APIError as exc:
            exc.rate = ids.rate
            self._refused_before_run(exc, tenant, admission)
            raise
        finally:
            if not streaming:  # a stream is counted until its last event (``_sse``)
                self._leave(tenant)

    async def _handle(self, request: Request, body: bytes, ids: RequestIds, arrival: float) -> Response:
        rid = ids.server
        tenant = getattr(request.state, "tenant", None)  # gateway/auth.py: None without API keys
        req, prompt = await self._or_closing(self._prepare(body, tenant))
        log.info("request", extra={"request_id": rid, "client_request_id": ids.client, "stream": req.stream,
                                   "tenant": tenant.name if tenant else None,
                                   "media": len(prompt.media), "text_tokens": len(prompt.token_ids)})
        self._admit_media(prompt, arrival)
        queue = self.replies.subscribe(rid)
        watcher = self._spawn(self._watch_disconnect(request, queue))
        deltas = None
        try:
            plan, reserved = await self._plan(rid, req, prompt, queue, tenant=tenant)
            ids = ids.reserved(reserved)

            async def encode_again() -> list[m.MediaRef]:  # a cached tensor expired (or a Redis restart lost it)
                return await self.media.encode(rid, prompt.media, queue, prompt.namespace, prompt.tenant)

            deltas = self._deltas(rid, req, plan, queue, encode_again, tenant, arrival, reserved)
            first = await anext(deltas)  # errors before the first token are plain HTTP errors
        except BaseException as exc:
            if deltas is None:
                self._ended_early(exc, arrival)
            watcher.cancel()
            self.replies.unsubscribe(rid)
            raise
        if req.stream:
            def release() -> None:  # once the stream ended, however it ended (even before its first byte)
                self._leave(tenant)
                watcher.cancel()
                self.replies.unsubscribe(rid)

            return ReleasingStream(self._sse(rid, req, first, deltas), release, media_type="text/event-stream",
                                   headers={"cache-control": "no-cache", **ids.headers()})
        try:
            last, text = first, first.text
            async for last in deltas:
                text += last.text
        finally:
            watcher.cancel()
            self.replies.unsubscribe(rid)
        return JSONResponse(self._completion(rid, req, text, last), headers=ids.headers())

    async def respond(self, rid: str, body: bytes, cancelled: asyncio.Event, via: str,
                      features: dict[str, bytes] | None = None, tenant=None, namespace: str | None = None,
                      cap: float | None = None) -> AsyncIterator[Delta]:
        """One chat completion for a caller other than the HTTP route (the Realtime WebSocket): ``body`` is a chat
        request (JSON), run through the same validation, admission, media encoding (cache first) and generation.
        ``features``: audio features the caller already computed, by the digest of the media part they stand for;
        a part that must be encoded sends them to the encoder instead of its bytes. An APIError comes before the
        first delta; setting ``cancelled``, or closing the iterator, stops it and frees the backbone slot
        (ClientGone). ``tenant``: the caller's (gateway/auth.py), None without API keys; ``namespace``: the cache
        namespace ``features`` were keyed in (default: the tenant's, as ``namespace()`` gives it); ``cap``: instead
        of a budget in ``body``, at most this many tokens, as many as the context leaves (``math.inf``: all of it),
        as the Realtime protocol's ``max_output_tokens`` means."""
        arrival = time.perf_counter()
        self.admit(["backbone"])  # a refusal for load counts toward no rate limit
        self._enter(tenant, count=False)
        admission = await self._rate(tenant, rid)
        try:
            self._enter(tenant)
        except BaseException as exc:
            self._refused_after_count(exc, tenant, admission)
            raise
        queue = watcher = None
        try:
            req, prompt = await self._or_closing(self._prepare(body, tenant, namespace))
            if features:
                prompt.media[:] = [replace(p, features=features.get(p.digest)) for p in prompt.media]
            log.info("request", extra={"request_id": rid, "via": via, "tenant": tenant.name if tenant else None,
                                       "media": len(prompt.media),
                                       "text_tokens": len(prompt.token_ids)})
            self._admit_media(prompt, arrival)
            queue = self.replies.subscribe(rid)
            watcher = self._spawn(self._watch_event(cancelled, queue))
            try:
                plan, reserved = await self._plan(rid, req, prompt, queue, cap, tenant)
            except BaseException as exc:
                self._ended_early(exc, arrival)
                # The REST route logs how its request ended (gateway/app.py); this caller's ends here, unlogged
                # otherwise (a socket dropped while its media were encoded).
                log.info("response", extra={"request_id": rid, "via": via, "completion_tokens": 0,
                                            "finished": None, "ended": getattr(exc, "code", None)
                                            or type(exc).__name__})
                raise

            async def encode_again() -> list[m.MediaRef]:
                return await self.media.encode(rid, prompt.media, queue, prompt.namespace, prompt.tenant)

            deltas = self._deltas(rid, req, plan, queue, encode_again, tenant, arrival, reserved)
            try:
                async for d in deltas:
                    yield d
            finally:
                await deltas.aclose()
        except Exception as exc:  # Redis failing while preparing or encoding: the 503 the REST route answers
            self._refused_before_run(exc, tenant, admission)
            if not redis_failure(exc):
                raise
            log.warning("redis failed", extra={"request_id": rid, "error": f"{type(exc).__name__}: {exc}"})
            raise redis_unavailable(exc) from exc
        finally:
            if watcher is not None:
                watcher.cancel()
            if queue is not None:
                self.replies.unsubscribe(rid)
            self._leave(tenant)

    def _ended_early(self, exc: BaseException, arrival: float) -> None:
        """A request that ended while its media were encoded or its plan queued, before it could generate (an
        encoder tier down, bad media found by the encoder, the client gone): in the metrics as ``_deltas`` counts
        the others, so that an outage there shows as errors, not as silence."""
        gone = isinstance(exc, (ClientGone, asyncio.CancelledError, GeneratorExit))
        self.metrics.request(arrival).finish("abort" if gone else "error")

    @staticmethod
    async def _watch_event(cancelled: asyncio.Event, queue: asyncio.Queue) -> None:
        await cancelled.wait()
        queue.put_nowait(DISCONNECTED)

    async def _read_body(self, request: Request, tenant=None) -> bytes:
        """The request's body, within ``max_body_bytes`` and ``body_timeout_s``. The bodies being received at once are
        bounded in bytes (``RECEIVING_BODIES`` whole ones: a 503), and a tenant's to its share of that bound, as of
        ``max_inflight`` (a 429): one key's 16 bodies held one byte short of their end for the body timeout had every
        other key's bodies over 256 KiB refused (an outside tester's)."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.cfg.max_body_bytes:
            raise PayloadTooLarge(f"request body exceeds {self.cfg.max_body_bytes} bytes")
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):  # never decompressed here (a zip bomb); never read as if it were plain
            raise UnsupportedMediaType(f"request bodies with Content-Encoding {encoding!r} are not accepted; send the "
                                       "JSON uncompressed", param="content-encoding", code="unsupported_encoding")
        chunks, size = [], 0
        limit = self.cfg.max_body_bytes * RECEIVING_BODIES
        name = tenant.name if tenant is not None else None
        tenant_limit = (limit * tenant_share(self.cfg, self.tenants()) // max(1, self.cfg.max_inflight)
                        if name is not None else limit)
        small = min(SMALL_BODY, self.cfg.max_body_bytes // 16)
        try:
            try:
                async with asyncio.timeout(self.cfg.body_timeout_s):  # a slow client cannot hold a buffer for long
                    async for chunk in request.stream():
                        if not chunk:  # Starlette's empty last chunk (an empty body is only that): nothing to count
                            continue
                        size += len(chunk)
                        self.receiving += len(chunk)
                        if name is not None:
                            count_by(self.receiving_by_tenant, name, len(chunk))
                        if size > self.cfg.max_body_bytes:
                            raise PayloadTooLarge(f"request body exceeds {self.cfg.max_body_bytes} bytes")
                        if (name is not None and self.receiving_by_tenant[name] > tenant_limit and size > small
                                and tenant_limit < limit):
                            self.metrics.reject("rate_limit_exceeded")
                            raise RateLimited(f"this key is sending {tenant_limit} bytes of request bodies at once, "
                                              "its share of this gateway's; retry when one is sent", 1, {}, "requests")
                        if self.receiving > limit and size > small:
                            self.metrics.reject("server_overloaded")
                            raise Overloaded(f"this gateway is receiving {limit} bytes of request bodies at once; "
                                             "retry later")
                        chunks.append(chunk)
            except TimeoutError:
                raise RequestTimeout(f"the request body did not arrive within {self.cfg.body_timeout_s:g} s") from None
            except ClientDisconnect:  # the client left (or sent a body the HTTP parser refused) before it all came
                raise ClientGone() from None
        except BaseException:
            # The exception's traceback holds this frame, and with it ``chunks``, for as long as the exception
            # lives, which a reference cycle (a task holding its exception, whose traceback holds the task) makes
            # "until the garbage collector runs": a gateway kept every byte of every body cut off by its client.
            chunks.clear()
            raise
        finally:
            self.receiving -= size
            if name is not None and size:
                count_by(self.receiving_by_tenant, name, -size)
        return b"".join(chunks)

    def namespace(self, tenant) -> str:
        """The cache namespace a request's media are keyed in: its tenant's (gateway/auth.py; "" without keys), or
        with the media cache off (``media_cache``) one of its own, which nothing else ever looks up."""
        namespace = tenant.cache if tenant else ""
        return namespace if self.cfg.media_cache else f"{namespace}|once:{secrets.token_hex(12)}"

    async def parse_off_loop(self, size: int, parse, *args):
        """``parse(*args)`` of ``size`` bytes, on a thread: past LARGE_PARSE one at a time, across the REST bodies
        and the Realtime events (gateway/realtime.py) of this gateway."""
        async with self.large_parse if size > LARGE_PARSE else contextlib.nullcontext():
            return await asyncio.to_thread(parse, *args)

    async def _prepare(self, body: bytes, tenant=None, namespace: str | None = None
                       ) -> tuple[ChatCompletionRequest, Prompt]:
        """Parse (on a thread), fetch remote media (gateway/remote.py: concurrently, each bounded), then build the
        prompt (on a thread), its media keyed in ``namespace`` (default: ``namespace(tenant)``)."""
        namespace = self.namespace(tenant) if namespace is None else namespace
        req = await self.parse_off_loop(len(body), self._parse, body)
        remote = self.builder.remote_parts(req)
        fetched = {}
        if remote:
            tasks = [asyncio.ensure_future(self.remote.fetch(url, kind, param)) for param, url, kind in remote]
            try:
                datas = await asyncio.gather(*tasks)
            except BaseException:  # one part refused (or the client gone): the other fetches stop too
                for task in tasks:
                    task.cancel()
                # The exception's traceback holds this frame: with the tasks in it (one holding that exception),
                # the fetched bytes would wait for the garbage collector.
                tasks = task = None
                raise
            fetched = {param: data for (param, _, _), data in zip(remote, datas)}
        prompt = await asyncio.to_thread(self._build, req, namespace, fetched)
        return req, replace(prompt, tenant=tenant.name if tenant else "")

    def _parse(self, body: bytes) -> ChatCompletionRequest:
        req = parse_chat_request(body)
        if req.model != self.spec.name:
            raise NotFound(f"model '{req.model}' does not exist; this server serves '{self.spec.name}'",
                           param="model", code="model_not_found")
        req.stop_strings()  # validate now, before any work is queued
        return req

    def _build(self, req: ChatCompletionRequest, namespace: str, fetched: dict[str, bytes]) -> Prompt:
        prompt = self.builder.build(req, namespace, fetched)
        # before anything is encoded
        self._check_context(prompt.expected_length, req.token_budget(), req.budget_param())
        return prompt

    def _check_context(self, length: int, budget: int | None, param: str = "max_tokens") -> int:
        """The room left after a prompt of ``length`` tokens; a 400 if the prompt or the budget (from the field
        ``param``) does not fit."""
        room = self.spec.max_context - length
        if room < 1:
            raise InvalidRequest(f"the prompt is {length} tokens; this model's context is "
                                 f"{self.spec.max_context} tokens", param="messages", code="context_length_exceeded")
        if budget is not None and budget > room:
            raise InvalidRequest(f"{param} {budget} + prompt {length} tokens exceeds the context of "
                                 f"{self.spec.max_context} tokens", param=param, code="context_length_exceeded")
        return room

    async def _plan(self, rid: str, req: ChatCompletionRequest, prompt: Prompt, queue, cap: float | None = None,
                    tenant=None) -> tuple[m.PromptPlan, Reservation | None]:
        """The plan, and its token reservation. ``cap`` (see ``respond``): the budget when the request names none,
        clamped to the context left. With a token rate limit, the prompt and the budget are reserved first
        (``RateLimiter.reserve``: a 429 here), and settled as the request ends (``_deltas``, given the
        reservation)."""
        default = self.cfg.default_max_tokens if cap is None else cap
        length = prompt.expected_length
        may_take = length + (req.token_budget() or int(min(default, self.spec.max_context - length)))
        reservation = await self._reserve(tenant, may_take, rid)
        try:
            refs = await self.media.encode(rid, prompt.media, queue, prompt.namespace, prompt.tenant)
            ids = expand_placeholders(prompt.token_ids, self.spec.placeholder_ids, [r.num_tokens for r in refs])
            # the encoders' counts are final
            room = self._check_context(len(ids), budget := req.token_budget(), req.budget_param())
        except BaseException:
            if reservation is not None:  # it does not run: what it reserved is given back
                self._spawn(self.limiter.spend(tenant, -reservation.tokens, reservation.key))
            raise
        # The seed is fixed here when the client sent none: every attempt of the request (a migration, a plan
        # queued twice by a retried XADD) then draws the same tokens, so they can be joined by position.
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        sampling = m.SamplingParams(max_tokens=budget or int(min(default, room)),
                                    temperature=req.temperature, top_p=req.top_p, seed=seed,
                                    ignore_eos=req.ignore_eos, default_budget=budget is None)
        return m.PromptPlan(request_id=rid, reply_to=self.tiers.reply_stream, token_ids=ids, media=refs,
                            sampling=sampling, deadline=clock.now() + self.cfg.first_token_timeout_s,
                            cache_salt=tenant.cache if tenant else ""), reservation

    async def _deltas(self, rid: str, req: ChatCompletionRequest, plan: m.PromptPlan, queue, encode_again,
                      tenant=None, arrival: float | None = None, reserved: Reservation | None = None
                      ) -> AsyncIterator[Delta]:
        """The request's deltas; ``reserved``: its token reservation, settled to what it used as it ends."""
        detok = Detokenizer(self.builder.tokenizer, req.stop_strings())
        finished = False
        used = 0  # prompt + completion tokens so far, for the tenant's token rate limit
        timing = self.metrics.request(time.perf_counter() if arrival is None else arrival)
        reason = "abort"  # the metrics' finished_reason (gateway/metrics.py) unless it ends otherwise
        queued = True  # its plan may be queued: a cancellation is posted should it end unfinished
        media = tuple(sum(r.num_tokens for r in plan.media if r.modality == mod)
                      for mod in (m.Modality.IMAGE, m.Modality.AUDIO))
        try:
            started = _monotonic(arrival) if arrival is not None else None
            async for ev in self.tiers.generate(plan, queue, encode_again, started):
                if ev.finish == m.FinishReason.ERROR:
                    finished = True
                    reason = "error"
                    raise _event_error(ev, req)
                timing.tokens(len(ev.token_ids), ev.prompt_tokens)
                text = detok.add(ev.token_ids)
                used = ev.prompt_tokens + ev.completion_tokens
                d = Delta(text, None, ev.prompt_tokens, ev.completion_tokens, ev.cached_tokens, media, ev.dtype)
                if detok.stopped or ev.finish is not None:
                    finished = ev.finish is not None
                    d.text += detok.flush()
                    d.finish = "length" if ev.finish == m.FinishReason.LENGTH and not detok.stopped else "stop"
                    reason = "abort" if ev.finish == m.FinishReason.CANCELLED else d.finish  # a stop string: stop
                    yield d
                    return
                yield d
        except ClientGone:  # the client went away: an abort
            raise
        except Exception as exc:  # the gateway gave up waiting (a 504) included: the service failed the request
            reason = "error"
            queued = not (isinstance(exc, APIError) and exc.code == "no_live_worker")  # refused before queueing
            if not redis_failure(exc):
                raise
            # Redis failing mid-answer (a migration's requeue, a cancel): a 503, as before the first token
            log.warning("redis failed mid-answer", extra={"request_id": rid, "error": f"{type(exc).__name__}: {exc}"})
            raise redis_unavailable(exc) from exc
        finally:
            timing.finish(reason)
            if not finished and queued:  # stop string, client gone, timeout: free the backbone slot (none for a
                self._spawn(self.tiers.cancel(rid))  # request refused before queueing: its key would stay 10 min)
            if used or reserved:
                self._spawn(self.limiter.spend(tenant, used - (reserved.tokens if reserved else 0),
                                               reserved.key if reserved else None))
            log.info("response", extra={"request_id": rid, "completion_tokens": len(detok.ids),
                                        "finished": finished, "outcome": reason})  # stop, length, abort, error

    async def _sse(self, rid, req, first: Delta, deltas) -> AsyncIterator[bytes]:
        created, model = int(time.time()), self.spec.name
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        fingerprint = self.spec.system_fingerprint_with(first.backbone_dtype)  # one for the whole answer

        def event(choices: list, usage: dict | None = None) -> bytes:
            body = {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": created, "model": model,
                    "system_fingerprint": fingerprint, "choices": choices}
            if include_usage:  # on every chunk, null but on the last, as OpenAI's (clients read chunk["usage"])
                body["usage"] = usage
            return b"data: " + json.dumps(body).encode() + b"\n\n"

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            return event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])

        last = first
        try:
            yield chunk({"role": "assistant", "content": ""})
            d = first
            while True:
                if d.text:
                    yield chunk({"content": d.text})
                last = d
                if d.finish:
                    yield chunk({}, d.finish)
                    break
                d = await anext(deltas)
            if include_usage:
                yield event([], _usage(last))
        except (APIError, ClientGone) as exc:
            err = exc if isinstance(exc, APIError) else Internal("client disconnected")
            yield b"data: " + json.dumps(err.body()).encode() + b"\n\n"
        except Exception:  # the stream has started: end it with an error event, not a cut connection
            log.exception("unhandled error mid-stream", extra={"request_id": rid})
            err = Internal("internal error; see the gateway log for request " + rid)
            yield b"data: " + json.dumps(err.body()).encode() + b"\n\n"
        finally:
            await deltas.aclose()
        yield b"data: [DONE]\n\n"

    def _completion(self, rid: str, req: ChatCompletionRequest, text: str, last: Delta) -> dict:
        return {
            "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()),
            "model": self.spec.name, "system_fingerprint": self.spec.system_fingerprint_with(last.backbone_dtype),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": last.finish}],
            "usage": _usage(last),
        }

    async def _watch_disconnect(self, request: Request, queue: asyncio.Queue) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                queue.put_nowait(DISCONNECTED)
                return

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._spawned)
        return task

    def _spawned(self, task: asyncio.Task) -> None:
        """A request's task beside its answer (a watcher, a cancel posted, tokens settled) that failed is logged, as
        one line with the error: it was only dropped, and asyncio said "exception was never retrieved" at its
        collection, with no words of ours."""
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("a request's background task failed", extra={
                "task": getattr(task.get_coro(), "__qualname__", "?"), "error": f"{type(exc).__name__}: {exc}"})


class ReleasingStream(StreamingResponse):
    """A streamed answer that calls ``release`` exactly once when the response ends, whether it ran to its end,
    the client went away, or sending failed before the body started (when the body generator never runs)."""

    def __init__(self, content, release, **kwargs):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


def _usage(d: Delta) -> dict:
    """OpenAI's usage object. The details count what this server can have: prompt tokens its prefix cache held and
    those the audio encoder made; every completion token is text (no reasoning, audio or predicted-output tokens)."""
    return {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
            "total_tokens": d.prompt_tokens + d.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": d.cached_tokens, "audio_tokens": d.media_tokens[1]},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0}}


def _shutting_down() -> APIError:
    return Unavailable("the gateway is shutting down; retry the request", code="server_shutting_down",
                       retry_after=1)


def _event_error(ev: m.TokenEvent, req: ChatCompletionRequest) -> APIError:
    if ev.code == m.ErrorCode.BAD_PLAN:
        if ev.limit is not None:  # the backbone's KV pool holds less than the request: its context, in effect
            return InvalidRequest(ev.error or "the request does not fit the backbone's KV pool",
                                  param="messages" if ev.limit == "prompt" else req.budget_param(),
                                  code="context_length_exceeded")
        return InvalidRequest(ev.error or "the request does not fit the model")
    if ev.code == m.ErrorCode.MEDIA_EXPIRED:
        return Unavailable(ev.error or "a cached input expired; retry", code="media_expired")
    if ev.code == m.ErrorCode.DEADLINE:
        return Timeout(ev.error or "the request waited too long for a backbone", code="first_token_timeout")
    if ev.code == m.ErrorCode.CANCELLED:
        return Unavailable(ev.error or "the request was cancelled before it started")
    if ev.code == m.ErrorCode.GAVE_UP:
        return Internal(ev.error or "the request was given up on", code="dead_lettered")
    return Internal(ev.error or "the backbone failed this request")


def _monotonic(perf: float) -> float:
    """A ``time.perf_counter()`` instant (a request's arrival) on the ``time.monotonic()`` clock (the monitor's)."""
    return time.monotonic() - (time.perf_counter() - perf)


def count_by(counts: dict[str, int], name: str, n: int) -> None:
    """Add ``n`` (negative: take it off what it holds: a KeyError if it holds nothing) to ``counts[name]``, dropping
    it at 0: a tenant holding nothing holds no entry."""
    left = (counts.pop(name) if n < 0 else counts.pop(name, 0)) + n
    if left:
        counts[name] = left


def tenant_share(cfg: GatewayConfig, tenants: int) -> int:
    """What one API key's tenant may hold of a gateway's ``max_inflight`` (requests in flight, and Realtime
    connections apart): an even share among the tenants the keys name, but never less than a quarter (it counts at
    most TENANT_SHARE tenants), one at the least. A gateway of one tenant gives it all."""
    return max(1, cfg.max_inflight // min(TENANT_SHARE, max(1, tenants)))

"""The Starlette application: routes, the lifespan that opens Redis and starts the reply reader, error rendering.

Probes: ``/health`` is liveness (200 while this process serves, with each tier's live workers and whether Redis
answers: a reason to page someone, never to restart the gateway); ``/ready`` is readiness (200 only once Redis
answers and every tier the served model needs has a live worker, else 503 saying what is missing or why Redis is
unreachable). Both answer from the cluster monitor's last view (gateway/monitor.py, at most a second old), never by
waiting on Redis themselves. Both echo the
gateway's ``instance`` id, so a supervisor can tell its own gateway from another process on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from pathlib import Path

from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from cache.client import ASYNC_MAX_CONNECTIONS, SOCKET_TIMEOUT_S, connect_async
from cache.keys import Keys
from gateway.auth import AuthMiddleware, KeyRing
from gateway.chat import ChatService, RequestIds
from gateway.config import GatewayConfig
from gateway.dashboard import Dashboard
from gateway.encoding import MediaEncoder
from gateway.errors import (
    APIError,
    Internal,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    redis_failure,
    redis_unavailable,
)
from gateway.metrics import CONTENT_TYPE, ClusterMetrics, GatewayMetrics, lease_owner
from gateway.monitor import PROBE_TIMEOUT_S, ClusterMonitor
from gateway.openapi import openapi
from gateway.origin import CORS, BrowserGuard, refuse, split_list
from gateway.prompt import PromptBuilder
from gateway.ratelimit import RateLimiter
from gateway.realtime import realtime_endpoint
from gateway.replies import ReplyRouter
from gateway.tiers import RESET, ClientGone, TierClient
from models.spec import ModelSpec, parse_encoder_dtypes
from router.logs import REQUEST_ID

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"  # the playground page (no build step, nothing from a CDN)


def tiers_for(spec: ModelSpec) -> list[str]:
    """The tiers this model needs: one encoder per modality it takes (LLaVA: image only), and the backbone."""
    return [f"encoder:{m}" for m in spec.modalities] + ["backbone"]


def create_app(cfg: GatewayConfig):
    """The ASGI app: the Starlette routes behind the browser checks and the API key check."""
    spec = ModelSpec.from_dir(cfg.model_dir, cfg.served_name).with_encoder_dtypes(
        parse_encoder_dtypes(cfg.encoder_dtype), parse_encoder_dtypes(cfg.encoder_wire_dtype))
    tokenizer = spec.load_tokenizer()
    needed_tiers = tiers_for(spec)
    gateway_id = uuid.uuid4().hex[:12]
    keys = Keys(cfg.prefix)
    ring = KeyRing.from_env(cfg.api_key_file, cfg.shared_cache)  # a bad key file stops the start here
    if ring.enabled:
        log.info("API keys required", extra={"key_file": cfg.api_key_file})
    metrics = GatewayMetrics()  # GET /metrics (gateway/metrics.py)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        # Twice the workers' socket timeout: a request already in flight rides out a short outage (a failover, a
        # pause of a few seconds) while new requests are refused at once by the monitor (gateway/monitor.py).
        # Connections for every request in flight at once, twice over (a request's own call and a cancellation).
        redis = connect_async(cfg.redis_url, socket_timeout=2 * SOCKET_TIMEOUT_S,
                              max_connections=max(ASYNC_MAX_CONNECTIONS, 2 * cfg.max_inflight))
        reply_stream = keys.reply(gateway_id)
        replies = ReplyRouter(redis, keys, gateway_id)
        tiers = TierClient(redis, cfg, spec, replies, reply_stream)
        tiers.on_migrate = metrics.migrations.inc

        def on_reset() -> None:  # Redis lost our lease: every request in flight re-queues its work
            tiers.reset_at = time.monotonic()
            for queue in list(replies.queues.values()):
                queue.put_nowait(RESET)

        def on_beat(view) -> None:
            metrics.redis_up.set(1 if view.up else 0)
            if view.steady():
                tiers.check_workers(view.live.get("backbone", set()))

        monitor = ClusterMonitor(cfg, needed_tiers, reply_stream, on_reset, on_beat)
        await monitor.beat()  # takes the lease before the first request (a Redis still away is retried)
        app.state.redis, app.state.tiers, app.state.monitor = redis, tiers, monitor
        tiers.view = monitor.view
        media = MediaEncoder(redis, cfg, spec, replies, reply_stream, tiers.liveness_unknown, metrics,
                             tiers.known_live, tiers.gone)
        builder = PromptBuilder(spec, tokenizer, cfg.max_media_bytes, cfg.limit_mm_per_prompt, cfg.max_audio_seconds)
        limiter = RateLimiter(redis, keys, cfg.rate_limit_rpm, cfg.rate_limit_tpm)
        app.state.chat = ChatService(cfg, builder, media, tiers, replies, monitor, limiter, metrics)
        app.state.chat.tenants = ring.tenant_count  # each tenant's share of max_inflight (chat.tenant_share)
        # The queues' metrics, exported by one gateway of the cluster (the metrics leader lease); its own
        # connection (the monitor's settings: a short timeout, never a timeout retried), so a slow Redis never
        # holds requests.
        cluster = ClusterMetrics(connect_async(cfg.redis_url, retries=1, socket_timeout=2.0), keys,
                                 needed_tiers, lease_owner(gateway_id))
        await cluster.refresh()  # a Redis still away only leaves the snapshot empty
        metrics.attach(cluster)
        app.state.spec, app.state.cfg, app.state.realtime_connections = spec, cfg, 0
        app.state.realtime_by_tenant = {}  # tenant name -> its open Realtime connections (gateway/realtime.py)
        app.state.dashboard = Dashboard(cluster, keys, spec.name, metrics.recent, ring.enabled)
        # Kept: the loop holds tasks weakly.
        tasks = [asyncio.create_task(replies.run(), name="reply-reader"),
                 asyncio.create_task(monitor.run(), name="cluster-monitor"),
                 asyncio.create_task(cluster.run(), name="cluster-metrics")]
        for task in tasks:  # each loops for good; one that ends is a bug: stop rather than serve 504s
            task.add_done_callback(_stop_if_ended)
        log.info("gateway ready", extra={"gateway_id": gateway_id, "model": spec.name})
        try:
            yield
        finally:
            await stop_tasks(tasks)
            await monitor.close()
            await cluster.close()
            await cluster.r.aclose()
            with contextlib.suppress(RedisError, TimeoutError):  # else it expires with this gateway's lease
                await asyncio.wait_for(redis.delete(reply_stream), PROBE_TIMEOUT_S)
            await redis.aclose()

    async def chat_completions(request: Request) -> Response:
        ids = RequestIds.of(request)
        rid = ids.server
        REQUEST_ID.set(rid)  # every log line of this request names it (router/logs.py)
        try:
            return await request.app.state.chat.handle(request, ids)
        except APIError as exc:
            tenant = getattr(request.state, "tenant", None)
            log.info("request refused", extra={"request_id": rid, "client_request_id": ids.client,
                                               "status": exc.status, "code": exc.code,
                                               "tenant": tenant.name if tenant else None, "error": exc.message})
            metrics.error(exc.status, exc.code)
            return exc.response(ids.headers())
        except ClientGone:
            log.info("client disconnected", extra={"request_id": rid})
            return Response(status_code=499)
        except Exception as exc:
            if redis_failure(exc):
                log.error("redis unavailable", extra={"request_id": rid, "error": f"{type(exc).__name__}: {exc}"})
                metrics.error(503, "redis_unavailable")
                return redis_unavailable(exc).response(ids.headers())
            log.exception("unhandled error", extra={"request_id": rid})
            metrics.error(500, None)
            return Internal("internal error; see the gateway log for request " + rid).response(ids.headers())

    def model_card() -> dict:
        return {"id": spec.name, "object": "model", "created": int(spec.path.stat().st_mtime), "owned_by": "tributary"}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        """``GET /v1/models/{id}`` (the SDK's ``models.retrieve``)."""
        name = request.path_params["model"]
        if name != spec.name:
            return NotFound(f"model '{name}' does not exist; this server serves '{spec.name}'", param="model",
                            code="model_not_found").response()
        return JSONResponse(model_card())

    api_description = openapi(spec.name, _version())

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(api_description)

    async def probe(request: Request) -> tuple[dict, bool]:
        """What both probes report, and whether this gateway is ready to serve."""
        body = {"instance": cfg.instance_id, "gateway_id": gateway_id, "pid": os.getpid(), "model": spec.name,
                "time": time.time()}
        view = request.app.state.monitor.view
        if not view.up:  # the monitor's verdict, at once: no probe may hang on an unreachable Redis
            return {**body, "status": "redis_unavailable", "redis": f"unavailable: {view.reason}",
                    "redis_down_s": round(time.monotonic() - view.since, 1), "workers": {}}, False
        chat = request.app.state.chat
        body.update(inflight=chat.inflight, realtime_connections=request.app.state.realtime_connections,
                    backlog=view.backlog, queue_wait_s=view.wait,
                    migrations=request.app.state.tiers.migrations)
        live = {tier: len(view.live.get(tier, ())) for tier in needed_tiers}  # as of the last beat (<= 1 s)
        missing = [tier for tier, n in live.items() if not n]
        status = "ok" if not missing else "degraded"
        if view.redis_warning:
            body["redis_warning"] = view.redis_warning
        redis_state = "ok"
        if view.reads_failing is not None:  # a Redis Cluster node away: workers as last read
            redis_state = f"ok, but the live sets are unread: {view.reads_failing}"
            body["read_age_s"] = round(time.monotonic() - view.read_at, 1) if view.read_at is not None else None
        if view.unreadable:  # a queue's node away: its backlog as last read
            body["queues_unread"] = dict(view.unreadable)
            if "backbone" in view.unreadable:  # every request queues there: none can be served (admit refuses)
                redis_state, status = f"the backbone's queue does not answer: {view.unreadable['backbone']}", \
                    "redis_unavailable"
        # Just after Redis (or the reads of the live sets) came back, a worker's beats may have lapsed meanwhile:
        # a tier missing then proves nothing (requests are queued, not refused: gateway/tiers.liveness_unknown),
        # and a load balancer taking every gateway out for those seconds would refuse what they would serve.
        settling = request.app.state.tiers.settling_s()
        if missing and settling > 0:
            body["settling_s"] = round(settling, 1)
        ready = (not missing or settling > 0) and "backbone" not in view.unreadable
        return {**body, "status": status, "redis": redis_state, "workers": live, "missing": missing}, ready

    async def metrics_text(request: Request) -> Response:
        """Prometheus metrics (no API key: gateway/auth.py). Never waits on Redis (gateway/metrics.py)."""
        body = await asyncio.to_thread(metrics.render) if metrics.multiprocess else metrics.render()
        return Response(body, media_type=CONTENT_TYPE)

    async def page(request: Request) -> Response:
        """The playground (gateway/static): a chat and the tiers' live state; no data of its own, so no key."""
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    async def dashboard_state(request: Request) -> Response:
        """The playground's live data (gateway/dashboard.py); behind the API key when keys are configured."""
        tenant = getattr(request.state, "tenant", None)
        state = await request.app.state.dashboard.state(tenant.name if tenant else None)
        return JSONResponse(state, headers={"cache-control": "no-store"})

    async def health(request: Request) -> Response:
        body, _ = await probe(request)
        return JSONResponse(body)

    async def ready(request: Request) -> Response:
        """Readiness. ``?scope=gateway``: this gateway's own part only (its Redis answers, the backbone's queue
        with it), whatever workers are live, for a Service in front of several gateways: every gateway sees the
        same tiers, so a tier without a worker (one pod restarting, a node drained) took every gateway out at once,
        and clients met refused connections, text-only ones included, instead of the 503 ``no_live_worker`` with
        its Retry-After that the gateway answers (a deploy review's)."""
        scope = request.query_params.get("scope", "cluster")
        if scope not in ("cluster", "gateway"):
            return InvalidRequest(f"scope must be 'cluster' (every tier has a live worker: the default) or "
                                  f"'gateway' (this gateway serves), not {scope[:40]!r}", param="scope").response()
        body, ok = await probe(request)
        if scope == "gateway":
            ok = body["status"] != "redis_unavailable"
        return JSONResponse({**body, "scope": scope}, status_code=200 if ok else 503)

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", model, methods=["GET"]),
            Route("/openapi.json", openapi_json, methods=["GET"]),
            WebSocketRoute("/v1/realtime", realtime_endpoint),
            Route("/health", health, methods=["GET"]),
            Route("/ready", ready, methods=["GET"]),
            Route("/metrics", metrics_text, methods=["GET"]),
            Route("/", page, methods=["GET"]),
            Route("/dashboard/state", dashboard_state, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        lifespan=lifespan,
        exception_handlers={404: _route_error, 405: _route_error},
    )
    # A path with a trailing slash is a 404 naming the route, not Starlette's 307 redirect: clients POST, and
    # OpenAI's SDK (httpx) does not follow redirects, so a redirect would only hide the mistake.
    app.router.redirect_slashes = False
    # Outermost first: the browser checks (Host, Origin), CORS when origins are allowed (it answers preflights,
    # which carry no key), then the API key.
    outer = AuthMiddleware(app, ring)
    if origins := split_list(cfg.allowed_origins):
        outer = CORS(outer, origins)
    guarded = with_request_id(BrowserGuard(outer, cfg.bind_host, cfg.allowed_hosts, cfg.allowed_origins))

    def end_in_flight() -> int:  # gateway/server.py, as the graceful period ends; before the lifespan: nothing yet
        chat = getattr(app.state, "chat", None)
        return chat.end_in_flight() if chat is not None else 0

    def redis_away_s() -> float:  # for how long the monitor has found Redis away (0: up, or not checked yet)
        chat = getattr(app.state, "chat", None)
        return chat.monitor.view.away_s() if chat is not None else 0.0

    guarded.end_in_flight, guarded.redis_away_s = end_in_flight, redis_away_s
    return guarded


STOP_TASKS_S = 5.0  # how long the lifespan's end waits for the background tasks


async def stop_tasks(tasks: list[asyncio.Task], timeout_s: float = STOP_TASKS_S) -> None:
    """Cancel ``tasks`` and wait for them, bounded. A cancellation can be lost: redis-py, cancelled while it
    connects, carries on with the command (seen: a gateway that could not bind its port hung in its shutdown for good,
    deaf to SIGTERM, its reply reader looping on). So a task still running is cancelled again every half second, and
    one still running after ``timeout_s`` is logged and left, never holding the process."""
    deadline = time.monotonic() + timeout_s
    pending = {t for t in tasks if not t.done()}
    while pending and (left := deadline - time.monotonic()) > 0:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(0.5, left))
    for task in pending:
        log.error("a background task did not stop; leaving it", extra={"task": task.get_name()})
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("a background task had failed", exc_info=task.exception(), extra={"task": task.get_name()})


def _stop_if_ended(task: asyncio.Task) -> None:
    """A gateway background loop (the reply reader above all: without it every request waits out its timeout while
    /health says ok) that ended other than by being cancelled: logged, and the process stopped as SIGTERM stops it,
    so that its supervisor (tributary up, Kubernetes) starts a fresh one."""
    if task.cancelled():
        return
    exc = task.exception()
    log.critical("a gateway background task ended; stopping the gateway to be restarted",
                 extra={"task": task.get_name(), "error": f"{type(exc).__name__}: {exc}" if exc else "returned"})
    os.kill(os.getpid(), signal.SIGTERM)


def with_request_id(app):
    """Every HTTP response carries ``x-request-id`` (as OpenAI's do), refusals by the browser and key checks, 404s
    and 405s included: the chat route sets its own (the id that runs through every tier); any other response gets
    the one made here, which a refusal's log record names too (``scope["state"]["response_id"]``)."""
    async def wrapped(scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await app(scope, receive, send)
        if scope["type"] == "websocket" and scope.get("path") != "/v1/realtime":
            # Starlette closes it before accepting, which uvicorn answers 403 with an empty text body
            return await refuse(scope, receive, send, 404, "not_found",
                                f"no WebSocket endpoint at {scope.get('path')!r} (the Realtime API is at /v1/realtime)",
                                extra_headers=[(b"x-request-id", uuid.uuid4().hex.encode())])
        rid = uuid.uuid4().hex
        scope.setdefault("state", {})["response_id"] = rid

        async def send_with_id(message):
            # a WebSocket refused before its handshake is answered as HTTP too (the denial-response extension)
            if message["type"] in ("http.response.start", "websocket.http.response.start") and not any(
                    k.lower() == b"x-request-id" for k, _ in message.get("headers", ())):
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        return await app(scope, receive, send_with_id)

    return wrapped


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tributary")
    except PackageNotFoundError:
        return "0"


async def _route_error(request: Request, exc) -> Response:
    if exc.status_code == 405:
        return MethodNotAllowed(f"method {request.method} is not allowed on {request.url.path}").response(
            getattr(exc, "headers", None))  # Starlette's carries Allow
    path = request.url.path
    hint = f" (did you mean {path.rstrip('/')}?)" if path.endswith("/") and len(path) > 1 else ""
    return NotFound(f"no route {request.method} {path}{hint}").response()

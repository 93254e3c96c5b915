"""The Starlette application: routes, the lifespan that opens Redis and starts the reply reader, error rendering."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cache.client import connect_async
from cache.keys import Keys
from gateway.chat import ChatService, request_id_for
from gateway.config import GatewayConfig
from gateway.encoding import MediaEncoder
from gateway.errors import APIError, Internal, MethodNotAllowed, NotFound, Unavailable
from gateway.prompt import PromptBuilder
from gateway.replies import ReplyRouter
from gateway.tiers import ClientGone, TierClient
from models.spec import ModelSpec

log = logging.getLogger(__name__)


def tiers_for(spec: ModelSpec) -> list[str]:
    """The tiers this model needs: one encoder per modality it takes (LLaVA: image only), and the backbone."""
    return [f"encoder:{m}" for m in spec.modalities] + ["backbone"]


def create_app(cfg: GatewayConfig) -> Starlette:
    spec = ModelSpec.from_dir(cfg.model_dir, cfg.served_name)
    tokenizer = spec.load_tokenizer()
    needed_tiers = tiers_for(spec)
    gateway_id = uuid.uuid4().hex[:12]
    keys = Keys(cfg.prefix)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        redis = connect_async(cfg.redis_url)
        replies = ReplyRouter(redis, keys, gateway_id)
        tiers = TierClient(redis, cfg, spec, replies, keys.reply(gateway_id))
        app.state.redis, app.state.tiers = redis, tiers
        media = MediaEncoder(redis, cfg, spec, replies, keys.reply(gateway_id))
        app.state.chat = ChatService(cfg, PromptBuilder(spec, tokenizer, cfg.max_media_bytes), media, tiers, replies)
        reader = asyncio.create_task(replies.run(), name="reply-reader")  # kept: the loop holds tasks weakly
        log.info("gateway ready", extra={"gateway_id": gateway_id, "model": spec.name})
        try:
            yield
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            with contextlib.suppress(RedisError):
                await redis.delete(keys.reply(gateway_id))
            await redis.aclose()

    async def chat_completions(request: Request) -> Response:
        rid = request_id_for(request)
        try:
            return await request.app.state.chat.handle(request, rid)
        except APIError as exc:
            log.info("request refused", extra={"request_id": rid, "status": exc.status, "error": exc.message})
            return exc.response({"x-request-id": rid})
        except ClientGone:
            log.info("client disconnected", extra={"request_id": rid})
            return Response(status_code=499)
        except RedisError as exc:
            log.error("redis unavailable", extra={"request_id": rid, "error": str(exc)})
            return Unavailable(f"the queue (Redis) is unavailable: {exc}").response({"x-request-id": rid})
        except Exception:
            log.exception("unhandled error", extra={"request_id": rid})
            return Internal("internal error; see the gateway log for request " + rid).response({"x-request-id": rid})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": spec.name, "object": "model", "created": int(spec.path.stat().st_mtime), "owned_by": "tributary"}
        ]})

    async def health(request: Request) -> Response:
        try:
            live = await request.app.state.tiers.live_workers(needed_tiers)
        except RedisError as exc:
            return JSONResponse({"status": "unavailable", "error": f"redis: {exc}"}, status_code=503)
        ready = all(live.values())
        return JSONResponse({"status": "ok" if ready else "degraded", "workers": live, "time": time.time()})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={404: _route_error, 405: _route_error},
    )


async def _route_error(request: Request, exc) -> Response:
    if exc.status_code == 405:
        return MethodNotAllowed(f"method {request.method} is not allowed on {request.url.path}").response()
    return NotFound(f"no route {request.method} {request.url.path}").response()

"""Redis connections with one retry policy for every tier.

Workers (encoders, backbone) run a synchronous loop and use :func:`connect`; the gateway runs on asyncio and uses
:func:`connect_async`. Both retry transient connection errors with exponential backoff instead of sleeping in loops.
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

RETRY_ERRORS = [RedisConnectionError, RedisTimeoutError]


def _options() -> dict:
    return {
        "retry_on_error": RETRY_ERRORS,
        "health_check_interval": 30,
        "socket_keepalive": True,
        "decode_responses": False,
    }


def connect(url: str, retries: int = 5) -> redis.Redis:
    from redis.retry import Retry

    return redis.Redis.from_url(url, retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries), **_options())


def connect_async(url: str, retries: int = 5) -> aioredis.Redis:
    from redis.asyncio.retry import Retry

    return aioredis.Redis.from_url(
        url, retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries), **_options()
    )

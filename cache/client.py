"""Redis connections with one retry and timeout policy for every tier.

Workers (encoders, backbone) run a synchronous loop and use :func:`connect`; the gateway runs on asyncio and uses
:func:`connect_async`. Both retry a call that could not reach the server (a connection refused or reset: a
restarting server, a stale pooled connection) a few times with exponential backoff, but never one that timed out:
the server may have run it, and running XADD or XREADGROUP twice queues a plan twice or delivers entries nobody
hears of (callers handle that: workers re-read their own pending entries, cache/streams.py). Every call has a
socket timeout: a paused or partitioned server makes a call fail after ``socket_timeout`` (plus the retries)
instead of hanging until TCP gives up. Blocking reads (XREAD/XREADGROUP ``BLOCK``) must block for less than the
socket timeout. A call that times out or is cancelled closes its connection (redis-py disconnects on both), so its
late reply can never be read by the next command (the lesson of CVE-2023-28858; tests/integration/test_recovery.py).
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

RETRY_ERRORS = [RedisConnectionError]  # not RedisTimeoutError: see above


SOCKET_TIMEOUT_S = 5.0  # any one call (longer than every BLOCK we use: at most 1 s)
CONNECT_TIMEOUT_S = 2.0


def redact(url: str) -> str:
    """A Redis URL fit for a log line or a banner: its password (and user) replaced by ``***``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def describe(exc: BaseException) -> str:
    """What went wrong talking to Redis, in words fit for a client or a probe: no host, port or server text (those
    go to the log)."""
    from redis.exceptions import AuthenticationError, ResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    if isinstance(exc, AuthenticationError) or "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
        return "authentication failed"
    if isinstance(exc, (RedisTimeoutError, TimeoutError)):
        return "timed out"
    if isinstance(exc, RedisConnectionError | ConnectionError | OSError):
        return "cannot connect"
    if isinstance(exc, ResponseError):
        return "the server refused a command"
    return "error"


PASSWORD_FILE_ENV = "TRIBUTARY_REDIS_PASSWORD_FILE"


def with_password_file(url: str) -> str:
    """``url`` with the password read from the file ``$TRIBUTARY_REDIS_PASSWORD_FILE`` names (a Docker or Kubernetes
    secret mounted as a file), unless the URL carries one already. Read at every connect, so a rotated secret is
    picked up by the next connection."""
    import os
    from urllib.parse import quote, urlsplit, urlunsplit

    path = os.environ.get(PASSWORD_FILE_ENV)
    parts = urlsplit(url)
    if not path or parts.password is not None:
        return url
    try:
        password = open(path, encoding="utf-8").read().strip()
    except OSError as exc:
        raise ValueError(f"{PASSWORD_FILE_ENV}: cannot read the password file ({exc.strerror})") from None
    if not password:
        return url
    user = quote(parts.username, safe="") if parts.username else ""
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _options(socket_timeout: float) -> dict:
    return {
        "retry_on_error": RETRY_ERRORS,
        "retry_on_timeout": False,
        "health_check_interval": 30,
        "socket_keepalive": True,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": min(CONNECT_TIMEOUT_S, socket_timeout),
        "decode_responses": False,
    }


def connect(url: str, retries: int = 2, socket_timeout: float = SOCKET_TIMEOUT_S) -> redis.Redis:
    from redis.retry import Retry

    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries, tuple(RETRY_ERRORS))
    return redis.Redis.from_url(with_password_file(url), retry=retry, **_options(socket_timeout))


def connect_async(url: str, retries: int = 2, socket_timeout: float = SOCKET_TIMEOUT_S) -> aioredis.Redis:
    from redis.asyncio.retry import Retry

    return aioredis.Redis.from_url(with_password_file(url), retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries,
                                                    tuple(RETRY_ERRORS)), **_options(socket_timeout))

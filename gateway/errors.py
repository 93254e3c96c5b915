"""The gateway's errors and their one HTTP rendering: the OpenAI error shape
``{"error": {"message", "type", "param", "code"}}``. Statuses are decided here and nowhere else.

Messages are for the client: they name the part and what was wrong in the client's terms. As a last line of defence,
every message is scrubbed of what a library's exception text may carry in (``public_message``): Python object reprs
(``<_io.BytesIO object at 0x7f...>``) and tracebacks. The detail belongs in the server's log, not in the response.
"""

from __future__ import annotations

import json
import random
import re

from redis.exceptions import RedisError
from starlette.responses import JSONResponse

from cache.client import REDIS_CODE, refused_for_memory

# ``<_io.BytesIO object at 0x7f...>``, ``<function <lambda> at 0x7f...>``, ``<bound method X.y of <...>>``'s inner
# part: any repr carrying a memory address. The space before it goes too ("Error opening <...>: x" -> "Error opening:
# x").
_OBJECT_REPR = re.compile(r"\s*<[\w.]+(?: [\w.]+)*(?: <[\w.]+>)?(?: [\w.]+)* at 0x[0-9a-fA-F]+>")
_TRACEBACK = re.compile(r"\s*Traceback \(most recent call last\):.*", re.DOTALL)


def public_message(message: str) -> str:
    """``message`` without object reprs or a traceback (what a library's ``str(exc)`` may hold)."""
    message = str(message)
    if " at 0x" in message or "Traceback (" in message:
        message = _OBJECT_REPR.sub("", _TRACEBACK.sub("", message)).strip()
    return message or "the request failed (the details are in the server log)"


MESSAGE_AT_MOST = 2000  # characters of an error message
PARAM_AT_MOST = 256  # characters of its param


def clip(text: str | None, at_most: int) -> str | None:
    """``text``, or its first ``at_most`` characters and how many there were."""
    if text is None or len(text) <= at_most:
        return text
    return f"{text[:at_most]}... ({len(text)} characters)"


class ErrorJSON(JSONResponse):
    """Rendered as ASCII (non-ASCII escaped): an error message may quote client text, and escaping can never fail
    to encode, whatever that text holds."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class APIError(Exception):
    status = 500
    type = "server_error"
    rate: tuple = ()  # the tenant's x-ratelimit-* headers, when it was refused after being counted

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        # Clipped: either may quote the client's text (a 100,000-character model name came back whole, and a body of
        # 90,000 unknown keys got a 400 naming all of them, logged as one 889 KB line).
        message, param = clip(public_message(message), MESSAGE_AT_MOST), clip(param, PARAM_AT_MOST)
        super().__init__(message)
        self.message, self.param, self.code, self.retry_after = message, param, code, retry_after

    def body(self) -> dict:
        return {"error": {"message": public_message(self.message), "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        if self.rate:
            headers = {**dict(self.rate), **(headers or {})}
        if self.retry_after is not None:
            # retry-after-ms (read first by the OpenAI SDKs) spreads the retries over the delay and up to half of it
            # more, 2 s at most (never sooner: a rate limit's window): refused together, clients would otherwise all
            # come back in the same instant and be refused again; a long wait needs no more spread (an outside
            # tester's 81 s rate-limit wait was told as 85.2 s).
            jittered = round(1000 * (self.retry_after + random.uniform(0.0, min(0.5 * self.retry_after, 2.0))))
            headers = {**(headers or {}), "retry-after": str(self.retry_after), "retry-after-ms": str(jittered)}
        if self.status == 408:  # the rest of the body may still trickle in: the connection goes with the answer
            headers = {**(headers or {}), "connection": "close"}
        return ErrorJSON(self.body(), status_code=self.status, headers=headers)


class InvalidRequest(APIError):
    status, type = 400, "invalid_request_error"


class NotFound(APIError):
    status, type = 404, "invalid_request_error"


class MethodNotAllowed(APIError):
    status, type = 405, "invalid_request_error"


class RequestTimeout(APIError):
    """The request body did not arrive in time."""

    status, type = 408, "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = "request_timeout"):
        super().__init__(message, param, code)  # the code the header timeout's 408 carries (gateway/server.py)


class PayloadTooLarge(APIError):
    status, type = 413, "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = "request_too_large"):
        super().__init__(message, param, code)


class UnsupportedMediaType(APIError):
    status, type = 415, "invalid_request_error"


class Unavailable(APIError):
    """A tier has no live worker or Redis is unreachable: retry later."""

    status, type = 503, "service_unavailable"


def redis_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of the Redis path, answered with a 503 (retry later), not a 500: redis-py's
    errors, its cluster client's own (``RedisClusterException``, not a ``RedisError``: no node for a slot), and
    anything raised while redis-py ran, in its own code or in what it called (outside testers' chaos runs: a failover
    gave an AttributeError in its connection code, from a connection another task's retry had closed; a write on
    such a connection gave uvloop's ``RuntimeError: unable to perform operation on <TCPTransport closed=True>``,
    raised in uvloop's frame, beneath redis-py's)."""
    from redis.exceptions import RedisClusterException

    if isinstance(exc, RedisError | RedisClusterException):
        return True
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(REDIS_CODE):
            return True
        tb = tb.tb_next
    return False


def redis_unavailable(exc: BaseException) -> Unavailable:
    """The 503 for a Redis call that failed, wherever in a request it failed (before its first token, mid-stream, in
    a Realtime event): Redis unreachable, timed out, or refusing writes for memory (said so: an operator then looks
    at ``maxmemory``, not at the network)."""
    if refused_for_memory(exc):
        return Unavailable("Redis (queues and cache) is out of memory and refuses writes (maxmemory); retry later",
                           code="redis_unavailable", retry_after=2)
    return Unavailable("Redis (queues and cache) is unavailable; retry later", code="redis_unavailable", retry_after=2)


def redis_too_slow() -> Unavailable:
    """The 503 for a request's Redis round trip that did not answer within its bound (a Redis Cluster node paused or
    partitioned away: a call waits for its socket timeout, and redis-py's cluster client retries it)."""
    return Unavailable("Redis (queues and cache) did not answer in time; retry later", code="redis_unavailable",
                       retry_after=2)


class Overloaded(Unavailable):
    """Past an admission bound (in-flight requests, a tier's backlog): retry after a moment. 429 is kept for
    per-key rate limits."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, code="server_overloaded", retry_after=retry_after)


class Timeout(APIError):
    """A tier did not answer within its bound."""

    status, type = 504, "timeout"


class Internal(APIError):
    status, type = 500, "server_error"

"""Per-tenant rate limits: requests and tokens per minute, counted in Redis so that they hold across gateways.

Limits need API keys (they are per tenant): ``--rate-limit-rpm`` / ``--rate-limit-tpm`` for every tenant (0: none),
and ``rpm=N`` / ``tpm=N`` after a tenant's digest in the key file for that tenant (gateway/auth.py).

Counting is a sliding window over the last minute, estimated from two fixed one-minute counters per tenant (the
approximation Cloudflare and others use): ``INCR`` for each request into the current minute's counter (for tokens,
``INCRBY`` of what a request may take, its prompt and its budget, as it starts, settled to what it took as it ends),
and the previous minute's count weighted by the part of it still inside the last 60 s. So a burst cannot take twice
the limit across a minute's boundary, as with one fixed window; keys expire after two minutes. A request is refused
with a 429 ``rate_limit_exceeded`` when that estimate already holds ``rpm`` requests, or when what it may take would
pass ``tpm`` tokens (unless the estimate holds nothing else: a request larger than the limit runs alone), with a
``Retry-After`` of the seconds until it would fit, were nothing else sent meanwhile. Every answer to a limited tenant
carries OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers: remaining is the limit less the
estimate (the tokens remaining count the request's own reservation), reset the seconds until the estimate is back to
nothing. A count whose round trip is cut (the request's Redis bound, a cancel, a lost reply: it may have been made
all the same) is given back, as a refused request's is.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import NamedTuple

from cache.keys import Keys
from gateway.errors import APIError

log = logging.getLogger(__name__)
WINDOW_S = 60
SPEND_TIMEOUT_S = 10.0  # a finished request's token count is written within this, or dropped (a node away)


class Reservation(NamedTuple):
    """What a request reserved of its tenant's tokens per minute (``RateLimiter.reserve``)."""
    key: str  # its window's token counter, which the request's count settles
    tokens: int
    remaining: int  # the window's tokens left with this reservation counted: x-ratelimit-remaining-tokens


class Admission(NamedTuple):
    """A request counted toward its tenant's requests per minute (``RateLimiter.admit``)."""
    headers: dict[str, str]  # the x-ratelimit-* headers for its answers
    key: str | None = None  # the window's request counter it was counted in (None: no limit, nothing counted)


class Window(NamedTuple):
    """A tenant's counters now: the current minute's, the previous minute's, and how far into the current one."""
    requests: str
    tokens: str
    previous_requests: str
    previous_tokens: str
    elapsed: float  # seconds into the current minute

    def carried(self, previous) -> float:
        """The share of the previous minute's count (a Redis reply) still inside the last 60 s."""
        return int(previous or 0) * (1 - self.elapsed / WINDOW_S)

    def wait(self, current: int, previous, need: int, limit: int) -> int:
        """Seconds until ``need`` more fit within ``limit`` (or the estimate holds nothing, when ``need`` alone
        passes it), with no other traffic: the previous minute's share falls linearly over this minute, this
        minute's over the next. ``current``: this minute's count without the one asking."""
        previous, target = int(previous or 0), max(limit - need, 0)
        if current <= target:  # fits once the previous minute's share has fallen to what is left
            t = WINDOW_S * (1 - (target - current) / previous) - self.elapsed if previous else 0.0
        else:  # not before the next minute, while this one's count falls in turn
            t = WINDOW_S - self.elapsed + WINDOW_S * (1 - target / current)
        return max(1, math.ceil(t))

    def reset(self, current: int, previous) -> int:
        """Seconds until the estimate is back to nothing (x-ratelimit-reset-*)."""
        if current:
            return math.ceil(2 * WINDOW_S - self.elapsed)
        return math.ceil(WINDOW_S - self.elapsed) if int(previous or 0) else 0


class RateLimited(APIError):
    status, type = 429, "requests"

    def __init__(self, message: str, retry_after: int, headers: dict[str, str], kind: str):
        super().__init__(message, code="rate_limit_exceeded", retry_after=retry_after)
        self.type, self.headers = kind, headers

    def response(self, headers: dict | None = None):
        return super().response({**(headers or {}), **self.headers})


class RateLimiter:
    def __init__(self, redis, keys: Keys, rpm: int = 0, tpm: int = 0):
        if rpm < 0 or tpm < 0:
            raise ValueError("rate limits must be >= 0 (0: none)")
        self.r, self.keys, self.rpm, self.tpm = redis, keys, rpm, tpm
        self._giving_back: set[asyncio.Task] = set()
        self.clock = time.time  # the minutes' clock (tests set it)

    def limits(self, tenant) -> tuple[int, int]:
        if tenant is None:
            return 0, 0
        return (tenant.rpm if tenant.rpm is not None else self.rpm,
                tenant.tpm if tenant.tpm is not None else self.tpm)

    def _window(self, tenant) -> Window:
        now = self.clock()
        minute = int(now // WINDOW_S)
        key = f"{self.keys.prefix}:rl:{tenant.name}:{{}}:{{}}".format
        return Window(key(minute, "requests"), key(minute, "tokens"), key(minute - 1, "requests"),
                      key(minute - 1, "tokens"), now - minute * WINDOW_S)

    async def admit(self, tenant) -> Admission:
        """Count this request (its rate headers, and the counter to give it back to should it be refused for load:
        :meth:`uncount`), or RateLimited. No Redis call for a tenant without limits."""
        rpm, tpm = self.limits(tenant)
        if not rpm and not tpm:
            return Admission({})
        w = self._window(tenant)
        pipe = self._adding(w.requests, 1)
        for key in (w.tokens, w.previous_requests, w.previous_tokens):  # GETs, not an MGET: on a Redis Cluster the
            pipe.get(key)  # minutes' keys lie in different slots
        requests, _, tokens, prev_requests, prev_tokens = await self._or_given_back(pipe, tenant, w.requests, 1)
        tokens = int(tokens or 0)
        seen_requests = requests + w.carried(prev_requests)  # this request included
        seen_tokens = tokens + w.carried(prev_tokens)
        headers = {}
        if rpm:
            headers.update({"x-ratelimit-limit-requests": str(rpm),
                            "x-ratelimit-remaining-requests": str(max(rpm - math.ceil(seen_requests), 0)),
                            "x-ratelimit-reset-requests": f"{w.reset(requests, prev_requests)}s"})
        if tpm:
            headers.update({"x-ratelimit-limit-tokens": str(tpm),
                            "x-ratelimit-remaining-tokens": str(max(tpm - math.ceil(seen_tokens), 0)),
                            "x-ratelimit-reset-tokens": f"{w.reset(tokens, prev_tokens)}s"})
        over_requests, over_tokens = rpm and seen_requests > rpm, tpm and seen_tokens >= tpm
        if over_requests or over_tokens:
            self._give_back(tenant, w.requests, 1)  # refused: not counted (else a burst's refusals held the window)
        if over_requests:
            log.debug("rate limited", extra={"tenant": tenant.name, "limit": "requests"})  # the refusal is logged
            wait = w.wait(requests - 1, prev_requests, 1, rpm)
            raise RateLimited(f"rate limit reached: {rpm} requests per minute; retry in {wait} s", wait, headers,
                              "requests")
        if over_tokens:
            log.debug("rate limited", extra={"tenant": tenant.name, "limit": "tokens"})
            wait = w.wait(tokens, prev_tokens, 1, tpm)
            raise RateLimited(f"rate limit reached: {tpm} tokens per minute; retry in {wait} s", wait, headers,
                              "tokens")
        return Admission(headers, w.requests)

    def uncount(self, tenant, admission: Admission) -> None:
        """Give back a request's count, in a task of its own: it was refused for load after it was counted."""
        if admission.key is not None:
            self._give_back(tenant, admission.key, 1)

    async def reserve(self, tenant, tokens: int) -> Reservation | None:
        """Count ``tokens`` (a request's prompt and its budget, what it may take) in its tenant's window before it
        runs, or refuse it (429) when that would pass the tenant's tokens per minute. Without it, requests admitted
        together each spent their budget past the limit (an outside tester: three of 1,000 tokens against 60). A
        request alone in its window is let through whatever its size (a limit under one request's budget must not
        refuse every request). The reservation is settled by :meth:`spend` as the request ends; None: nothing
        reserved (no token limit)."""
        tpm = self.limits(tenant)[1]
        if not tpm or tokens <= 0:
            return None
        w = self._window(tenant)
        pipe = self._adding(w.tokens, tokens)
        pipe.get(w.previous_tokens)
        total, _, previous = await self._or_given_back(pipe, tenant, w.tokens, tokens)
        seen = total + w.carried(previous)  # this reservation included
        if seen > tpm and seen - tokens > 0:
            await self.spend(tenant, -tokens, w.tokens)  # given back: this request does not run
            log.debug("rate limited", extra={"tenant": tenant.name, "limit": "tokens", "reserving": tokens})
            wait = w.wait(total - tokens, previous, tokens, tpm)
            headers = {"x-ratelimit-limit-tokens": str(tpm),
                       "x-ratelimit-remaining-tokens": str(max(tpm - math.ceil(seen - tokens), 0)),
                       "x-ratelimit-reset-tokens": f"{w.reset(total - tokens, previous)}s"}
            raise RateLimited(f"rate limit reached: {tpm} tokens per minute, and this request may take {tokens} "
                              f"(its prompt and its max_tokens); retry in {wait} s", wait, headers, "tokens")
        return Reservation(w.tokens, tokens, max(tpm - math.ceil(seen), 0))

    async def spend(self, tenant, tokens: int, key: str | None = None) -> None:
        """Add a finished request's tokens to its tenant's window (best effort: a lost count only errs in the
        tenant's favour); ``key``: that of the window it reserved in, which its count (here, what it used less what
        it reserved: negative for a request that took less) settles."""
        if not self.limits(tenant)[1] or not tokens:
            return
        await self._add(tenant, key or self._window(tenant).tokens, tokens)

    def _adding(self, key: str, n: int):
        """A pipeline adding ``n`` to the counter ``key``, which expires two windows on."""
        pipe = self.r.pipeline(transaction=False)
        pipe.incrby(key, n)
        pipe.expire(key, 2 * WINDOW_S)
        return pipe

    async def _add(self, tenant, key: str, n: int) -> None:
        """Add ``n`` to a counter, best effort: a lost count only errs in the tenant's favour."""
        try:
            await asyncio.wait_for(self._adding(key, n).execute(), SPEND_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 -- Redis away: the monitor refuses new requests anyway
            log.warning("could not update a rate-limit count", extra={"tenant": tenant.name, "error": str(exc)})

    async def _or_given_back(self, pipe, tenant, key: str, n: int) -> list:
        """``pipe.execute()``, which adds ``n`` to ``key``; when the call is cut (the request's bound on a Redis round
        trip, a cancel, a reply lost), the count may have been made all the same: it is given back (a request
        answered 503 held 8,000 of its tenant's tokens per minute in a reviewer's test). Giving back a count that
        was never made errs in the tenant's favour, as a lost one does."""
        try:
            return await pipe.execute()
        except BaseException:
            self._give_back(tenant, key, n)
            raise

    def _give_back(self, tenant, key: str, n: int) -> None:
        """Take ``n`` off the counter ``key``, in a task of its own (best effort)."""
        task = asyncio.get_running_loop().create_task(self._add(tenant, key, -n))
        self._giving_back.add(task)  # held: a task only the loop refers to may be collected before it runs
        task.add_done_callback(self._giving_back.discard)

"""Per-tenant rate limits: requests and tokens per minute, counted in Redis so that they hold across gateways.

Limits need API keys (they are per tenant): ``--rate-limit-rpm`` / ``--rate-limit-tpm`` for every tenant (0: none),
and ``rpm=N`` / ``tpm=N`` after a tenant's digest in the key file for that tenant (gateway/auth.py). Counting is a
fixed one-minute window per tenant (``INCR`` for each request; for tokens, ``INCRBY`` of what a request may take,
its prompt and its budget, as it starts, settled to what it took as it ends), keys expiring after two minutes. A
request is refused with a 429 ``rate_limit_exceeded`` and ``Retry-After`` (seconds to the next window) when the
window already holds ``rpm`` requests, or when what it may take would pass ``tpm`` tokens (unless it is alone in its
window). Every answer to a limited tenant carries OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``
headers; the tokens remaining count the request's own reservation. A count whose round trip is cut (the request's
Redis bound, a cancel, a lost reply: it may have been made all the same) is given back, as a refused request's is.
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

    def limits(self, tenant) -> tuple[int, int]:
        if tenant is None:
            return 0, 0
        return (tenant.rpm if tenant.rpm is not None else self.rpm,
                tenant.tpm if tenant.tpm is not None else self.tpm)

    def _window(self, tenant) -> tuple[str, str, int]:
        now = time.time()
        window = int(now // WINDOW_S)
        reset = math.ceil((window + 1) * WINDOW_S - now)
        return (f"{self.keys.prefix}:rl:{tenant.name}:{window}:requests",
                f"{self.keys.prefix}:rl:{tenant.name}:{window}:tokens", reset)

    async def admit(self, tenant) -> Admission:
        """Count this request (its rate headers, and the counter to give it back to should it be refused for load:
        :meth:`uncount`), or RateLimited. No Redis call for a tenant without limits."""
        rpm, tpm = self.limits(tenant)
        if not rpm and not tpm:
            return Admission({})
        req_key, tok_key, reset = self._window(tenant)
        pipe = self._adding(req_key, 1)
        pipe.get(tok_key)
        requests, _, tokens = await self._or_given_back(pipe, tenant, req_key, 1)
        tokens = int(tokens or 0)
        headers = {}
        if rpm:
            headers.update({"x-ratelimit-limit-requests": str(rpm),
                            "x-ratelimit-remaining-requests": str(max(rpm - requests, 0)),
                            "x-ratelimit-reset-requests": f"{reset}s"})
        if tpm:
            headers.update({"x-ratelimit-limit-tokens": str(tpm),
                            "x-ratelimit-remaining-tokens": str(max(tpm - tokens, 0)),
                            "x-ratelimit-reset-tokens": f"{reset}s"})
        if (rpm and requests > rpm) or (tpm and tokens >= tpm):
            self._give_back(tenant, req_key, 1)  # refused: not counted (else a burst's refusals held the window)
        if rpm and requests > rpm:
            log.debug("rate limited", extra={"tenant": tenant.name, "limit": "requests"})  # the refusal is logged
            raise RateLimited(f"rate limit reached: {rpm} requests per minute; retry in {reset} s", reset, headers,
                              "requests")
        if tpm and tokens >= tpm:
            log.debug("rate limited", extra={"tenant": tenant.name, "limit": "tokens"})
            raise RateLimited(f"rate limit reached: {tpm} tokens per minute; retry in {reset} s", reset, headers,
                              "tokens")
        return Admission(headers, req_key)

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
        _, tok_key, reset = self._window(tenant)
        total, _ = await self._or_given_back(self._adding(tok_key, tokens), tenant, tok_key, tokens)
        if total > tpm and total - tokens > 0:
            await self.spend(tenant, -tokens, tok_key)  # given back: this request does not run
            log.debug("rate limited", extra={"tenant": tenant.name, "limit": "tokens", "reserving": tokens})
            headers = {"x-ratelimit-limit-tokens": str(tpm),
                       "x-ratelimit-remaining-tokens": str(max(tpm - (total - tokens), 0)),
                       "x-ratelimit-reset-tokens": f"{reset}s"}
            raise RateLimited(f"rate limit reached: {tpm} tokens per minute, and this request may take {tokens} "
                              f"(its prompt and its max_tokens); retry in {reset} s", reset, headers, "tokens")
        return Reservation(tok_key, tokens, max(tpm - total, 0))

    async def spend(self, tenant, tokens: int, key: str | None = None) -> None:
        """Add a finished request's tokens to its tenant's window (best effort: a lost count only errs in the
        tenant's favour); ``key``: that of the window it reserved in, which its count (here, what it used less what
        it reserved: negative for a request that took less) settles."""
        if not self.limits(tenant)[1] or not tokens:
            return
        await self._add(tenant, key or self._window(tenant)[1], tokens)

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

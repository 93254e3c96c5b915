"""Per-tenant rate limits: requests and tokens per minute, counted in Redis so that they hold across gateways.

Limits need API keys (they are per tenant): ``--rate-limit-rpm`` / ``--rate-limit-tpm`` for every tenant (0: none),
and ``rpm=N`` / ``tpm=N`` after a tenant's digest in the key file for that tenant (gateway/auth.py).

Counting is a sliding minute, at one-second grain: a tenant's requests and tokens are counted per second in a hash
(``<prefix>:rl:<tenant>:requests`` / ``:tokens``, field: the unix second), and a limit holds what the last 61
seconds counted (a second's count leaves 61 s after the second began, so two requests less than 60 s apart always
count against each other). ``HINCRBY`` for each request (for tokens, of what a request may take, its prompt and its
budget, as it starts, settled to what it took as it ends, in the same second's field), read back whole in the same
round trip; fields older than that are deleted as they are met, and the keys expire two minutes after their last
count. No 60 s holds more than the limit (fixed one-minute windows let twice the limit through across a
minute's boundary, and a weighted two-minute estimate 1.7 times: an outside tester's count). A request is refused
with a 429 ``rate_limit_exceeded`` when the minute already holds ``rpm`` requests, or when what it may take would
pass ``tpm`` tokens (unless the minute holds nothing else: a request larger than the limit runs alone), with a
``Retry-After`` of the seconds until it would fit, were nothing else sent meanwhile. Every answer to a limited
tenant carries OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers: remaining is the limit
less the minute's count (the tokens remaining count the request's own reservation), reset the seconds until the
minute holds nothing. A count whose round trip is cut (the request's Redis bound, a cancel, a lost reply: it may
have been made all the same) is given back, as a refused request's is.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import NamedTuple

from cache.keys import Keys
from gateway.errors import APIError
from router import clock

log = logging.getLogger(__name__)
WINDOW_S = 60
# A second's count leaves the minute 61 s after that second began: counted at its end (S.99), it still counts at
# S.99 + 60; leaving at S + 60 let twice the limit into one 60 s (a regression tester's 12 of rpm 6 in 59.25 s).
LEAVES_S = WINDOW_S + 1
SPEND_TIMEOUT_S = 10.0  # a finished request's token count is written within this, or dropped (a node away)


class Count(NamedTuple):
    """Where a count was made: a tenant's hash and the second's field (what giving it back or settling it names)."""
    key: str
    field: int


class Reservation(NamedTuple):
    """What a request reserved of its tenant's tokens per minute (``RateLimiter.reserve``)."""
    key: Count  # the token count the request's count settles
    tokens: int
    remaining: int  # the minute's tokens left with this reservation counted: x-ratelimit-remaining-tokens


class Admission(NamedTuple):
    """A request counted toward its tenant's requests per minute (``RateLimiter.admit``)."""
    headers: dict[str, str]  # the x-ratelimit-* headers for its answers
    key: Count | None = None  # the request count it made (None: no limit, nothing counted)


class Minute(NamedTuple):
    """One counter's last minute (``LEAVES_S``) as read back: its per-second counts, at ``now``."""
    counts: dict[int, int]  # unix second -> count, within the minute
    now: float
    stale: tuple[int, ...] = ()  # fields past the minute, to delete

    @classmethod
    def read(cls, reply, now: float) -> "Minute":
        counts, stale = {}, []
        for field, value in (reply or {}).items():
            try:
                second, n = int(field), int(value)
            except ValueError:  # not ours: ignored, and deleted
                stale.append(field)
                continue
            if second > now - WINDOW_S - 1:  # a second's count stays 61 s after it began (see ``LEAVES_S``)
                counts[second] = n
            else:
                stale.append(second)
        return cls(counts, now, tuple(stale))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def wait(self, need: int, limit: int, without: int = 0) -> int:
        """Seconds until ``need`` more fit within ``limit`` (or nothing else is counted, when ``need`` alone passes
        it), with no other traffic: each second's count leaves the minute ``LEAVES_S`` after that second began.
        ``without``: of this second's count, the asker's own (not counted against it)."""
        target, now_s = max(limit - need, 0), int(self.now)
        counts = dict(self.counts)
        counts[now_s] = counts.get(now_s, 0) - without
        left = sum(counts.values())
        for second in sorted(counts):
            if left <= target:
                break
            left -= counts[second]
            if left <= target:
                return max(1, math.ceil(second + LEAVES_S - self.now))
        return 1

    def reset(self) -> int:
        """Seconds until the minute holds nothing (x-ratelimit-reset-*)."""
        held = [s for s, n in self.counts.items() if n > 0]
        return max(0, math.ceil(max(held) + LEAVES_S - self.now)) if held else 0


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
        self.clock = clock.now  # the minutes' clock: Redis's, shared by every gateway (tests set it)

    def limits(self, tenant) -> tuple[int, int]:
        if tenant is None:
            return 0, 0
        return (tenant.rpm if tenant.rpm is not None else self.rpm,
                tenant.tpm if tenant.tpm is not None else self.tpm)

    def _counts(self, tenant) -> tuple[Count, Count]:
        """This second's request and token counts of ``tenant``."""
        second = int(self.clock())
        key = f"{self.keys.prefix}:rl:{tenant.name}:{{}}".format
        return Count(key("requests"), second), Count(key("tokens"), second)

    async def admit(self, tenant) -> Admission:
        """Count this request (its rate headers, and the count to give back should it be refused for load:
        :meth:`uncount`), or RateLimited. No Redis call for a tenant without limits."""
        rpm, tpm = self.limits(tenant)
        if not rpm and not tpm:
            return Admission({})
        req, tok = self._counts(tenant)
        pipe = self._adding(req, 1)
        pipe.hgetall(req.key)
        pipe.hgetall(tok.key)
        _, _, req_reply, tok_reply = await self._or_given_back(pipe, tenant, req, 1)
        requests, tokens = self._minute(tenant, req.key, req_reply), self._minute(tenant, tok.key, tok_reply)
        headers = {}
        if rpm:
            headers.update({"x-ratelimit-limit-requests": str(rpm),
                            "x-ratelimit-remaining-requests": str(max(rpm - requests.total, 0)),
                            "x-ratelimit-reset-requests": f"{requests.reset()}s"})
        if tpm:
            headers.update({"x-ratelimit-limit-tokens": str(tpm),
                            "x-ratelimit-remaining-tokens": str(max(tpm - tokens.total, 0)),
                            "x-ratelimit-reset-tokens": f"{tokens.reset()}s"})
        over_requests, over_tokens = rpm and requests.total > rpm, tpm and tokens.total >= tpm
        if over_requests or over_tokens:
            self._give_back(tenant, req, 1)  # refused: not counted (else a burst's refusals held the minute)
        if over_requests:
            log.debug("rate limited", extra={"tenant": tenant.name, "limit": "requests"})  # the refusal is logged
            wait = requests.wait(1, rpm, without=1)
            raise RateLimited(f"rate limit reached: {rpm} requests per minute; retry in {wait} s", wait, headers,
                              "requests")
        if over_tokens:
            log.debug("rate limited", extra={"tenant": tenant.name, "limit": "tokens"})
            wait = tokens.wait(1, tpm)
            raise RateLimited(f"rate limit reached: {tpm} tokens per minute; retry in {wait} s", wait, headers,
                              "tokens")
        return Admission(headers, req)

    def uncount(self, tenant, admission: Admission) -> None:
        """Give back a request's count, in a task of its own: it was refused for load after it was counted."""
        if admission.key is not None:
            self._give_back(tenant, admission.key, 1)

    async def reserve(self, tenant, tokens: int) -> Reservation | None:
        """Count ``tokens`` (a request's prompt and its budget, what it may take) in its tenant's minute before it
        runs, or refuse it (429) when that would pass the tenant's tokens per minute. Without it, requests admitted
        together each spent their budget past the limit (an outside tester: three of 1,000 tokens against 60). A
        request the minute holds nothing else against is let through whatever its size (a limit under one
        request's budget must not refuse every request). The reservation is settled by :meth:`spend` as the request
        ends; None: nothing reserved (no token limit)."""
        tpm = self.limits(tenant)[1]
        if not tpm or tokens <= 0:
            return None
        tok = self._counts(tenant)[1]
        pipe = self._adding(tok, tokens)
        pipe.hgetall(tok.key)
        _, _, reply = await self._or_given_back(pipe, tenant, tok, tokens)
        minute = self._minute(tenant, tok.key, reply)
        seen = minute.total  # this reservation included
        if seen > tpm and seen - tokens > 0:
            await self.spend(tenant, -tokens, tok)  # given back: this request does not run
            log.debug("rate limited", extra={"tenant": tenant.name, "limit": "tokens", "reserving": tokens})
            wait = minute.wait(tokens, tpm, without=tokens)
            headers = {"x-ratelimit-limit-tokens": str(tpm),
                       "x-ratelimit-remaining-tokens": str(max(tpm - (seen - tokens), 0)),
                       "x-ratelimit-reset-tokens": f"{minute.reset()}s"}
            raise RateLimited(f"rate limit reached: {tpm} tokens per minute, and this request may take {tokens} "
                              f"(its prompt and its max_tokens); retry in {wait} s", wait, headers, "tokens")
        return Reservation(tok, tokens, max(tpm - seen, 0))

    async def spend(self, tenant, tokens: int, key: Count | None = None) -> None:
        """Add a finished request's tokens to its tenant's minute (best effort: a lost count only errs in the
        tenant's favour); ``key``: the count it reserved in, which its count (here, what it used less what it
        reserved: negative for a request that took less) settles."""
        if not self.limits(tenant)[1] or not tokens:
            return
        await self._add(tenant, key or self._counts(tenant)[1], tokens)

    def _adding(self, count: Count, n: int):
        """A pipeline adding ``n`` to ``count``, whose hash expires two minutes on."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hincrby(count.key, count.field, n)
        pipe.expire(count.key, 2 * WINDOW_S)
        return pipe

    def _minute(self, tenant, key: str, reply) -> Minute:
        """The minute ``key`` read back as (``HGETALL``); its fields past the minute are deleted, in a task of
        their own (best effort)."""
        minute = Minute.read(reply, self.clock())
        if minute.stale:
            self._later(self._run(tenant, lambda: self.r.hdel(key, *minute.stale)))
        return minute

    async def _add(self, tenant, count: Count, n: int) -> None:
        """Add ``n`` to a count, best effort: a lost count only errs in the tenant's favour."""
        await self._run(tenant, lambda: self._adding(count, n).execute())

    async def _run(self, tenant, call) -> None:
        try:
            await asyncio.wait_for(call(), SPEND_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 -- Redis away: the monitor refuses new requests anyway
            log.warning("could not update a rate-limit count", extra={"tenant": tenant.name, "error": str(exc)})

    async def _or_given_back(self, pipe, tenant, count: Count, n: int) -> list:
        """``pipe.execute()``, which adds ``n`` to ``count``; when the call is cut (the request's bound on a Redis
        round trip, a cancel, a reply lost), the count may have been made all the same: it is given back (a request
        answered 503 held 8,000 of its tenant's tokens per minute in a reviewer's test). Giving back a count that
        was never made errs in the tenant's favour, as a lost one does."""
        try:
            return await pipe.execute()
        except BaseException:
            self._give_back(tenant, count, n)
            raise

    def _give_back(self, tenant, count: Count, n: int) -> None:
        """Take ``n`` off ``count``, in a task of its own (best effort)."""
        self._later(self._add(tenant, count, -n))

    def _later(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._giving_back.add(task)  # held: a task only the loop refers to may be collected before it runs
        task.add_done_callback(self._giving_back.discard)

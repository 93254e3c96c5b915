"""Stream and consumer-group helpers shared by the tiers: groups, acks that free memory, reclaiming the entries of
dead consumers, and the dead-letter stream.

Bounded streams: an entry is deleted when it is acknowledged (XACK + XDEL in one round trip), never before, so a
stream holds exactly its unread and in-progress entries; the group's ``lag`` (XINFO GROUPS, what an autoscaler reads)
stays exact because nothing after the group's last-delivered id is ever deleted.

Reclaim from the dead only: XAUTOCLAIM takes every entry idle past a bound whoever holds it, and a busy backbone's
plans sit idle in its pending list for the whole generation; so instead a worker lists the group's consumers, keeps
those absent from its tier's live set (router/liveness.py), and claims exactly their entries (XPENDING for that
consumer, then XCLAIM, which is atomic: of two reclaimers racing, one gets each entry). The same commands and reply
shapes on Redis 6.2 and 7+/Valkey. Each claimed entry comes with its delivery count; a dead consumer with nothing
pending is removed from the group.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from redis.exceptions import AuthenticationError, BusyLoadingError, OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cache.client import no_such_key
from cache.keys import alive

log = logging.getLogger(__name__)

DEAD_LETTER_MAXLEN = 10_000  # the dead-letter stream keeps (about) this many entries


def ensure_group(r, stream: str, group: str) -> None:
    """Create ``group`` on ``stream`` (and the stream) if missing; idempotent."""
    try:
        r.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def ensure_group_patiently(r, stream: str, group: str, stop, what: str) -> bool:
    """:func:`ensure_group`, riding out a Redis that is away or refuses writes (out of memory, a replica promoting,
    loading its data) at a worker's start: retried every few seconds, logged every ~30 s, until it succeeds (True)
    or ``stop`` (a ``threading.Event``: SIGTERM) is set (False). A worker that exits instead is restarted into the
    same Redis, and counted as a crash for a fault that is not its own. Errors that never clear (a wrong password,
    an ACL, a key of the wrong type) are raised."""
    delay, logged = 0.5, -1e9
    while not stop.is_set():
        try:
            ensure_group(r, stream, group)
            return True
        except (RedisConnectionError, RedisTimeoutError, OutOfMemoryError, ReadOnlyError, BusyLoadingError) as exc:
            if isinstance(exc, AuthenticationError):  # a wrong password never clears: fail, as a crash, at once
                raise
            if time.monotonic() - logged > 30:
                logged = time.monotonic()
                log.error("redis unavailable or refusing writes at start; retrying", extra={
                    "worker": what, "error": f"{type(exc).__name__}: {exc}"})
            stop.wait(delay)
            delay = min(delay * 2, 5.0)
    return False


def is_nogroup(exc: Exception) -> bool:
    """A restarted Redis without persistence lost the stream and its group."""
    return isinstance(exc, ResponseError) and "NOGROUP" in str(exc)


def ack_delete(pipe, stream: str, group: str, *entry_ids) -> None:
    """Queue the ack of entries and their deletion: a finished entry leaves the stream with its ack."""
    if entry_ids:
        pipe.xack(stream, group, *entry_ids)
        pipe.xdel(stream, *entry_ids)


_XADD_IF_ALIVE = """
-- KEYS: a gateway's reply stream, its lease (<stream>:alive, the same slot). ARGV: message. Written only while the
-- lease is held: a write after it lapsed would recreate the expired stream with no TTL, for nobody to read.
if redis.call('EXISTS', KEYS[2]) == 1 then
  return redis.call('XADD', KEYS[1], '*', 'm', ARGV[1])
end
return false
"""


def run_script(client, script: str, keys: list, args: list = ()):
    """Run (or queue, on a pipeline) a Lua script on any client or pipeline, single server or cluster, sync or
    asyncio: a plain EVAL (redis-py's cluster pipeline has no ``eval`` and cannot load a script with EVALSHA on the
    node a command lands on; the server caches the compiled script either way). Every key the script touches is in
    ``keys``, all in one slot."""
    return client.execute_command("EVAL", script, len(keys), *keys, *args)


_DELETE_IF_HELD = """
-- KEYS: a lease. ARGV: its holder. Deletes it only if that holder still holds it (not one taken since by another).
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def release_lease(client, key: str, holder: str):
    """Give up the lease ``key`` if ``holder`` holds it (compare and delete, one round trip), on any client or
    pipeline, sync or asyncio; 1 if it was released."""
    return run_script(client, _DELETE_IF_HELD, [key], [holder])


_EXPIRE_IF_HELD = """
-- KEYS: a lease. ARGV: its holder, seconds. Renews it only while that holder still holds it.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def renew_lease(client, key: str, holder: str, ttl_s: float):
    """Hold the lease ``key`` another ``ttl_s`` if ``holder`` still holds it (compare and expire), on any client or
    pipeline, sync or asyncio; 1 if it was renewed."""
    return run_script(client, _EXPIRE_IF_HELD, [key], [holder, max(1, int(ttl_s))])


def send_reply(pipe, reply_to: str, payload: bytes) -> None:
    """Queue a write to a gateway's reply stream that happens only while the gateway is alive (see cache/keys.py
    ``alive``), on any pipeline."""
    run_script(pipe, _XADD_IF_ALIVE, [reply_to, alive(reply_to)], [payload])


_DELCONSUMER_IF_EMPTY = """
-- KEYS: stream. ARGV: group, consumer. XGROUP DELCONSUMER drops the consumer's pending entries with it: only when it
-- holds none, checked in the same atomic step (a consumer that reads between a check and the delete keeps its work).
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"""

_ACK_DELETE_IF_PENDING = """
-- KEYS: stream. ARGV: group, entry id. Ack the entry and, only if it was pending (read), delete it: an unread entry
-- stays (its readers skip it) so the group's lag stays exact.
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('XDEL', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


def _delete_if_empty(r, stream: str, group: str, consumer: str) -> None:
    run_script(r, _DELCONSUMER_IF_EMPTY, [stream], [group, consumer])


def ack_delete_if_pending(pipe, stream: str, group: str, entry_id) -> None:
    """Queue the ack of an entry that may be pending on another consumer, or not yet read at all: deleted only if it
    was pending (a superseded plan the gateway withdraws; an unread one is skipped by its reader)."""
    run_script(pipe, _ACK_DELETE_IF_PENDING, [stream], [group, entry_id])


def fields_payload(fields: dict) -> bytes:
    """The message bytes of a stream entry written by :func:`payload_fields`."""
    return fields[b"m"]


def payload_fields(payload: bytes) -> dict[str, bytes]:
    """Every Tributary stream entry has a single field ``m`` holding one encoded message."""
    return {"m": payload}


def own_pending(r, stream: str, group: str, me: str, count: int) -> list:
    """The entries already delivered to ``me`` and not acked (XREADGROUP from id 0), as (entry id, fields) pairs.

    After a read whose reply was lost (a timeout while Redis was paused: the server delivered, the client never
    heard), those entries sit in ``me``'s pending list and no one else would ever take them, ``me`` being alive:
    a worker calls this after any failed read. Entries deleted meanwhile are acked away, not returned."""
    reply = r.xreadgroup(group, me, {stream: "0"}, count=count)
    entries = list(reply[0][1]) if reply else []
    gone = [e for e, f in entries if not f]
    if gone:
        r.xack(stream, group, *gone)
    return [(e, f) for e, f in entries if f]


@dataclass
class Claimed:
    entry_id: bytes
    fields: dict
    deliveries: int  # how many consumers have now been handed this entry, this one included
    consumer: str  # the dead consumer it was taken from


def take_pending(r, stream: str, group: str, me: str) -> Claimed | None:
    """The oldest entry pending on ``me``, delivered to it again (XREADGROUP from id 0 counts a delivery, as XCLAIM
    does), with its delivery count, or None if none is. Entries deleted meanwhile are acked away, not returned."""
    while True:
        pipe = r.pipeline(transaction=False)
        pipe.xreadgroup(group, me, {stream: "0"}, count=1)
        pipe.xpending_range(stream, group, min="-", max="+", count=1, consumername=me)
        reply, pending = pipe.execute()
        if not reply or not reply[0][1]:
            return None
        entry_id, fields = reply[0][1][0]
        if fields:
            counts = {p["message_id"]: p["times_delivered"] for p in pending}
            return Claimed(entry_id, fields, counts.get(entry_id, 2), me)
        r.xack(stream, group, entry_id)  # deleted while pending: one fewer each time round


def reclaim_dead(r, stream: str, group: str, me: str, live: set[str], count: int, min_idle_ms: int = 1000,
                 justid: bool = False) -> list[Claimed]:
    """Claim for ``me`` up to ``count`` entries pending on consumers absent from ``live``; drop dead consumers that
    hold nothing. Entries deleted from the stream meanwhile are acked away, not returned.

    ``justid``: claim them without delivering them (XCLAIM JUSTID: no fields, and their delivery counts unchanged,
    ``deliveries`` being those of the dead consumers), for ``me`` to take up one at a time (:func:`take_pending`):
    only the entry being run has its count raised, so a job that kills its worker does not raise the counts of the
    jobs claimed with it. Deleted ones may be claimed too (Redis 6.2): :func:`take_pending` acks them away."""
    try:
        consumers = r.xinfo_consumers(stream, group)
    except ResponseError as exc:
        if is_nogroup(exc) or no_such_key(exc):  # a Redis restarted empty: nothing to reclaim
            return []
        raise
    out: list[Claimed] = []
    for c in consumers:
        name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
        if name == me or name in live:
            continue
        if not c["pending"]:
            _delete_if_empty(r, stream, group, name)
            continue
        if len(out) >= count:
            continue
        pending = r.xpending_range(stream, group, min="-", max="+", count=count - len(out), consumername=name,
                                   idle=min_idle_ms)
        if not pending:
            continue
        delivered = {p["message_id"]: p["times_delivered"] for p in pending}
        claimed = r.xclaim(stream, group, me, min_idle_ms, list(delivered), justid=justid)
        if justid:
            out += [Claimed(entry_id, {}, delivered[entry_id], name) for entry_id in claimed if entry_id in delivered]
            continue
        got, stale = set(), False
        for entry_id, fields in claimed:
            if entry_id is not None and fields:
                got.add(entry_id)
                out.append(Claimed(entry_id, fields, delivered[entry_id] + 1, name))
            else:  # deleted from the stream while pending: 7+ drops it from the list, 6.2 claims it as (nil, nil)
                stale = True
        if stale:  # the ids XCLAIM made ours without returning them: ack them away
            mine = r.xpending_range(stream, group, min="-", max="+", count=len(delivered) + 1024, consumername=me)
            gone = [p["message_id"] for p in mine if p["message_id"] in delivered and p["message_id"] not in got]
            if gone:
                r.xack(stream, group, *gone)
    return out


def dead_letter(pipe, dead_stream: str, source: str, entry: Claimed, reason: str) -> None:
    """Queue a copy of ``entry`` to the dead-letter stream (with why and from where); the caller acks it."""
    pipe.xadd(dead_stream, {"m": entry.fields.get(b"m", b""), "stream": source, "entry": entry.entry_id,
                            "deliveries": entry.deliveries, "reason": reason},
              maxlen=DEAD_LETTER_MAXLEN, approximate=True)

"""The content-addressed tensor cache's write side: answer a batch of encode jobs, store their tensors, tell every
waiter.

An entry is a hash ``{data: safetensors bytes, n: placeholder count}`` with a TTL under ``Keys.tensor``. Gateways that
want an entry not yet there add their reply stream to its ``waiters`` set and one of them holds its ``lease``
(see gateway/encoding.py). A batch of answers takes three round trips, each one pipeline, and works the same on one
Redis and on a Redis Cluster (no script or transaction spans two slots):

1. **Ack** every job (XACK + XDEL on the jobs stream), with whatever else the caller queued (counters, dead
   letters). A job whose ack finds it already acked was answered by another run (its first worker was presumed dead
   but finished), whose tensor is stored: it publishes nothing, so a job run twice answers once. A tensor whose job
   was not pending and that nobody stored had its entry lost (a failover, a restart): it is published.
2. **Store and take**, per acked job, on its digest's slot and in this order: ``HSET`` the tensor (one command: the
   bytes are never copied through a script), then one slot-local script sets its TTL and takes the waiters set,
   deleting it with the lease and the media blob. A failure takes the waiters without writing a tensor.
3. **Tell** every waiter taken, and the job's own gateway, through a script that writes a reply stream only while
   its gateway's lease (``<stream>:alive``) is held.

A tensor Redis refuses for memory (``maxmemory`` under ``noeviction``: its bytes count as they arrive) is answered
with the job's ``refused`` failure instead (the gateway's 503 ``cache_full``), retried for a moment since Redis
refuses every write until it frees the refused command's buffer.

**One node's failure is that node's jobs'.** On a Redis Cluster the jobs of one batch are spread over every shard,
and a node may not answer while the others do (cache/client.py: its commands fail, the others' replies stand). A job
whose tensor could not be stored (its digest's node away, or any other error) is answered with its ``lost`` failure
(the gateway asks again, and queues the job again or fails the request with a 503), or with nothing if it has none;
a reply whose stream's node is away is dropped (that gateway looks again once its lease lapses). The others are
answered as usual. Only a failed ack (the jobs stream's node away, or one Redis) or a failed round trip as a whole is
raised: the worker's loop takes over and re-reads the jobs still pending on it.

No waiter is missed: a gateway adds itself to the waiters *before* it looks for the tensor again (one ordered
pipeline on the same slot), and the publisher writes the tensor *before* it takes the waiters; so a gateway either
is in the set taken or sees the tensor when it looks. A worker that dies between steps leaves its waiters unanswered
until their lease lapses (``lease_ttl_s``): they look again, find the tensor (died after 2) or take the lease and
queue the job again (died after 1). A tensor's TTL is set by step 2's script; a worker killed between the HSET and
the script (one buffer apart) leaves a tensor without TTL, which the next gateway to look it up gives one
(gateway/encoding.py refreshes the TTL of every hit).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from cache.client import lost_node, refused_for_memory
from cache.streams import run_script, send_reply

log = logging.getLogger(__name__)

REFUSED_RETRY_S = 2.0  # how long replies refused for memory are retried, after Redis refused a tensor for it

_TAKE = """
-- KEYS: tensor, waiters, lease, blob (one slot: the digest's hash tag). ARGV: ttl (0: a failure, no tensor).
-- The tensor's TTL, then the waiting gateways' reply streams, taken with the lease and the blob.
if tonumber(ARGV[1]) > 0 then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
end
local waiters = redis.call('SMEMBERS', KEYS[2])
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
return waiters
"""


@dataclass
class _Answer:
    keys: tuple[str, str, str, str]  # tensor, waiters, lease, blob
    entry_id: bytes
    message: bytes
    reply_to: str
    data: bytes = b""  # b"": a failure
    n: int = 0
    ttl_s: int = 0
    refused: bytes = b""  # the message sent instead of ``message`` if Redis refuses to store the tensor (full)
    lost: bytes = b""  # the message sent instead if Redis did not store it otherwise (its node away): b"", none


@dataclass
class Answers:
    """One batch's answers (tensors or failures) and the other commands that go with its acks; run by
    :meth:`TensorPublisher.execute`."""

    answers: list[_Answer] = field(default_factory=list)
    also: list = field(default_factory=list)  # callables (pipe) -> None queued on the ack round trip

    def publish(self, keys: tuple[str, str, str, str], entry_id: bytes, data: bytes, n: int, ttl_s: int,
                message: bytes, reply_to: str, refused: bytes = b"", lost: bytes = b"") -> None:
        """``refused``: the failure to send ``reply_to`` instead if Redis refuses the tensor for memory
        (``maxmemory`` reached under ``noeviction``); ``lost``: the one to send if Redis did not store it for another
        reason (its node did not answer). Without them, ``reply_to`` is told nothing and looks again once its lease
        lapses."""
        self.answers.append(_Answer(keys, entry_id, message, reply_to, data, n, ttl_s, refused, lost))

    def fail(self, keys: tuple[str, str, str, str], entry_id: bytes, message: bytes, reply_to: str) -> None:
        self.answers.append(_Answer(keys, entry_id, message, reply_to))

    def with_acks(self, queue) -> None:
        """Queue commands (``queue(pipe)``) on the first round trip, before any answer can be seen."""
        self.also.append(queue)


class TensorPublisher:
    def __init__(self, redis, stream: str, group: str):
        self.r, self.stream, self.group = redis, stream, group
        self.refused: set[bytes] = set()  # the last batch's entries whose tensor Redis refused (their failure sent)
        self.lost: set[bytes] = set()  # the last batch's entries whose tensor Redis did not store otherwise
        self.undelivered = 0  # the last batch's replies not delivered (their stream's node away)
        self.elsewhere: set[bytes] = set()  # the last batch's entries answered by another run (nothing published)

    def execute(self, batch: Answers) -> int:
        """Ack, store and tell (the module docstring); returns how many reply streams were written. ``refused``
        then holds the entries whose tensor Redis refused for memory (answered with their ``refused`` failure),
        ``lost`` those it did not store for another reason, ``elsewhere`` those another run of the job answered
        (nothing published), and ``undelivered`` counts the replies dropped."""
        self.refused, self.lost, self.undelivered, self.elsewhere = set(), set(), 0, set()
        if not batch.answers and not batch.also:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for a in batch.answers:
            pipe.xack(self.stream, self.group, a.entry_id)
            pipe.xdel(self.stream, a.entry_id)
        for queue in batch.also:
            queue(pipe)
        res = pipe.execute(raise_on_error=False)
        acks = res[0 : 2 * len(batch.answers) : 2]
        if away := next((r for r in acks if lost_node(r)), None):
            raise away  # the jobs are still pending here, or acked unheard: the loop re-reads them
        acked = [a for a, n in zip(batch.answers, acks) if n == 1]
        failed = [r for r in res[2 * len(batch.answers) :] if isinstance(r, Exception)]
        if failed:  # a counter or a dead letter refused: the answers still go out
            log.warning("a command queued with the acks failed", extra={"error": str(failed[0])})
        acked += self._orphans([a for a, n in zip(batch.answers, acks) if n != 1 and a.data])
        self.elsewhere = {a.entry_id for a in batch.answers} - {a.entry_id for a in acked}
        if not acked:
            return 0
        pipe = self.r.pipeline(transaction=False)
        takes = []  # where each take script's reply sits among the results
        for a in acked:
            if a.data:
                pipe.hset(a.keys[0], mapping={"data": a.data, "n": a.n})
            takes.append(len(pipe))
            run_script(pipe, _TAKE, list(a.keys), [a.ttl_s if a.data else 0])
        res = pipe.execute(raise_on_error=False)
        replies, refused = [], False  # (stream, message) to send
        for a, at in zip(acked, takes):
            errors = [r for r in res[at - 1 if a.data else at : at + 1] if isinstance(r, Exception)]
            message = a.message
            if errors and a.refused and all(map(refused_for_memory, errors)):
                # Redis is full: the job fails now, named, instead of its gateways waiting it out
                log.error("redis refused an encoder output: out of memory (maxmemory)", extra={
                    "tensor": a.keys[0], "bytes": len(a.data), "error": str(errors[0])})
                message, refused = a.refused, True
                self.refused.add(a.entry_id)
            elif errors and a.data:  # not stored (its node away): the waiters taken by nobody look again
                log.error("redis did not store an encoder output", extra={"tensor": a.keys[0],
                                                                          "error": str(errors[0])})
                message = a.lost
                self.lost.add(a.entry_id)
            waiters = [] if isinstance(res[at], Exception) else res[at]
            streams = {w.decode() if isinstance(w, bytes) else w for w in waiters}
            if a.reply_to:
                streams.add(a.reply_to)
            if message:
                replies += [(stream, message) for stream in sorted(streams)]
        return self._tell(replies, patient=refused)

    def _orphans(self, unacked: list[_Answer]) -> list[_Answer]:
        """Of the tensors whose job was no longer pending here, those nobody stored: their job entry was lost with
        its stream (a failover promoted a replica that had not received it yet; a restart without persistence lost
        the stream or its group), not answered by another run of the job (which stores the tensor before telling
        anyone). They are published all the same: else their gateways heard nothing until their lease lapsed (an
        outside tester's chaos run: images encoded as a node came back, and encoded again 30 s later). A failure
        whose job was not pending is not sent (nothing tells the two cases apart); its gateway asks again then."""
        if not unacked:
            return []
        pipe = self.r.pipeline(transaction=False)
        for a in unacked:
            pipe.exists(a.keys[0])
        found = pipe.execute(raise_on_error=False)
        orphans = [a for a, n in zip(unacked, found) if n == 0]
        if orphans:
            log.warning("encoder outputs whose jobs Redis no longer held are published (their entries were lost)",
                        extra={"count": len(orphans)})
        return orphans

    def _tell(self, replies: list[tuple[str, bytes]], patient: bool) -> int:
        """Send the replies; how many reached a live gateway. ``patient``: Redis just refused a tensor for memory,
        and refuses every write until it has freed the refused command's buffer (its clients cron: ~0.2 s), so
        replies refused for memory are sent again for up to ``REFUSED_RETRY_S``. A reply that fails otherwise (its
        stream's node away) is dropped: its gateway looks again once its lease lapses."""
        told, deadline = 0, time.monotonic() + REFUSED_RETRY_S
        while replies:
            pipe = self.r.pipeline(transaction=False)
            for stream, message in replies:
                send_reply(pipe, stream, message)
            res = pipe.execute(raise_on_error=False)
            told += sum(r is not None and not isinstance(r, Exception) for r in res)
            retry = patient and time.monotonic() < deadline
            errors = [(reply, r) for reply, r in zip(replies, res) if isinstance(r, Exception)]
            again = [reply for reply, r in errors if retry and refused_for_memory(r)]
            dropped = [r for _, r in errors if not (retry and refused_for_memory(r))]
            if dropped:
                self.undelivered += len(dropped)
                log.warning("replies not delivered: their gateways look again once their lease lapses",
                            extra={"count": len(dropped), "error": str(dropped[0])})
            replies = again
            if replies:
                time.sleep(0.1)
        return told

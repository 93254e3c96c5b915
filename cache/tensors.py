"""The content-addressed tensor cache's write side: store an encoder output and tell every waiter, atomically.

An entry is a hash ``{data: safetensors bytes, n: placeholder count}`` with a TTL under ``Keys.tensor``. Gateways that
want an entry not yet there add their reply stream to its ``waiters`` set and one of them holds its ``lease``
(see gateway/encoding.py). Publishing runs as one Lua script, so no waiter can register between "tensor written"
and "waiters notified" and be missed: a waiter either sees the tensor when it looks again, or is in the set the
script reads. The same script acks (and deletes) the job's stream entry: answering a job and acking it are one step,
so a job run twice answers once. The message bytes are built by the caller; the script only copies them to each
stream.

The script names reply streams that are not among its KEYS, so it needs a non-cluster Redis (or one slot).
"""

from __future__ import annotations

_PUBLISH = """
-- KEYS: tensor, waiters, lease, blob, jobs stream. ARGV: data, n, ttl, message, reply_to, group, entry id.
-- data == '' publishes a failure. The job's ack comes first: a job already answered (run twice: its first worker
-- was presumed dead but finished) is answered once, so a second run publishes nothing (returns -1).
local acked = redis.pcall('XACK', KEYS[5], ARGV[6], ARGV[7])
if type(acked) ~= 'number' or acked == 0 then
  return -1
end
redis.call('XDEL', KEYS[5], ARGV[7])
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], 'data', ARGV[1], 'n', ARGV[2])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
end
-- Tell every waiting gateway that is alive (its lease, <stream>:alive, is held): a dead gateway's reply stream is
-- never written again, so it expires with its lease.
local told = 0
local seen = {}
local streams = redis.call('SMEMBERS', KEYS[2])
if ARGV[5] ~= '' then
  table.insert(streams, ARGV[5])
end
for _, stream in ipairs(streams) do
  if not seen[stream] then
    seen[stream] = true
    if redis.call('EXISTS', stream .. ':alive') == 1 then
      redis.call('XADD', stream, '*', 'm', ARGV[4])
      told = told + 1
    end
  end
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
return told
"""


class TensorPublisher:
    """Queues ack-and-publish / ack-and-fail scripts on a pipeline (one round trip for a whole batch)."""

    def __init__(self, redis, stream: str, group: str):
        self.script = redis.register_script(_PUBLISH)
        self.stream, self.group = stream, group

    def publish(self, pipe, keys: tuple[str, str, str, str], entry_id: bytes, data: bytes, n: int, ttl_s: int,
                message: bytes, reply_to: str) -> None:
        self.script(keys=[*keys, self.stream], args=[data, n, ttl_s, message, reply_to, self.group, entry_id],
                    client=pipe)

    def fail(self, pipe, keys: tuple[str, str, str, str], entry_id: bytes, message: bytes, reply_to: str) -> None:
        self.script(keys=[*keys, self.stream], args=[b"", 0, 0, message, reply_to, self.group, entry_id],
                    client=pipe)

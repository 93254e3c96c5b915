"""The content-addressed tensor cache's write side: store an encoder output and tell every waiter, atomically.

An entry is a hash ``{data: safetensors bytes, n: placeholder count}`` with a TTL under ``Keys.tensor``. Gateways that
want an entry not yet there add their reply stream to its ``waiters`` set and one of them holds its ``lease``
(see gateway/encoding.py). Publishing runs as one Lua script, so no waiter can register between "tensor written"
and "waiters notified" and be missed: a waiter either sees the tensor when it looks again, or is in the set the
script reads. The message bytes are built by the caller; the script only copies them to each stream.

The script names reply streams that are not among its KEYS, so it needs a non-cluster Redis (or one slot).
"""

from __future__ import annotations

_PUBLISH = """
-- KEYS: tensor, waiters, lease, blob. ARGV: data, n, ttl, message, reply_to. data == '' publishes a failure.
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], 'data', ARGV[1], 'n', ARGV[2])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
end
local told = 0
local seen = {}
for _, stream in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  seen[stream] = true
  redis.call('XADD', stream, '*', 'm', ARGV[4])
  told = told + 1
end
if ARGV[5] ~= '' and not seen[ARGV[5]] then
  redis.call('XADD', ARGV[5], '*', 'm', ARGV[4])
  told = told + 1
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
return told
"""


class TensorPublisher:
    """Queues publish/fail scripts on a pipeline (one round trip for a whole batch)."""

    def __init__(self, redis):
        self.script = redis.register_script(_PUBLISH)

    def publish(self, pipe, keys: tuple[str, str, str, str], data: bytes, n: int, ttl_s: int, message: bytes,
                reply_to: str) -> None:
        self.script(keys=list(keys), args=[data, n, ttl_s, message, reply_to], client=pipe)

    def fail(self, pipe, keys: tuple[str, str, str, str], message: bytes, reply_to: str) -> None:
        self.script(keys=list(keys), args=[b"", 0, 0, message, reply_to], client=pipe)

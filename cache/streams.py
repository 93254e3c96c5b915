"""Stream and consumer-group helpers shared by the tiers (synchronous and asyncio flavours)."""

from __future__ import annotations

from redis.exceptions import ResponseError


def ensure_group(r, stream: str, group: str) -> None:
    """Create ``group`` on ``stream`` (and the stream) if missing; idempotent."""
    try:
        r.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def autoclaim_entries(reply) -> list:
    """The claimed entries of an XAUTOCLAIM reply: Redis 6.2 answers 2 elements, Redis/Valkey 7+ answer 3."""
    return list(reply[1]) if reply else []


def fields_payload(fields: dict) -> bytes:
    """The message bytes of a stream entry written by :func:`payload_fields`."""
    return fields[b"m"]


def payload_fields(payload: bytes) -> dict[str, bytes]:
    """Every Tributary stream entry has a single field ``m`` holding one encoded message."""
    return {"m": payload}

"""Media parts of a request: base64/data-URL decoding with size caps, and their content-addressed cache keys.

The gateway only unwraps the bytes; decoding pixels or samples is the encoder worker's job.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, replace

from gateway.errors import InvalidRequest, PayloadTooLarge


@dataclass(frozen=True)
class MediaPart:
    modality: str
    data: bytes  # empty when the client sent only a uuid
    param: str  # where it sat in the request, for error messages: messages.0.content.2
    digest: str = ""  # content key; for a bare uuid, filled in from Redis (gateway/encoding.py)
    uuid: str | None = None
    tokens: int = 0  # placeholder tokens it will expand to, from its header (0 for a bare uuid: not known yet)
    features: bytes | None = None  # audio features already computed from ``data`` (Realtime streaming): sent instead

    def with_digest(self, digest: str) -> "MediaPart":
        return replace(self, digest=digest)


def _b64(data: str, param: str, limit: int) -> bytes:
    padding = 2 if data.endswith("==") else 1 if data.endswith("=") else 0
    if len(data) * 3 // 4 - padding > limit:  # the decoded size (exact for valid base64), without decoding
        raise PayloadTooLarge(f"media larger than {limit} bytes", param=param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(f"media data is not valid base64: {exc}", param=param) from exc


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def from_data_url(url: str, kind: str, param: str, limit: int) -> bytes:
    """An ``image_url`` / ``audio_url``'s bytes from its ``data:<kind>/...;base64,`` URL (remote URLs are fetched
    by gateway/remote.py before this, when the server allows them)."""
    field = "image_url" if kind == "image" else "audio_url"
    if is_remote(url):
        raise InvalidRequest(f"{field} must be a data: URL; fetching http(s) URLs is disabled on this server",
                             param=param, code="remote_url_disabled")
    if not url.startswith("data:"):
        raise InvalidRequest(f"{field} must be a data: URL (data:{kind}/...;base64,...)", param=param)
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise InvalidRequest(f"{kind} data URL must be base64-encoded (data:<type>;base64,<data>)", param=param)
    media_type = header[: -len(";base64")]
    if media_type and not media_type.startswith(f"{kind}/"):
        raise InvalidRequest(f"data URL media type {media_type!r} is not {'an image' if kind == 'image' else kind}",
                             param=param)
    return _b64(payload, param, limit)


def image_from_url(url: str, param: str, limit: int) -> bytes:
    return from_data_url(url, "image", param, limit)


def audio_from_base64(data: str, param: str, limit: int) -> bytes:
    return _b64(data, param, limit)


def content_digest(encoder_id: str, preprocess: dict, data: bytes, namespace: str = "") -> str:
    """Key of one encoder output: the encoder's identity, its preprocessing config and the exact input bytes.

    Hashing the full bytes (not a decoded summary) means two inputs share an entry only if they are identical; the
    config is part of the key so a change of image size or mel settings never reuses a stale tensor. ``namespace``:
    the tenant's cache namespace (gateway/auth.py), so tenants never share (or time) each other's entries; empty
    without API keys.
    """
    h = hashlib.sha256()
    parts = (encoder_id.encode(), json.dumps(preprocess, sort_keys=True).encode())
    for part in parts + ((b"tenant:" + namespace.encode(),) if namespace else ()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    h.update(data)
    return h.hexdigest()

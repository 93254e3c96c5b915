"""Media parts of a request: base64/data-URL decoding with size caps, and their content-addressed cache keys.

The gateway only unwraps the bytes; decoding pixels or samples is the encoder worker's job. A part that is not what
it should be is a 400 that names the part, the formats expected and what was sent instead ("1234 bytes starting with
'RIFF', which looks like WAV audio"); the decoder's own message, in a library's terms, goes to the log only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
from dataclasses import dataclass, replace

from gateway.errors import InvalidRequest, PayloadTooLarge
from models.media import IMAGE_NAMES

log = logging.getLogger(__name__)


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


def _either(names: list[str]) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


# What a part of each modality may hold, for error messages: the formats models.media accepts, and the audio formats
# libsndfile reads that the schema's input_audio.format names.
_FORMATS = {"image": IMAGE_NAMES, "audio": ["WAV", "MP3", "FLAC", "OGG"]}
ACCEPTED = {modality: _either(formats) for modality, formats in _FORMATS.items()}

# Leading bytes of what clients send by mistake, for "got ... which looks like ...".
_SIGNATURES = [
    (b"\x89PNG\r\n\x1a\n", "PNG", "a PNG image"), (b"\xff\xd8\xff", "JPEG", "a JPEG image"),
    (b"GIF87a", "GIF", "a GIF image"), (b"GIF89a", "GIF", "a GIF image"), (b"II*\x00", "TIFF", "a TIFF image"),
    (b"MM\x00*", "TIFF", "a TIFF image"), (b"fLaC", "FLAC", "FLAC audio"), (b"OggS", "OGG", "OGG data"),
    (b"ID3", "MP3", "MP3 audio"), (b"%PDF", "PDF", "a PDF document"), (b"PK\x03\x04", "ZIP", "a ZIP archive"),
]
_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/]{16,}={0,2}")


def sniff(data: bytes) -> tuple[str, str] | None:
    """(format, what it is in words) of a few common kinds of file, from their first bytes; None if unknown."""
    for magic, fmt, words in _SIGNATURES:
        if data.startswith(magic):
            return fmt, words
    if data[:4] == b"RIFF" and data[8:12] in (b"WAVE", b"WEBP"):
        return ("WAV", "WAV audio") if data[8:12] == b"WAVE" else ("WEBP", "a WEBP image")
    if data[4:8] == b"ftyp":
        return "MP4", "an MP4/MOV/HEIC file"
    if data[:2] == b"BM" and len(data) >= 26:
        return "BMP", "a BMP image"
    text = data[:512].decode("utf-8", "replace").rstrip("\ufffd")  # a character cut at 512 bytes is no error
    if text and all(c.isprintable() and c != "\ufffd" or c in "\r\n\t" for c in text):
        if _BASE64_TEXT.fullmatch(data[:512].strip()):
            return "base64", "base64 text: was the data base64-encoded twice?"
        if data.lstrip()[:1] == b"<":
            return "HTML", "HTML or XML text"
        return "text", "text"
    return None


def describe_bytes(data: bytes, modality: str) -> str:
    """What the client sent, in its terms: "1234 bytes starting with 'RIFF', which looks like WAV audio"."""
    if not data:
        return "no data"
    head = "".join(chr(b) if 32 <= b < 127 and b not in (39, 92) else f"\\x{b:02x}" for b in data[:8])
    out = f"{len(data)} bytes starting with '{head}'"
    kind = sniff(data)
    if kind is None:
        return out
    fmt, words = kind
    if fmt in _FORMATS[modality]:
        return f"{out}, the start of {words}, but the data is truncated or corrupt"
    return f"{out}, which looks like {words}"


def unreadable(data: bytes, modality: str, param: str) -> str:
    """The message for a part whose header the gateway cannot read (the decoder's own words go to the log)."""
    return (f"{param}: the {modality} could not be read: expected {ACCEPTED[modality]} data (got "
            f"{describe_bytes(data, modality)})")


def undecodable(part: MediaPart, reason: str) -> InvalidRequest:
    """The 400 for a part an encoder worker could not decode: ``reason`` is the worker's, in the client's terms
    (encoders/preprocess.py's MediaError); the decoder's own words are in the worker's log."""
    return InvalidRequest(f"{part.param}: the {part.modality} could not be decoded: {reason}", param=part.param,
                          code="invalid_media")


_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/=]")


def _base64_problem(data: str) -> str:
    """Why ``data`` is not (standard, unwrapped) base64, in the client's terms."""
    bad = _NOT_BASE64.search(data)
    if bad:
        c = bad.group()
        hint = (" (line breaks and spaces are not allowed)" if c.isspace() else
                " (URL-safe base64 with '-' and '_' is not accepted; use '+' and '/')" if c in "-_" else "")
        return f"character {bad.start()} ({c!r}) is not a base64 character{hint}"
    body = data.rstrip("=")
    if "=" in body:
        return f"padding '=' appears inside the data, at character {body.index('=')}"
    return (f"its length ({len(data)} characters) does not make whole groups of 4: the data is cut short or wrongly "
            "padded")


B64_CHUNK = 1 << 20  # characters (a multiple of 4) decoded at a time


def b64decode_chunked(data: str) -> bytes:
    """``base64.b64decode(data, validate=True)``, a megabyte at a time: binascii holds the GIL for a whole call, so
    16 MB of media decoded on a worker thread held the event loop (and every other request) for 0.1 s; between
    chunks the loop gets its turn."""
    if len(data) <= B64_CHUNK:
        return base64.b64decode(data, validate=True)
    if len(data) % 4 or data.find("=", 0, len(data) - 2) >= 0:  # padding only at the very end
        raise binascii.Error("incorrect padding")
    return b"".join(base64.b64decode(data[i : i + B64_CHUNK], validate=True) for i in range(0, len(data), B64_CHUNK))


def _b64(data: str, param: str, limit: int, kind: str = "media") -> bytes:
    padding = 2 if data.endswith("==") else 1 if data.endswith("=") else 0
    if len(data) * 3 // 4 - padding > limit:  # the decoded size (exact for valid base64), without decoding
        raise PayloadTooLarge(f"{param}: the {kind} is larger than {limit} bytes", param=param, code="media_too_large")
    try:
        return b64decode_chunked(data)
    except (binascii.Error, ValueError) as exc:
        log.debug("base64 refused", extra={"param": param, "error": f"{type(exc).__name__}: {exc}"})
        raise InvalidRequest(f"{param}: the {kind} data is not valid base64: {_base64_problem(data)}",
                             param=param, code="invalid_media") from None


def is_remote(url: str) -> bool:
    return url[:8].lower().startswith(("http://", "https://"))  # URL schemes are case-insensitive


def from_data_url(url: str, kind: str, param: str, limit: int) -> bytes:
    """An ``image_url`` / ``audio_url``'s bytes from its ``data:<kind>/...;base64,`` URL (remote URLs are fetched
    by gateway/remote.py before this, when the server allows them)."""
    field = "image_url" if kind == "image" else "audio_url"
    if is_remote(url):
        raise InvalidRequest(f"{field} must be a data: URL; fetching http(s) URLs is disabled on this server",
                             param=param, code="remote_url_disabled")
    if url[:5].lower() != "data:":  # the scheme, the media type and "base64" are case-insensitive (RFC 2397)
        raise InvalidRequest(f"{field} must be a data: URL (data:{kind}/...;base64,...)", param=param,
                             code="invalid_media")
    header, sep, payload = url[5:].partition(",")
    header = header.lower()
    if not sep or not header.endswith(";base64"):
        raise InvalidRequest(f"{kind} data URL must be base64-encoded (data:<type>;base64,<data>)", param=param,
                             code="invalid_media")
    media_type = header[: -len(";base64")]
    if media_type and not media_type.startswith(f"{kind}/"):
        raise InvalidRequest(f"data URL media type {media_type!r} is not {'an image' if kind == 'image' else kind}",
                             param=param, code="invalid_media")
    return _b64(payload, param, limit, kind)


def image_from_url(url: str, param: str, limit: int) -> bytes:
    return from_data_url(url, "image", param, limit)


def audio_from_base64(data: str, param: str, limit: int) -> bytes:
    return _b64(data, param, limit, "audio")


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

"""API keys and tenants: who may call the gateway, and whose cache a request reads.

Keys come from ``TRIBUTARY_API_KEYS`` (comma-separated; ``tenant:key`` names the tenant, a bare key belongs to the
tenant ``default``) and/or a key file (``--api-key-file``): one ``tenant sha256-hex-of-key`` per line, ``#``
comments, re-read when it changes (checked at most once a second), so keys rotate and are revoked without a restart.
The file holds only digests; the gateway keeps only digests of the environment's keys too. Neither reaches a
command line: ``tributary up`` hands its children the environment and the file's path.

With no key configured the gateway is open (the local default). With keys, every route needs
``Authorization: Bearer <key>`` except ``/health``, ``/ready`` and ``/metrics`` (probes and scrapers carry no key);
the WebSocket also takes the key as the ``openai-insecure-api-key.<key>`` subprotocol, which browsers' OpenAI
Realtime clients send since they cannot set headers. A missing, wrong or revoked key gets a 401 in the OpenAI error
shape (a WebSocket's handshake is refused with it). The tenant's name, never the key, goes into ``scope["state"]``
for the handlers and the logs.

Tenants: cached encodings and media ``uuid``s are keyed by the tenant's cache namespace (``Tenant.cache``), so one
tenant can neither reuse nor time another's cached media. An operator may let named tenants share one namespace
(``--shared-cache a,b;c,d``: a and b share, c and d share).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.origin import refuse
from router.logs import Throttle

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/"})  # "/": the playground page, which holds no data
OPEN_PREFIXES = ("/static/",)  # the page's scripts and styles (gateway/static)
WS_KEY_PROTOCOL = "openai-insecure-api-key."
DEFAULT_TENANT = "default"
RELOAD_EVERY_S = 1.0


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    cache: str  # the namespace of its cached encodings and media uuids
    rpm: int | None = None  # its own rate limits from the key file (None: the gateway's defaults)
    tpm: int | None = None


class KeyConfigError(ValueError):
    """A key configuration that cannot be used (at start-up: the gateway refuses to start)."""


# A tenant's name: it keys its cache namespace (media uuids, encodings) and ``--shared-cache`` joins names with "+",
# so a name holding ":" or "+" could spell another tenant's key ("team" + uuid "red:x" = "team:red" + uuid "x").
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


def _tenant_name(name: str, where: str) -> str:
    if not TENANT_NAME.fullmatch(name):
        raise KeyConfigError(f"{where}: tenant name {name!r} is not allowed: up to 64 letters, digits, '_', '.', '@' "
                             "or '-', starting with a letter or digit")
    return name


def parse_env_keys(value: str | None) -> dict[str, str]:
    """``k1,k2`` or ``alice:k1,bob:k2`` -> {sha256(key): tenant}."""
    out: dict[str, str] = {}
    for entry in (value or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        tenant, sep, key = entry.partition(":")
        if not sep:
            tenant, key = DEFAULT_TENANT, entry
        if not key or not tenant:
            raise KeyConfigError("TRIBUTARY_API_KEYS: an entry is empty (expected key or tenant:key)")
        out[key_digest(key)] = _tenant_name(tenant, "TRIBUTARY_API_KEYS")
    return out


def parse_key_file(text: str, name: str) -> dict[str, tuple[str, dict[str, int]]]:
    """Lines of ``tenant sha256-hex [rpm=N] [tpm=N]`` -> {digest: (tenant, its rate limits)}."""
    out: dict[str, tuple[str, dict[str, int]]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) < 2 or len(parts[1]) != 64 or any(c not in "0123456789abcdef" for c in parts[1].lower()):
            raise KeyConfigError(f"{name}:{n}: expected 'tenant sha256-hex-of-key [rpm=N] [tpm=N]' (64 hex digits)")
        limits = {}
        for extra in parts[2:]:
            key, _, value = extra.partition("=")
            if key not in ("rpm", "tpm") or not value.isdigit():
                raise KeyConfigError(f"{name}:{n}: unknown field {extra!r} (rpm=N and tpm=N are known)")
            limits[key] = int(value)
        out[parts[1].lower()] = (_tenant_name(parts[0], f"{name}:{n}"), limits)
    return out


def parse_shared(value: str | None) -> dict[str, str]:
    """``a,b;c,d`` -> {tenant: namespace} for tenants that share a cache."""
    out: dict[str, str] = {}
    for group in (value or "").split(";"):
        names = sorted({_tenant_name(n.strip(), "--shared-cache") for n in group.split(",") if n.strip()})
        for name in names if len(names) > 1 else ():
            out[name] = "+".join(names)
    return out


class KeyRing:
    """The keys in force: the environment's, and the key file's as last read."""

    def __init__(self, env_keys: str | None = None, key_file: str | None = None, shared: str | None = None):
        self.env = parse_env_keys(env_keys)
        self.file = Path(key_file) if key_file else None
        self.shared = parse_shared(shared)
        self.from_file: dict[str, tuple[str, dict[str, int]]] = {}
        self._stamp: tuple | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if self.file is not None:
            self._reload(strict=True)

    @classmethod
    def from_env(cls, key_file: str | None = None, shared: str | None = None) -> KeyRing:
        return cls(os.environ.get("TRIBUTARY_API_KEYS"), key_file or os.environ.get("TRIBUTARY_API_KEY_FILE"),
                   shared if shared is not None else os.environ.get("TRIBUTARY_SHARED_CACHE"))

    @property
    def enabled(self) -> bool:
        return bool(self.env) or self.file is not None

    def tenant_count(self) -> int:
        """The tenants the keys in force name (the environment's and the key file's, as last read)."""
        return len(set(self.env.values()) | {name for name, _ in self.from_file.values()})

    def tenant(self, key: str | None) -> Tenant | None:
        """The key's tenant, or None for no key / an unknown or revoked one."""
        if not key:
            return None
        self._maybe_reload()
        digest = key_digest(key)
        name, limits = (self.env[digest], {}) if digest in self.env else self.from_file.get(digest, (None, {}))
        return Tenant(name, self.shared.get(name, name), **limits) if name else None

    def _maybe_reload(self) -> None:
        if self.file is None or time.monotonic() - self._checked < RELOAD_EVERY_S:
            return
        with self._lock:
            if time.monotonic() - self._checked >= RELOAD_EVERY_S:
                self._reload(strict=False)

    def _reload(self, strict: bool) -> None:
        self._checked = time.monotonic()
        try:
            st = self.file.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return
            keys = parse_key_file(self.file.read_text(), str(self.file))
        except (OSError, KeyConfigError) as exc:
            if strict:
                raise KeyConfigError(f"cannot use the API key file: {exc}") from None
            # Keep the keys in force: a half-written file must not open the gateway or lock everyone out.
            log.error("API key file unreadable; keeping the keys in force", extra={"error": str(exc)})
            return
        self.from_file, self._stamp = keys, stamp
        log.info("API keys loaded", extra={"file": str(self.file), "keys": len(keys),
                                           "tenants": len({t for t, _ in keys.values()})})


def bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def ws_protocol_key(scope: dict) -> str | None:
    for proto in scope.get("subprotocols") or ():
        if proto.startswith(WS_KEY_PROTOCOL):
            return proto[len(WS_KEY_PROTOCOL) :]
    return None


class AuthMiddleware:
    """ASGI middleware: the key check for HTTP and WebSocket scopes (see the module docstring)."""

    def __init__(self, app, ring: KeyRing):
        self.app, self.ring = app, ring
        self._unauthorized = Throttle(1.0)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state["tenant"] = None
        if not self.ring.enabled or scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        key = bearer(scope["headers"]) or (ws_protocol_key(scope) if scope["type"] == "websocket" else None)
        tenant = self.ring.tenant(key)
        if tenant is not None:
            state["tenant"] = tenant
            if scope["type"] == "websocket":  # a session outlives its handshake: it asks again (gateway/realtime.py)
                state["key_in_force"] = lambda: getattr(self.ring.tenant(key), "name", None) == tenant.name
            return await self.app(scope, receive, send)
        message = ("invalid API key (unknown or revoked)" if key else
                   "missing API key: send the header 'Authorization: Bearer <key>'")
        if self._unauthorized.due():  # at most a line a second: a flood of keyless requests costs no log volume
            log.info("unauthorized", extra={"request_id": state.get("response_id"), "path": scope["path"],
                                            "reason": "invalid key" if key else "no key",
                                            "unlogged_since_last": self._unauthorized.held})
        await refuse(scope, receive, send, 401, "invalid_api_key", message,
                     [(b"www-authenticate", b'Bearer realm="tributary"')])

"""What a browser may make the gateway do: the Host check (DNS rebinding) and the Origin check (cross-site pages).

A web page cannot read another origin's responses (CORS is off unless ``--allowed-origins`` names origins), but it
can still *send*: a form or ``fetch(..., {mode: "no-cors"})`` POST, and above all a WebSocket, which no CORS rule
covers. And a page on a name the attacker controls can re-point that name at 127.0.0.1 (DNS rebinding) and then talk
to a gateway bound to localhost as if it were same-origin. So:

- **Host**: a gateway bound to a loopback address answers only requests whose ``Host`` is a loopback name
  (``localhost``, ``127.0.0.1``, ``[::1]``, any port); bound elsewhere, any Host unless ``--allowed-hosts`` lists
  them. Else a 400 ``invalid_host`` (a WebSocket handshake is refused with it).
- **Origin**: a request that carries an ``Origin`` header (browsers send one on cross-site requests and on every
  WebSocket handshake) is served only if the origin is the gateway's own (same scheme-less host and port as
  ``Host``) or listed in ``--allowed-origins``; else a 403 ``origin_not_allowed``. Clients that are not browsers (the
  OpenAI SDKs, curl) send no Origin and are unaffected.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

LOOPBACK_BINDS = {"127.0.0.1", "localhost", "::1", "[::1]"}
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def split_list(value: str | list[str] | None) -> list[str]:
    if not value:
        return []
    items = value if isinstance(value, list) else value.split(",")
    return [v.strip() for v in items if v.strip()]


def host_name(host: str) -> str:
    """``Host`` header -> the name without its port (``[::1]:8000`` -> ``::1``), lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class BrowserGuard:
    def __init__(self, app, bind_host: str, allowed_hosts: str | list[str] | None = None,
                 allowed_origins: str | list[str] | None = None):
        self.app = app
        hosts = {host_name(h) for h in split_list(allowed_hosts)}
        if "*" in hosts:
            self.hosts = None
        elif hosts:
            self.hosts = hosts
        else:
            self.hosts = set(LOOPBACK_NAMES) if bind_host in LOOPBACK_BINDS else None
        origins = split_list(allowed_origins)
        self.any_origin = "*" in origins
        self.origins = {o.rstrip("/").lower() for o in origins}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if self.hosts is not None and host_name(host) not in self.hosts:
            return await refuse(scope, receive, send, 400, "invalid_host",
                                 f"Host {host!r} is not served here (a loopback-bound gateway answers loopback "
                                 "names only; see --allowed-hosts)")
        origin = headers.get(b"origin")
        if origin is not None and not self._origin_ok(origin.decode("latin-1"), host):
            return await refuse(scope, receive, send, 403, "origin_not_allowed",
                                 "requests from this web origin are not allowed (see --allowed-origins)")
        return await self.app(scope, receive, send)

    def _origin_ok(self, origin: str, host: str) -> bool:
        if self.any_origin or origin.rstrip("/").lower() in self.origins:
            return True
        parts = urlsplit(origin)
        # Same origin: a web page's (http or https: not "evil://host") from the host and port the client asked for.
        # The scheme is not compared with the request's: behind a TLS-terminating proxy a page on https reaches an
        # http gateway.
        return (parts.scheme in ("http", "https") and bool(parts.netloc)
                and parts.netloc.lower() == host.strip().lower())


async def refuse(scope, receive, send, status: int, code: str, message: str, extra_headers=()) -> None:
    """An HTTP or WebSocket scope answered with an OpenAI-shaped error (a WebSocket's handshake refused with it
    where the server supports the denial-response extension, as uvicorn does; else closed with 1008)."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra_headers]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await receive()  # websocket.connect
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": code})


# What a page of an allowed origin may read of an answer besides the CORS-safelisted headers.
EXPOSED = ["x-request-id", "x-client-request-id", "retry-after", "retry-after-ms", "x-ratelimit-limit-requests",
           "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens",
           "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"]


class CORS(CORSMiddleware):
    """CORS for the origins ``--allowed-origins`` names. They are trusted, so a preflight may ask for any request
    header: the OpenAI JS SDK sends its own (``x-stainless-*``, ``openai-organization``, ...), and a fixed list of
    three refused every preflight of it (an outside tester's). A preflight refused (a method not served) gets the
    OpenAI error shape, not Starlette's plain text."""

    def __init__(self, app, origins: list[str]):
        super().__init__(app, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
                         expose_headers=EXPOSED)

    def preflight_response(self, request_headers):
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        why = response.body.decode(errors="replace").strip()  # "Disallowed CORS method", ...
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
        return JSONResponse({"error": {"message": f"{why}: this gateway serves GET and POST from allowed origins",
                                       "type": "invalid_request_error", "param": None, "code": "cors_not_allowed"}},
                            status_code=400, headers=headers)

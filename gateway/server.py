"""Runs the gateway app under uvicorn (one process; start more processes behind a balancer to scale out)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import resource
import uuid
from collections import OrderedDict
from collections.abc import Callable

import uvicorn
import uvicorn.server
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from gateway.app import create_app
from gateway.config import GatewayConfig
from router.lifecycle import STOP_SIGNALS
from router.logs import Throttle

log = logging.getLogger(__name__)

KEEP_ALIVE_S = 75  # idle keep-alive connections are closed after this (the clients' pools expire sooner)
GRACEFUL_S = 30  # on SIGTERM, how long requests in flight may run on (the workers outlive the gateway in `up`)
END_MARGIN_S = 3  # before that ends, the requests still running are answered (503 / an error event), not cut
# Redis away this long while the gateway shuts down: its requests cannot go on, and are answered at once rather than
# at the end of the graceful period (`tributary up` killed: its Redis stopped with it, and streams waited 27 s).
AWAY_AT_SHUTDOWN_S = 3.0
FD_RESERVE = 256  # file descriptors kept for Redis connections, worker threads, files, when capping connections
# A request's headers past either bound get a 431 (httptools has none: a 20 MB header value, or 5,000 headers, were
# buffered and served). The bytes are counted per read (asyncio reads up to 256 KiB), so a read that ends a request's
# body and starts the next one's headers may count the body's tail too: the byte bound is kept above a whole read.
MAX_HEADER_BYTES = 512 * 1024
MAX_HEADERS = 256
LINGER_S = 2.0  # after an error answered straight to the socket, how long further bytes are read and dropped
# Past the connection cap, this many more connections may still ask these paths (a liveness probe, a scrape): a
# cap filled by clients made every probe a 503, and the supervisor (or a kubelet) killed a gateway that was serving.
PROBE_RESERVE = 64
PROBE_PATHS = (b"/health", b"/ready", b"/metrics")
PROBE_HEADER_TIMEOUT_S = 5.0
# At the cap with no idle connection, one whose request's headers have been arriving for longer than this is closed
# (408) to make room: a client sends its headers in a packet or two, and 200 sockets trickling a header byte every
# 3 s each (reconnecting at the header timeout) kept a --max-connections 60 gateway refusing nearly every client.
# (Sockets that reconnect faster than this still hold a small cap: only a proxy's per-client limits stop those.)
SLOW_HEADERS_S = 1.0
# ... and an idle connection only once it has been idle this long: a client that connected a moment ago, or was just
# answered, is about to send (a probe connecting, then sending 0.2 s later, was closed before it could ask).
MIN_IDLE_S = 1.0


def _client_fault_not_error(record: logging.LogRecord) -> bool:
    """uvicorn logs a client's text frame that is not UTF-8 as an error with a traceback (the socket is closed with
    1007, rightly), and bytes that are not HTTP as a warning: any client could fill the logs with them. Kept, as info
    records without a traceback."""
    if record.levelno >= logging.ERROR and str(record.msg).startswith("Invalid UTF-8 sequence received from client"):
        record.levelno, record.levelname, record.exc_info, record.exc_text = logging.INFO, "INFO", None, None
        record.msg = "a WebSocket client sent a text frame that is not UTF-8; closed with 1007"
    elif record.levelno >= logging.WARNING and str(record.msg).startswith("Invalid HTTP request received"):
        record.levelno, record.levelname = logging.INFO, "INFO"  # a client's bytes: answered 400, nothing to act on
    return True


# A secret in a URL's query (a client sending its key as ``?api_key=``, which is refused, or a presigned media URL's
# token) is written out of log lines: uvicorn logs every WebSocket handshake's path whole, at INFO (an outside
# tester's key in the log).
_SECRET_IN_QUERY = re.compile(r"([?&](?:api[_-]?key|key|token|access[_-]?token|auth|authorization|password|secret|"
                              r"signature|x-amz-signature|x-goog-signature|sig)=)[^&\s\"']*", re.IGNORECASE)


def _without_secrets(record: logging.LogRecord) -> bool:
    if isinstance(record.args, tuple) and any(isinstance(a, str) and "=" in a for a in record.args):
        record.args = tuple(_SECRET_IN_QUERY.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
    if isinstance(record.msg, str) and "=" in record.msg:
        record.msg = _SECRET_IN_QUERY.sub(r"\1***", record.msg)
    return True


for _name, _filters in (("uvicorn.error", (_client_fault_not_error, _without_secrets)),
                        ("uvicorn.access", (_without_secrets,))):
    for _f in _filters:
        if _f not in logging.getLogger(_name).filters:
            logging.getLogger(_name).addFilter(_f)
# httpx logs each request's URL at INFO: a remote media URL, its query's tokens included. Its failures are logged by
# gateway/remote.py, without the URL.
logging.getLogger("httpx").setLevel(logging.WARNING)


def _error_response(status: int, reason: str, message: str, code: str, extra: bytes = b"",
                    type_: str = "invalid_request_error") -> bytes:
    """An HTTP/1.1 error in the OpenAI shape, with a fresh ``x-request-id`` and ``connection: close``, as bytes to
    write straight to a socket (no request to answer through the app)."""
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n"
            b"x-request-id: %s\r\n%s\r\n%s" % (status, reason.encode(), len(body), uuid.uuid4().hex.encode(), extra,
                                               body))


def _linger(protocol) -> asyncio.TimerHandle | None:
    """Close ``protocol``'s connection after its last answer, lingering: closed at once with the client's bytes
    unread (a request or frame still being sent), the kernel answers with a reset, which can destroy the answer
    before the client reads it. So the write side is shut, what still comes is dropped (``protocol._lingering``:
    its ``data_received`` returns), and the socket is closed when the client closes it, or after LINGER_S (the
    timer returned)."""
    transport = protocol.transport
    if not transport.can_write_eof():
        transport.close()
        return None
    transport.write_eof()
    protocol._lingering = True
    transport.resume_reading()  # a paused read would leave the client's bytes unread all the same
    return protocol.loop.call_later(LINGER_S, transport.close)


class Server(uvicorn.Server):
    """uvicorn's server, except that ``END_MARGIN_S`` before its graceful period ends it calls ``end_in_flight``,
    so requests still running get an answer in the OpenAI error shape (and their generations are cancelled)
    instead of uvicorn's plain-text 500 or a stream cut without its end; and at once should Redis be away for
    ``AWAY_AT_SHUTDOWN_S`` meanwhile (``redis_away_s``: for how long the gateway's monitor has found it away)."""

    def __init__(self, config: uvicorn.Config, end_in_flight: Callable[[], object],
                 redis_away_s: Callable[[], float] = lambda: 0.0):
        super().__init__(config)
        self.end_in_flight, self.redis_away_s = end_in_flight, redis_away_s

    async def shutdown(self, sockets=None) -> None:
        graceful = self.config.timeout_graceful_shutdown
        delay = graceful - min(END_MARGIN_S, graceful / 2)
        timer = asyncio.get_running_loop().call_later(delay, self.end_in_flight)
        watch = asyncio.ensure_future(self._end_if_redis_away())
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
            watch.cancel()

    async def _end_if_redis_away(self) -> None:
        while self.redis_away_s() < AWAY_AT_SHUTDOWN_S:
            await asyncio.sleep(0.25)
        log.warning("redis is away while the gateway shuts down: the requests in flight cannot go on; ending them")
        self.end_in_flight()


class WSProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, with ``HTTPProtocol``'s send bound: a client that has not read its events (its
    socket buffer full) for ``send_timeout_s`` has its connection aborted, which the app sees as a disconnect (its
    response cancelled, its slots freed). Without it a Realtime send waited for good: the keepalive ping's close
    waits for the buffer to drain, which never comes, so eight clients that stopped reading held eight in-flight
    slots and eight Realtime connections for as long as they stayed (an outside reviewer's experiment)."""

    send_timeout_s = 30.0  # set by serve()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._stall_timer = None
        self._write_blocked = False
        super().connection_made(transport)

    def handle_connect(self, event) -> None:
        """A handshake websockets refuses (no Sec-WebSocket-Key, a wrong version) is answered in the OpenAI error
        shape with an ``x-request-id``, as every other error, not websockets' plain text."""
        response = self.conn.accept(event)
        if response.status_code == 101:
            self.conn.accept = lambda _request: response  # uvicorn's handshake goes on with this very response
            try:
                return super().handle_connect(event)
            finally:
                del self.conn.accept
        self.request, self.handshake_initiated = event, True
        self.handshake_complete = self.close_sent = True
        reason = response.body.decode("utf-8", "replace").strip() if response.body else response.reason_phrase
        extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode("latin-1")) for k, v in response.headers.raw_items()
                         if k.lower() in ("sec-websocket-version", "upgrade"))  # what the client should send
        self.transport.write(_error_response(response.status_code, response.reason_phrase, reason,
                                             "invalid_websocket_handshake", extra))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if getattr(self, "_lingering", False):  # closed for a protocol error: what still comes is dropped
            return
        super().data_received(data)

    def handle_parser_exception(self) -> None:
        """A frame websockets refuses (over ``ws_max_size``: 1009; bad UTF-8: 1007): the close frame is sent, then a
        lingering close as HTTPProtocol's, since a client still sending its frame would otherwise get a reset that
        can destroy the close frame before it reads it (seen: a 33 MB frame answered by a bare EOF)."""
        code, reason = self.conn.close_sent.code, self.conn.close_sent.reason
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        # As uvicorn's own close timer: the app ending (it sees the disconnect at once) then leaves the socket to it
        self.close_timer = _linger(self)

    def pause_writing(self) -> None:
        """The client's socket is full: nothing more is read from it until it drains. Each ping a client sends is
        answered with a pong, and websockets writes it whatever the buffer holds: clients that sent pings without
        reading their pongs grew the gateway by half a gigabyte and held its event loop for seconds, until the
        supervisor killed it (an outside tester)."""
        super().pause_writing()
        self._write_blocked = True
        self.transport.pause_reading()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.send_timeout_s, self._stalled)

    def resume_writing(self) -> None:
        self._cancel_stall()
        self._write_blocked = False
        if not self.read_paused:  # uvicorn's own pause (a message waiting for the app) stays
            self.transport.resume_reading()
        super().resume_writing()

    async def receive(self):
        message = await super().receive()  # resumes reading once the app has taken every message
        if self._write_blocked and not self.transport.is_closing():
            self.transport.pause_reading()  # ... but not while the client's socket is full
        return message

    def _cancel_stall(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _stalled(self) -> None:
        self._stall_timer = None
        log.warning("a WebSocket client has not read its events for %g s; closing its connection", self.send_timeout_s,
                    extra={"client": f"{self.client[0]}:{self.client[1]}" if self.client else None})
        self.transport.abort()  # connection_lost follows: a send raises, a receive gets the disconnect

    def shutdown(self) -> None:
        """The server is shutting down: a session that can drain (gateway/realtime.RealtimeSession.drain, in the
        scope) finishes its answer in progress and closes itself with 1012; any other socket is closed with 1012 at
        once, as uvicorn does."""
        drain = (getattr(self, "scope", None) or {}).get("tributary.drain")
        if drain is not None and self.handshake_complete and not self.close_sent and not self.transport.is_closing():
            self.stop_keepalive()
            drain()
            return
        super().shutdown()

    def connection_lost(self, exc) -> None:
        self._cancel_stall()
        super().connection_lost(exc)


class HTTPProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol (httptools), with the bounds a server facing clients it does not control needs:

    * bytes it cannot parse as HTTP are answered in the OpenAI error shape (400 ``invalid_http_request``, JSON)
      instead of uvicorn's plain text, as every other error is;
    * a connection must send a request's headers within ``header_timeout_s`` (``--header-timeout``) of opening (or
      of the request's first byte): uvicorn starts no timer before a first response, so sockets that sent nothing,
      or a header byte now and then, were held for good (a few thousand of them exhaust the file descriptors, and
      every client is refused);
    * a response the client does not read (its socket buffer full) for ``send_timeout_s`` (``--send-timeout``) is
      cut: the connection is aborted, which the app sees as a disconnect (the generation is cancelled, the in-flight
      slot freed). Without it a client that stops reading held a ``--max-inflight`` slot for good;
    * past ``max_connections`` open connections (default: the file-descriptor limit less ``FD_RESERVE``) the
      longest idle connection is closed to make room, as nginx does: one between keep-alive requests, or one that
      has sent nothing yet (sockets that sent nothing filled the cap as well as idle keep-alive ones did); else the
      one whose request's headers have been arriving longest, past ``SLOW_HEADERS_S`` (a 408: a slowloris); an idle
      one only once idle ``MIN_IDLE_S`` (one just opened or answered is about to send); with none of those, a new
      one may only ask a probe's path (``PROBE_PATHS``, ``PROBE_RESERVE`` of them at most: liveness probes and
      scrapes are answered however full the cap, where a full cap had the supervisor kill a gateway that was
      serving), and any other request is answered 503 ``server_overloaded`` (JSON, ``connection: close``,
      ``x-served-by``: this gateway's instance and pid, so the supervisor's probe knows its event loop answered),
      instead of the accept failing for lack of descriptors (which refuses every client, the probe included);
    * a request asking to upgrade to anything but a WebSocket (``Upgrade: h2c``, as ``curl --http2`` sends) gets a
      400 saying so, not its body dropped (httptools stops parsing at the upgrade);
    * a request's headers larger than ``MAX_HEADER_BYTES`` or more than ``MAX_HEADERS`` get a 431;
    * a connection between requests always has a timer (``_between_requests``): a body an answer left unread is
      dropped as it comes until ``header_timeout_s`` after the answer, then the connection is closed."""

    max_connections = 0  # set by serve(); 0: no cap
    max_body_bytes = 0  # set by serve(): a request declaring a longer body is answered 413 and its connection closed
    header_timeout_s, send_timeout_s = 15.0, 30.0  # set by serve()
    _refused = Throttle(10.0)
    _idle: OrderedDict = OrderedDict()  # connections between requests or before their first, longest idle first
    _heading: OrderedDict = OrderedDict()  # connections inside a request's headers -> when it began, oldest first
    served_by = b""  # set by serve(): "<instance id> <pid>", on the cap's 503s

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = self._stall_timer = self._discard_timer = None
        self._in_headers, self._header_bytes, self._header_count, self._too_large = True, 0, 0, False
        self._header_size = 0  # the request line's target and the header fields, as parsed
        self._probe_only = self._overloaded = self._bad_upgrade = False
        self._unsupported: tuple | None = None  # (status, reason, message, code) of a request this server cannot read
        timeout = self.header_timeout_s
        if self.max_connections and len(self.connections) > self.max_connections and not self._reclaim_idle():
            if len(self.connections) > self.max_connections + PROBE_RESERVE:
                self._overloaded = True
                return self._refuse()
            self._probe_only, timeout = True, min(timeout, PROBE_HEADER_TIMEOUT_S)
        self._header_timer = self.loop.call_later(timeout, self._headers_late)
        self._idle[self] = self.loop.time()  # nothing sent yet: the first closed should the cap need room

    def _reclaim_idle(self) -> bool:
        """Close the longest idle connection (between keep-alive requests, or not yet sent a byte), to make room for a
        new one, as nginx does, else the one whose request's headers have been arriving longest past SLOW_HEADERS_S
        (answered 408); False: none is either."""
        idle_since = self.loop.time() - MIN_IDLE_S
        while self._idle and next(iter(self._idle.values())) < idle_since:
            victim, _ = self._idle.popitem(last=False)
            if not victim.transport.is_closing():
                victim.transport.close()
                return True
        slow_since = self.loop.time() - SLOW_HEADERS_S
        while self._heading and next(iter(self._heading.values())) < slow_since:
            victim, began = self._heading.popitem(last=False)
            if not victim.transport.is_closing():
                victim.transport.write(_error_response(
                    408, "Request Timeout", f"the request's headers were still arriving after "
                    f"{self.loop.time() - began:.0f} s while the server was at its connection cap", "request_timeout"))
                victim.transport.close()
                return True
        return False

    def _refuse(self) -> None:
        if self._refused.due():
            log.warning("connection refused: too many open connections", extra={
                "connections": len(self.connections), "max_connections": self.max_connections,
                "refused_since_last": self._refused.held})
        self._answer(503, "Service Unavailable", "too many open connections; retry later", "server_overloaded",
                     "service_unavailable", b"retry-after: 1\r\n" + (b"x-served-by: %s\r\n" % self.served_by
                                                                     if self.served_by else b""))

    def data_received(self, data: bytes) -> None:
        if getattr(self, "_lingering", False):  # answered and closing: dropped
            return
        self._idle.pop(self, None)
        began = self._in_headers
        super().data_received(data)
        if self._in_headers and not self.transport.is_closing():  # this read ended inside a request's headers
            self._header_bytes = (self._header_bytes if began else 0) + len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._headers_too_large()
        self._between_requests()

    def _between_requests(self) -> None:
        """After a read, a connection whose last request is answered and that has no next one begun (uvicorn's read
        cancelled its keep-alive timer, and arms none) gets a timer again: a request answered before its body was
        read (a refusal: 401, 429, 503; /health sent a body) has the rest dropped as it comes, until the header
        timeout after the answer, when the connection is closed; with the body whole, the keep-alive timer runs
        again. One body byte after such an answer had the socket held for good, without a key (a reviewer's)."""
        cycle = self.cycle
        if (cycle is None or not cycle.response_complete or self.pipeline or self._header_timer is not None
                or self.timeout_keep_alive_task is not None or self.transport.is_closing()):
            return
        self._idle.setdefault(self, self.loop.time())  # the first closed should the cap need room
        if not cycle.more_body:
            self._cancel("_discard_timer")  # the body left unread has all come: keep-alive again
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)
        elif self._discard_timer is None:
            left = getattr(self, "_answered_at", self.loop.time()) + self.header_timeout_s - self.loop.time()
            self._discard_timer = self.loop.call_later(max(0.0, left), self._discarded_too_long, cycle)

    def _discarded_too_long(self, cycle) -> None:
        self._discard_timer = None
        if self.cycle is cycle and cycle.more_body and self._header_timer is None:  # that body, still coming
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self._header_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_size += len(name) + len(value) + 4
        if self._header_count > MAX_HEADERS:
            self._too_large = True
            raise ValueError("too many headers")  # the parser's callback error: answered by send_400_response
        super().on_header(name, value)

    def _headers_too_large(self) -> None:
        self._answer(431, "Request Header Fields Too Large", f"the request's headers exceed {MAX_HEADER_BYTES} "
                     f"bytes or {MAX_HEADERS} fields", "request_headers_too_large", "invalid_request_error")

    def on_message_begin(self) -> None:
        self._idle.pop(self, None)
        self._cancel("_discard_timer")  # a next request: the last one's body came whole
        self._heading[self] = self.loop.time()
        super().on_message_begin()
        self._in_headers, self._header_bytes, self._header_count, self._header_size = True, 0, 0, 0
        self._begun = True
        if self._header_timer is None:  # a request begun (a keep-alive connection's next one): its headers in time
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def on_headers_complete(self) -> None:
        if self._header_size > MAX_HEADER_BYTES:  # exact, where the reads' count bounds the buffering only
            self._too_large = True
            raise ValueError("headers too large")
        if self._probe_only and self.url.split(b"?", 1)[0] not in PROBE_PATHS:
            self._overloaded = True  # past the cap: a probe's path only
            raise ValueError("too many open connections")
        if self._get_upgrade() not in (None, b"websocket"):
            self._bad_upgrade = True
            raise ValueError("unsupported upgrade")
        if (version := self.parser.get_http_version()) not in ("1.0", "1.1"):
            self._unsupported = (505, "HTTP Version Not Supported", f"HTTP/{version} is not served here: send "
                                 "HTTP/1.1", "http_version_not_supported")
            raise ValueError("unsupported version")
        codings = [c.strip().lower() for n, v in self.headers if n == b"transfer-encoding"
                   for c in v.decode("latin-1").split(",")]
        if codings and codings != ["chunked"]:  # the parser reads chunked alone: "gzip, chunked" was read as plain
            self._unsupported = (501, "Not Implemented", f"Transfer-Encoding {', '.join(codings)!r} is not "
                                 "supported: send the body as is or chunked", "unsupported_transfer_encoding")
            raise ValueError("unsupported transfer coding")
        self._in_headers = self._begun = False
        self._heading.pop(self, None)
        self._cancel("_header_timer")
        super().on_headers_complete()
        declared = next((v for n, v in self.headers if n == b"content-length"), b"")
        if self.max_body_bytes and declared.isdigit() and int(declared) > self.max_body_bytes:
            self.cycle.oversized = True  # refused (413) unread: the connection closes after the answer

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if not getattr(self, "_begun", False):  # nothing of a request came: nobody to answer
            self.transport.close()
            return
        self._answer(408, "Request Timeout", f"the request headers did not arrive within {self.header_timeout_s:g} s",
                     "request_timeout", "invalid_request_error")

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.send_timeout_s, self._stalled)

    def resume_writing(self) -> None:
        self._cancel("_stall_timer")
        super().resume_writing()

    def _stalled(self) -> None:
        self._stall_timer = None
        path = self.scope.get("path") if self.scope else None
        log.warning("a client has not read its response for %g s; closing its connection", self.send_timeout_s,
                    extra={"client": f"{self.client[0]}:{self.client[1]}" if self.client else None, "path": path})
        self.transport.abort()  # connection_lost follows: the app sees a disconnect

    def handle_websocket_upgrade(self) -> None:
        """uvicorn hands the upgrade on with its request line rewritten to HTTP/1.1, so an HTTP/1.0 handshake (which
        RFC 6455 does not allow: it has no Upgrade) was accepted; it is refused here, where the version is known, as
        is one by another method than GET (it got websockets' plain-text refusal)."""
        if self.scope.get("http_version", "1.1") == "1.0":
            self._answer(400, "Bad Request", "a WebSocket handshake needs HTTP/1.1", "invalid_websocket_handshake",
                         "invalid_request_error", b"upgrade: websocket\r\n")
            return
        if self.scope.get("method") != "GET":
            self._answer(400, "Bad Request", f"a WebSocket handshake is a GET, not a {self.scope.get('method')}",
                         "invalid_websocket_handshake", "invalid_request_error")
            return
        super().handle_websocket_upgrade()

    def _start_asgi_task(self, cycle, app) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def on_response_complete(self) -> None:
        running = getattr(self, "_running", None)
        if getattr(running, "oversized", False) and running.more_body and not self.transport.is_closing():
            # A body past --max-body-bytes, answered 413 unread: dropping it as it comes could take the rest of the
            # header timeout, and a client that sent no body (only its length) and then its next request on the
            # connection had that request read as body, unanswered, for 15 s (an outside tester's). Closed now,
            # lingering, so that a client still sending reads its 413 rather than a reset.
            super().on_response_complete()
            self._cancel("timeout_keep_alive_task")
            _linger(self)
            return
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None and not self.transport.is_closing():
            self._idle[self] = self.loop.time()  # between requests: the first closed should the cap need room
        deferred = getattr(self, "_deferred", None)
        running = getattr(self, "_running", None)
        if deferred and not self.pipeline and (running is None or running.response_complete):
            self._deferred = None
            self._answer(*deferred)
        self._answered_at = self.loop.time()

    def connection_lost(self, exc) -> None:
        self._idle.pop(self, None)
        self._heading.pop(self, None)
        self._cancel("_header_timer")
        self._cancel("_discard_timer")
        self._cancel("_stall_timer")
        # uvicorn tells only the last request it parsed that the client is gone; with pipelined requests that is not
        # the one running, which then wrote to the closed socket (an error traceback) instead of seeing a disconnect.
        running = getattr(self, "_running", None)
        for cycle in [running, *(c for c, _ in self.pipeline)]:
            if cycle is not None and cycle is not self.cycle and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        super().connection_lost(exc)

    def _cancel(self, name: str) -> None:
        timer = getattr(self, name, None)
        if timer is not None:
            timer.cancel()
            setattr(self, name, None)

    def send_400_response(self, msg: str) -> None:
        if self._too_large:
            return self._headers_too_large()
        if self._overloaded:
            return self._refuse()
        if self._unsupported is not None:
            return self._answer(*self._unsupported, "invalid_request_error")
        if self._bad_upgrade:
            upgrade = self._get_upgrade().decode("latin-1", "replace")[:40]
            return self._answer(400, "Bad Request", f"upgrading to {upgrade!r} is not supported: send the request "
                                "without its Upgrade header (HTTP/1.1)", "unsupported_upgrade", "invalid_request_error")
        self._answer(400, "Bad Request", f"{msg.rstrip('.')}: the bytes sent are not a valid HTTP/1.1 request",
                     "invalid_http_request", "invalid_request_error")

    def _answer(self, status: int, reason: str, message: str, code: str, type_: str, extra: bytes = b"") -> None:
        """An error in the OpenAI shape written straight to the socket (no request to answer through the app),
        and the connection closed."""
        if getattr(self, "_lingering", False) or getattr(self, "_deferred", None):
            return
        running = getattr(self, "_running", None)
        queued = next((entry for entry in self.pipeline if entry[0] is self.cycle), None)
        if queued is not None:
            # A pipelined request, not started, whose own body is broken (a bad chunk): the error is its answer, and
            # it must never run (its app would wait for the rest of its body until the body timeout).
            self.pipeline.remove(queued)
        in_body = (queued is None and self.cycle is not None and self.cycle.more_body
                   and not self.cycle.response_complete)
        if not in_body and ((running is not None and not running.response_complete) or self.pipeline):
            # Requests parsed before this error are answered first (HTTP answers in order): written now, the error
            # took the place of a pipelined request's answer, which was then lost to the close. (An error inside
            # the running request's own body, a bad chunk, is that request's answer: at once. One inside the body
            # of a request queued behind others was written at once too, in their answers' place.)
            self._deferred = (status, reason, message, code, type_, extra)
            return
        self.transport.write(_error_response(status, reason, message, code, extra, type_))
        self._heading.pop(self, None)
        self._cancel("_header_timer")
        _linger(self)


def connection_cap(configured: int = 0) -> int:
    """The open-connection cap: ``configured``, else what the file-descriptor limit leaves after ``FD_RESERVE``,
    the soft limit raised to the hard one first (a container's 1024 is a common soft default)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if configured:
        return configured
    return 0 if soft == resource.RLIM_INFINITY else max(soft - FD_RESERVE, 64)


def check_redis_credentials(url: str) -> None:
    """A Redis that refuses the gateway's credentials, or a server at the URL that is no Redis, stops the start (a
    RedisError, which the command line words in one line): neither ever clears, and a gateway running on with
    /ready 503 hid it. A Redis that is not up yet is only logged: the gateway starts, refusing requests, until it
    is."""
    from cache.client import describe, not_redis, ping_error, refused_credentials

    exc = ping_error(url)
    if exc is not None and (refused_credentials(exc) or not_redis(exc)):
        raise exc
    if exc is not None:
        log.warning("Redis is not reachable yet; serving 503s until it is", extra={"error": describe(exc)})


def serve(cfg: GatewayConfig, host: str = "127.0.0.1", port: int = 8000, graceful_s: float = GRACEFUL_S) -> None:
    check_redis_credentials(cfg.redis_url)
    app = create_app(cfg)
    # A Realtime frame larger than a request body closes its socket with 1009; pings find dead peers. No
    # permessage-deflate: (de)compression runs on the event loop, ~0.1 s per MB, so one client's large frames (audio,
    # images, a retrieved item) would stall every other connection; token events are small anyway.
    # Keep-alive past the clients' pool expiry (httpx, and so the openai SDK: 5 s, uvicorn's own default): with equal
    # timeouts a client reuses a connection in the instant the server closes it and gets a connection reset
    # (seen once in tests/e2e/test_autoscale.py's burst).
    HTTPProtocol.max_connections = connection_cap(cfg.max_connections)
    HTTPProtocol.served_by = f"{cfg.instance_id} {os.getpid()}".encode("latin-1", "replace")
    HTTPProtocol.max_body_bytes = cfg.max_body_bytes
    HTTPProtocol.header_timeout_s, HTTPProtocol.send_timeout_s = cfg.header_timeout_s, cfg.send_timeout_s
    WSProtocol.send_timeout_s = cfg.send_timeout_s
    log.info("serving", extra={"max_connections": HTTPProtocol.max_connections,
                               "header_timeout_s": cfg.header_timeout_s, "send_timeout_s": cfg.send_timeout_s})
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, http=HTTPProtocol,
                            timeout_graceful_shutdown=graceful_s, timeout_keep_alive=KEEP_ALIVE_S,
                            ws_max_size=cfg.max_body_bytes, ws_ping_interval=20, ws_ping_timeout=20,
                            ws_per_message_deflate=False, ws=WSProtocol)
    # SIGHUP (a closed terminal) stops the gateway gracefully too, as SIGTERM and SIGINT do.
    uvicorn.server.HANDLED_SIGNALS = tuple(dict.fromkeys((*uvicorn.server.HANDLED_SIGNALS, *STOP_SIGNALS)))
    Server(config, app.end_in_flight, app.redis_away_s).run()

"""gateway/server.py's HTTP protocol against raw sockets, on a real uvicorn server: what uvicorn alone leaves
unbounded is bounded (an outside tester held sockets for good with nothing or a trickle of header bytes, and a
``--max-inflight`` slot with a client that stopped reading), and bytes that are not HTTP get the OpenAI error shape.
The timeouts are shortened for the test."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import pytest
import uvicorn

from gateway.server import HTTPProtocol, WSProtocol

HEADER_S, STALL_S = 0.6, 1.0


class App:
    """``/ok``: a small JSON answer; ``/stream``: chunks of 64 KiB until the client is gone (``gone`` set)."""

    def __init__(self):
        self.gone = threading.Event()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and scope["path"] == "/ws-quiet":  # reads until the client is gone
            await receive()
            await send({"type": "websocket.accept"})
            while (await receive())["type"] != "websocket.disconnect":
                pass
            return
        if scope["type"] == "websocket":  # events of 64 KiB until a send finds the client gone
            await receive()
            await send({"type": "websocket.accept"})
            try:
                while True:
                    await send({"type": "websocket.send", "text": "x" * 65536})
            except Exception:  # uvicorn's ClientDisconnected (an OSError)
                self.gone.set()
            return
        if scope["type"] != "http":
            return
        if scope["path"] == "/read":  # the whole body first, as the gateway reads one
            while (message := await receive())["type"] == "http.request" and message.get("more_body"):
                pass
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})

            async def watch():
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.gone.set()

            watcher = asyncio.ensure_future(watch())
            while not self.gone.is_set():
                await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
                await asyncio.sleep(0)
            watcher.cancel()
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"),
                                                                               (b"content-length", b"12")]})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})


@contextlib.contextmanager
def serving(app, max_connections: int = 0):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    HTTPProtocol.max_connections = max_connections
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=HTTPProtocol, ws=WSProtocol,
                                           log_config=None, lifespan="off", timeout_keep_alive=30))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        yield port
    finally:
        HTTPProtocol.max_connections = 0
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def short(monkeypatch):
    monkeypatch.setattr(HTTPProtocol, "header_timeout_s", HEADER_S)  # as serve() sets them from the flags
    monkeypatch.setattr(HTTPProtocol, "send_timeout_s", STALL_S)
    monkeypatch.setattr(WSProtocol, "send_timeout_s", STALL_S)


def read_all(s: socket.socket, timeout: float = 10) -> tuple[bytes, float]:
    """Everything until the server closes, and how long that took."""
    s.settimeout(timeout)
    start, reply = time.monotonic(), b""
    while chunk := s.recv(65536):
        reply += chunk
    return reply, time.monotonic() - start


def error_of(reply: bytes) -> tuple[bytes, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower() and b"connection: close" in head.lower(), head
    return head, json.loads(body)["error"]


@pytest.mark.parametrize("garbage", [b"GARBAGE\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),
                                     b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n"])
def test_bytes_that_are_not_http_get_a_400_in_the_openai_shape_not_uvicorns_plain_text(garbage):
    """A request the HTTP parser refuses (garbage, TLS spoken to the plain port, a malformed header) is answered by
    the gateway's server as every other error is: JSON in the OpenAI shape."""
    with serving(App()) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(garbage)
        reply, _ = read_all(s)
    head, error = error_of(reply)
    assert head.startswith(b"HTTP/1.1 400 "), reply
    assert error["code"] == "invalid_http_request" and error["type"] == "invalid_request_error", error
    assert "not a valid HTTP/1.1 request" in error["message"], error


def test_a_connection_that_sends_nothing_is_closed(short):
    with serving(App()) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        reply, took = read_all(s)
    assert reply == b"" and HEADER_S * 0.8 < took < HEADER_S + 3, took


def test_headers_trickled_a_byte_at_a_time_get_a_408_in_time(short):
    request = b"GET /ok HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"z" * 100
    with serving(App()) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        start, reply = time.monotonic(), b""
        s.settimeout(0.1)
        for byte in request:  # every byte resets uvicorn's keep-alive timer: it never fired
            try:
                s.sendall(bytes([byte]))
                if chunk := s.recv(65536):
                    reply += chunk
                    break
            except (TimeoutError, socket.timeout):
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        more, _ = read_all(s)
        took = time.monotonic() - start
    head, error = error_of(reply + more)
    assert head.startswith(b"HTTP/1.1 408 ") and error["code"] == "request_timeout", error
    assert took < HEADER_S + 3, took


def test_a_keep_alive_connection_may_idle_between_requests(short):
    """The header timeout runs from a request's first byte, not across the idle time between two requests (the
    keep-alive timeout's job)."""
    with serving(App()) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for _ in range(2):
            s.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
            reply = b""
            while not reply.endswith(b'{"ok": true}'):
                reply += s.recv(65536)
            assert reply.startswith(b"HTTP/1.1 200 ")
            time.sleep(HEADER_S * 2)


def test_a_client_that_stops_reading_is_cut_and_its_work_ends(short):
    """The app streams until the client is gone: a client that reads nothing fills its socket, and after the stall
    timeout the connection is aborted, which the app sees as a disconnect (a generation cancelled, a slot freed)."""
    app = App()
    with serving(app) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\n")
        assert app.gone.wait(STALL_S + 10), "the app never saw the client go"


def test_a_websocket_client_that_stops_reading_is_cut_and_its_session_ends(short):
    """The same bound for a WebSocket (a Realtime session): uvicorn's own protocol waited for good for a buffer that
    never drains (its keepalive's close waits for it too), holding the session's slots for as long as the client
    stayed (an outside reviewer held eight with eight sockets)."""
    app = App()
    with serving(app) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        assert s.recv(12) == b"HTTP/1.1 101"  # upgraded; then nothing more is read
        assert app.gone.wait(STALL_S + 10), "the app never saw the client go"


@pytest.mark.parametrize("headers", [b"X-Big: " + b"a" * (2 << 20) + b"\r\n",  # one value of 2 MB
                                     b"X-Big: " + b"a" * (600 << 10) + b"\r\n",  # 600 KiB: within one read more
                                     b"".join(b"X-H%d: v\r\n" % i for i in range(300))])  # 300 fields
def test_headers_too_large_or_too_many_get_a_431(headers):
    """httptools bounds neither: a 20 MB header value, or 5,000 headers, were buffered and served (an outside tester's
    fuzzer). Past either bound: a 431 in the OpenAI shape, the connection closed."""
    with serving(App()) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # the server may close while we still send
            s.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n")
        reply, _ = read_all(s)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:80]
    assert error_of(reply)[1]["code"] == "request_headers_too_large"


def test_a_large_body_and_many_pipelined_requests_are_not_taken_for_large_headers():
    """Reads of up to 256 KiB hold a body's tail and the next request's headers: the bound counts only reads that end
    inside headers, so 4 MB of body around pipelined requests is served."""
    body = b"x" * (4 << 20)
    request = b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    with serving(App()) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request * 3 + b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        reply, _ = read_all(s)
    assert reply.count(b"HTTP/1.1 200 ") == 4, reply[:200]


def test_a_text_frame_that_is_not_utf8_closes_with_1007_and_logs_no_error(caplog):
    """uvicorn logged each such frame as an error with a traceback: a client could fill the logs (an outside tester's
    fuzzer). Now an info record."""
    import logging

    from websockets.sync.client import connect

    with serving(App()) as port, caplog.at_level(logging.INFO):
        with connect(f"ws://127.0.0.1:{port}/ws-quiet", open_timeout=10) as ws:
            ws.send(b"\xed\xa0\x80", text=True)
            with pytest.raises(Exception) as info:
                while True:
                    ws.recv(timeout=10)
        assert getattr(info.value, "rcvd", None) is not None and info.value.rcvd.code == 1007, info.value
    records = [r for r in caplog.records if "UTF-8" in r.getMessage()]
    assert records and all(r.levelno == logging.INFO and not r.exc_info for r in records)


@pytest.mark.parametrize("headers,status", [(b"Sec-WebSocket-Version: 13\r\n", 400),  # no key
                                            (b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                             b"Sec-WebSocket-Version: 8\r\n", 400)])
def test_a_websocket_handshake_refused_is_answered_in_the_openai_shape(headers, status):
    """websockets answered these in plain text with no request id (an outside tester's fuzzer)."""
    with serving(App()) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /ws-quiet HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" + headers
                  + b"\r\n")
        reply, _ = read_all(s)
    assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:80]
    head, err = error_of(reply)
    assert b"x-request-id: " in head and err["code"] == "invalid_websocket_handshake" and err["message"]


def test_a_websocket_handshake_over_http_1_0_is_refused():
    """uvicorn rewrote the request line to HTTP/1.1 before websockets saw it: a handshake RFC 6455 does not allow
    was accepted (an outside tester's fuzzer)."""
    with serving(App()) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /ws-quiet HTTP/1.0\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        reply, _ = read_all(s)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:80]
    head, err = error_of(reply)
    assert err["code"] == "invalid_websocket_handshake" and "HTTP/1.1" in err["message"]


def test_bytes_that_are_not_http_after_a_pipelined_request_are_answered_after_it():
    """A valid request, then garbage on the same connection: the 400 was written at once and the connection closed,
    so the first request's answer was lost (an outside tester's fuzzer). Answers go in order."""
    with serving(App()) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nGARBAGE\r\n\r\n")
        reply, _ = read_all(s)
    first, _, rest = reply.partition(b'{"ok": true}')
    assert first.startswith(b"HTTP/1.1 200 ") and rest.startswith(b"HTTP/1.1 400 "), reply


@pytest.mark.parametrize("body", [b"zz\r\nabc\r\n", b"-5\r\n", b"3\r\nabc\r\nffffffffffffffffffff\r\n"])
def test_a_bad_chunk_in_the_running_requests_own_body_is_answered_at_once(body):
    """Its error is that request's answer: deferred behind it (as an error after a pipelined request is), it waited
    for the body timeout and came as a 408 after 30 s (an outside retest's finding)."""
    import time

    with serving(App()) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        t = time.monotonic()
        s.sendall(b"POST /read HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        reply, _ = read_all(s)
    assert reply.startswith(b"HTTP/1.1 400 ") and time.monotonic() - t < 5, reply[:80]


@pytest.mark.parametrize("before", [1, 2])
def test_a_bad_chunk_in_a_pipelined_requests_body_is_answered_after_the_requests_before_it(before):
    """Requests, then one whose chunked body is broken, in one write: the 400 was written at once, in the place of
    the earlier requests' answers, which were lost to the close (each logging "Cannot call write() after
    write_eof()"; an outside tester's). Answers go in order, the error last, and the broken request never runs."""
    with serving(App()) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        t = time.monotonic()
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n" * before
                  + b"POST /read HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        reply, _ = read_all(s)
    import re

    assert re.findall(rb"(?:^|})HTTP/1\.1 (\d{3}) ", reply) == [b"200"] * before + [b"400"], reply
    assert reply.endswith(b"}") and b"invalid_http_request" in reply
    assert time.monotonic() - t < 5  # not the body timeout


@pytest.mark.parametrize("request_, status, code", [
    (b"POST /read HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 501,
     b"unsupported_transfer_encoding"),
    (b"GET /ok HTTP/2.0\r\nHost: a\r\n\r\n", 505, b"http_version_not_supported"),
])
def test_what_the_parser_would_misread_is_refused(request_, status, code):
    """A gzip transfer coding was ignored (the body read as if plain) and an HTTP/2.0 request line served as
    HTTP/1.1 (an outside tester's): each is refused, saying why (RFC 9112: 501 for a transfer coding not
    understood)."""
    with serving(App()) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request_)
        reply, _ = read_all(s)
    head, error = error_of(reply)
    assert head.startswith(b"HTTP/1.1 %d " % status) and error["code"] == code.decode(), reply


def test_a_body_past_the_bound_is_answered_unread_and_its_connection_closed(monkeypatch):
    """A request declaring a body past --max-body-bytes, answered unread (the gateway's 413): its connection held on
    to drop the body as it came, so a client that sent only the length and then its next request had that request
    read as body, unanswered, until the header timeout (an outside tester's 15 s). The connection is closed after
    the answer, lingering: a client still sending its body reads the answer, not a reset."""
    monkeypatch.setattr(HTTPProtocol, "max_body_bytes", 1000)
    with serving(App()) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999\r\n\r\n")
            time.sleep(0.3)  # the answer comes; then the next request on the same connection
            s.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
            reply, took = read_all(s)
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.count(b"HTTP/1.1 ") == 1 and took < 3, (reply, took)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # still sending 4 MB: it reads its answer
            s.sendall(b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 4000000\r\n\r\n")
            sender = threading.Thread(target=_send_quietly, args=(s, b"x" * 4_000_000), daemon=True)
            sender.start()
            reply, took = read_all(s)
            sender.join(10)
        assert reply.startswith(b"HTTP/1.1 200 ") and took < 5, (reply[:80], took)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # within the bound: kept alive
            s.sendall(b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789"
                      b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            reply, _ = read_all(s)
        assert reply.count(b"HTTP/1.1 200 ") == 2, reply


def _send_quietly(s: socket.socket, data: bytes) -> None:
    try:
        s.sendall(data)
    except OSError:  # the server closed its side after answering: what it had not read is dropped
        pass


def test_connections_past_the_cap_are_answered_503_at_once_but_probes_are_answered():
    """Past the cap a request is a 503 at once, unless it asks a probe's path: with the cap full of clients, the
    supervisor's /health probe got 503s and killed a gateway that was serving (an outside tester, three times of
    three; the requests it was running were lost)."""
    assert HTTPProtocol.header_timeout_s >= 15  # "at once": long before the held connections' header timeout
    with serving(App(), max_connections=3) as port:
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        for s in held:  # each in its request's headers: not idle, so not closed to make room
            s.sendall(b"GET /ok HTTP/1.1\r\n")
        time.sleep(0.2)
        try:  # accepted in order: the fourth comes after the three
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
                reply, took = read_all(s)
            head, error = error_of(reply)
            assert head.startswith(b"HTTP/1.1 503 ") and error["code"] == "server_overloaded", reply
            assert b"retry-after: 1" in head.lower() and took < 5, took
            for path in (b"/health", b"/ready?x=1"):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                    reply, _ = read_all(s)
                assert reply.startswith(b"HTTP/1.1 200 "), reply
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 10
        while True:  # room again, once the server has seen them close
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                reply, _ = read_all(s)
            if not reply.startswith(b"HTTP/1.1 503 ") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert reply.startswith(b"HTTP/1.1 200 "), reply


def test_at_the_cap_a_connection_that_has_sent_nothing_makes_room_and_the_503_names_its_gateway(monkeypatch):
    """An outside tester held the cap (and the 64 probes past it) with sockets that sent nothing, reopened as they
    were closed: /health got 503s and the supervisor killed the gateway. A socket that has sent nothing is idle: the
    longest such is closed to make room. And a 503 the cap answers names its gateway (``x-served-by``), which the
    supervisor's probe takes as an answer (tributary/watchdog.py)."""
    monkeypatch.setattr(HTTPProtocol, "served_by", b"inst-1 4242")
    with serving(App(), max_connections=3) as port:
        silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        try:
            time.sleep(1.2)  # idle past MIN_IDLE_S
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                reply, _ = read_all(s)
            assert reply.startswith(b"HTTP/1.1 200 "), reply
            assert read_all(silent[0], 5)[0] == b""  # the first to connect, closed
            busy = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
            for b in busy:  # every slot (and past it) held by requests begun: nothing idle is left to close
                b.sendall(b"GET /ok HTTP/1.1\r\n")
            time.sleep(0.2)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
                reply, _ = read_all(s)
            head, error = error_of(reply)
            assert head.startswith(b"HTTP/1.1 503 ") and b"x-served-by: inst-1 4242" in head, head
            for b in busy:
                b.close()
        finally:
            for s in silent:
                s.close()


def test_the_supervisors_probe_takes_the_caps_503_from_its_own_gateway_as_an_answer():
    import http.server

    from tributary.watchdog import GatewayProbe

    class Full(http.server.BaseHTTPRequestHandler):
        served_by = "inst-1 4242"

        def do_GET(self):  # noqa: N802
            self.send_response(503)
            self.send_header("x-served-by", self.served_by)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Full)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    probes = []
    try:
        for instance in ("inst-1", "another"):
            probe = GatewayProbe(f"http://127.0.0.1:{server.server_address[1]}", instance, 30, 30, every_s=0.05)
            probes.append(probe)
            time.sleep(0.5)
        assert 4242 in probes[0].answered and not probes[1].answered  # a 503 from another gateway is no answer
    finally:
        for probe in probes:
            probe.close()
        server.shutdown()


def test_the_supervisors_probe_judges_no_silence_it_was_not_there_to_hear():
    """up stopped (or its host paused) for 2 minutes: on waking it killed a healthy gateway at once, its last
    answer 2 minutes old (an outside tester's). A probe that has not asked lately judges nobody."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from tributary.watchdog import GatewayProbe

    probe = GatewayProbe("http://127.0.0.1:1", "inst", hang_s=5, load_s=5, every_s=0.05)
    probe.close()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        child = SimpleNamespace(proc=proc, exited=None, started_at=time.monotonic() - 200, served=True, name="gw")
        group = SimpleNamespace(children=[child], restart_at=None)
        probe.answered[proc.pid] = time.monotonic() - 120  # its last answer, before the pause
        probe.tried = time.monotonic() - 120  # nor did the probe ask since
        assert probe.check(group) is None and proc.poll() is None
        probe.tried = time.monotonic()  # it asked now, and got no answer: a real silence
        assert probe.check(group) is child
        assert proc.wait(timeout=10) == -9
    finally:
        if proc.poll() is None:
            proc.kill()


def test_at_the_cap_the_longest_idle_keep_alive_connection_makes_room():
    """An outside tester held the cap with idle keep-alive connections (each asked once, then said nothing for the
    75 s keep-alive): every new client got 503s. At the cap the longest idle one is closed instead, as nginx does."""
    with serving(App(), max_connections=3) as port:
        idle = []
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
            reply = b""
            while not reply.endswith(b'{"ok": true}'):
                reply += s.recv(65536)
            idle.append(s)
        try:
            time.sleep(1.2)  # idle past MIN_IDLE_S
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                reply, _ = read_all(s)
            assert reply.startswith(b"HTTP/1.1 200 "), reply
            assert read_all(idle[0], 5)[0] == b""  # the first to go idle was closed
            idle[1].sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert read_all(idle[1])[0].startswith(b"HTTP/1.1 200 ")  # the others still serve
        finally:
            for s in idle:
                s.close()


def test_at_the_cap_the_connection_trickling_its_headers_longest_makes_room(monkeypatch):
    """An outside tester held a cap of 60 with 200 sockets each sending a header byte every 3 s (reconnecting at the
    header timeout): nearly every client got 503s. At the cap with nothing idle, the connection whose request's
    headers have been arriving longest, past SLOW_HEADERS_S, is answered 408 and closed to make room."""
    import gateway.server as server_module

    monkeypatch.setattr(server_module, "SLOW_HEADERS_S", 0.5)
    with serving(App(), max_connections=3) as port:
        slow = []
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /ok HTTP/1.1\r\n")
            slow.append(s)
            time.sleep(0.05)
        try:
            time.sleep(0.7)
            for s in slow:  # a byte more: trickling, not silent (silent ones are closed first, as idle)
                s.sendall(b"H")
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                reply, _ = read_all(s)
            assert reply.startswith(b"HTTP/1.1 200 "), reply
            head, error = error_of(read_all(slow[0], 5)[0])  # the first to begin its headers
            assert head.startswith(b"HTTP/1.1 408 ") and error["code"] == "request_timeout", head
            slow[1].sendall(b"ost: a\r\nConnection: close\r\n\r\n")  # the others are still served
            assert read_all(slow[1])[0].startswith(b"HTTP/1.1 200 ")
        finally:
            for s in slow:
                s.close()


def test_at_the_cap_a_connection_just_opened_is_not_closed_before_it_can_send(monkeypatch):
    """Under a slowloris at the cap, a probe that connected and sent its request 0.2 s later got EOF: it was idle
    (nothing sent yet), and the next connection closed it to make room. An idle connection makes room only once it
    has been idle MIN_IDLE_S."""
    import gateway.server as server_module

    monkeypatch.setattr(server_module, "SLOW_HEADERS_S", 30.0)  # the trickling ones are not slow yet
    with serving(App(), max_connections=3) as port:
        trickling = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        for t in trickling:
            t.sendall(b"GET /ok HTTP/1.1\r\n")
        time.sleep(0.1)
        probe = socket.create_connection(("127.0.0.1", port), timeout=5)  # the third: the cap is full
        time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as late:  # past the cap
            time.sleep(0.2)
            probe.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            reply, _ = read_all(probe)
            assert reply.startswith(b"HTTP/1.1 200 "), reply
            late.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_all(late)[0].startswith(b"HTTP/1.1 503 ")  # past the cap, not a probe's path
        probe.close()
        for t in trickling:
            t.close()


def test_a_body_left_unread_that_came_whole_does_not_cut_a_later_request_on_the_connection(short):
    """The timer bounding a body an answer left unread outlived that body: a later request's slow upload on the
    same keep-alive connection was cut at the header timeout after the first answer (a regression tester's)."""
    with serving(App()) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
        reply = b""
        while not reply.endswith(b'{"ok": true}'):
            reply += s.recv(65536)
        s.sendall(b"0123456789")  # the unread body, whole: keep-alive again
        s.sendall(b"POST /read HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nConnection: close\r\n\r\n")
        for byte in b"body":  # slower than the header timeout after the first answer
            time.sleep(HEADER_S * 0.6)
            s.sendall(bytes([byte]))
        reply, _ = read_all(s)
        assert reply.startswith(b"HTTP/1.1 200 "), reply


def test_a_request_answered_before_its_body_is_read_closes_its_connection_in_time(short):
    """An app answers without reading the body (a refusal, /health with a Content-Length); then one body byte came,
    which cancelled uvicorn's keep-alive timer, and nothing armed another: the socket was held for good (a
    reviewer's; N of them fill --max-connections, without a key). The rest of the body is dropped and the
    connection closed once the header timeout has passed."""
    with serving(App()) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n")
        reply = b""
        while not reply.endswith(b'{"ok": true}'):
            reply += s.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200 ")
        s.sendall(b"x")  # a body byte after the answer, then silence
        rest, took = read_all(s, timeout=10)
        assert rest == b"" and took < HEADER_S + 3, took


def test_an_upgrade_to_anything_but_a_websocket_is_a_400_saying_so_and_a_post_handshake_too():
    """``curl --http2`` sends ``Upgrade: h2c``: httptools stopped parsing there, so the request ran with its body
    dropped and got "request body is empty" (an outside tester). And a POST with ``Upgrade: websocket`` got
    websockets' plain-text refusal."""
    body = b'{"model": "m"}'
    with serving(App()) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /read HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                  b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        reply, _ = read_all(s)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:80]
    _, err = error_of(reply)
    assert err["code"] == "unsupported_upgrade" and "h2c" in err["message"], err
    with serving(App()) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /ws-quiet HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nContent-Length: 2\r\n"
                  b"\r\n{}")
        reply, _ = read_all(s)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:80]
    assert error_of(reply)[1]["code"] == "invalid_websocket_handshake"


def test_pings_from_a_client_that_does_not_read_its_pongs_are_not_read_past_a_full_socket():
    """Each ping is answered with a pong that websockets writes whatever the buffer holds: clients sending pings
    without reading grew the gateway by half a gigabyte and held its event loop for seconds, until the supervisor
    killed it (an outside tester). While the client's socket is full nothing more is read from it: what the
    server buffers stays bounded (then, after the send timeout, 30 s here, the connection is cut)."""
    import os
    import struct

    app = App()
    with serving(app) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /ws-quiet HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 101")
        mask = os.urandom(4)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"p" * 125))
        frames = (struct.pack("!BB", 0x89, 0x80 | 125) + mask + payload) * 200
        s.settimeout(2.0)
        sent = 0
        with contextlib.suppress(OSError):  # a send blocked 2 s (the server stopped reading), or cut
            while sent < 256 << 20:
                s.sendall(frames)
                sent += len(frames)
    # Bounded: the server stopped reading once its pongs filled the socket, so the client's sends blocked after a few
    # MB (what the kernel buffers on loopback); uncapped, the server read and queued all of it.
    assert sent < 64 << 20, sent

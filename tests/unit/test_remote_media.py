"""gateway/remote.py: remote media fetched only from allowed hosts on public addresses, bounded, never via a
redirect or a DNS answer that points inside. A real HTTP server on loopback serves the tests; reaching it needs the
unsafe test-only setting, and every case that must be refused is refused without it."""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import threading

import pytest

from gateway.errors import APIError
from gateway.remote import RemoteMedia, public
from tests.media import png_bytes

PNG = png_bytes(20, 20, seed=5)


class Handler(http.server.BaseHTTPRequestHandler):
    seen_encodings: list = []  # the Accept-Encoding of each /gzip.png request

    def do_GET(self):  # noqa: N802
        routes = {
            "/cat.png": (200, "image/png", PNG),
            "/text": (200, "text/html", b"<html>"),
            "/big.png": (200, "image/png", b"\x89PNG" + b"x" * 5000),
            "/missing.png": (404, "text/plain", b"no"),
        }
        if self.path.startswith("/redirect-to/"):
            self.send_response(302)
            rest = self.path[len("/redirect-to/") :]
            self.send_header("Location", rest if rest.startswith("http") else "/" + rest)
            self.end_headers()
            return
        if self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
            return
        if self.path == "/gzip.png":  # compressed though asked for identity: a 200 KiB bomb inflates to 200 MiB
            import gzip

            self.seen_encodings.append(self.headers.get("Accept-Encoding"))  # before the client can refuse the body
            body = gzip.compress(b"\0" * (200 << 20), compresslevel=9)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path == "/backslash":  # a Location httpx cannot request
            self.send_response(302)
            self.send_header("Location", "http:\\\\localhost/secret")
            self.end_headers()
            return
        if self.path == "/slow.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(b"\x89PNG")
            self.wfile.flush()
            threading.Event().wait(3)
            return
        status, ctype, body = routes.get(self.path, (404, "text/plain", b"no"))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def fetch(remote: RemoteMedia, url: str, kind: str = "image") -> bytes:
    return asyncio.run(remote.fetch(url, kind, "messages.0.content.1"))


def refused(remote: RemoteMedia, url: str, kind: str = "image") -> APIError:
    with pytest.raises(APIError) as info:
        fetch(remote, url, kind)
    assert info.value.param == "messages.0.content.1"
    return info.value


def unsafe(**kw) -> RemoteMedia:
    return RemoteMedia(frozenset({"127.0.0.1", "localhost"}), max_bytes=kw.pop("max_bytes", 4096),
                       timeout_s=kw.pop("timeout_s", 5.0), allow_private=True)


def test_off_by_default(server):
    err = refused(RemoteMedia.of(None, 4096), f"http://{server}/cat.png")
    assert err.code == "remote_url_disabled"


def test_an_allowed_host_is_fetched(server):
    assert fetch(unsafe(), f"http://{server}/cat.png") == PNG
    assert fetch(unsafe(), f"http://{server}/redirect-to/cat.png") == PNG  # a redirect to an allowed place


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{port}/cat.png",  # loopback
    "http://localhost:{port}/cat.png",  # a name that resolves to loopback
])
def test_loopback_is_refused_even_when_allowed_by_name(server, url):
    port = server.split(":")[1]
    remote = RemoteMedia(frozenset({"127.0.0.1", "localhost"}), 4096)  # allowed by name, but not the address
    err = refused(remote, url.format(port=port))
    assert err.code == "remote_media_refused" and "private, loopback or link-local" in err.message


@pytest.mark.parametrize("address", ["10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                                     "0.0.0.0", "::1", "fe80::1", "fd00:ec2::254", "::ffff:127.0.0.1", "224.0.0.1",
                                     # 6to4 wrapping 127.0.0.1 and the metadata address, site-local, Teredo's client
                                     # 127.0.0.1 (its bits inverted): an outside tester's, judged public before
                                     "2002:7f00:1::", "2002:a9fe:a9fe::1", "fec0::1",
                                     "2001:0:4136:e378:8000:63bf:80ff:fffe"])
def test_inside_addresses_are_not_public(address):
    assert not public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8"])
def test_outside_addresses_are_public(address):
    assert public(ipaddress.ip_address(address))


def test_private_and_metadata_literals_are_refused():
    remote = RemoteMedia(frozenset({"10.0.0.1", "169.254.169.254", "[::1]", "::1"}), 4096)
    for url in ("http://10.0.0.1/x.png", "http://169.254.169.254/latest/meta-data/", "http://[::1]/x.png"):
        assert "private, loopback or link-local" in refused(remote, url).message


def test_a_redirect_is_checked_like_the_first_url(server):
    port = server.split(":")[1]
    # Allowed: the first host. The redirect leads to another host that is not allowed, then to loopback.
    remote = RemoteMedia(frozenset({"127.0.0.1"}), 4096, allow_private=True)
    err = refused(remote, f"http://{server}/redirect-to/http://localhost:{port}/cat.png")
    assert "'localhost' is not in --allowed-media-domains" in err.message
    strict = RemoteMedia(frozenset({"127.0.0.1", "localhost"}), 4096)  # allowed by name, refused by address
    assert "private" in refused(strict, f"http://localhost:{port}/redirect-to/cat.png").message
    assert "redirects" in refused(unsafe(), f"http://{server}/loop").message


@pytest.mark.parametrize("path,kind,code,words", [
    ("/text", "image", "remote_media_refused", "content type is 'text/html'"),
    ("/cat.png", "audio", "remote_media_refused", "not audio/*"),
    ("/missing.png", "image", "remote_media_refused", "HTTP 404"),
    ("/big.png", "image", None, "larger than 4096 bytes"),
])
def test_answers_that_are_not_the_media_are_refused(server, path, kind, code, words):
    err = refused(unsafe(), f"http://{server}{path}", kind)
    assert words in err.message
    assert err.code == code if code else err.status == 413


def test_a_slow_download_is_cut_at_the_timeout(server):
    assert "longer than 1 s" in refused(unsafe(timeout_s=1.0), f"http://{server}/slow.png").message


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x.png", "file:///etc/passwd", "http://user:pw@127.0.0.1/x.png",
                                 "http:///x.png", "http://evil.example/x.png"])
def test_other_schemes_credentials_and_hosts_are_refused(url):
    assert refused(unsafe(), url).code == "remote_media_refused"


def test_lookups_that_hang_do_not_hold_the_threads_every_request_prepares_on(monkeypatch):
    """An allowed domain whose resolver hangs: each lookup's timeout ends its request, but the thread stays in
    getaddrinfo. They ran on the loop's default executor, which parsing and prompt building share (6 threads on 2
    cores): a few slow lookups held every other request's preparation (an outside reviewer's reading)."""
    import socket
    import time

    release, real = threading.Event(), socket.getaddrinfo

    def getaddrinfo(host, *args, **kw):
        if host == "slow.example":
            release.wait(20)
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    remote = RemoteMedia(frozenset({"slow.example"}), 4096, timeout_s=0.3)

    async def scenario() -> float:
        tries = [asyncio.create_task(remote.fetch("http://slow.example/cat.png", "image", "p")) for _ in range(12)]
        await asyncio.sleep(0.1)  # every lookup started (or queued)
        t = time.monotonic()
        await asyncio.wait_for(asyncio.to_thread(lambda: None), 5)  # what parsing a body waits for
        took = time.monotonic() - t
        for task in tries:
            with pytest.raises(APIError):
                await task
        return took

    try:
        assert asyncio.run(scenario()) < 1.0
    finally:
        release.set()


def test_a_compressed_answer_is_refused_before_it_is_inflated(server):
    """httpx inflated a gzip body chunk by chunk before the size bound saw it: an outside tester's 200 KiB bomb cost
    130 MB a request against a 16 MiB cap. The fetch asks for identity and refuses any other encoding."""
    err = refused(unsafe(max_bytes=16 << 20), f"http://{server}/gzip.png")
    assert err.code == "remote_media_refused" and "compressed" in err.message
    assert Handler.seen_encodings[-1] == "identity"


def test_a_redirect_to_what_cannot_be_requested_is_a_400_and_failures_are_told_alike(server):
    """``Location: http:\\\\localhost/...`` raised httpx's InvalidURL, which is no HTTPError: a 500 with a traceback.
    And which failure it was (refused, reset, not HTTP) is the log's to say, not the client's: it mapped an allowed
    host's ports."""
    assert refused(unsafe(), f"http://{server}/backslash").message == "remote media refused: fetching the " \
        "image failed"
    closed = refused(unsafe(), "http://127.0.0.1:1/cat.png")  # nothing listens: connection refused
    assert closed.message == "remote media refused: fetching the image failed", closed.message

"""Remote media (``http(s)`` image URLs and vLLM's ``audio_url`` parts), fetched only where the operator allows it.

Off by default: a URL is a 400 ``remote_url_disabled``. ``--allowed-media-domains a.com,b.org`` (vLLM's flag) turns
it on for exactly those host names. The fetch is built against SSRF (vLLM's CVE-2025-6242 and its follow-ups: a
URL that names an allowed host but reaches an internal one):

- only ``http`` and ``https``; the host must be one of the allowed names (exact match, no userinfo);
- the name is resolved here, and **every** address it resolves to must be public: loopback, private, link-local
  (cloud metadata at 169.254.169.254), carrier-grade NAT, multicast, reserved and unspecified addresses are refused,
  IPv4-mapped IPv6 included;
- the connection goes to the address that was checked (the URL's host is replaced by it; ``Host`` and TLS SNI and
  certificate checks keep the name), so a second DNS answer cannot re-point it (DNS rebinding);
- redirects are followed by hand, at most ``MAX_REDIRECTS``, each hop checked like the first;
- the download is bounded in time (``timeout_s`` for the whole fetch, redirects included) and size
  (``max_bytes``), and the response's ``Content-Type`` must be an image (or audio) type.

Each refusal is a 400 naming the part (code ``remote_media_refused``; too large: 413). Tests reach their own
loopback server only with ``allow_private=True``, which ``TRIBUTARY_UNSAFE_MEDIA_PRIVATE_NETWORKS=1`` sets: **unsafe**,
for tests only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import SplitResult, urljoin, urlsplit, urlunsplit

from gateway.errors import InvalidRequest, PayloadTooLarge

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
# Name lookups run on threads of their own: on the loop's default executor (which parsing and prompt building share),
# a slow resolver's lookups, whose threads a timeout cannot stop, held every request's preparation behind them.
DNS_THREADS = 4
_dns = ThreadPoolExecutor(DNS_THREADS, thread_name_prefix="dns")
CGNAT = ipaddress.ip_network("100.64.0.0/10")


def public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_site_local:  # fec0::/10, deprecated but routed by some stacks (an outside tester's finding)
            return False
        # An IPv4 address carried inside (mapped, 6to4, Teredo's client) is judged as that address: 2002:7f00:1::
        # is 127.0.0.1 to a host with a 6to4 relay.
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is not None:
            ip = inner
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
                or ip.is_unspecified or (isinstance(ip, ipaddress.IPv4Address) and ip in CGNAT))


@dataclass
class RemoteMedia:
    allowed: frozenset[str]  # host names (lower case)
    max_bytes: int
    timeout_s: float = 10.0
    allow_private: bool = False  # UNSAFE: tests only

    @classmethod
    def of(cls, domains: str | None, max_bytes: int, timeout_s: float = 10.0) -> RemoteMedia:
        names = frozenset(d.strip().lower().rstrip(".") for d in (domains or "").split(",") if d.strip())
        unsafe = os.environ.get("TRIBUTARY_UNSAFE_MEDIA_PRIVATE_NETWORKS") == "1"
        return cls(names, max_bytes, timeout_s, unsafe)

    @property
    def enabled(self) -> bool:
        return bool(self.allowed)

    async def fetch(self, url: str, kind: str, param: str) -> bytes:
        """The body at ``url`` (``kind``: image or audio), or a 400/413 naming ``param``."""
        self.check_url(url, kind, param)
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch(url, kind, param)
        except TimeoutError:
            raise _refused(f"fetching the {kind} took longer than {self.timeout_s:g} s", param) from None

    async def _fetch(self, url: str, kind: str, param: str) -> bytes:
        import httpx

        async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                target, host, ip = await self._check(url, kind, param)
                sni = {"sni_hostname": host} if urlsplit(url).scheme == "https" else {}
                try:
                    # Uncompressed only: httpx inflates a gzip body chunk by chunk before the size bound sees it
                    # (an outside tester's 200 KiB bomb took 130 MB a request, against a 16 MiB cap).
                    async with client.stream("GET", target, headers={"Host": _host_header(url),
                                                                     "Accept-Encoding": "identity"},
                                             extensions=sni) as resp:
                        if resp.is_redirect:
                            location = resp.headers.get("location")
                            if not location:
                                raise _refused("a redirect without a Location", param)
                            url = urljoin(url, location)
                            continue
                        if resp.status_code != 200:
                            raise _refused(f"the {kind} URL answered HTTP {resp.status_code}", param)
                        ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                        if not ctype.startswith(f"{kind}/"):
                            raise _refused(f"the {kind} URL's content type is {ctype or 'missing'!r}, not {kind}/*",
                                           param)
                        if resp.headers.get("content-encoding", "identity").strip().lower() not in ("identity", ""):
                            raise _refused(f"the {kind} URL answered compressed (Content-Encoding), though asked "
                                           "not to", param)
                        declared = resp.headers.get("content-length")
                        if declared and declared.isdigit() and int(declared) > self.max_bytes:
                            raise PayloadTooLarge(f"media larger than {self.max_bytes} bytes", param=param,
                                                  code="media_too_large")
                        body = bytearray()
                        async for chunk in resp.aiter_bytes():
                            body += chunk
                            if len(body) > self.max_bytes:
                                raise PayloadTooLarge(f"media larger than {self.max_bytes} bytes", param=param,
                                                      code="media_too_large")
                        return bytes(body)
                except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL: a redirect to what httpx cannot
                    # request (``http:\\host``). One message for every failure: which one (refused, reset, not
                    # HTTP) would map an allowed host's ports for the client; the log says which.
                    log.info("fetching remote media failed", extra={"error": type(exc).__name__, "param": param})
                    raise _refused(f"fetching the {kind} failed", param) from None
        raise _refused(f"more than {MAX_REDIRECTS} redirects", param)

    def check_url(self, url: str, kind: str, param: str) -> tuple[SplitResult, str, int]:
        """What can be told of ``url`` without resolving or fetching it (a Realtime item's image is checked so when
        the item is created): its parts, host name and port, or a 400 naming ``param``."""
        if not self.enabled:
            raise InvalidRequest(f"{kind} URLs must be data: URLs; fetching http(s) URLs is disabled on this server "
                                 "(--allowed-media-domains turns it on)", param=param, code="remote_url_disabled")
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise _refused("not a valid URL", param) from None
        host = (parts.hostname or "").rstrip(".")
        if parts.scheme not in ("http", "https") or not host:
            raise _refused("only http and https URLs with a host name are fetched", param)
        if parts.username is not None or parts.password is not None:
            raise _refused("URLs with credentials are not fetched", param)
        if host not in self.allowed:
            raise _refused(f"host {host!r} is not in --allowed-media-domains", param)
        return parts, host, port

    async def _check(self, url: str, kind: str, param: str) -> tuple[str, str, str]:
        """``url`` with its host replaced by the checked address, the host name, the address."""
        parts, host, port = self.check_url(url, kind, param)
        try:
            infos = await asyncio.get_running_loop().run_in_executor(_dns, socket.getaddrinfo, host, port, 0,
                                                                     socket.SOCK_STREAM)
        except OSError:
            raise _refused(f"host {host!r} does not resolve", param) from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        if not addresses:
            raise _refused(f"host {host!r} does not resolve", param)
        if not self.allow_private and not all(public(a) for a in addresses):
            raise _refused(f"host {host!r} resolves to a private, loopback or link-local address", param)
        ip = addresses[0]
        literal = f"[{ip}]" if ip.version == 6 else str(ip)
        return urlunsplit((parts.scheme, f"{literal}:{port}", parts.path or "/", parts.query, "")), host, str(ip)


def _host_header(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc.rsplit("@", 1)[-1]


def _refused(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(f"remote media refused: {message}", param=param, code="remote_media_refused")

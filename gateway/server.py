"""Runs the gateway app under uvicorn (one process; start more processes behind a balancer to scale out)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import uvicorn
import uvicorn.server
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from gateway.app import create_app
from gateway.config import GatewayConfig
from router.lifecycle import STOP_SIGNALS

KEEP_ALIVE_S = 75  # idle keep-alive connections are closed after this (the clients' pools expire sooner)
GRACEFUL_S = 30  # on SIGTERM, how long requests in flight may run on (the workers outlive the gateway in `up`)
END_MARGIN_S = 3  # before that ends, the requests still running are answered (503 / an error event), not cut


class Server(uvicorn.Server):
    """uvicorn's server, except that ``END_MARGIN_S`` before its graceful period ends it calls ``end_in_flight``,
    so requests still running get an answer in the OpenAI error shape (and their generations are cancelled)
    instead of uvicorn's plain-text 500 or a stream cut without its end."""

    def __init__(self, config: uvicorn.Config, end_in_flight: Callable[[], object]):
        super().__init__(config)
        self.end_in_flight = end_in_flight

    async def shutdown(self, sockets=None) -> None:
        graceful = self.config.timeout_graceful_shutdown
        delay = graceful - min(END_MARGIN_S, graceful / 2)
        timer = asyncio.get_running_loop().call_later(delay, self.end_in_flight)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


class HTTPProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP protocol (httptools, else h11), except that bytes it cannot parse as HTTP are answered in the
    OpenAI error shape (400 ``invalid_http_request``, JSON) instead of uvicorn's plain text, as every other error is:
    a client reads one shape from this server."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": {"message": f"{msg.rstrip('.')}: the bytes sent are not a valid HTTP/1.1 request",
                                     "type": "invalid_request_error", "param": None,
                                     "code": "invalid_http_request"}}).encode()
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def serve(cfg: GatewayConfig, host: str = "127.0.0.1", port: int = 8000, graceful_s: float = GRACEFUL_S) -> None:
    app = create_app(cfg)
    # A Realtime frame larger than a request body closes its socket with 1009; pings find dead peers.
    # Keep-alive past the clients' pool expiry (httpx, and so the openai SDK: 5 s, uvicorn's own default): with equal
    # timeouts a client reuses a connection in the instant the server closes it and gets a connection reset
    # (seen once in tests/e2e/test_autoscale.py's burst).
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, http=HTTPProtocol,
                            timeout_graceful_shutdown=graceful_s, timeout_keep_alive=KEEP_ALIVE_S,
                            ws_max_size=cfg.max_body_bytes, ws_ping_interval=20, ws_ping_timeout=20)
    # SIGHUP (a closed terminal) stops the gateway gracefully too, as SIGTERM and SIGINT do.
    uvicorn.server.HANDLED_SIGNALS = tuple(dict.fromkeys((*uvicorn.server.HANDLED_SIGNALS, *STOP_SIGNALS)))
    Server(config, app.end_in_flight).run()

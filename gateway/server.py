"""Runs the gateway app under uvicorn (one process; start more processes behind a balancer to scale out)."""

from __future__ import annotations

import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig

KEEP_ALIVE_S = 75  # idle keep-alive connections are closed after this (the clients' pools expire sooner)


def serve(cfg: GatewayConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    app = create_app(cfg)
    # A Realtime frame larger than a request body closes its socket with 1009; pings find dead peers.
    # Keep-alive past the clients' pool expiry (httpx, and so the openai SDK: 5 s, uvicorn's own default): with equal
    # timeouts a client reuses a connection in the instant the server closes it and gets a connection reset
    # (seen once in tests/e2e/test_autoscale.py's burst).
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=30,
                timeout_keep_alive=KEEP_ALIVE_S, ws_max_size=cfg.max_body_bytes, ws_ping_interval=20,
                ws_ping_timeout=20)

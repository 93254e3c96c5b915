"""Runs the gateway app under uvicorn (one process; start more processes behind a balancer to scale out)."""

from __future__ import annotations

import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig


def serve(cfg: GatewayConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    app = create_app(cfg)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=30)

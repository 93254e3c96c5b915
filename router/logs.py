"""Structured (JSON lines) logging shared by every tier: each record names its tier, its process and, when it is about
one request, the request id that follows the request through every tier.

Use ``log.info("encoded", extra={"request_id": rid, "ms": 12.5})``; any ``extra`` key becomes a JSON field.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

# Attributes every LogRecord has (plus uvicorn's colour duplicate): anything else came from ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def __init__(self, tier: str):
        super().__init__()
        self.tier = tier
        self.pid = os.getpid()

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "tier": self.tier,
            "pid": self.pid,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(tier: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(tier))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.Formatter.converter = time.gmtime

"""Graceful shutdown for worker processes: SIGTERM/SIGINT set a flag the busy loop checks between steps, so the
work in hand is finished and acknowledged before the process exits."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


def stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum, _frame):
        if stop.is_set():
            log.warning("second signal: exiting without draining", extra={"signal": signum})
            raise SystemExit(1)
        log.info("stopping: finishing the work in hand", extra={"signal": signum})
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop

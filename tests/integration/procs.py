"""Start one tier as a real process and wait until it registers as live in Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx

from cache.client import connect
from cache.embedded import free_port
from cache.keys import Keys, alive
from router.liveness import live_count_args, worker_pid


def start_tier(args: list[str], redis_url: str, tier: str, timeout: float = 120, keys: Keys = Keys()
               ) -> subprocess.Popen:
    """A worker process, once its heartbeat is in its tier's live set (``keys``: those of its ``--prefix``; a Redis
    Cluster's URL is fine)."""
    proc = subprocess.Popen([sys.executable, "-m", "tributary.cli", *args, "--redis-url", redis_url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    r = connect(redis_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{tier} exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        # Its own heartbeat (router.liveness.worker_id): a worker of the same tier killed moments ago (another
        # module's) is still within the live window, and counting it would send work before this one reads.
        key, low, high = live_count_args(keys, tier)
        if any(worker_pid(member) == proc.pid for member in r.zrangebyscore(key, low, high)):
            return proc
        time.sleep(0.2)  # the process is importing torch; its heartbeat is the readiness signal
    proc.kill()
    raise RuntimeError(f"{tier} not live after {timeout}s")


def start_gateway(model, redis_url: str, *args: str, output=subprocess.DEVNULL, timeout: float = 120
                  ) -> tuple[subprocess.Popen, str]:
    """A gateway on a free port (JSON logs to ``output``) and its base URL, once its /health sees a live backbone."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tributary.cli", "gateway", "--model", str(model), "--redis-url",
                             redis_url, "--port", str(port), *args], stdout=output, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1", TRIBUTARY_LOG_FORMAT="json"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).json()["workers"].get("backbone"):
                return proc, base
        except (httpx.TransportError, ValueError, KeyError):
            pass
        time.sleep(0.2)  # importing; the health probe is the readiness signal
    proc.kill()
    raise RuntimeError(f"the gateway saw no live backbone within {timeout}s")


def hold_lease(r, reply_to: str, ttl_s: int = 600) -> None:
    """Act as the live gateway owning ``reply_to``: workers write only to the reply streams of live gateways."""
    r.set(alive(reply_to), 1, ex=ttl_s)


@contextmanager
def paused(*servers):
    """The servers' processes stopped (SIGSTOP: a hung host or a partition looks so; their sockets still accept, the
    kernel queues connections and bytes) for the block, and continued after it whatever it raised. Each is anything
    with a ``.proc`` (an embedded Redis, a cluster node)."""
    for server in servers:
        os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for server in servers:
            os.kill(server.proc.pid, signal.SIGCONT)


def stop_tier(proc: subprocess.Popen, timeout: float = 30, sig: int = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_handles(pid: int, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
    """Until process ``pid`` catches or ignores ``sig`` (its handler installed, from /proc/<pid>/status): a child
    signalled before then dies of the default action instead of running its handler."""
    bit, deadline = 1 << (sig - 1), time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":" in line)
        if (int(status["SigCgt"], 16) | int(status["SigIgn"], 16)) & bit:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not install its signal {sig} handler within {timeout} s")

"""One real local cluster (`tributary up`, every tier its own process) per e2e module, on the session's Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from cache.embedded import free_port


@dataclass
class RunningCluster:
    proc: subprocess.Popen
    base_url: str
    redis_url: str
    model: str
    log_path: Path

    def stats(self, tier: str) -> dict[str, float]:
        raw = redis.Redis.from_url(self.redis_url).hgetall(f"trib:stats:{tier}")
        return {k.decode(): float(v) for k, v in raw.items()}

    def children(self) -> list[int]:
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                out.append(int(stat.parent.name))
        return out


def wait_healthy(base_url: str, proc: subprocess.Popen, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cluster exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as resp:
                if json.load(resp)["status"] == "ok":
                    return
        except OSError:
            pass
        time.sleep(0.5)  # polling a readiness probe: the processes are importing torch
    raise RuntimeError(f"cluster not healthy after {timeout}s:\n{log_path.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def cluster(tiny_model, redis_server, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("cluster") / "cluster.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tributary.cli", "up", "--model", str(tiny_model), "--port", str(port),
         "--redis-url", redis_server.url, "--encoder-max-wait-ms", "50"],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    c = RunningCluster(proc, f"http://127.0.0.1:{port}", redis_server.url, tiny_model.name, log_path)
    try:
        wait_healthy(c.base_url, proc, 240, log_path)
        yield c
    finally:
        children = c.children()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
        log.close()
        leftover = [pid for pid in children if Path(f"/proc/{pid}").exists()
                    and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]]
        assert code == 0, log_path.read_text()[-4000:]
        assert not leftover, f"processes left behind: {leftover}"

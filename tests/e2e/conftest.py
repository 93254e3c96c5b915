"""One real local cluster (`tributary up`, every tier its own process) per e2e module, on the session's Redis.

``local_cluster`` starts one for any checkpoint (the ``cluster`` fixture below: the tiny demo; test_reference_exact:
Hugging Face LLaVA / Qwen2-Audio checkpoints); give each cluster that may share the Redis its own ``prefix``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from cache.client import connect
from cache.embedded import free_port


@dataclass
class RunningCluster:
    proc: subprocess.Popen
    base_url: str
    redis_url: str
    model: str
    log_path: Path
    prefix: str = "trib"

    def wait_ready(self, timeout: float = 240) -> None:
        """Until the gateway answers /ready and ``up`` itself has said so (its banner): a test over sooner stops it
        while it still counts as starting, and ``up`` exits 130 (seen in a one-test run)."""
        deadline = time.monotonic() + timeout
        wait_healthy(self.base_url, self.proc, timeout, self.log_path)
        while "Tributary is up:" not in self.log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no banner from up:\n{self.log_path.read_text()[-4000:]}")
            time.sleep(0.1)  # up polls /ready itself, then prints it

    def banner_examples(self, timeout: float = 30) -> tuple[str, str]:
        """The curl and the python command of the banner ``tributary up`` printed (once its gateway was ready)."""
        import re

        deadline = time.monotonic() + timeout
        while "Tributary is up:" not in (log := self.log_path.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)  # printed right after /ready answered
        banner = log[log.index("Tributary is up:"):]
        return (re.search(r"^  (curl .*?)\n\n", banner, re.S | re.M)[1],
                re.search(r"^  (\S*python\S* -c .*?)\n\n", banner, re.S | re.M)[1])

    def stats(self, tier: str) -> dict[str, float]:
        raw = connect(self.redis_url).hgetall(f"{self.prefix}:stats:{tier}")  # a single server or a cluster
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
    """Until the gateway's /ready answers 200 (Redis up, a live worker in every tier)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cluster exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:  # not listening yet, or 503 (urllib raises HTTPError, an OSError) while a tier starts
            pass
        time.sleep(0.5)  # polling a readiness probe: the processes are importing torch
    raise RuntimeError(f"cluster not ready after {timeout}s:\n{log_path.read_text()[-4000:]}")


@contextlib.contextmanager
def local_cluster(model: Path, redis_url: str, log_dir: Path, *extra_args: str, prefix: str = "trib",
                  env: dict[str, str] | None = None):
    """``tributary up --model MODEL --port <free> --prefix PREFIX *extra_args`` with ``TRIBUTARY_REDIS_URL=URL``
    (and ``env``) in its environment: a URL may hold a password, which belongs on no command line. Yields as soon as
    the supervisor is started (call ``wait_ready()``: work done before overlaps the tiers' start-up); on exit,
    Ctrl-C (SIGINT), and it must exit 0 leaving no process behind."""
    port = free_port()
    log_path = log_dir / "cluster.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tributary.cli", "up", "--model", str(model), "--port", str(port),
         "--prefix", prefix, *extra_args],
        stdout=log, stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1", TRIBUTARY_REDIS_URL=redis_url, **(env or {})),
    )
    c = RunningCluster(proc, f"http://127.0.0.1:{port}", redis_url, Path(model).name, log_path, prefix)
    clean = False  # an error inside the block is the one to report, not the exit code it causes
    try:
        yield c
        clean = True
    finally:
        children = c.children()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
        log.close()
        leftover = [pid for pid in children if Path(f"/proc/{pid}").exists()
                    and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]]
        if clean:
            assert code == 0, log_path.read_text()[-4000:]
            assert not leftover, f"processes left behind: {leftover}"


@pytest.fixture(scope="module")
def cluster(tiny_model, redis_server, tmp_path_factory):
    # Remote media from the tests' own loopback server: needs the UNSAFE test-only setting (gateway/remote.py).
    with local_cluster(tiny_model, redis_server.url, tmp_path_factory.mktemp("cluster"),
                       "--encoder-max-wait-ms", "50", "--allowed-media-domains", "127.0.0.1",
                       env={"TRIBUTARY_UNSAFE_MEDIA_PRIVATE_NETWORKS": "1"}) as c:
        c.wait_ready()
        yield c

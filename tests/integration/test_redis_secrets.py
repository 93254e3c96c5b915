"""The Redis password as a secret file (Docker and Kubernetes secrets): ``TRIBUTARY_REDIS_PASSWORD_FILE`` for every
client, and ``tributary redis``, the server the image runs, which takes its password from the same file and keeps it
off its command line."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from cache.client import connect, with_password_file
from cache.embedded import EmbeddedRedis, free_port


def test_password_file_goes_into_the_url(tmp_path, monkeypatch):
    secret = tmp_path / "pw"
    secret.write_text("s3cr:t/@x\n")
    monkeypatch.setenv("TRIBUTARY_REDIS_PASSWORD_FILE", str(secret))
    url = with_password_file("redis://redis:6379/0")
    assert url == "redis://:s3cr%3At%2F%40x@redis:6379/0"
    assert with_password_file("redis://user:given@h:1/0") == "redis://user:given@h:1/0"  # the URL's own wins
    assert with_password_file("rediss://alice@h:6380/0?ssl_ca_certs=/ca.pem") == (
        "rediss://alice:s3cr%3At%2F%40x@h:6380/0?ssl_ca_certs=/ca.pem")
    monkeypatch.setenv("TRIBUTARY_REDIS_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot read the password file"):
        with_password_file("redis://h:1/0")


def test_tributary_redis_serves_with_the_password_from_the_file(tmp_path, monkeypatch):
    secret = tmp_path / "pw"
    secret.write_text("file-secret-123\n")
    port = free_port()
    env = dict(os.environ, TRIBUTARY_REDIS_PASSWORD_FILE=str(secret))
    proc = subprocess.Popen([sys.executable, "-m", "tributary.cli", "redis", "--port", str(port), "--dir",
                             str(tmp_path)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis(port=port, password="file-secret-123", socket_connect_timeout=0.5).ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, password="wrong").ping()
        monkeypatch.setenv("TRIBUTARY_REDIS_PASSWORD_FILE", str(secret))
        assert connect(f"redis://127.0.0.1:{port}/0").ping()  # the clients read the same file
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"file-secret-123" not in cmdline
        assert (tmp_path / "redis.conf").stat().st_mode & 0o077 == 0
    finally:
        proc.terminate()
        proc.wait(10)


def test_tributary_redis_refuses_to_serve_without_a_password(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRIBUTARY_REDIS_PASSWORD_FILE"}
    out = subprocess.run([sys.executable, "-m", "tributary.cli", "redis", "--port", str(free_port()), "--dir",
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no password" in out.stderr


def test_the_embedded_server_leaves_no_password_on_disk():
    """``tributary up``'s Redis reads its password from a 0600 file that is gone once the server answers: a
    supervisor killed -9 (no cleanup runs) leaves no secret in the temporary folder, and no folder either: it is
    removed once the server answers (one empty folder was left per killed ``up``)."""
    with EmbeddedRedis(password="embedded-pw-77") as server:
        folder = os.readlink(f"/proc/{server.proc.pid}/cwd")  # the server runs in it (--dir)
        assert "tributary-redis-" in folder and folder.endswith(" (deleted)"), folder
        assert b"embedded-pw-77" not in Path(f"/proc/{server.proc.pid}/cmdline").read_bytes()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, password="wrong").ping()
        assert redis.Redis(port=server.port, password="embedded-pw-77").ping()

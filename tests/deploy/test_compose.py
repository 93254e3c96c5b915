"""deploy/docker-compose.yml brought up for real: a Docker engine builds deploy/Dockerfile on a local base image, the
cluster starts (Redis, the demo model written by the one-shot service, gateway, encoders, backbone), the official
openai SDK streams a text + image + audio request through the published gateway port, the image encoder is scaled
to 2 and back, and everything is torn down with its volumes.

Opt-in (``TRIBUTARY_DOCKER_TESTS=1``; ``bash scripts/test.sh --docker`` sets it): the first build downloads PyTorch
into the image (several GB, minutes). tests/deploy/docker-env.sh provides the engine, the compose binary and the base
image on a Debian machine with no registry; on a machine with Docker and a registry, the default base image works.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from cache.embedded import free_port
from tests.media import b64, data_url, png_bytes, wav_bytes

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    os.environ.get("TRIBUTARY_DOCKER_TESTS") != "1",
    reason="builds and runs the Docker image: opt in with TRIBUTARY_DOCKER_TESTS=1 (bash scripts/test.sh --docker)")]


def _run(cmd, env, timeout, check=True):
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(cmd[-4:])} exited {out.returncode}:\n{out.stdout[-3000:]}\n"
                             f"{out.stderr[-3000:]}")
    return out


def _health(base: str) -> dict:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
            return json.load(resp)
    except OSError:
        return {}


def _until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compose")
    env = dict(os.environ)
    if not os.environ.get("DOCKER_COMPOSE"):
        subprocess.run(["bash", str(ROOT / "tests/deploy/docker-env.sh")], check=True, timeout=1200)
        for line in Path(os.environ.get("TMPDIR", "/tmp"), "tributary-docker.env").read_text().splitlines():
            key, _, value = line.partition("=")
            env.setdefault(key, value)
    password = tmp / "redis_password.txt"
    password.write_text(os.urandom(12).hex() + "\n")
    password.chmod(0o644)  # compose bind-mounts the file: the image's non-root user must read it
    port = free_port()
    env.update(TRIBUTARY_REDIS_PASSWORD_FILE_HOST=str(password), TRIBUTARY_GATEWAY_PORT=str(port),
               BUILD_CA_FILE=env.get("BUILD_CA_FILE", "/etc/ssl/certs/ca-certificates.crt"),
               TRIBUTARY_IMAGE="tributary:test", COMPOSE_PROFILES="cpu")
    env.pop("TRIBUTARY_REDIS_URL", None)
    dc = [env["DOCKER_COMPOSE"], "-p", f"tributary-test-{os.getpid()}", "-f", "deploy/docker-compose.yml",
          "-f", "deploy/compose.test.yml"]
    try:
        _run(dc + ["build"], env, timeout=2400)
        _run(dc + ["up", "-d", "--wait", "--wait-timeout", "600"], env, timeout=900)
        yield dc, env, f"http://127.0.0.1:{port}", password.read_text().strip()
    finally:
        logs = _run(dc + ["logs", "--no-color", "--timestamps"], env, timeout=120, check=False)
        (tmp / "compose.log").write_text(logs.stdout + logs.stderr)
        _run(dc + ["down", "-v", "--remove-orphans", "--timeout", "60"], env, timeout=300, check=False)


def test_openai_sdk_streams_text_image_and_audio_through_the_compose_cluster(stack):
    from openai import OpenAI

    _, _, base, _ = stack
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, max_tokens=8, temperature=0.0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "Describe both."},
            {"type": "image_url", "image_url": {"url": data_url(png_bytes(64, 48, seed=11))}},
            {"type": "input_audio", "input_audio": {"data": b64(wav_bytes(1.0, seed=12)), "format": "wav"}}]}])
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert finish in ("stop", "length") and usage and usage.completion_tokens > 0
    assert usage.prompt_tokens > 20  # the image's and the audio's placeholder tokens are in the prompt


def test_image_encoder_scales_to_two_and_back(stack):
    dc, env, base, _ = stack
    _run(dc + ["up", "-d", "--no-recreate", "--scale", "encoder-image=2", "--wait", "--wait-timeout", "600"],
         env, timeout=900)
    _until(lambda: _health(base).get("workers", {}).get("encoder:image") == 2, 180, "two live image workers")
    test_openai_sdk_streams_text_image_and_audio_through_the_compose_cluster(stack)
    _run(dc + ["up", "-d", "--no-recreate", "--scale", "encoder-image=1", "--wait", "--wait-timeout", "600"],
         env, timeout=900)
    _until(lambda: _health(base).get("workers", {}).get("encoder:image") == 1, 120, "one live image worker")
    assert _health(base)["status"] == "ok"


def test_containers_run_as_non_root_and_keep_the_password_out_of_their_config(stack):
    dc, env, _, password = stack
    ids = _run(dc + ["ps", "-q"], env, timeout=60).stdout.split()
    assert len(ids) >= 5
    for cid in ids:
        info = json.loads(_run(["docker", "inspect", cid], env, timeout=60).stdout)[0]
        assert password not in json.dumps(info["Config"]), "the Redis password is in a container's configuration"
        uid = _run(["docker", "exec", cid, "id", "-u"], env, timeout=60).stdout.strip()
        assert uid == "10001"


@pytest.mark.parametrize(("profile", "backbones"), [
    ("cpu", {"backbone"}), ("gpu", {"backbone-gpu"}), ("pipeline", {"backbone-shard-0", "backbone-shard-1"})])
def test_every_profile_renders_with_its_backbone(stack, profile, backbones):
    dc, env, _, _ = stack
    out = _run(dc + ["config", "--format", "json"], {**env, "COMPOSE_PROFILES": profile}, timeout=60)
    services = json.loads(out.stdout)["services"]
    assert {s for s in services if s.startswith("backbone")} == backbones
    assert {"redis", "model-init", "gateway", "encoder-image", "encoder-audio"} <= set(services)
    for name in backbones - {"backbone"}:  # the GPU profiles reserve their devices
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices and devices[0]["capabilities"] == ["gpu"]
    for name, svc in services.items():
        assert "container_name" not in svc, f"{name}: a fixed name would break --scale"
        if name.startswith(("encoder", "backbone")):  # longer than a drain (the backbone's is 30 s)
            assert int(str(svc["stop_grace_period"]).rstrip("s")) > 30, name

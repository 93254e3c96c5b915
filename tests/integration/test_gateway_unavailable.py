"""A gateway whose tiers have no live worker is live but not ready, and answers requests with a 503 at once, in the
OpenAI error shape; it never hangs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from cache.embedded import free_port
from tests.media import b64, wav_bytes


@pytest.fixture(scope="module")
def lone_gateway(tiny_model, redis_server):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tributary.cli", "gateway", "--model", str(tiny_model),
                             "--redis-url", redis_server.url, "--port", str(port),
                             "--prefix", "lone"],  # its own queues: other modules' plans left in trib:gen are old
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{base}/health", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.2)  # importing; the health probe is the readiness signal
    yield base
    proc.send_signal(signal.SIGHUP)  # a closed terminal: a graceful stop, as SIGTERM
    out, _ = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal so supervisors see how it ended.
    assert proc.returncode in (0, -signal.SIGHUP) and "Application shutdown complete" in out, out[-2000:]


def test_live_but_not_ready_naming_the_missing_tiers(lone_gateway):
    health = httpx.get(f"{lone_gateway}/health")
    assert health.status_code == 200  # liveness: the gateway itself is fine
    assert health.json()["status"] == "degraded" and health.json()["workers"]["backbone"] == 0
    ready = httpx.get(f"{lone_gateway}/ready")
    assert ready.status_code == 503
    assert set(ready.json()["missing"]) == {"encoder:image", "encoder:audio", "backbone"}
    # This gateway's own part (a Service's readiness): it serves, answering 503 no_live_worker with a Retry-After,
    # so it stays in the Service, whatever tiers are missing.
    own = httpx.get(f"{lone_gateway}/ready", params={"scope": "gateway"})
    assert own.status_code == 200 and own.json()["scope"] == "gateway" and own.json()["status"] == "degraded"
    bad = httpx.get(f"{lone_gateway}/ready", params={"scope": "pod"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "scope"


def test_ready_while_the_workers_beats_may_have_lapsed_after_redis_came_back(lone_gateway, redis_server):
    """Just after Redis comes back, a tier missing from the live sets proves nothing (its workers' beats failed
    meanwhile; requests are queued, not refused): /ready said 503 for those seconds, and a load balancer would take
    every gateway out at once (an outside tester's chaos run: a 2 s flap after every Redis Cluster node outage).
    It is 200 then, naming how long the window lasts, and 503 again once the window has passed."""
    def redis_up() -> str:
        return next(line.split()[-1] for line in httpx.get(f"{lone_gateway}/metrics").text.splitlines()
                    if line.startswith("tributary_redis_up "))

    assert redis_up() == "1.0"
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 20
        while httpx.get(f"{lone_gateway}/ready").json()["status"] != "redis_unavailable":
            assert time.monotonic() < deadline, "the gateway did not see Redis go"
            time.sleep(0.2)
        assert redis_up() == "0.0"  # an alert's series (the queues' are absent meanwhile)
        assert httpx.get(f"{lone_gateway}/ready", params={"scope": "gateway"}).status_code == 503  # it cannot serve
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    deadline, seen = time.monotonic() + 20, []
    while True:
        ready = httpx.get(f"{lone_gateway}/ready")
        seen.append((ready.status_code, ready.json().get("settling_s")))
        if ready.status_code == 200:
            break
        assert time.monotonic() < deadline, seen
        time.sleep(0.1)
    assert ready.json()["missing"] and 0 < ready.json()["settling_s"] <= 6, ready.json()
    time.sleep(ready.json()["settling_s"] + 0.5)
    ready = httpx.get(f"{lone_gateway}/ready")
    assert ready.status_code == 503 and "settling_s" not in ready.json(), ready.json()


@pytest.mark.parametrize("content,what", [
    ("hello", "backbone"),
    ([{"type": "input_audio", "input_audio": {"data": b64(wav_bytes(0.5)), "format": "wav"}}], "audio encoder"),
])
def test_no_live_worker_is_a_fast_503(lone_gateway, tiny_model, content, what):
    t0 = time.monotonic()
    r = httpx.post(f"{lone_gateway}/v1/chat/completions", timeout=30,
                   json={"model": tiny_model.name, "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "no_live_worker" and what in err["message"]
    assert time.monotonic() - t0 < 5
    counted = [line for line in httpx.get(f"{lone_gateway}/metrics").text.splitlines()
               if line.startswith('tributary_request_errors_total{code="no_live_worker",status="503"}')]
    assert counted and float(counted[0].split()[-1]) >= 1, counted


def test_a_queued_request_whose_tier_has_no_worker_for_the_no_worker_timeout_gets_a_503(tiny_model, redis_server):
    """Admitted while a backbone (and an image encoder) beat, then both gone: the request waited for its whole
    first-token (120 s) or encode (60 s) timeout, while new requests were refused at once (an outside tester's). It
    now gets a 503 no_live_worker once the tier has had no live worker for --no-worker-timeout."""
    from concurrent.futures import ThreadPoolExecutor

    from cache.keys import Keys
    from router.liveness import Heartbeat
    from tests.media import data_url, png_bytes

    prefix = "gone"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tributary.cli", "gateway", "--model", str(tiny_model),
                             "--redis-url", redis_server.url, "--port", str(port), "--prefix", prefix,
                             "--no-worker-timeout", "2", "--first-token-timeout", "90", "--encode-timeout", "90"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    beats = [Heartbeat(redis_server.url, Keys(prefix), tier, f"fake-{tier}").start()
             for tier in ("backbone", "encoder:image", "encoder:audio")]
    image = {"type": "image_url", "image_url": {"url": data_url(png_bytes(9, 9), "image/png")}}

    def post(content):
        t0 = time.monotonic()
        r = httpx.post(f"{base}/v1/chat/completions", timeout=80,
                       json={"model": tiny_model.name, "messages": [{"role": "user", "content": content}]})
        return r, time.monotonic() - t0

    try:
        deadline = time.monotonic() + 120
        while True:  # up, and sees the (fake) workers
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the gateway did not become ready"
            time.sleep(0.2)
        with ThreadPoolExecutor(2) as pool:
            sent = [pool.submit(post, "hello"), pool.submit(post, [{"type": "text", "text": "hi"}, image])]
            time.sleep(1.5)  # both admitted and queued (nothing reads the queues)
            for hb in beats:
                hb.stop()  # deregistered: the tiers have no live worker from now on
            for (r, waited), what in zip((f.result() for f in sent), ("backbone", "image encoder")):
                assert r.status_code == 503 and r.json()["error"]["code"] == "no_live_worker", r.text
                assert what in r.json()["error"]["message"] and 2 < waited < 25, (r.text, waited)
    finally:
        for hb in beats:
            hb.stop()
        proc.terminate()
        proc.wait(timeout=30)

"""A gateway told to stop (SIGTERM) lets its requests in flight run on for its graceful period, then answers those
still running in the OpenAI error shape (503 ``server_shutting_down``, or an error event in a stream that has begun)
and cancels their generations, instead of uvicorn's plain-text 500 or a stream cut without its end. Real processes:
a gateway and a backbone worker, the backbone stopped (SIGSTOP) so that requests cannot finish."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest
import redis

from cache.keys import Keys
from tests.integration.procs import start_gateway, start_tier

GRACEFUL_S = 6.0


def body(model: str, stream: bool, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "tell me a long story"}], "stream": stream,
            "max_tokens": max_tokens, "temperature": 0}


def end(*procs: subprocess.Popen) -> None:
    """Stop what a test left running: SIGTERM, then SIGKILL after 30 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_requests_still_running_when_the_graceful_period_ends_get_an_answer(tiny_model, redis_url):
    backbone = start_tier(["backbone", "--model", str(tiny_model), "--threads", "1"], redis_url, "backbone")
    gateway, base = start_gateway(tiny_model, redis_url, "--graceful-timeout", str(GRACEFUL_S),
                                  output=subprocess.PIPE)
    stopped = False
    try:
        client = httpx.Client(timeout=60)
        results: dict[str, object] = {}

        # A stream that has begun: its first tokens arrive, then its backbone stops.
        began = threading.Event()

        def streamed_midway() -> None:
            lines = results["midway"] = []
            try:
                with client.stream("POST", f"{base}/v1/chat/completions", json=body(tiny_model.name, True, 900)
                                   ) as resp:
                    results["midway_status"] = resp.status_code
                    for line in resp.iter_lines():
                        lines.append(line)
                        if '"content"' in line and not began.is_set():
                            os.kill(backbone.pid, signal.SIGSTOP)
                            began.set()
            finally:
                began.set()

        threading.Thread(target=streamed_midway, daemon=True).start()
        assert began.wait(60) and results.get("midway_status") == 200, results
        stopped = True
        waiting = {}  # requests queued behind the stopped backbone: no first token yet

        def waiting_for_first(name: str, stream: bool) -> None:
            resp = client.post(f"{base}/v1/chat/completions", json=body(tiny_model.name, stream, 8))
            waiting[name] = (resp.status_code, resp.headers.get("retry-after"), resp.text)

        threads = [threading.Thread(target=waiting_for_first, args=(n, s), daemon=True)
                   for n, s in (("plain", False), ("stream", True))]
        for t in threads:
            t.start()
        r = redis.Redis.from_url(redis_url)
        gen = Keys().gen()
        deadline = time.monotonic() + 30
        while r.xlen(gen) < 3 and time.monotonic() < deadline:  # both plans queued
            time.sleep(0.05)
        assert r.xlen(gen) >= 3

        # A client still sending its body (no reply queue yet) when the period ends gets the same answer.
        slow = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=GRACEFUL_S + 20)
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 500\r\n\r\n{")
        t0 = time.monotonic()
        gateway.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(GRACEFUL_S + 20)
        out, _ = gateway.communicate(timeout=GRACEFUL_S + 20)
        took = time.monotonic() - t0
        assert gateway.returncode in (0, -15), out[-3000:]

        reply = slow.recv(65536)
        slow.close()
        assert reply.startswith(b"HTTP/1.1 503") and b"server_shutting_down" in reply, reply[:300]
        for name in ("plain", "stream"):
            status, retry_after, text = waiting[name]
            assert status == 503, (name, text)
            assert json.loads(text)["error"]["code"] == "server_shutting_down" and retry_after == "1"
        assert results["midway_status"] == 200
        data = [line[len("data: "):] for line in results["midway"] if line.startswith("data: ")]
        assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["code"] == "server_shutting_down", data[-3:]
        assert not any('"finish_reason": "' in d for d in data), "the stream ended on its own: nothing tested"
        assert took < GRACEFUL_S + 10, took  # ended at the graceful period, not cut later
        assert "timeout graceful shutdown exceeded" not in out  # nothing was left for uvicorn to cancel
        assert "ending requests still in flight" in out
        # Their generations were cancelled: the stopped backbone drops them when it runs again.
        assert len(r.keys("*:cancel:*")) >= 3
    finally:
        if stopped:
            os.kill(backbone.pid, signal.SIGCONT)
        end(gateway, backbone)


def test_a_realtime_answer_in_progress_ends_before_its_socket_closes(tiny_model, redis_url):
    """uvicorn closed every WebSocket with 1012 as the shutdown began: a Realtime answer was cut mid-text with no
    event saying so (an outside tester's). Now a session with an answer in progress finishes it (response.done),
    then closes with 1012; a response asked for meanwhile is refused (server_shutting_down); an idle session closes
    with 1012 at once."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    backbone = start_tier(["backbone", "--model", str(tiny_model), "--threads", "1"], redis_url, "backbone")
    gateway, base = start_gateway(tiny_model, redis_url, "--graceful-timeout", str(GRACEFUL_S),
                                  output=subprocess.PIPE)
    url = base.replace("http://", "ws://") + f"/v1/realtime?model={tiny_model.name}"

    def next_of(ws, kind: str) -> dict:
        while (event := json.loads(ws.recv(timeout=30)))["type"] != kind:
            pass
        return event

    try:
        with connect(url, open_timeout=30) as idle, connect(url, open_timeout=30) as busy:
            next_of(idle, "session.created")
            next_of(busy, "session.created")
            busy.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "long"}]}}))
            next_of(busy, "conversation.item.done")
            os.kill(backbone.pid, signal.SIGSTOP)  # the answer cannot end before the shutdown has begun
            try:
                busy.send(json.dumps({"type": "response.create",
                                      "response": {"max_output_tokens": 300, "temperature": 0}}))
                next_of(busy, "response.created")
                gateway.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed) as closed:  # idle: closed at once
                    idle.recv(timeout=10)
                assert closed.value.rcvd.code == 1012
                busy.send(json.dumps({"type": "response.create", "event_id": "late"}))
                err = next_of(busy, "error")["error"]
                assert (err["code"], err["event_id"]) == ("server_shutting_down", "late")
            finally:
                os.kill(backbone.pid, signal.SIGCONT)
            done = next_of(busy, "response.done")["response"]
            assert done["status"] in ("completed", "incomplete") and done["output"][0]["content"][0]["text"], done
            with pytest.raises(ConnectionClosed) as closed:
                busy.recv(timeout=10)
            assert closed.value.rcvd.code == 1012
        gateway.communicate(timeout=GRACEFUL_S + 20)
    finally:
        end(gateway, backbone)


def test_requests_are_answered_at_once_when_redis_is_away_during_the_shutdown(tiny_model):
    """`tributary up` killed: its Redis stopped with the gateway, and streams waited out the graceful period (27 s
    of 30) for a Redis that was gone (an outside tester's). Redis away for AWAY_AT_SHUTDOWN_S during the shutdown
    ends the requests in flight then, with the same answer."""
    from cache.embedded import EmbeddedRedis

    graceful = 30.0
    with EmbeddedRedis(maxmemory="64mb") as server:
        backbone = start_tier(["backbone", "--model", str(tiny_model), "--threads", "1"], server.url, "backbone")
        gateway, base = start_gateway(tiny_model, server.url, "--graceful-timeout", str(graceful),
                                      output=subprocess.PIPE)
        try:
            lines, began = [], threading.Event()

            def stream() -> None:
                try:
                    with httpx.Client(timeout=60).stream("POST", f"{base}/v1/chat/completions",
                                                         json=body(tiny_model.name, True, 900)) as resp:
                        for line in resp.iter_lines():
                            lines.append(line)
                            if '"content"' in line and not began.is_set():
                                os.kill(backbone.pid, signal.SIGSTOP)  # the answer cannot end by itself
                                began.set()
                finally:
                    began.set()

            reader = threading.Thread(target=stream, daemon=True)
            reader.start()
            assert began.wait(60)
            gateway.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            server.kill()
            reader.join(graceful + 10)
            took = time.monotonic() - t0
            data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
            assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["code"] == "server_shutting_down", data[-3:]
            assert took < graceful - 10, took  # ~3-5 s, not the graceful period
            out, _ = gateway.communicate(timeout=graceful + 20)
            assert "redis is away while the gateway shuts down" in out
        finally:
            os.kill(backbone.pid, signal.SIGCONT)
            end(gateway, backbone)

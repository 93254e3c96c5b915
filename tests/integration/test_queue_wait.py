"""Admission by queue wait, with real processes: a backbone with one slot, busy with long answers, leaves the next
plan unread in its queue; once that plan has waited past --max-queue-wait, new requests get a 503 server_overloaded
at once (they would queue behind it and time out), while the queued one is still answered."""

from __future__ import annotations

import subprocess
import threading
import time

import httpx

from tests.integration.procs import start_gateway, start_tier

LIMIT_S = 1.0  # --max-queue-wait


def test_requests_are_refused_while_the_queues_head_has_waited_too_long(tiny_model, redis_url):
    backbone = start_tier(["backbone", "--model", str(tiny_model), "--threads", "1", "--max-running", "1"],
                          redis_url, "backbone")
    # 1 s: the third request has that long to be admitted behind the second (at 0.2 s a loaded machine's monitor
    # once saw the head wait past it first), and a 900-token answer (~2.3 s here) still outlasts it
    gateway, base = start_gateway(tiny_model, redis_url, "--max-queue-wait", str(LIMIT_S))
    try:
        def ask(max_tokens: int) -> httpx.Response:
            return httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
                "model": tiny_model.name, "messages": [{"role": "user", "content": "tell me a long story"}],
                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})

        answers: dict[str, httpx.Response] = {}
        threads = []
        # The first holds the only slot; the third follows the second at once, while the second (the queue's head)
        # has waited less than the limit.
        for name, n, pause in (("long", 900, 0.3), ("long2", 900, 0.02), ("queued", 4, 0.3)):
            threads.append(threading.Thread(target=lambda name=name, n=n: answers.setdefault(name, ask(n))))
            threads[-1].start()
            time.sleep(pause)
        refused = None
        deadline = time.monotonic() + 60
        while refused is None and threads[1].is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
            health = httpx.get(f"{base}/health", timeout=5).json()
            if health["queue_wait_s"].get("backbone", 0) > LIMIT_S:
                t0 = time.monotonic()
                refused = ask(4)
                took = time.monotonic() - t0
        assert refused is not None, (f"the long answers ended before the queue's head waited {LIMIT_S} s: nothing "
                                     "tested",
                                     {k: v.json().get("usage") for k, v in answers.items()})
        assert refused.status_code == 503, refused.text
        err = refused.json()["error"]
        assert err["code"] == "server_overloaded" and "backbone queue's oldest request has waited" in err["message"]
        assert refused.headers["retry-after"] and took < 2
        for t in threads:
            t.join(120)
        assert [answers[k].status_code for k in ("long", "long2", "queued")] == [200] * 3  # nothing accepted lost
        assert answers["long2"].json()["usage"]["completion_tokens"] == 900
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/health", timeout=5).json()["queue_wait_s"].get("backbone", 0) > LIMIT_S:
            assert time.monotonic() < deadline, "the monitor never saw the queue empty again"
            time.sleep(0.2)
        assert ask(2).status_code == 200
    finally:
        for proc in (gateway, backbone):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

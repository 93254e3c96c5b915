"""Admission by queue wait, with real processes: a backbone with one slot, busy with long answers, leaves the next
plan unread in its queue; once that plan has waited past --max-queue-wait, new requests get a 503 server_overloaded
at once (they would queue behind it and time out), while the queued one is still answered."""

from __future__ import annotations

import subprocess
import threading
import time

import httpx

from tests.integration.procs import start_gateway, start_tier


def test_requests_are_refused_while_the_queues_head_has_waited_too_long(tiny_model, redis_url):
    backbone = start_tier(["backbone", "--model", str(tiny_model), "--threads", "1", "--max-running", "1"],
                          redis_url, "backbone")
    gateway, base = start_gateway(tiny_model, redis_url, "--max-queue-wait", "0.2")
    try:
        def ask(max_tokens: int) -> httpx.Response:
            return httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
                "model": tiny_model.name, "messages": [{"role": "user", "content": "tell me a long story"}],
                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})

        answers: dict[str, httpx.Response] = {}
        threads = []
        # The first holds the only slot; the third follows the second at once: 0.3 s later, the second (the queue's
        # head) had waited past 0.2 s when a loaded machine's monitor looked, and the third was refused too.
        for name, n, pause in (("long", 900, 0.3), ("long2", 900, 0.02), ("queued", 4, 0.3)):
            threads.append(threading.Thread(target=lambda name=name, n=n: answers.setdefault(name, ask(n))))
            threads[-1].start()
            time.sleep(pause)
        refused = None
        deadline = time.monotonic() + 60
        while refused is None and threads[1].is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
            health = httpx.get(f"{base}/health", timeout=5).json()
            if health["queue_wait_s"].get("backbone", 0) > 0.2:
                t0 = time.monotonic()
                refused = ask(4)
                took = time.monotonic() - t0
        assert refused is not None, ("the long answers ended before the queue's head waited 0.2 s: nothing tested",
                                     {k: v.json().get("usage") for k, v in answers.items()})
        assert refused.status_code == 503, refused.text
        err = refused.json()["error"]
        assert err["code"] == "server_overloaded" and "backbone queue's oldest request has waited" in err["message"]
        assert refused.headers["retry-after"] and took < 2
        for t in threads:
            t.join(120)
        assert [answers[k].status_code for k in ("long", "long2", "queued")] == [200] * 3  # nothing accepted lost
        assert answers["long2"].json()["usage"]["completion_tokens"] == 900
        time.sleep(2.0)  # the monitor sees the queue empty again
        assert ask(2).status_code == 200
    finally:
        for proc in (gateway, backbone):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

"""[gpu-encoders]: an encoder worker answers batch N in Redis on its publishing thread while batch N+1 runs its
forward, and a Redis error there is handled by the loop as if it happened inline: the jobs are re-read and each is
answered once. An in-process worker (the real runtime, preprocessor and publisher) on a real Redis; only the
publisher's call is wrapped, to hold it or fail it once."""

from __future__ import annotations

import threading

import pytest
import redis

from cache.keys import ENCODER_GROUP, Keys
from encoders.loader import load_preprocessor, load_runtime
from encoders.worker import EncoderConfig, EncoderWorker
from router import messages as m
from tests.integration.test_encoder_worker import next_reply, submit
from tests.media import png_bytes

WAIT_S = 30


class Counted:
    """The real runtime, counting its forwards."""

    def __init__(self, runtime):
        self.runtime, self.name, self.forwards = runtime, runtime.name, threading.Semaphore(0)

    def run(self, x, lengths=None):
        out = self.runtime.run(x) if lengths is None else self.runtime.run(x, lengths)
        self.forwards.release()
        return out


@pytest.fixture
def worker(redis_url, tiny_spec):
    runtime = Counted(load_runtime(tiny_spec, "image"))
    cfg = EncoderConfig(redis_url=redis_url, modality="image", max_wait_ms=0, block_ms=50)
    w = EncoderWorker(cfg, load_preprocessor(tiny_spec, "image"), runtime, threading.Event(),
                      tiny_spec.encoder_id("image"))
    w.forwards = runtime.forwards
    yield w
    w.stop.set()
    w.thread.join(WAIT_S)
    assert not w.thread.is_alive()


def start(w: EncoderWorker) -> None:
    w.thread = threading.Thread(target=w.run, daemon=True)
    w.thread.start()


def acquire(sem: threading.Semaphore, what: str) -> None:
    assert sem.acquire(timeout=WAIT_S), f"timed out waiting for {what}"


def test_the_next_batch_is_encoded_while_the_last_is_answered(worker, redis_url, tiny_spec):
    r = redis.Redis.from_url(redis_url)
    execute, entered, release = worker.publisher.execute, threading.Semaphore(0), threading.Event()

    def held(answers):
        entered.release()
        assert release.wait(WAIT_S)
        return execute(answers)

    worker.publisher.execute = held
    start(worker)
    first = submit(r, tiny_spec, png_bytes(40, 30, seed=1), "reply:overlap")
    acquire(worker.forwards, "the first forward")
    acquire(entered, "the first batch's publication")
    second = submit(r, tiny_spec, png_bytes(30, 40, seed=2), "reply:overlap")
    acquire(worker.forwards, "the second forward, while the first batch is being answered")
    assert r.xlen("reply:overlap") == 0  # nothing answered yet: the first batch is still held
    release.set()
    got = {next_reply(r, "reply:overlap").job_id for _ in range(2)}
    assert got == {first.job_id, second.job_id}
    assert r.xpending(Keys().jobs("image"), ENCODER_GROUP)["pending"] == 0


def test_a_redis_error_on_the_publishing_thread_re_reads_and_answers_once(worker, redis_url, tiny_spec):
    r = redis.Redis.from_url(redis_url)
    execute, failed = worker.publisher.execute, []

    def flaky(answers):
        if not failed:
            failed.append(True)
            raise redis.ConnectionError("injected: Redis went away before the batch was answered")
        return execute(answers)

    worker.publisher.execute = flaky
    start(worker)
    job = submit(r, tiny_spec, png_bytes(40, 30, seed=3), "reply:flaky")
    done = next_reply(r, "reply:flaky")
    assert isinstance(done, m.EncodeDone) and done.job_id == job.job_id and failed
    acquire(worker.forwards, "the first forward")
    acquire(worker.forwards, "the forward after the re-read")  # encoded again: the failed answer acked nothing
    assert r.xread({"reply:flaky": "0-0"}, block=300) == []  # answered once
    assert r.xpending(Keys().jobs("image"), ENCODER_GROUP)["pending"] == 0

"""An input that kills its encoder worker process (a decoder's segfault, an OOM kill), on real worker processes and a
real Redis: only that job is dead-lettered; the innocent jobs read in the same batch are answered."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import redis

from cache.keys import ENCODER_GROUP, Keys
from cache.streams import fields_payload, payload_fields
from router import messages as m
from tests.integration.procs import hold_lease
from tests.media import png_bytes

KEYS = Keys(f"crash{uuid.uuid4().hex[:6]}")  # a prefix of its own: no other module's worker takes these jobs
MAX_DELIVERIES = 2
EXIT_WAIT_S = 60  # a worker's start (importing torch) and its first reclaim: a live window and a beat after it

# The real encoder worker (tributary.cli), whose decoder kills the whole process on one input, as the kernel's OOM
# killer would: SIGKILL, nothing answered, nothing handed back.
CRASHING_WORKER = """
import os, signal, sys
from encoders.worker import EncoderWorker
from tributary.cli import main

decode = EncoderWorker._preprocess

def crashing(self, blob, msg):
    if blob.startswith(b"CRASH"):
        os.kill(os.getpid(), signal.SIGKILL)
    return decode(self, blob, msg)

EncoderWorker._preprocess = crashing
sys.exit(main(sys.argv[1:]))
"""


def start_worker(tiny_model, redis_url: str, log) -> subprocess.Popen:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.Popen(
        [sys.executable, "-c", CRASHING_WORKER, "encoder", "--modality", "image", "--model", str(tiny_model),
         "--redis-url", redis_url, "--prefix", KEYS.prefix, "--threads", "1", "--max-deliveries", str(MAX_DELIVERIES),
         "--max-batch", "8", "--max-wait-ms", "50"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
        env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=root))


def job(r, spec, data: bytes, reply_to: str, name: str) -> m.EncodeJob:
    digest = uuid.uuid4().hex
    job = m.EncodeJob(request_id=name, job_id=digest, modality=m.Modality.IMAGE, encoder_id=spec.encoder_id("image"),
                      digest=digest, blob_key=KEYS.blob(digest), reply_to=reply_to, deadline=time.time() + 300)
    r.set(job.blob_key, data, ex=300)
    return job


def test_a_job_that_kills_its_worker_is_dead_lettered_alone(tiny_model, tiny_spec, redis_url, tmp_path):
    """A crashing image read in one batch with three good ones (an auditor's): each worker that reclaimed the dead
    one's jobs ran all four together and died on them too, until all four were dead-lettered (gave_up). Reclaimed
    jobs now run one at a time, alone, each claim raising only the count of the job run: the crashing one is first
    (the worst order) and kills the second worker as well, then reaches ``max_deliveries`` and fails alone; the three
    others are encoded."""
    r = redis.Redis.from_url(redis_url)
    reply = KEYS.reply("gw")
    hold_lease(r, reply)
    jobs = [job(r, tiny_spec, b"CRASH" + b"x" * 64, reply, "crashing")]
    jobs += [job(r, tiny_spec, png_bytes(20, 20, seed=400 + i), reply, f"good-{i}") for i in range(3)]
    pipe = r.pipeline()
    for j in jobs:  # queued before the first worker reads: one batch of four
        pipe.xadd(KEYS.jobs("image"), payload_fields(m.encode(j)))
    pipe.execute()

    log = open(tmp_path / "workers.log", "w")
    procs = []
    try:
        for _ in range(MAX_DELIVERIES):  # the first reads the batch, the next reclaims it: both die on it
            procs.append(start_worker(tiny_model, redis_url, log))
            code = procs[-1].wait(EXIT_WAIT_S)
            assert code == -signal.SIGKILL, f"exit {code}\n{(tmp_path / 'workers.log').read_text()[-3000:]}"
        procs.append(start_worker(tiny_model, redis_url, log))  # the next one answers
        answers, deadline = {}, time.monotonic() + EXIT_WAIT_S
        while len(answers) < len(jobs) and time.monotonic() < deadline and procs[-1].poll() is None:
            for _, fields in r.xrange(reply):
                msg = m.decode(fields_payload(fields), m.ReplyMessage)
                answers[msg.request_id] = msg
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        log.close()
    told = {name: (type(msg).__name__, getattr(msg, "code", None)) for name, msg in answers.items()}
    assert told == {"crashing": ("EncodeFailed", m.ErrorCode.GAVE_UP), "good-0": ("EncodeDone", None),
                    "good-1": ("EncodeDone", None), "good-2": ("EncodeDone", None)}, told
    dead = [m.decode(f[b"m"], m.EncodeJob).request_id for _, f in r.xrange(KEYS.dead_letter())]
    assert dead == ["crashing"], dead
    assert r.xpending(KEYS.jobs("image"), ENCODER_GROUP)["pending"] == 0

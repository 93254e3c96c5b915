"""An encoder worker as a real process on a real Redis: encode, cache, notify, ack; typed failure; clean SIGTERM."""

from __future__ import annotations

import signal
import time
import urllib.request
import uuid

import msgspec
import numpy as np
import pytest
import redis
import torch

from cache.codec import decode_tensor
from cache.embedded import free_port
from cache.keys import ENCODER_GROUP, Keys
from cache.streams import fields_payload, payload_fields
from encoders.loader import load_preprocessor, load_runtime
from router import messages as m
from router.liveness import live_count_args, worker_pid
from tests.integration.procs import hold_lease, start_tier, stop_tier
from tests.media import png_bytes

KEYS = Keys()


@pytest.fixture(scope="module")
def image_worker(tiny_model, redis_server):
    port = free_port()
    proc = start_tier(["encoder", "--modality", "image", "--model", str(tiny_model), "--metrics-port", str(port)],
                      redis_server.url, "encoder:image")
    proc.metrics_port = port
    yield proc
    if proc.poll() is None:
        proc.kill()


def submit(r, spec, data: bytes, reply_to: str, input: m.JobInput = m.JobInput.MEDIA, **extra) -> m.EncodeJob:
    digest = uuid.uuid4().hex
    job = m.EncodeJob(request_id=f"req-{digest[:6]}", job_id=digest, modality=m.Modality.IMAGE,
                      encoder_id=spec.encoder_id("image"), digest=digest, blob_key=KEYS.blob(digest, input.value),
                      reply_to=reply_to, deadline=time.time() + 60, input=input, **extra)
    r.set(job.blob_key, data, ex=60)
    hold_lease(r, reply_to)
    r.xadd(KEYS.jobs("image"), payload_fields(m.encode(job)))
    return job


def next_reply(r, stream: str, timeout_ms: int = 30000):
    reply = r.xread({stream: "0-0"}, count=1, block=timeout_ms)
    assert reply, "no reply from the encoder worker"
    entry_id, fields = reply[0][1][0]
    r.xdel(stream, entry_id)
    return m.decode(fields_payload(fields), m.ReplyMessage)


def test_encodes_caches_notifies_and_acks(image_worker, redis_server, tiny_spec):
    r = redis.Redis.from_url(redis_server.url)
    data = png_bytes(50, 40, seed=11)
    job = submit(r, tiny_spec, data, "reply:test1")
    done = next_reply(r, "reply:test1")
    assert isinstance(done, m.EncodeDone) and done.job_id == job.job_id and done.num_tokens == 16
    cached = decode_tensor(r.hget(done.tensor_key, "data"))
    pre = load_preprocessor(tiny_spec, "image")(data)
    expected = load_runtime(tiny_spec, "image").run(pre.data.unsqueeze(0))[0]
    assert cached.shape == (16, tiny_spec.config["text_config"]["hidden_size"])
    torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-5)
    assert r.ttl(done.tensor_key) > 0
    assert r.exists(job.blob_key) == 0  # the input blob is dropped once encoded
    assert r.xpending(KEYS.jobs("image"), ENCODER_GROUP)["pending"] == 0


def test_bad_media_is_a_typed_failure_and_the_worker_survives(image_worker, redis_server, tiny_spec):
    r = redis.Redis.from_url(redis_server.url)
    job = submit(r, tiny_spec, b"\x89PNG\r\n\x1a\n garbage", "reply:test2")
    failed = next_reply(r, "reply:test2")
    assert isinstance(failed, m.EncodeFailed) and failed.code == m.ErrorCode.BAD_MEDIA
    assert failed.job_id == job.job_id and "image" in failed.error
    submit(r, tiny_spec, png_bytes(seed=12), "reply:test2")
    assert isinstance(next_reply(r, "reply:test2"), m.EncodeDone)
    assert image_worker.poll() is None


def test_an_undecodable_job_is_dropped_to_the_dead_letter_stream_and_the_worker_goes_on(image_worker, redis_server,
                                                                                         tiny_spec):
    r = redis.Redis.from_url(redis_server.url)
    before = r.xlen(KEYS.dead_letter()) if r.exists(KEYS.dead_letter()) else 0
    bad = r.xadd(KEYS.jobs("image"), {"m": b"\x01not msgpack"})
    submit(r, tiny_spec, png_bytes(seed=15), "reply:undecodable")
    assert isinstance(next_reply(r, "reply:undecodable"), m.EncodeDone)
    dead = r.xrange(KEYS.dead_letter())[before:]
    assert [(f[b"entry"], f[b"m"]) for _, f in dead] == [(bad, b"\x01not msgpack")], dead
    assert r.xpending(KEYS.jobs("image"), ENCODER_GROUP)["pending"] == 0


def test_a_job_of_another_wire_version_is_refused_to_its_gateway_naming_the_version(image_worker, redis_server,
                                                                                   tiny_spec):
    """A job from a gateway of another wire version (a rolling upgrade) cannot be read: it was dead-lettered
    unanswered, and its gateway queued it again and again until the request timed out (an auditor's: a 504 after
    15-60 s, nothing naming the version). Its gateway is told at once, on the tensor key it waits on, in the wire
    version it sent; the job is kept in the dead-letter stream and the worker goes on."""
    r = redis.Redis.from_url(redis_server.url)
    before = r.xlen(KEYS.dead_letter()) if r.exists(KEYS.dead_letter()) else 0
    newer = m.WIRE_VERSION + 1
    job = submit(r, tiny_spec, png_bytes(seed=18), "reply:version", v=newer)
    reply = r.xread({"reply:version": "0-0"}, count=1, block=4000)
    assert reply, "the gateway of a job of another wire version was told nothing"
    failed = msgspec.msgpack.decode(fields_payload(reply[0][1][0][1]), type=m.ReplyMessage)  # as that gateway reads
    assert isinstance(failed, m.EncodeFailed) and failed.code == m.ErrorCode.INTERNAL and failed.v == newer
    assert failed.tensor_key == KEYS.tensor(job.encoder_id, job.digest) and failed.job_id == job.job_id
    assert f"wire version {newer} is not supported" in failed.error, failed.error
    dead = r.xrange(KEYS.dead_letter())[before:]
    assert [f[b"m"] for _, f in dead] == [m.encode(job)], dead
    assert not r.exists(job.blob_key) and r.xpending(KEYS.jobs("image"), ENCODER_GROUP)["pending"] == 0
    r.delete("reply:version")
    submit(r, tiny_spec, png_bytes(seed=19), "reply:version")
    assert isinstance(next_reply(r, "reply:version"), m.EncodeDone)


def test_a_job_for_another_precision_is_refused_with_the_fix(image_worker, redis_server, tiny_spec):
    """The worker computes and sends float32; a gateway that believes its encoders run bf16 keys its cache under
    another id: the job fails naming the flags to align, nothing lands under the bf16 id, and the worker goes on."""
    r = redis.Redis.from_url(redis_server.url)
    job = submit(r, tiny_spec.with_encoder_dtypes("bfloat16"), png_bytes(seed=13), "reply:precision")
    failed = next_reply(r, "reply:precision")
    assert isinstance(failed, m.EncodeFailed) and failed.code == m.ErrorCode.INTERNAL
    assert "--encoder-dtype image=float32" in failed.error and job.encoder_id in failed.error, failed.error
    assert r.exists(KEYS.tensor(job.encoder_id, job.digest)) == 0
    submit(r, tiny_spec, png_bytes(seed=14), "reply:precision")
    assert isinstance(next_reply(r, "reply:precision"), m.EncodeDone)
    assert r.xpending(KEYS.jobs("image"), ENCODER_GROUP)["pending"] == 0


def test_a_job_for_another_precision_is_handed_back_while_a_replica_of_it_is_live(image_worker, redis_server,
                                                                                 tiny_spec):
    """Replicas of one modality share its queue: during a rolling precision change each job that reached a replica
    of the other precision failed with a 500 though a matching replica was up (outside testers'). While a live
    worker says it computes the job's encoder, the job is queued again for it; once none does, it fails as before.
    Here the matching replica is a stand-in that never reads: the job goes round until it is gone."""
    r = redis.Redis.from_url(redis_server.url)
    other = tiny_spec.with_encoder_dtypes("bfloat16")
    r.zadd(KEYS.live("encoder:image"), {"bf16-replica": time.time() + 600})
    r.hset(KEYS.encoder_ids("image"), "bf16-replica", other.encoder_id("image"))
    try:
        job = submit(r, other, png_bytes(seed=15), "reply:handback")
        first = r.xrange(KEYS.jobs("image"))[-1][0]
        time.sleep(1.5)
        queued = [(e, m.decode(fields_payload(f), m.EncodeJob)) for e, f in r.xrange(KEYS.jobs("image"))]
        assert [j.job_id for _, j in queued] == [job.job_id] and queued[0][0] != first, queued
        assert r.xlen("reply:handback") == 0  # not failed
    finally:
        r.zrem(KEYS.live("encoder:image"), "bf16-replica")
        r.hdel(KEYS.encoder_ids("image"), "bf16-replica")
    failed = next_reply(r, "reply:handback")  # no replica of it live any more: refused, naming the flags
    assert isinstance(failed, m.EncodeFailed) and failed.code == m.ErrorCode.INTERNAL
    assert "--encoder-dtype" in failed.error
    said = [v for k, v in r.hgetall(KEYS.encoder_ids("image")).items() if worker_pid(k) == image_worker.pid]
    assert said == [tiny_spec.encoder_id("image").encode()]  # the real worker says which it is
    submit(r, tiny_spec, png_bytes(seed=16), "reply:handback")
    assert isinstance(next_reply(r, "reply:handback"), m.EncodeDone)
    assert r.xpending(KEYS.jobs("image"), ENCODER_GROUP)["pending"] == 0


def test_a_job_whose_media_key_holds_another_type_fails_alone_and_the_worker_goes_on(image_worker, redis_server,
                                                                                   tiny_spec):
    """A job whose media key holds another type than bytes (WRONGTYPE: another version's layout, a hand-made entry)
    was taken for a Redis outage: re-read first after every retry, it held the whole tier for good (an outside
    auditor's: the next image waited past 25 s). It fails alone, kept in the dead-letter stream, and the next runs."""
    r = redis.Redis.from_url(redis_server.url)
    before = r.xlen(KEYS.dead_letter()) if r.exists(KEYS.dead_letter()) else 0
    job = submit(r, tiny_spec, png_bytes(seed=16), "reply:wrongtype")
    next_reply(r, "reply:wrongtype")
    odd = m.EncodeJob(**{**{f: getattr(job, f) for f in job.__struct_fields__}, "job_id": "odd",
                         "blob_key": KEYS.blob("odd-type"), "deadline": time.time() + 3600})
    r.hset(odd.blob_key, "not", "bytes")
    entry = r.xadd(KEYS.jobs("image"), payload_fields(m.encode(odd)))
    good = submit(r, tiny_spec, png_bytes(seed=17), "reply:wrongtype")
    replies = {msg.job_id: msg for msg in (next_reply(r, "reply:wrongtype", 15000) for _ in range(2))}
    assert isinstance(replies["odd"], m.EncodeFailed) and replies["odd"].code == m.ErrorCode.INTERNAL
    assert "WRONGTYPE" in replies["odd"].error, replies["odd"].error
    assert isinstance(replies[good.job_id], m.EncodeDone)
    dead = r.xrange(KEYS.dead_letter())[before:]
    assert [f[b"entry"] for _, f in dead] == [entry] and dead[0][1][b"m"], dead
    assert r.xpending(KEYS.jobs("image"), ENCODER_GROUP)["pending"] == 0
    r.delete(odd.blob_key)


def test_expired_blob_is_reported_not_hung(image_worker, redis_server, tiny_spec):
    r = redis.Redis.from_url(redis_server.url)
    job = submit(r, tiny_spec, png_bytes(seed=13), "reply:test3")
    # Racing the worker for the blob is flaky; instead send a job whose blob never existed.
    ghost = m.EncodeJob(**{**{f: getattr(job, f) for f in job.__struct_fields__}, "job_id": "ghost",
                           "blob_key": KEYS.blob("missing")})
    r.xadd(KEYS.jobs("image"), payload_fields(m.encode(ghost)))
    replies = {msg.job_id: msg for msg in (next_reply(r, "reply:test3") for _ in range(2))}
    assert set(replies) == {job.job_id, "ghost"}
    assert isinstance(replies[job.job_id], m.EncodeDone)
    assert isinstance(replies["ghost"], m.EncodeFailed) and replies["ghost"].code == m.ErrorCode.MEDIA_EXPIRED


def test_a_job_dropped_before_encoding_is_logged_with_its_request_id(caplog):
    """A job past its deadline, or whose media expired, failed with no log line: the gateway's 504 could not be
    followed into the encoder by its request id (an outside tester's)."""
    import logging
    from types import SimpleNamespace

    from encoders.worker import EncoderWorker

    def job(deadline: float):
        return SimpleNamespace(msg=SimpleNamespace(request_id="rid-x", job_id="job-x", deadline=deadline))

    with caplog.at_level(logging.WARNING, logger="encoders.worker"):
        assert EncoderWorker._check(None, job(time.time() - 1), b"bytes")[0] == m.ErrorCode.DEADLINE
        assert EncoderWorker._check(None, job(time.time() + 60), None)[0] == m.ErrorCode.MEDIA_EXPIRED
        assert EncoderWorker._check(None, job(time.time() + 60), b"bytes") is None
    assert [rec.request_id for rec in caplog.records] == ["rid-x", "rid-x"]


def test_features_an_encoder_cannot_take_are_an_internal_error_not_bad_media(image_worker, redis_server, tiny_spec):
    """A features job (what a Realtime gateway sends for streamed audio) that does not fit the encoder is the
    gateway's fault, not the client's: an internal error naming the mismatch; the worker goes on."""
    from models.audio import Features

    r = redis.Redis.from_url(redis_server.url)
    job = submit(r, tiny_spec, Features(np.zeros((16, 4), np.float32), np.float32(0), 200, 4).to_bytes(),
                 "reply:features", m.JobInput.FEATURES)
    failed = next_reply(r, "reply:features")
    assert isinstance(failed, m.EncodeFailed) and failed.code == m.ErrorCode.INTERNAL and failed.job_id == job.job_id
    assert "features from the gateway do not fit this image encoder" in failed.error
    submit(r, tiny_spec, png_bytes(seed=15), "reply:features")
    assert isinstance(next_reply(r, "reply:features"), m.EncodeDone)
    assert image_worker.poll() is None


def test_the_metrics_port_counts_jobs_by_outcome_and_forward_batches(image_worker, redis_server, tiny_spec):
    """The worker's --metrics-port (Prometheus text): answered jobs by outcome, one batch-size and one encode-seconds
    observation per forward batch, nothing left in hand once the answers are out."""
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[tuple, float]:
        url = f"http://127.0.0.1:{image_worker.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        return {(s.name, s.labels.get("outcome") or s.labels.get("le")): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.labels.get("modality") == "image"}

    r = redis.Redis.from_url(redis_server.url)
    before = scrape()
    submit(r, tiny_spec, png_bytes(seed=21), "reply:metrics")
    assert isinstance(next_reply(r, "reply:metrics"), m.EncodeDone)
    submit(r, tiny_spec, b"not an image", "reply:metrics")
    assert isinstance(next_reply(r, "reply:metrics"), m.EncodeFailed)
    bad, deadline = ("tributary_encoder_jobs_total", "bad_media"), time.monotonic() + 10
    while True:  # the counters are bumped after the reply is written
        after = scrape()
        if after.get(bad, 0) > before.get(bad, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    def grew(name: str, label: str | None = None) -> float:
        return after[(name, label)] - before[(name, label)]

    assert grew("tributary_encoder_jobs_total", "encoded") == 1
    assert grew("tributary_encoder_jobs_total", "bad_media") == 1
    assert grew("tributary_encoder_batch_size_count") == grew("tributary_encoder_encode_seconds_count") == 1
    assert grew("tributary_encoder_batch_size_bucket", "1.0") == 1  # one image per forward
    assert after[("tributary_encoder_in_flight_jobs", None)] == 0


def test_sighup_exits_cleanly_and_deregisters(image_worker, redis_server):
    """SIGHUP (a closed terminal) stops a worker as SIGTERM does: it finishes, deregisters and exits 0."""
    code, out = stop_tier(image_worker, sig=signal.SIGHUP)
    assert code == 0, out[-2000:]
    assert "encoder stopped" in out
    r = redis.Redis.from_url(redis_server.url)
    assert r.zcount(*live_count_args(KEYS, "encoder:image")) == 0

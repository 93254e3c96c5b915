"""The encoder worker loop: consume EncodeJobs of one modality, encode, cache the tensor, notify, ack.

One consumer in the modality's consumer group; add replicas by starting more processes. On SIGTERM it stops reading,
finishes the jobs in hand, acks them and exits; unacked jobs of a crashed worker are reclaimed by a live one after
``claim_idle_s``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import torch
from redis.exceptions import RedisError

from cache.client import connect
from cache.codec import encode_tensor
from cache.keys import ENCODER_GROUP, Keys
from cache.streams import autoclaim_entries, ensure_group, fields_payload, payload_fields
from encoders.preprocess import MediaError, Prepared
from router import messages as m
from router.liveness import Heartbeat

log = logging.getLogger(__name__)


@dataclass
class EncoderConfig:
    redis_url: str
    modality: str
    prefix: str = "trib"
    device: str = "cpu"
    max_batch: int = 8  # jobs taken per read
    block_ms: int = 1000  # how long one read waits for jobs (bounds how late a stop is noticed)
    tensor_ttl_s: int = 3600  # lifetime of a cached encoder output
    wire_dtype: str = "float32"  # dtype of cached tensors: float32, float16 or bfloat16
    claim_idle_s: float = 60.0  # a job pending this long on a dead consumer is taken over


class EncoderWorker:
    def __init__(self, cfg: EncoderConfig, preprocess, runtime, stop: threading.Event):
        self.cfg, self.preprocess, self.runtime, self.stop = cfg, preprocess, runtime, stop
        self.keys = Keys(cfg.prefix)
        self.stream = self.keys.jobs(cfg.modality)
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.r = connect(cfg.redis_url)
        self._last_claim = 0.0

    def run(self) -> None:
        ensure_group(self.r, self.stream, ENCODER_GROUP)
        heartbeat = Heartbeat(self.cfg.redis_url, self.keys, f"encoder:{self.cfg.modality}", self.consumer).start()
        log.info("encoder ready", extra={"modality": self.cfg.modality, "runtime": self.runtime.name,
                                         "device": self.cfg.device, "consumer": self.consumer})
        try:
            while not self.stop.is_set():
                try:
                    # 1) Take jobs: stale ones of dead consumers first, then new ones (blocking at most block_ms).
                    entries = self._reclaim() or self._read()
                    if entries:
                        # 2) Encode them, write tensors, notify gateways, ack: all before the next read.
                        self.handle(entries)
                except RedisError as exc:  # the client already retried with backoff: Redis is down or was reset
                    if "NOGROUP" in str(exc):  # a restarted Redis without persistence lost the group
                        ensure_group(self.r, self.stream, ENCODER_GROUP)
                        continue
                    log.error("redis unavailable; retrying", extra={"error": str(exc)})
                    self.stop.wait(1.0)
        finally:
            heartbeat.stop()
            log.info("encoder stopped", extra={"consumer": self.consumer})

    def _read(self) -> list:
        reply = self.r.xreadgroup(ENCODER_GROUP, self.consumer, {self.stream: ">"},
                                  count=self.cfg.max_batch, block=self.cfg.block_ms)
        return reply[0][1] if reply else []

    def _reclaim(self) -> list:
        now = time.monotonic()
        if now - self._last_claim < self.cfg.claim_idle_s / 2:
            return []
        self._last_claim = now
        reply = self.r.xautoclaim(self.stream, ENCODER_GROUP, self.consumer,
                                  min_idle_time=int(self.cfg.claim_idle_s * 1000), count=self.cfg.max_batch)
        entries = [e for e in autoclaim_entries(reply) if e[1]]  # deleted entries come back with no fields
        if entries:
            log.warning("reclaimed jobs from a silent consumer", extra={"count": len(entries)})
        return entries

    def handle(self, entries: list) -> None:
        jobs: list[tuple[bytes, m.EncodeJob]] = []
        pipe = self.r.pipeline(transaction=False)
        for entry_id, fields in entries:
            try:
                jobs.append((entry_id, m.decode(fields_payload(fields), m.EncodeJob)))
            except (m.WireError, KeyError) as exc:
                log.error("dropping undecodable job", extra={"entry": entry_id, "error": str(exc)})
                pipe.xack(self.stream, ENCODER_GROUP, entry_id)
        blobs = self.r.mget([job.blob_key for _, job in jobs]) if jobs else []
        for (entry_id, job), blob in zip(jobs, blobs):
            self._encode_one(pipe, job, blob)
            pipe.xack(self.stream, ENCODER_GROUP, entry_id)
        pipe.execute()  # one round trip: tensors, notifications and acks of the whole read

    def _encode_one(self, pipe, job: m.EncodeJob, blob: bytes | None) -> None:
        extra = {"request_id": job.request_id, "job_id": job.job_id, "modality": job.modality.value}
        if time.time() > job.deadline:
            log.warning("job past its deadline, dropped", extra=extra)
            return self._fail(pipe, job, m.ErrorCode.MEDIA_EXPIRED, "the job waited past its deadline")
        if blob is None:
            return self._fail(pipe, job, m.ErrorCode.MEDIA_EXPIRED, "the media bytes expired before encoding")
        t0 = time.perf_counter()
        try:
            prepared: Prepared = self.preprocess(blob)
        except MediaError as exc:
            log.info("bad media", extra={**extra, "error": str(exc)})
            return self._fail(pipe, job, m.ErrorCode.BAD_MEDIA, str(exc))
        t1 = time.perf_counter()
        out = self.runtime.run(prepared.data.unsqueeze(0))[0, : prepared.num_tokens]  # [N, H]
        t2 = time.perf_counter()
        key = self.keys.tensor(job.encoder_id, job.digest)
        pipe.hset(key, mapping={"data": encode_tensor(out, self.cfg.wire_dtype), "n": prepared.num_tokens})
        pipe.expire(key, self.cfg.tensor_ttl_s)
        pipe.delete(job.blob_key)
        done = m.EncodeDone(request_id=job.request_id, job_id=job.job_id, tensor_key=key,
                            num_tokens=prepared.num_tokens)
        pipe.xadd(job.reply_to, payload_fields(m.encode(done)))
        pipe.hincrby(self.keys.stats(f"encoder:{job.modality.value}"), "encoder_calls", 1)
        log.info("encoded", extra={**extra, "tokens": prepared.num_tokens,
                                   "preprocess_ms": round((t1 - t0) * 1e3, 2), "encode_ms": round((t2 - t1) * 1e3, 2)})

    def _fail(self, pipe, job: m.EncodeJob, code: m.ErrorCode, error: str) -> None:
        msg = m.EncodeFailed(request_id=job.request_id, job_id=job.job_id, code=code, error=error)
        pipe.xadd(job.reply_to, payload_fields(m.encode(msg)))


def serve(cfg: EncoderConfig, model_dir: str, threads: int | None = None) -> None:
    from encoders.loader import load_preprocessor, load_runtime
    from models.spec import ModelSpec
    from router.lifecycle import stop_on_signals, tune_allocator

    stop = stop_on_signals()
    tune_allocator()
    if threads:
        torch.set_num_threads(threads)
    spec = ModelSpec.from_dir(model_dir)
    worker = EncoderWorker(cfg, load_preprocessor(spec, cfg.modality), load_runtime(spec, cfg.modality, cfg.device),
                           stop)
    worker.run()

"""The encoder worker loop: take a batch of EncodeJobs of one modality, encode it in one forward pass per input
shape, publish each tensor to the cache (notifying every waiting gateway), ack.

Three batches are in hand at a time: while batch N runs its forward pass on the main thread, batch N+1 (read without
waiting) is decoded and resized on a thread pool (``preprocess_threads``), so the device is not left waiting on
image decoding, and batch N-1 is answered in Redis on the publishing thread (one batch at a time, in order), so the
device is not left waiting on Redis either. On a GPU the loop's thread never waits for the device: each item is put
in pinned memory by its pool thread, the batch is assembled on the device, its forward and the copies of its outputs
to the host are queued, and the publishing thread waits for them (encoders/runtime.py ``launch_isolating``), while
the loop reads and launches the next batch behind it. The outputs come back in one copy per item, straight into the
payload Redis is sent (cache/codec.py: no serialization pass, and cache/client.py: no copy by the client).

One consumer in the modality's consumer group; add replicas by starting more processes. On SIGTERM it stops reading,
finishes the batches in hand, answers and acks them and exits. Jobs a dead worker left unacked are reclaimed by a
live one within about a second of the dead one leaving the live set (cache/streams.py ``reclaim_dead``), and run one
at a time, alone (a job that kills its worker must not take its batch with it); a job handed to ``max_deliveries``
workers goes to the dead-letter stream and fails its request. Answering a job acks it in the same
script (cache/tensors.py), so a job run twice publishes one tensor and one answer. A job whose gateway is dead (its
lease lapsed) and that no other gateway waits on is dropped unencoded. Redis errors (an outage, a restart that lost
the group) never end the loop: it waits and goes on. On a Redis Cluster, a node that does not answer fails only the
jobs whose keys it holds (``media_expired``: their gateways ask again; cache/tensors.py), and the reclaim of dead
workers' jobs runs on a thread of its own, so the live set's node away does not hold the loop.

Faults are per job: media that does not decode, whose decoded values are not finite, whose forward pass fails alone
(a failed batch is re-run one item at a time) or whose output is not finite in the wire dtype is published as that
job's ``EncodeFailed``; the rest of the batch is encoded and the loop goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace

import torch
from redis.exceptions import RedisError

from cache.client import connect, key_error, lost_node
from cache.codec import WIRE_DTYPES, Payload
from cache.keys import ENCODER_GROUP, Keys, alive
from cache.streams import (
    Claimed,
    ack_delete,
    dead_letter,
    ensure_group,
    ensure_group_patiently,
    fields_payload,
    is_nogroup,
    own_pending,
    take_pending,
)
from cache.tensors import Answers, TensorPublisher
from encoders.batching import batch_lengths, read_batch, shape_groups
from encoders.preprocess import MediaError, Prepared
from encoders.runtime import launch_isolating
from models.media import MAX_AUDIO_S
from router import clock
from router import messages as m
from router.liveness import Heartbeat, Reclaimer, ReclaimGate, live_count_args, worker_id
from router.metrics import EncoderMetrics
from router.metrics import serve as serve_metrics
from router.metrics import stop as stop_metrics

log = logging.getLogger(__name__)

PUBLISH_POLL_MS = 5  # an idle read's block while a batch is being answered (the server may round it up to its tick)
REGISTER_EVERY_S = 10.0  # how often a worker says again which encoder it is (Keys.encoder_ids)
REGISTER_TTL_S = 3600  # that hash's TTL, renewed as workers register (a dead worker's field is judged by liveness)
HAND_BACK_PAUSE_S = 0.05  # the loop's wait after handing jobs back, so that jobs only other replicas take never spin
EXIT_JOIN_S = 5.0  # at exit, the pools' threads still running are waited for this long in all, then left behind


@dataclass
class EncoderConfig:
    redis_url: str
    modality: str
    prefix: str = "trib"
    runtime: str = "torch"  # torch | onnx
    device: str = "cpu"  # cpu | cuda | cuda:N
    dtype: str = "auto"  # compute dtype: float32 | bfloat16 | float16; auto: bfloat16 on a GPU (torch), else float32
    max_batch: int = 8  # jobs per forward pass at most
    max_wait_ms: float = 2.0  # once one job is in hand, how long to wait for the batch to fill
    block_ms: int = 1000  # how long an idle read waits (bounds how late a stop is noticed)
    tensor_ttl_s: int = 3600  # lifetime of a cached encoder output
    wire_dtype: str | None = None  # dtype of cached tensors (default: the compute dtype; bf16/fp16 halve the bytes)
    max_deliveries: int = 3  # a job handed to this many workers (the others died) is dead-lettered
    stall_s: float = 60.0  # a loop that has not come round for this long stops heartbeating (router/liveness.py)
    max_audio_seconds: float = MAX_AUDIO_S  # decoding stops past it; a longer clip is bad media
    preprocess_threads: int = 0  # decode + resize threads (0: min(8, cores)); they prepare batch N+1 during N's forward
    # An item still preprocessing this long after its batch was staged fails alone as bad media (a decoder hung on
    # hostile bytes); its thread is left behind. Kept under stall_s, so the loop keeps heartbeating meanwhile.
    preprocess_timeout_s: float = 20.0
    eager: bool = False  # no CUDA graphs of the forward (CPUs and the ONNX runtime always run without)
    metrics_port: int = 0  # serve Prometheus metrics on this port (0: not served; router/metrics.py)
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_wait_ms < 0 or self.block_ms < 1 or self.tensor_ttl_s < 1:
            raise ValueError("max_batch, block_ms and tensor_ttl_s must be >= 1 and max_wait_ms >= 0")
        if not (self.stall_s > 0 and self.max_audio_seconds > 0 and 0 < self.preprocess_timeout_s < self.stall_s):
            raise ValueError("stall_s and max_audio_seconds must be > 0, and preprocess_timeout_s in (0, stall_s)")
        if self.max_deliveries < 1 or self.preprocess_threads < 0:
            raise ValueError("max_deliveries must be >= 1 and preprocess_threads >= 0")
        if self.dtype == "auto":
            gpu = self.device.startswith("cuda") and self.runtime == "torch"
            self.dtype = "bfloat16" if gpu else "float32"
        if self.dtype not in WIRE_DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(WIRE_DTYPES)}, got {self.dtype!r}")
        if self.runtime == "onnx" and self.dtype != "float32":
            raise ValueError("the ONNX runtime runs the float32 export: use --dtype float32 (a bf16/fp16 wire is "
                             "fine) or --runtime torch")
        self.wire_dtype = self.wire_dtype or self.dtype
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {self.wire_dtype!r}")


@dataclass
class Job:
    entry_id: bytes
    msg: m.EncodeJob
    tensor_key: str
    script_keys: tuple[str, str, str, str]  # tensor, waiters, lease, blob
    deliveries: int = 1
    fields: dict = field(default_factory=dict)  # the entry as read (what a dead letter keeps)


@dataclass
class Staged:
    """A batch read and admitted, its items being preprocessed on the pool; its answers and acks go on ``answers``."""

    answers: Answers
    jobs: list[Job]
    prepared: list[Future]  # per job: (Prepared, or (code, error); preprocessing ms)
    t0: float  # when it was staged
    outcomes: Counter  # its answers, by outcome (counted in the metrics once Redis took them)
    inputs: list = field(default_factory=list)  # per job: (blob, message) given to the pool, or None


class BusyClock:
    """The seconds this worker holds a batch (preprocessing, encoding or publishing it), said to the tier's
    ``busy_seconds`` counter with each batch's counters: the autoscaler reads from it how much of the tier's time the
    work takes (router/autoscale.py), which the queue's length alone does not show. The loop's thread holds and lets
    go; the publishing thread takes what has accrued."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None  # holding a batch since (monotonic), or None
        self._unsaid = 0.0

    def holding(self, held: bool) -> None:
        with self._lock:
            now = time.monotonic()
            if self._since is not None:
                self._unsaid += now - self._since
            self._since = now if held else None

    def take(self) -> float:
        with self._lock:
            if self._since is not None:
                now = time.monotonic()
                self._unsaid, self._since = self._unsaid + now - self._since, now
            taken, self._unsaid = self._unsaid, 0.0
            return taken


class EncoderWorker:
    def __init__(self, cfg: EncoderConfig, preprocess, runtime, stop: threading.Event, encoder_id: str):
        self.cfg, self.preprocess, self.runtime, self.stop = cfg, preprocess, runtime, stop
        self.encoder_id = encoder_id  # checkpoint + modality + compute and wire dtype: jobs for another are refused
        self.keys = Keys(cfg.prefix)
        self.tier = f"encoder:{cfg.modality}"
        self.stream = self.keys.jobs(cfg.modality)
        self.consumer = worker_id()
        self.r = connect(cfg.redis_url)
        self.publisher = TensorPublisher(self.r, self.stream, ENCODER_GROUP)
        self.gate = ReclaimGate()
        self.reclaimer = Reclaimer(self.r, self.keys, self.tier, self.stream, ENCODER_GROUP, self.consumer,
                                   cfg.max_batch, self.gate, "jobs", justid=True)
        # Jobs are pending on us that no batch in hand holds: a read failed (its jobs may have been delivered to us
        # unheard, cache/streams.py), or a reclaim claimed them. They are taken up one at a time (:meth:`_reread`).
        self.reread = False
        self.taking = False  # and among them jobs claimed from dead workers: taken up one at a time
        self.metrics = EncoderMetrics(cfg.modality)  # served on --metrics-port (router/metrics.py)
        self._outcomes: Counter = Counter()  # the answers of the batch being staged or finished, by outcome
        self.threads = threads = cfg.preprocess_threads or min(8, os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="preprocess")
        self.stuck = 0  # preprocessing threads left behind on an item past preprocess_timeout_s
        self.exit_code = 0  # non-zero: the worker stopped itself to be restarted (main exits with it)
        self.publishing = ThreadPoolExecutor(1, thread_name_prefix="publish")  # one batch's answers at a time, in order
        self.published: Future | None = None  # the batch being answered there
        self.busy = BusyClock()
        self.wire = WIRE_DTYPES[cfg.wire_dtype]  # outputs are cast to it where they were computed, then checked
        device = getattr(runtime, "device", torch.device("cpu"))
        self.device = device if device.type == "cuda" else None  # batches are assembled there, from pinned items
        self.on_threads = None  # set to follow the tier's thread budget (tributary up's autoscaler re-divides it)
        self.registered = -1e9  # monotonic time this worker last said which encoder it is (_register)
        self.handed_back = False  # the batch being staged handed jobs back (_hand_back)

    def run(self) -> None:
        if not ensure_group_patiently(self.r, self.stream, ENCODER_GROUP, self.stop, self.tier):
            return  # stopped before Redis would take the group
        heartbeat = Heartbeat(self.cfg.redis_url, self.keys, self.tier, self.consumer, self.cfg.stall_s,
                              on_threads=self.on_threads).start()
        log.info("encoder ready", extra={"modality": self.cfg.modality, "runtime": self.runtime.name,
                                         "provider": getattr(self.runtime, "provider", self.cfg.device),
                                         "max_batch": self.cfg.max_batch, "consumer": self.consumer,
                                         "cuda_graphs": graph_buckets(self.runtime)})
        pending: Staged | None = None  # read and being preprocessed; encoded next round
        metrics = serve_metrics(self.metrics.registry, self.cfg.metrics_port, self.cfg.metrics_host,
                                self.tier, live=heartbeat.live) if self.cfg.metrics_port else None
        try:
            while not self.stop.is_set():
                heartbeat.tick()  # the heartbeat goes stale if this loop stops coming round
                self._register()
                try:
                    # 1) Take a batch: jobs a failed read left with us, the jobs of dead consumers, then new ones
                    #    (without waiting while a batch is in hand: it is encoded next, whatever comes).
                    # The batch on the publishing thread, once answered: its Redis error, if any, is handled below
                    # right away (its jobs re-read). Before a re-read it must be answered: every entry pending on
                    # this worker is then one to redo.
                    if self.published is not None and (self.published.done() or (self.reread and pending is None)):
                        self._answered()
                    self.busy.holding(pending is not None or self.published is not None)  # else the read waits idle
                    t0 = time.monotonic()
                    block = self.cfg.block_ms if pending is None else None
                    if block is not None and self.published is not None:  # come round soon to look at it again
                        block = min(block, PUBLISH_POLL_MS)
                    if self.reread and pending is not None:
                        entries = []  # the batch in hand first; then every entry still pending on us is a leftover
                    else:
                        entries = self._reread()
                        if not entries:
                            self._reclaim()
                            if self.reread and block is not None:  # it claimed jobs: take them up soon
                                block = min(block, PUBLISH_POLL_MS)
                            entries = read_batch(self.r, ENCODER_GROUP, self.consumer, self.stream,
                                                 self.cfg.max_batch, self.cfg.max_wait_ms, block)
                    self.gate.observe(time.monotonic() - t0 - ((block or 0) + self.cfg.max_wait_ms) / 1000)
                    # 2) Start preprocessing it on the pool, 3) then encode the batch before it meanwhile, and hand
                    #    its answers (ack, publish tensors, notify gateways) to the publishing thread.
                    staged = self._stage(entries) if entries else None
                    if self.handed_back:
                        self.handed_back = False
                        self.stop.wait(HAND_BACK_PAUSE_S)
                    if pending is not None:
                        self.metrics.in_flight.set(len(pending.jobs) + (len(staged.jobs) if staged else 0))
                        self._finish(pending)
                    pending = staged
                    self.metrics.in_flight.set(len(pending.jobs) if pending else 0)
                except RedisError as exc:  # the client already retried with backoff: Redis is down or was reset
                    self._drain()  # the batch being answered: done, or its jobs are still ours (re-read below)
                    if pending is not None:  # its jobs are still ours in Redis: read again (reread) and redone
                        for future in pending.prepared:
                            future.cancel()
                        pending = None
                        self.metrics.in_flight.set(0)
                    self.gate.broken()
                    self.reread = True
                    if is_nogroup(exc):  # a restarted Redis without persistence lost the group
                        self._ensure_group()
                        continue
                    log.error("redis unavailable; retrying", extra={"error": str(exc)})
                    self.stop.wait(1.0)
            if pending is not None:  # stopping: the batch in hand is finished and acked
                self._finish(pending)
            self._answered()
        except RedisError as exc:
            log.error("could not finish the batch in hand (Redis away); its jobs stay pending and a live worker "
                      "reclaims them", extra={"error": str(exc)})
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.publishing.shutdown(wait=False, cancel_futures=True)
            self.reclaimer.close(wait=False)
            heartbeat.stop()
            with contextlib.suppress(RedisError):
                self.r.hdel(self.keys.encoder_ids(self.cfg.modality), self.consumer)
            stop_metrics(metrics)
            log.info("encoder stopped", extra={"consumer": self.consumer})

    def _ensure_group(self) -> None:
        try:
            ensure_group(self.r, self.stream, ENCODER_GROUP)
        except RedisError as exc:
            log.error("redis unavailable; retrying", extra={"error": str(exc)})
            self.stop.wait(1.0)

    def _reread(self) -> list:
        """The jobs pending on this worker that no batch in hand holds (called only with none). Those of a failed
        round trip alone: a batch at a time, their counts as they were (an outage is no fault of theirs). Once a
        reclaim has claimed jobs from dead workers, one at a time: each is delivered again (its count raised) and
        runs as a batch of its own, nothing else read until it is answered. A job that kills the worker (a decoder's
        segfault, an OOM kill) then takes only itself to ``max_deliveries``: an auditor's crashing image was
        reclaimed with the three innocent jobs of its batch, all of them run together by each next worker, which
        died too, until all four were dead-lettered (gave_up). Not while a reclaim is in flight or its jobs
        untaken: the entries it claims are pending on us too."""
        if not self.reread or self.reclaimer.busy:
            return []
        if not self.taking:
            entries = own_pending(self.r, self.stream, ENCODER_GROUP, self.consumer, self.cfg.max_batch)
            self.reread = bool(entries)  # a batch at a time: look again once it is done, until none is left
            if entries:
                log.warning("taking up jobs delivered during a Redis failure", extra={"count": len(entries)})
            return entries
        entry = take_pending(self.r, self.stream, ENCODER_GROUP, self.consumer)
        self.reread = self.taking = entry is not None  # look again once it is answered, until none is left
        if entry is None:
            return []
        log.info("taking up a job delivered again", extra={"entry": entry.entry_id, "deliveries": entry.deliveries})
        return [entry]

    def _reclaim(self) -> None:
        """Start or take up the claim of the jobs of consumers absent from the live set: claimed without being
        delivered (their delivery counts unchanged, cache/streams.py), they are pending on us, for the re-read."""
        outcome = self.reclaimer.poll()
        if isinstance(outcome, Exception):  # entries it claimed are pending on us now: the re-read takes them up
            self.reread = self.taking = True
            if isinstance(outcome, RedisError) and is_nogroup(outcome):
                self._ensure_group()
        elif outcome:
            self.reread = self.taking = True

    def _answered(self) -> None:
        """Wait for the batch on the publishing thread to be answered; its Redis error is raised here, in the loop
        (whose handler re-reads the jobs still pending on this worker)."""
        future, self.published = self.published, None
        if future is not None:
            t = time.perf_counter()
            future.result()  # bounded: every call has a socket timeout (cache/client.py)
            self.metrics.publish_wait_seconds.observe(time.perf_counter() - t)

    def _drain(self) -> None:
        """After a Redis error: let the batch on the publishing thread end, whatever its outcome, so that every job
        still pending on this worker afterwards is one to redo."""
        try:
            self._answered()
        except RedisError:
            pass  # its unanswered jobs are still pending on this worker: the loop re-reads them

    def _stage(self, entries: list) -> Staged:
        """Entries are (entry id, fields) pairs as read, or :class:`Claimed` ones (reclaimed from a dead worker):
        decode and admit them (one round trip), and start preprocessing each on the pool."""
        answers = Answers()
        self._outcomes = outcomes = Counter()
        jobs, blobs = self._admit(self._decode(entries, answers), answers)
        t0 = time.perf_counter()
        futures, inputs = [], []
        for job, blob in zip(jobs, blobs):
            if error := self._check(job, blob):
                futures.append(_done((error, 0.0)))
                inputs.append(None)
            else:
                futures.append(self.pool.submit(self._timed, blob, job.msg))
                inputs.append((blob, job.msg))
        return Staged(answers, jobs, futures, t0, outcomes, inputs)

    def _timed(self, blob: bytes, msg: m.EncodeJob) -> tuple[Prepared | tuple[m.ErrorCode, str], float]:
        """On a pool thread: the item preprocessed (and, for a GPU, put in pinned memory, so the loop's thread only
        queues its copy to the device), and the milliseconds it took."""
        t0 = time.perf_counter()
        p = self._preprocess(blob, msg)
        if self.device is not None and isinstance(p, Prepared):
            p = replace(p, data=p.data.pin_memory())
        return p, (time.perf_counter() - t0) * 1e3

    def _preprocess(self, blob: bytes, msg: m.EncodeJob) -> Prepared | tuple[m.ErrorCode, str]:
        """One item's input ready for the encoder, or why it is bad media (on a pool thread: touches nothing
        shared). Features a gateway computed (a Realtime stream) skip decoding; features that do not fit this
        encoder are the gateway's fault, not the client's: an internal error."""
        request_id = msg.request_id
        if msg.input == m.JobInput.FEATURES:
            try:
                return self.preprocess.from_features(blob)
            except (AttributeError, ValueError) as exc:
                error = (f"features from the gateway do not fit this {self.cfg.modality} encoder (are the gateway "
                         "and the encoders serving the same checkpoint?)")
                log.error("bad features job", extra={"request_id": request_id, "error": error,
                                                     "detail": f"{type(exc).__name__}: {exc}"})
                return m.ErrorCode.INTERNAL, error
        try:
            p = self.preprocess(blob)
        except MediaError as exc:  # its message is for the client; the decoder's words are only logged
            log.info("bad media", extra={"request_id": request_id, "error": str(exc), "detail": exc.detail})
            return m.ErrorCode.BAD_MEDIA, str(exc)
        except Exception as exc:  # a decoder or resampler choking on hostile bytes: this job only
            log.exception("preprocessing failed", extra={"request_id": request_id})
            error = f"cannot preprocess this {self.cfg.modality} ({type(exc).__name__})"
        else:
            if not p.data.is_floating_point() or bool(torch.isfinite(p.data).all()):
                return p
            error = (f"the decoded {self.cfg.modality} holds non-finite values (NaN or infinity)" + (
                "" if self.cfg.modality == "image" else ", or samples too large for its features (a float clip "
                "should lie within -1..1)"))
        log.info("bad media", extra={"request_id": request_id, "error": error})
        return m.ErrorCode.BAD_MEDIA, error

    def _finish(self, staged: Staged) -> None:
        """Encode a staged batch: one forward pass per input shape, launched without waiting for the device; then,
        once the batch before it is answered, hand it to the publishing thread, which waits for its outputs and
        answers it (:meth:`_answer`)."""
        answers, jobs = staged.answers, staged.jobs
        self._outcomes = staged.outcomes
        t0 = time.perf_counter()
        prepared, pre_ms = [], {}
        for i, (job, (p, pre_ms[i])) in enumerate(zip(jobs, self._collect(staged))):
            if isinstance(p, Prepared):
                prepared.append((i, p))
            else:
                self._fail(answers, job, *p)
        t1 = time.perf_counter()  # t1 - t0: the preprocessing the previous batch's forward did not hide
        # One forward pass per input shape (one per item only for a batch that raised). On a GPU this only queues
        # them: the device runs them while this thread goes on to the next batch.
        by_index = dict(prepared)
        launched = []  # (indices, Outputs, launch time) per forward batch
        for indices, batch in shape_groups(prepared, device=self.device):
            lengths = batch_lengths([by_index[i] for i in indices])  # [B] real lengths, or None
            counts = [by_index[i].num_tokens for i in indices]
            t = time.perf_counter()
            launched.append((indices, launch_isolating(self.runtime, batch, lengths, self.wire, counts), t))
        self._answered()  # the batch before this one (its answers overlapped our forward); raises its Redis error here
        self.published = self.publishing.submit(self._answer, staged, prepared, launched, t1, t1 - t0, pre_ms)

    def _collect(self, staged: Staged) -> list[tuple[Prepared | tuple[m.ErrorCode, str], float]]:
        """Each item's preprocessing result, waited for until ``preprocess_timeout_s`` after the batch was staged.
        An item still running then fails alone, as bad media, and its thread is left behind: new work goes to a
        fresh pool (the old one finishes what it holds). The items that had not started by then (queued behind the
        slow ones: an outside tester's JPEG of 3,000 scans had innocent images beside it refused as undecodable) run
        again on the fresh pool, with a deadline of their own; those not done by then fail too. Once as many threads
        are stuck as the pool has, the worker stops (its jobs handed back) with a non-zero exit, to be restarted
        with its threads. The whole wait stays under the loop's stall limit (its heartbeat)."""
        limit = self.cfg.preprocess_timeout_s
        futures = list(staged.prepared)
        wait(futures, timeout=max(0.0, staged.t0 + limit - time.perf_counter()))
        waiting = [i for i, f in enumerate(futures) if not f.done() and f.cancel()]  # never started
        running = [i for i, f in enumerate(futures) if not f.done() and i not in waiting]
        for i in running:
            self._left_behind(staged.jobs[i], limit)
        if waiting:
            for i in waiting:
                futures[i] = self.pool.submit(self._timed, *staged.inputs[i])
            now = time.perf_counter()
            wait([futures[i] for i in waiting],
                 timeout=max(0.0, min(now + limit, staged.t0 + 0.8 * self.cfg.stall_s) - now))
            for i in waiting:
                if not futures[i].done() and not futures[i].cancel():
                    self._left_behind(staged.jobs[i], limit)
        late = ((m.ErrorCode.BAD_MEDIA, f"this {self.cfg.modality} could not be decoded within {limit:g} s"),
                limit * 1e3)
        return [f.result() if f.done() and not f.cancelled() else late for f in futures]

    def _left_behind(self, job: Job, limit: float) -> None:
        """An item still running past its limit: its thread is left behind, and new work goes to a fresh pool."""
        self.stuck += 1
        log.error("an item's preprocessing did not finish in time; it fails alone and its thread is left behind",
                  extra={"request_id": job.msg.request_id, "timeout_s": limit, "stuck_threads": self.stuck})
        old, self.pool = self.pool, ThreadPoolExecutor(self.threads, thread_name_prefix="preprocess")
        old.shutdown(wait=False)
        if self.stuck >= self.threads and not self.stop.is_set():
            log.error("as many preprocessing threads are stuck as the pool has: stopping, to be restarted",
                      extra={"stuck_threads": self.stuck})
            self.exit_code = 3
            self.stop.set()

    def _answer(self, staged: Staged, prepared: list, launched: list, t1: float, preprocess_wait: float,
                pre_ms: dict) -> None:
        """On the publishing thread: wait for the batch's outputs (each item's payload in pinned memory, or why it
        failed), then ack every entry with the counters bumped and publish every tensor (or failure) in Redis
        (cache/tensors.py: three round trips), so a gateway (or an operator) that sees an answer sees the counters
        that include it; then count and log."""
        answers, jobs, outcomes = staged.answers, staged.jobs, staged.outcomes
        outputs: dict[int, Payload | str] = {}
        forwards = []  # (seconds from launch to outputs on the host, items) per forward batch
        for indices, pending, t in launched:
            outputs.update(zip(indices, pending.result()))
            forwards.append((time.perf_counter() - t, len(indices)))
        encode_s = time.perf_counter() - t1
        encoded = sum(self._publish(answers, jobs[i], outputs[i], p.num_tokens, outcomes) for i, p in prepared)
        outcomes["encoded"] += encoded
        streamed = sum(jobs[i].msg.input == m.JobInput.FEATURES for i, _ in prepared)

        def count(pipe):
            stats = self.keys.stats(self.tier)
            pipe.hincrby(stats, "encoder_calls", encoded)  # items encoded
            if streamed:
                pipe.hincrby(stats, "feature_inputs", streamed)  # of them, from features a gateway streamed
            pipe.hincrby(stats, "forward_passes", len(launched))
            pipe.hincrbyfloat(stats, "encode_seconds", encode_s)
            if busy := self.busy.take():
                pipe.hincrbyfloat(stats, "busy_seconds", round(busy, 6))
            if launched:
                pipe.hset(stats, "last_batch_size", len(prepared))

        answers.with_acks(count)
        t = time.perf_counter()
        self.publisher.execute(answers)
        refused = {i for i, _ in prepared if jobs[i].entry_id in self.publisher.refused}  # Redis full: failed
        lost = {i for i, _ in prepared if jobs[i].entry_id in self.publisher.lost}  # its node away: asked again
        twice = {i for i, _ in prepared if jobs[i].entry_id in self.publisher.elsewhere}  # another run answered
        outcomes["encoded"] -= len(refused) + len(lost) + len(twice)
        outcomes[m.ErrorCode.CACHE_FULL.value] += len(refused)
        outcomes["not_stored"] += len(lost)
        self.metrics.publish_seconds.observe(time.perf_counter() - t)
        self.metrics.finished(outcomes)
        self.metrics.preprocess_wait_seconds.observe(preprocess_wait)
        for seconds, items in forwards:
            self.metrics.encode_seconds.observe(seconds)
            self.metrics.batch_size.observe(items)
        for i, p in prepared:
            if i in refused:
                log.warning("encoded, but the tensor cache (Redis) is full: it refused the output; the request "
                            "failed (cache_full)", extra={"request_id": jobs[i].msg.request_id,
                                                          "job_id": jobs[i].msg.job_id})
                continue
            if i in twice:
                log.info("encoded, but the job was no longer pending and its tensor is stored (another run, or a "
                         "copy of the job, answered it): nothing published", extra={
                    "request_id": jobs[i].msg.request_id, "job_id": jobs[i].msg.job_id})
                continue
            if i in lost:
                log.warning("encoded, but Redis did not store the output (its node did not answer); its gateway "
                            "was told to ask again", extra={"request_id": jobs[i].msg.request_id,
                                                            "job_id": jobs[i].msg.job_id})
                continue
            log.info("encoded", extra={"request_id": jobs[i].msg.request_id, "job_id": jobs[i].msg.job_id,
                                       "modality": self.cfg.modality, "tokens": p.num_tokens, "batch": len(prepared),
                                       "preprocess_ms": round(pre_ms[i], 2),  # on a pool thread
                                       "preprocess_wait_ms": round(preprocess_wait * 1e3, 2),  # the forward waited
                                       "encode_ms": round(encode_s * 1e3, 2)})

    def _decode(self, entries: list, answers: Answers) -> list[Job]:
        jobs = []
        for entry in entries:
            entry_id, fields, deliveries = ((entry.entry_id, entry.fields, entry.deliveries)
                                            if isinstance(entry, Claimed) else (*entry, 1))
            try:
                msg = m.decode(fields_payload(fields), m.EncodeJob)
            except (m.WireError, KeyError) as exc:
                self._undecodable(answers, entry_id, fields, deliveries, exc)
                continue
            key = self.keys.tensor(msg.encoder_id, msg.digest)
            script_keys = (key, self.keys.waiters(msg.encoder_id, msg.digest),
                           self.keys.lease(msg.encoder_id, msg.digest), msg.blob_key)
            job = Job(entry_id, msg, key, script_keys, deliveries, fields)
            if msg.encoder_id != self.encoder_id and self._hand_back(answers, job):
                continue
            if msg.encoder_id != self.encoder_id:  # a gateway configured for another precision (or checkpoint)
                mod = self.cfg.modality
                error = (f"this {mod} encoder is {self.encoder_id} (computes {self.cfg.dtype}, sends "
                         f"{self.cfg.wire_dtype}) but the job asks for {msg.encoder_id}: give the gateway "
                         f"--encoder-dtype {mod}={self.cfg.dtype} --encoder-wire-dtype {mod}={self.cfg.wire_dtype} "
                         "(or one TRIBUTARY_ENCODER_DTYPE to gateways and encoders), and the same checkpoint")
                log.error("job for another encoder", extra={"request_id": msg.request_id, "error": error})
                self._fail(answers, job, m.ErrorCode.INTERNAL, error)
                continue
            if deliveries > self.cfg.max_deliveries:  # every worker that took it died: a poison job, or bad luck
                error = (f"the job was handed to {deliveries - 1} encoder workers that all died before answering "
                         "it; it was moved to the dead-letter stream")
                log.error("dead-lettering a job", extra={"request_id": msg.request_id, "job_id": msg.job_id,
                                                         "deliveries": deliveries})
                dead = Claimed(entry_id, fields, deliveries, "")
                answers.with_acks(lambda pipe, d=dead, e=error: dead_letter(pipe, self.keys.dead_letter(),
                                                                            self.stream, d, e))
                self._fail(answers, job, m.ErrorCode.GAVE_UP, error)
                continue
            jobs.append(job)
        return jobs

    def _register(self) -> None:
        """Say which encoder this worker is (``Keys.encoder_ids``), at start and every ``REGISTER_EVERY_S`` (a
        Redis restarted empty forgets it); a failure waits for the next time."""
        if time.monotonic() - self.registered < REGISTER_EVERY_S:
            return
        self.registered = time.monotonic()
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.hset(self.keys.encoder_ids(self.cfg.modality), self.consumer, self.encoder_id)
            pipe.expire(self.keys.encoder_ids(self.cfg.modality), REGISTER_TTL_S)
            pipe.execute()
        except RedisError as exc:
            log.warning("could not say which encoder this worker is", extra={"error": str(exc)})

    def _hand_back(self, answers: Answers, job: Job) -> bool:
        """A job for another encoder (a gateway, or this worker, on another precision: a rolling change) is queued
        again for the replicas that compute it, while one is live and the job's deadline is not past: replicas of
        one modality share its queue, and each job that reached a replica of the other precision failed with a 500
        though a matching replica was up (outside testers' rolling upgrades). Whether one is live: one round trip,
        on this rare path only. The loop then waits a moment, so that jobs only the others can take do not spin."""
        if clock.now() > job.msg.deadline:
            return False
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.hgetall(self.keys.encoder_ids(self.cfg.modality))
            pipe.zrangebyscore(*live_count_args(self.keys, self.tier))
            ids, live = pipe.execute()
        except RedisError:
            return False
        if not any(ids.get(worker) == job.msg.encoder_id.encode() for worker in live):
            return False
        log.info("job for another encoder handed back to its replicas", extra={
            "request_id": job.msg.request_id, "encoder_id": job.msg.encoder_id})

        def again(pipe, e=job.entry_id, fields=job.fields):
            pipe.xadd(self.stream, fields)
            ack_delete(pipe, self.stream, ENCODER_GROUP, e)

        answers.with_acks(again)
        self.handed_back = True
        return True

    def _undecodable(self, answers: Answers, entry_id: bytes, fields: dict, deliveries: int, exc: Exception) -> None:
        """A job this build cannot read goes to the dead-letter stream (kept for the operator: another version's job,
        a rolling upgrade), and its gateway is told why if the job names it (:meth:`_refusal`): an auditor's job of
        the next wire version was dropped unanswered, and its gateway's lost-job check queued it again and again
        until the request timed out (a 504 after 15-60 s, nothing naming the version). Not a job at all: dropped
        unanswered."""
        log.error("dropping undecodable job", extra={"entry": entry_id, "error": str(exc)})
        dead, why = Claimed(entry_id, fields, deliveries, ""), f"undecodable: {exc}"
        answers.with_acks(lambda pipe: dead_letter(pipe, self.keys.dead_letter(), self.stream, dead, why))
        refusal = self._refusal(fields, exc) if isinstance(exc, m.WireError) else None
        if refusal is None:
            answers.with_acks(lambda pipe: ack_delete(pipe, self.stream, ENCODER_GROUP, entry_id))
            self._outcomes["undecodable"] += 1
            return
        script_keys, reply_to, message = refusal
        answers.fail(script_keys, entry_id, message, reply_to)  # acked, and told, as every failed job is
        self._outcomes[m.ErrorCode.INTERNAL.value] += 1

    def _refusal(self, fields: dict, exc: m.WireError) -> tuple[tuple[str, str, str, str], str, bytes] | None:
        """The failure that tells the gateway of a job this build refuses why: the job's keys, its reply stream and
        an ``EncodeFailed`` (internal) for its tensor key, the one the gateway waits on. The job's fields are read
        loosely (plain msgpack); None unless it names them, as strings. The reply carries the job's wire version,
        the one its gateway reads (an ``EncodeFailed`` every version so far has)."""
        job = m.loose(fields_payload(fields))
        if not (all(isinstance(job.get(k), str) for k in ("request_id", "job_id"))
                and all(isinstance(job.get(k), str) and job[k] for k in ("encoder_id", "digest", "reply_to"))):
            return None
        version = job.get("v")
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < 2**32:
            version = m.WIRE_VERSION
        encoder_id, digest, blob = job["encoder_id"], job["digest"], job.get("blob_key")
        key = self.keys.tensor(encoder_id, digest)
        script_keys = (key, self.keys.waiters(encoder_id, digest), self.keys.lease(encoder_id, digest),
                       blob if isinstance(blob, str) and blob else self.keys.blob(digest))
        error = (f"this {self.cfg.modality} encoder cannot read the job: {exc}; run gateways and encoders that speak "
                 "the same wire version")
        msg = m.EncodeFailed(v=version, request_id=job["request_id"], job_id=job["job_id"], tensor_key=key,
                             code=m.ErrorCode.INTERNAL, error=error)
        return script_keys, job["reply_to"], m.encode(msg)

    def _admit(self, jobs: list[Job], answers: Answers) -> tuple[list[Job], list[bytes | Exception | None]]:
        """The jobs some live gateway still waits on, with their media bytes (one round trip); the others are
        acked away unencoded (their gateway died). On a Redis Cluster a node may not answer while the others do:
        a gateway whose liveness is not known is taken for alive, and media that could not be read are an error
        (the job fails alone, :meth:`_check`)."""
        if not jobs:
            return [], []
        check = self.r.pipeline(transaction=False)
        for job in jobs:
            check.exists(alive(job.msg.reply_to))
            check.scard(job.script_keys[1])
            check.get(job.msg.blob_key)
        res = check.execute(raise_on_error=False)  # one Redis away: raised as a whole (the loop takes over)
        kept, blobs = [], []
        for job, owner_alive, waiters, blob in zip(jobs, res[0::3], res[1::3], res[2::3]):
            if key_error(blob):  # its media key holds another type: this job fails alone, kept for the operator
                error = f"the job's media key cannot be read ({blob})"
                log.error("dead-lettering a job whose media key cannot be read", extra={
                    "request_id": job.msg.request_id, "job_id": job.msg.job_id, "error": error})
                dead = Claimed(job.entry_id, job.fields, job.deliveries, "")
                answers.with_acks(lambda pipe, d=dead, e=error: dead_letter(pipe, self.keys.dead_letter(),
                                                                            self.stream, d, e))
                self._fail(answers, job, m.ErrorCode.INTERNAL, error)
                continue
            if isinstance(blob, Exception) and not lost_node(blob):
                raise blob  # not a node away: a failure of the round trip (as a single Redis raises it)
            if owner_alive or isinstance(owner_alive, Exception) or isinstance(waiters, Exception) or waiters > 1:
                kept.append(job)
                blobs.append(blob)
                continue
            log.info("dropping the job of a dead gateway", extra={"request_id": job.msg.request_id,
                                                                  "job_id": job.msg.job_id})
            self._fail(answers, job, m.ErrorCode.CANCELLED, "the gateway that queued this job is gone")
        return kept, blobs

    def _check(self, job: Job, blob: bytes | Exception | None) -> tuple[m.ErrorCode, str] | None:
        """Why the job cannot run (logged with its request id, as every failure of a job is), or None."""
        ids = {"request_id": job.msg.request_id, "job_id": job.msg.job_id}
        if clock.now() > job.msg.deadline:  # the gateway's deadline, on the clock they share
            log.warning("job dropped: it waited past its deadline", extra={
                **ids, "late_s": round(clock.now() - job.msg.deadline, 3)})
            return m.ErrorCode.DEADLINE, "the job waited past its deadline"
        if blob is None:
            log.warning("job dropped: its media bytes expired before encoding", extra=ids)
            return m.ErrorCode.MEDIA_EXPIRED, "the media bytes expired before encoding"
        if isinstance(blob, Exception):  # its node did not answer: the gateway asks again (and queues it again)
            log.warning("the job's media could not be read (its Redis node did not answer)", extra={
                "request_id": job.msg.request_id, "job_id": job.msg.job_id, "error": str(blob)})
            return m.ErrorCode.MEDIA_EXPIRED, "the media bytes could not be read (their Redis node did not answer)"
        return None

    def _publish(self, answers: Answers, job: Job, output: Payload | str, n: int, outcomes: Counter) -> bool:
        """Queue the tensor's publication (``output``: its payload, [n, H] in the wire dtype, checked finite by
        ``launch_isolating``), or the job's failure (the forward failed alone, or gave values that are not finite in
        the wire dtype). True if published."""
        if not isinstance(output, str):
            data = output.data
            done = m.EncodeDone(request_id=job.msg.request_id, job_id=job.msg.job_id, tensor_key=job.tensor_key,
                                num_tokens=n)
            refused = m.EncodeFailed(request_id=job.msg.request_id, job_id=job.msg.job_id, tensor_key=job.tensor_key,
                                     code=m.ErrorCode.CACHE_FULL,
                                     error=f"the tensor cache (Redis) is full: it refused this {self.cfg.modality}'s "
                                           f"encoder output ({len(data)} bytes); retry later")
            # Not stored for another reason (its Redis node did not answer): the gateway asks again (the tensor,
            # or the lease to queue the job again), which its own bounds settle.
            lost = m.EncodeFailed(request_id=job.msg.request_id, job_id=job.msg.job_id, tensor_key=job.tensor_key,
                                  code=m.ErrorCode.MEDIA_EXPIRED,
                                  error=f"the tensor cache (Redis) did not store this {self.cfg.modality}'s encoder "
                                        "output: its node did not answer")
            ttl = job.msg.ttl_s or self.cfg.tensor_ttl_s  # a gateway without the media cache keeps it shorter
            answers.publish(job.script_keys, job.entry_id, data, n, ttl, m.encode(done), job.msg.reply_to,
                            m.encode(refused), m.encode(lost))
            return True
        log.error("encode failed", extra={"request_id": job.msg.request_id, "job_id": job.msg.job_id,
                                          "error": output})
        self._fail(answers, job, m.ErrorCode.INTERNAL, output, outcomes)
        return False

    def _fail(self, answers: Answers, job: Job, code: m.ErrorCode, error: str, outcomes: Counter | None = None) -> None:
        """Queue the job's failure on ``answers``, counted in ``outcomes`` (default: the batch the loop is staging or
        finishing; the publishing thread passes its own batch's)."""
        msg = m.EncodeFailed(request_id=job.msg.request_id, job_id=job.msg.job_id, tensor_key=job.tensor_key,
                             code=code, error=error)
        (self._outcomes if outcomes is None else outcomes)[code.value] += 1
        answers.fail(job.script_keys, job.entry_id, m.encode(msg), job.msg.reply_to)


def graph_buckets(runtime) -> list[int]:
    """The batch sizes whose forward replays a captured CUDA graph (none: eager)."""
    graphs = getattr(runtime, "graphs", None)
    return sorted(graphs.graphs) if graphs is not None else []


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def serve(cfg: EncoderConfig, model_dir: str, threads: int | None = None) -> None:
    from encoders.loader import load_preprocessor, load_runtime
    from models.spec import ModelSpec
    from router.lifecycle import device_problem, stop_on_signals, tune_allocator

    stop = stop_on_signals()
    tune_allocator()
    if threads:
        torch.set_num_threads(threads)
    # A one-line error (tributary/cli.py), not torch's traceback from deep in the load (ONNX Runtime falls back to its
    # CPU provider).
    if cfg.runtime == "torch" and (problem := device_problem(cfg.device)):
        raise ValueError(problem)
    spec = ModelSpec.from_dir(model_dir).with_encoder_dtypes({cfg.modality: cfg.dtype}, {cfg.modality: cfg.wire_dtype})
    runtime = load_runtime(spec, cfg.modality, cfg.runtime, cfg.device, threads, dtype=WIRE_DTYPES[cfg.dtype])
    log.info("encoder loaded", extra={"modality": cfg.modality, "encoder_id": spec.encoder_id(cfg.modality),
                                      "device": cfg.device, "dtype": cfg.dtype, "wire_dtype": cfg.wire_dtype})
    preprocess = load_preprocessor(spec, cfg.modality, cfg.max_audio_seconds)
    if cfg.runtime == "torch" and cfg.device.startswith("cuda") and not cfg.eager:
        if preprocess.input_shape is None:  # e.g. a shortest-edge resize without a crop: shapes vary
            log.warning("inputs of this encoder have no fixed shape: its forward runs without CUDA graphs")
        else:
            runtime.capture(preprocess.input_shape, cfg.max_batch, lengths=preprocess.keep_length)
    worker = EncoderWorker(cfg, preprocess, runtime, stop, spec.encoder_id(cfg.modality))
    if threads and cfg.runtime == "torch":  # a budgeted process follows its re-divisions (ONNX Runtime's pool is fixed)
        worker.on_threads = torch.set_num_threads
    worker.run()
    # The interpreter's exit joins the pools' threads: one stuck (a decode hung on hostile bytes, found stuck or
    # still running as Redis failed; an answer waiting on a hung device) would hold the exit for good, SIGTERM
    # ignored until SIGKILL. Leave without it.
    if worker.stuck or (left := busy_threads(EXIT_JOIN_S)):
        if not worker.stuck:
            log.warning("threads still running at exit; leaving without them", extra={"threads": left})
        logging.shutdown()
        os._exit(worker.exit_code)


def busy_threads(timeout: float, prefixes: tuple[str, ...] = ("preprocess", "publish")) -> list[str]:
    """The names of this worker's pool threads still running after ``timeout`` in all (idle ones end once their
    pool is shut down)."""
    deadline = time.monotonic() + timeout
    threads = [t for t in threading.enumerate() if t.name.startswith(prefixes)]
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in threads if t.is_alive()]

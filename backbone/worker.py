"""The backbone worker loop: take prompt plans when there is room, prefill, decode, stream token events back.

One Redis round trip per step carries that step's token events (one XADD per request, pipelined), the acks of
finished requests (ack + delete: ``gen`` holds only unread and running plans), the cancellation checks of running
ones, whether their gateways are alive and, when there is room, the read of new plans. A plan stays pending in the
``backbone`` group until its request finishes. On SIGTERM the worker stops taking plans, finishes the running ones
(up to ``drain_timeout_s``), then hands what is left back to its gateways (``worker_lost``: they move each request
to another replica, within their migration limit) and exits.

The round trip runs on an I/O thread while the next step computes, and on a GPU a step's tokens are applied only
when the next step starts (backbone/engine.py, ``defer``), so building and applying the round trips also runs while
the device computes (``--sync-io``: all of it between steps). A CPU computes a step before ``step`` returns, so there
deferring would only hold each token back a step. The first waiting plans' cancellation checks and encoder
tensors are fetched ahead on a thread of their own (decoded, checked for non-finite values and, on a GPU host,
pinned); a plan starts on the first step after they are in, so admitting an image request never makes the running
streams wait on Redis.

Faults are per request: a plan that cannot be decoded, validated, fetched or fused, and a sequence whose forward or
sampling fails (backbone/engine.py), ends with an error event for that request alone; the loop and every other
request go on. Only a broken pipeline (a peer shard gone) ends the process, and its supervisor restarts it.

Recovery (docs/architecture.md, "Recovery"):

- Redis away (paused, partitioned, restarted): the worker holds its running sequences and retries the step's round
  trip (each cut at ``round_trip_timeout_s``, so the loop keeps coming round); token events are sent only once Redis
  took them, so none is lost. Sequences held longer than
  ``outage_hold_s`` are failed (their gateways gave up by then). A group lost in a restart is recreated.
- One Redis Cluster node away (its part of the round trip failed, the rest taken): only the requests whose gateways'
  reply streams it holds wait, generating on, their events kept until it takes them (dropped after
  ``outage_hold_s``); the others stream on.
- A dead replica's plans: once a second (when Redis has been steady for a live window) the worker claims the plans
  pending on consumers absent from the live set and tells each plan's gateway ``worker_lost``; the gateway, which
  knows the tokens it already streamed, queues a continuation plan (gateway/tiers.py). A plan claimed more than
  ``max_deliveries`` times goes to the dead-letter stream and fails.
- Cancellation is per attempt: ``cancel:<request>`` holds the lowest attempt still wanted. A request whose gateway's
  lease lapsed is dropped without an event (nobody reads its reply stream any more).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from prometheus_client import CollectorRegistry
from redis.exceptions import BusyLoadingError, ReadOnlyError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from backbone.engine import Engine, Sequence, load_engine, warn_small_pool
from backbone.fusion import PlanError
from cache.client import connect, key_error, lost_node, refused_for_memory
from cache.codec import CodecError, decode_tensor
from cache.keys import BACKBONE_GROUP, Keys, alive
from cache.keys import cancel as cancel_key
from cache.streams import (
    Claimed,
    ack_delete,
    dead_letter,
    ensure_group,
    ensure_group_patiently,
    fields_payload,
    is_nogroup,
    own_pending,
    send_reply,
)
from router import clock
from router import messages as m
from router.lifecycle import device_problem
from router.liveness import Heartbeat, Reclaimer, ReclaimGate, worker_id
from router.logs import Throttle
from router.metrics import BackboneCollector, pool_usage
from router.metrics import serve as serve_metrics
from router.metrics import stop as stop_metrics

log = logging.getLogger(__name__)

# Fetching ahead (see BackboneWorker._fetch_ahead). A Redis Cluster node that does not answer (paused, partitioned)
# holds each fetch reading a key there for the fetch client's socket timeout and its one retry; the plans behind
# such a fetch must not wait for it (an outside tester's chaos run: admission stalled for 100 s). So fetches run on
# several threads, with a shorter socket timeout than the step's round trips, a fetch still running after
# FETCH_STALLED_S no longer holds the fetches of the plans behind it, and a plan whose fetch Redis failed is fetched
# again after a backoff (FETCH_BACKOFF_S doubling up to FETCH_BACKOFF_MAX_S), not at once, on at most half the
# threads (the plans of a node away must not take every thread from the plans of the nodes that answer).
FETCH_THREADS = 16
FETCH_SOCKET_TIMEOUT_S = 3.0
FETCH_STALLED_S = 0.25
FETCH_BACKOFF_S, FETCH_BACKOFF_MAX_S = 0.25, 4.0

# The default step budget by device: 2048 on a GPU (vLLM's order of magnitude); 256 on a CPU, where a step of 2048
# prompt tokens stalls every running stream for about a second (bench/chunked.py: 256 kept the worst stall at 0.12x
# of an unchunked one; bench/serve.py's isolation run: a burst of prompts at 2048 stalled streams 1.2 s).
STEP_TOKENS = {"cuda": 2048, "cpu": 256}
# The default step-time target by device (backbone/budget.py). On 2 CPU cores (bench/serve.py, one run, image
# workload at concurrency 4 and the isolation burst): no target (256-position chunks) gave 1.72 requests/s and
# stalled running streams to an ITL p99 of 339 ms; 100 ms gave 1.58 requests/s and 119 ms; 50 ms gave 1.15 requests/s
# and 67 ms. 100 ms bounds the stalls for 8% of throughput. None on a GPU: a 2048-position step is tens of ms there.
STEP_MS = {"cuda": None, "cpu": 100.0}
# A running request with no new token for this long gets an event with none: the gateway bounds the gap between a
# request's events (its token timeout, 30 s), and a sequence the scheduler holds (preempted, recomputing, waiting for
# KV blocks) may go longer than that without a token while the worker is well (an outside tester's runs under KV
# pressure: streams cut, and non-streamed answers lost to a 504, after 30 s preempted). Only a turning loop sends
# them, so a hung worker or pipeline shard still falls silent.
HELD_EVENT_S = 5.0
# The stats counters (tokens, cancellations) are written on a thread of their own, not in the step's round trip: a
# Redis Cluster node holding them that does not answer held every running request (an outside tester's chaos run:
# no token for the 40 s a shard was paused). Tokens are counted this often, cancellations at once (one write in
# flight at most); counts a write failed go with the next one.
STATS_EVERY_S = 1.0


@dataclass
class BackboneConfig:
    redis_url: str
    prefix: str = "trib"
    max_running: int = 16  # sequences decoding at once; further plans wait in the stream
    kv_cache_bytes: int | None = None  # this shard's KV pool (default: from gpu_memory_utilization, or CPU memory)
    gpu_memory_utilization: float = 0.9  # on a GPU: the share of its memory weights + KV pool + activations may take
    # New positions one step computes at most (decodes + prefill chunks). None: by device (STEP_TOKENS): a step is the
    # longest a running stream waits for its next token, and a CPU takes about a second for 2048 prompt tokens.
    max_batched_tokens: int | None = None
    # With it, a step that carries decodes takes as many prompt positions as fit this many ms (learned online,
    # backbone/budget.py), within max_batched_tokens: an inter-token latency target. None: by device (STEP_MS);
    # 0: none, the token budget alone.
    max_step_ms: float | None = None
    attention: str = "auto"  # auto (triton on CUDA, torch SDPA elsewhere) | torch | triton | loop
    overlap_io: bool = True  # step N's Redis round trip runs while step N+1 computes (False: one after the other)
    micro_batches: int = 0  # pipeline steps in flight at once (0: one per shard on GPUs, 1 on CPUs)
    eager: bool = False  # no CUDA graphs for decode steps (CPUs always run eagerly)
    shard: int = 0  # this process's place in its pipeline replica
    num_shards: int = 1
    layers: range | None = None  # this shard's layers (default: an even split)
    dist_url: str = ""  # torch.distributed rendezvous of the replica, e.g. tcp://10.0.0.5:29500
    block_ms: int = 1000  # idle read wait (bounds how late a stop is noticed)
    drain_timeout_s: float = 30.0  # on SIGTERM, how long running requests may take to finish
    stall_s: float = 60.0  # a loop that has not come round for this long stops heartbeating (router/liveness.py)
    device: str = "auto"  # cpu | cuda | cuda:N; auto: cuda if a GPU is present, else cpu
    dtype: str = "auto"  # float32 | bfloat16 | float16; auto: bfloat16 on a GPU, float32 on a CPU
    max_deliveries: int = 3  # a plan claimed from this many dead workers is dead-lettered
    outage_hold_s: float = 30.0  # while Redis is away, running sequences are held this long, then failed
    pipeline_timeout_s: float = 120.0  # a shard that hears nothing from its neighbour this long gives up (--num-shards)
    # A step's round trip (overlapped I/O) not answered by then counts as failed, as one Redis timed out would: the
    # loop goes on (it holds its sequences and sends the same events again) and the I/O thread is left to end the
    # call on its own. One call's socket timeout (5 s) does not bound a round trip: redis-py's cluster client
    # retries it and refreshes its slot map, and a Redis Cluster node that did not answer held the loop for 35 s
    # (an outside tester's chaos run: it stopped coming round, so its heartbeat went stale).
    round_trip_timeout_s: float = 10.0
    # Prompts share the KV blocks of their common prefix (same tokens, media and tenant: backbone/kv.py).
    prefix_cache: bool = True
    metrics_port: int = 0  # serve Prometheus metrics on this port (0: not served; router/metrics.py)
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.max_running < 1 or self.max_deliveries < 1 or self.outage_hold_s <= 0:
            raise ValueError("max_running and max_deliveries must be >= 1 and outage_hold_s > 0")
        if (self.max_batched_tokens is not None and self.max_batched_tokens < 1) or \
                not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("max_batched_tokens must be >= 1 and gpu_memory_utilization in (0, 1]")
        if self.max_step_ms is not None and not self.max_step_ms >= 0:
            raise ValueError("max_step_ms must be >= 0 (0: no step-time target)")
        if self.micro_batches < 0:
            raise ValueError("micro_batches must be >= 0 (0: one per shard on GPUs, 1 on CPUs)")
        if self.attention not in ("auto", "torch", "triton", "loop"):
            raise ValueError(f"attention must be auto, torch, triton or loop, got {self.attention!r}")
        resolve_placement(self.device, self.dtype)  # a bad flag is an error here, before any weight is read


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_placement(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``--device`` / ``--dtype`` to a torch device and dtype: auto is CUDA and bf16 where a GPU is present, CPU and
    fp32 otherwise. ValueError naming what is wrong."""
    gpu = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if gpu else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if problem := device_problem(device):
        raise ValueError(problem)
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of float32, bfloat16, float16, got {dtype!r}")
    return dev, DTYPES[dtype]


class Out(NamedTuple):
    """An outbox entry: an event for a gateway (or none) and a plan to ack (or none), sent with the next round trip
    until Redis takes both."""

    reply_to: str
    ev: m.TokenEvent | None
    entry_id: bytes | None
    since: float | None = None  # when a round trip first failed to deliver it (its node away)
    dead: tuple[Claimed, str] | None = None  # a copy for the dead-letter stream, and why (an undecodable plan)


@dataclass
class Running:
    seq: Sequence
    plan: m.PromptPlan
    entry_id: bytes
    code: m.ErrorCode | None = None  # the error code its failure carries (default INTERNAL)
    told: float = field(default_factory=time.monotonic)  # when its last event went into an exchange
    undelivered_since: float | None = None  # its events' node has not taken them since (a Redis Cluster node away)

    def event(self, worker: str, token_ids: list[int], dtype: str = "", **end) -> m.TokenEvent:
        """This attempt's event carrying ``token_ids`` (and ``finish``/``code``/``error`` from ``end``), with usage as
        the client counts it, from ``worker`` computing in ``dtype``."""
        lowered = self.seq.max_tokens < self.plan.sampling.max_tokens  # a default budget the pool could not hold
        return m.TokenEvent(request_id=self.plan.request_id, token_ids=token_ids, prompt_tokens=self.seq.prompt_tokens,
                            completion_tokens=self.seq.completion_tokens, attempt=self.plan.attempt, worker=worker,
                            budget=self.seq.resumed + self.seq.max_tokens if lowered else None,
                            cached_tokens=self.seq.cached, dtype=dtype, **end)


@dataclass
class Exchange:
    """One step's Redis round trip: its pipeline and what it carries (see BackboneWorker._prepare_exchange)."""

    pipe: object
    outbox: int  # outbox entries it sends (the first ones)
    outbox_spans: list = field(default_factory=list)  # (first, end) of each outbox entry's commands
    sent: list = field(default_factory=list)  # (running key, tokens sent, finished) per event
    sent_spans: list = field(default_factory=list)  # (first, end) of each event's commands (with its ack)
    alive: list = field(default_factory=list)  # running keys whose cancel key it reads
    owners: list = field(default_factory=list)  # reply streams whose gateway lease it checks
    checks_at: int = 0
    owners_at: int = 0
    read_at: int | None = None
    admit: bool = False


@dataclass
class Fetch:
    """A waiting plan's fetch ahead (its tensors and checks) on the prefetch pool."""

    future: Future
    since: float  # monotonic time it was submitted

    def stalled(self, now: float) -> bool:
        return not self.future.done() and now - self.since > FETCH_STALLED_S


class StepFailure(Exception):
    def __init__(self, code: m.ErrorCode, error: str, silent: bool = False):
        super().__init__(error)
        self.code, self.error, self.silent = code, error, silent


def _refuses_writes(result) -> bool:
    """A round trip's result that says Redis refuses writes for now (memory, a read-only replica, loading)."""
    return isinstance(result, (ReadOnlyError, BusyLoadingError)) or (isinstance(result, Exception)
                                                                      and refused_for_memory(result))


def run_key(plan: m.PromptPlan) -> str:
    """Two attempts of one request may meet on one replica (the first presumed dead, then back): keep them apart."""
    return f"{plan.request_id}#{plan.attempt}"


class BackboneWorker:
    def __init__(self, cfg: BackboneConfig, engine: Engine, stop: threading.Event):
        self.cfg, self.engine, self.stop = cfg, engine, stop
        self.keys = Keys(cfg.prefix)
        self.stream = self.keys.gen()
        self.consumer = worker_id()
        self.r = connect(cfg.redis_url)
        self.running: dict[str, Running] = {}
        self._round_trip_errors = Throttle()
        self._outages, self._outage_logged = Throttle(), False  # "redis unavailable" lines
        self._fetch_errors = Throttle()
        self._node_errors = Throttle()
        self._stats_errors = Throttle()
        self.waiting: deque[tuple[bytes, m.PromptPlan]] = deque()  # read, not started (slots or KV memory full)
        self.told_waiting: dict[str, float] = {}  # run key -> when its gateway was last told this worker holds it
        self.outbox: list[Out] = []  # events and acks the next round trip sends
        self.stats_key = self.keys.stats("backbone")
        self.gate = ReclaimGate()
        self.outage_since: float | None = None  # monotonic time of the first failed round trip of an outage
        self.cancelled = 0  # cancellations not yet counted in the stats hash
        self.tokens = 0  # tokens sent, not yet counted in the stats hash
        self.stats_io = ThreadPoolExecutor(1, thread_name_prefix="stats")
        self.counting: Future | None = None  # the stats write in flight: returns the counts it failed to write
        self.counted_at = 0.0  # monotonic time of the last stats write
        self.heartbeat: Heartbeat | None = None  # once running
        self.on_threads = None  # set to follow the tier's thread budget (tributary up's autoscaler re-divides it)
        self.peers_ok = None  # a pipeline's shard 0: whether every other shard beats (backbone/pipeline.Peers)
        self.dtype = str(engine.model.dtype).removeprefix("torch.")  # on its events (the answers' fingerprint)
        self.reread = False  # a read failed: plans may have been delivered to us unheard (cache/streams.py)
        # Overlapped I/O: step N's round trip runs on this thread while step N+1 computes (one in flight at most).
        self.io = ThreadPoolExecutor(1, thread_name_prefix="redis-io") if cfg.overlap_io else None
        self.inflight: tuple[Exchange, Future] | None = None
        self.pipe_broken = False  # a pipeline shard failed: no more sends or receives on the pipe
        # The first waiting plans' checks and encoder tensors are fetched ahead (decoded, checked, pinned on a GPU
        # host) on threads of their own: a plan starts once its tensors are in, and the step never waits for them.
        self.prefetch = (ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="media-prefetch")
                         if cfg.overlap_io else None)
        self.fetch_r = connect(cfg.redis_url, socket_timeout=FETCH_SOCKET_TIMEOUT_S) if cfg.overlap_io else self.r
        # Reclaiming dead workers' plans runs on a thread of its own: its calls touch the live set and other
        # workers' entries, which may sit on a Redis Cluster node the step does not need (an outside tester's chaos
        # run: with the live set's node paused, each reclaim held the loop 9-10 s, the backbone idle 35 s of 60).
        self.reclaimer = Reclaimer(self.fetch_r, self.keys, "backbone", self.stream, BACKBONE_GROUP, self.consumer,
                                   64, self.gate, "plans", then=self._orphans)
        self.fetched: dict[str, Fetch] = {}  # run key -> its fetch, for the first waiting plans
        self.backoff: dict[str, tuple[int, float]] = {}  # run key -> (fetches Redis failed, monotonic time of the next)
        # Where the busy loop's time goes (seconds): the engine's steps, waiting for the round trip in flight, and
        # the whole busy iterations (the rest is host work: admissions, building and applying round trips).
        self.loop_seconds = {"step": 0.0, "io_wait": 0.0, "busy": 0.0}
        # Prometheus metrics, read from this state when scraped (router/metrics.py): nothing is done per step.
        self.metrics = CollectorRegistry()
        self.metrics.register(BackboneCollector(
            lambda: pool_usage(engine.pool), self._running_now, self._waiting_now,
            preemptions=lambda: engine.preemptions, steps=lambda: engine.steps, engine=engine,
            loop=self._loop_phases))

    def _preempted(self) -> int:
        """Running sequences whose KV blocks were taken back (they wait to be recomputed). Called on the metrics
        thread: it copies the values (one C call under the GIL) before looking at them."""
        return sum(1 for run in list(self.running.values())
                   if run.seq.preempted and not run.seq.blocks and run.seq.finish is None)

    def _loop_phases(self) -> dict[str, float]:
        """Seconds of the busy loop by phase: step, io_wait, host (the rest)."""
        t = dict(self.loop_seconds)
        return {"step": t["step"], "io_wait": t["io_wait"], "host": max(0.0, t["busy"] - t["step"] - t["io_wait"])}

    def _running_now(self) -> int:
        return len(self.running) - self._preempted()

    def _waiting_now(self) -> int:
        return len(self.waiting) + self._preempted()

    def _settle(self) -> list:
        """Wait for the round trip in flight (if any), at most ``round_trip_timeout_s``, and apply it; returns the
        plans it read."""
        if self.inflight is None:
            return []
        ex, future = self.inflight
        self.inflight = None
        t0 = time.perf_counter()
        try:
            results = future.result(timeout=self.cfg.round_trip_timeout_s)
        except FutureTimeout:
            # Left to its thread, on a pool of its own: what it sends may still land, as with any round trip that
            # timed out (events go again and gateways drop the positions they have; plans it reads are re-read).
            self.io.shutdown(wait=False)
            self.io = ThreadPoolExecutor(1, thread_name_prefix="redis-io")
            results = RedisTimeoutError(f"the step's round trip took over {self.cfg.round_trip_timeout_s:g} s")
        self.loop_seconds["io_wait"] += time.perf_counter() - t0
        return self._apply_exchange(ex, results)

    def run(self) -> None:
        if not ensure_group_patiently(self.r, self.stream, BACKBONE_GROUP, self.stop, "backbone"):
            return  # stopped before Redis would take the group
        heartbeat = self.heartbeat = Heartbeat(self.cfg.redis_url, self.keys, "backbone", self.consumer,
                                               self.cfg.stall_s, on_threads=self.on_threads,
                                               healthy=self.peers_ok).start()
        pool = self.engine.pool
        log.info("backbone ready", extra={"consumer": self.consumer, "max_running": self.cfg.max_running,
                                          "kv_blocks": pool.num_blocks, "block_size": pool.block_size,
                                          "kv_tokens": pool.num_blocks * pool.block_size,
                                          "attention": self.engine.model.attention.name,
                                          "max_batched_tokens": self.engine.max_batched_tokens,
                                          "max_step_ms": self.engine.budget.target_ms,
                                          "micro_batches": self.engine.lanes})
        new: list = []
        drain_deadline = None
        metrics = serve_metrics(self.metrics, self.cfg.metrics_port, self.cfg.metrics_host,
                                "backbone", live=heartbeat.live) if self.cfg.metrics_port else None
        try:
            while True:
                heartbeat.tick()  # the heartbeat goes stale if this loop stops coming round
                if self.stop.is_set() and drain_deadline is None:
                    drain_deadline = time.monotonic() + self.cfg.drain_timeout_s
                    log.info("draining", extra={"running": len(self.running), "waiting": len(self.waiting)})
                # Plans already read are ours to start even while draining: nobody else would take them.
                busy = self.running or self.waiting or new or self.outbox or self.inflight or self.engine.flights
                if drain_deadline is not None and (not busy or time.monotonic() > drain_deadline):
                    new = list(new) + self._settle()
                    for entry_id, fields in new:  # read but not queued yet: handed back with the rest
                        self._enqueue(entry_id, fields)
                    break
                self._reclaim()
                self._count_stats()
                # 1) Idle: block for plans (the only blocking call; with work in hand, reads ride the step's pipe).
                if not busy:
                    new = self._idle_read()
                    if self.engine.pipeline is not None:
                        self.engine.pipeline.keepalive()  # tells the other shards shard 0 is alive
                    continue
                busy_since = time.perf_counter()
                # 2) Queue the plans read last round; start waiting ones while slots and KV memory allow.
                for entry_id, fields in new:
                    self._enqueue(entry_id, fields)
                new = []
                if self.outage_since is None:
                    decoding = [r.seq for r in self.running.values()]
                    starting = self._start_waiting()
                    # 3) One forward: the next token of every decoding sequence, then prompt chunks.
                    t0 = time.perf_counter()
                    self._step(decoding, starting)
                    self.loop_seconds["step"] += time.perf_counter() - t0
                    if starting:
                        ms = round((time.perf_counter() - t0) * 1e3, 2)
                        for seq, _ in starting:
                            # Its first step (the whole prompt unless it exceeds --max-batched-tokens: computed).
                            log.info("prefilled", extra={"request_id": seq.request_id, "ms": ms,
                                                         "prompt_tokens": seq.prompt_len,
                                                         "batch": len(decoding) + len(starting),
                                                         "free_blocks": self.engine.pool.free})
                else:
                    self._idle_pipe()
                    self._hold()  # Redis is away: no step, only the round trip again
                # 4) One round trip: events, acks, cancellation checks, and the next plans if there is room. With
                #    overlapped I/O the previous step's trip ran while this step computed: settle it, send this
                #    one, and go on computing (cancellations land one step later: within two).
                new = self._settle()
                if self.io is not None and self.outage_since is None:
                    if self.running or self.outbox or self.waiting:  # else idle: the next loop blocks for plans
                        ex = self._prepare_exchange(admit=drain_deadline is None)
                        self.inflight = (ex, self.io.submit(self._execute, ex))
                else:
                    new = list(new) + self._exchange(admit=drain_deadline is None)
                self.loop_seconds["busy"] += time.perf_counter() - busy_since
        finally:
            try:
                if not self.pipe_broken:
                    self.engine.settle()  # the pipeline's steps in flight land: their tokens go out with the rest
            except Exception:
                log.exception("the pipeline's steps in flight could not land")
            try:
                new = self._settle()  # plans it read are ours: queued, then handed back below
                for entry_id, fields in new:
                    self._enqueue(entry_id, fields)
            except Exception:
                log.exception("the last round trip in flight failed")
            if self.prefetch is not None:
                self.prefetch.shutdown(wait=True, cancel_futures=True)
            self.reclaimer.close(wait=True)  # its calls are bounded by the fetch client's timeouts
            self._fail_all("a pipeline shard of this backbone replica is gone" if self.pipe_broken else
                           "the backbone worker is shutting down")  # its round trip on the I/O thread (bounded)
            self._count_stats(final=True)
            self.stats_io.shutdown(wait=True)  # the last write: bounded by the fetch client's timeouts
            if self.io is not None:
                self.io.shutdown(wait=True, cancel_futures=True)
            heartbeat.stop()
            stop_metrics(metrics)
            log.info("backbone stopped", extra={"consumer": self.consumer, "steps": self.engine.steps,
                                                "overlapped_steps": self.engine.overlapped})

    def _idle_pipe(self) -> None:
        """No step this time round: the pipeline's steps in flight land (their tokens wait in the events), and the
        other shards hear a no-op (else they would give the replica up after --pipeline-timeout, as broken). A peer
        gone shows here on an idle replica: the pipe is broken, as in :meth:`_step` (it was a traceback, then
        another from the stop sent down the dead pipe: an outside tester's)."""
        try:
            self.engine.settle()
            if self.engine.pipeline is not None:
                self.engine.pipeline.keepalive()
        except RuntimeError:
            if self.engine.pipeline is not None:
                self.pipe_broken = True
            raise

    def _step(self, decoding: list[Sequence], starting: list) -> None:
        """The engine isolates each request's faults itself; what still escapes is a bug in the batch assembly or a
        broken pipeline. The first fails the step's sequences (with their own errors) and the loop goes on; the
        second ends the process (its shards cannot go on without each other)."""
        try:
            self.engine.step(decoding, starting)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            if self.engine.pipeline is not None and isinstance(exc, RuntimeError):
                self.pipe_broken = True  # nothing more goes down the pipe (a hung peer would hold us for its timeout)
                raise  # gloo/NCCL errors are RuntimeErrors: the replica's pipe is broken
            log.exception("step failed outside any one request; failing its sequences")
            for seq in decoding + [s for s, _ in starting]:
                if seq.finish is None:
                    seq.fail(f"internal error in the backbone step ({type(exc).__name__})")

    # -- Redis: reads, reclaim, outages ------------------------------------------------------------------------

    def _redis_failed(self, exc: RedisError, what: str) -> None:
        self.gate.broken()
        if is_nogroup(exc):  # a restarted Redis without persistence lost the group (and every plan in it)
            try:
                ensure_group(self.r, self.stream, BACKBONE_GROUP)
                log.warning("the backbone group was gone (Redis restarted, or its stream deleted or evicted); "
                            "recreated it", extra={"during": what})
                return
            except RedisError as again:  # refused (Redis out of memory): an outage, logged and waited out as one;
                # it spun here, 9,000 warnings in 10 s on two cores (an outside tester's)
                exc, what = again, f"{what}: recreating the lost backbone group"
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            # One line per 10 s: a partial outage (one Cluster node away) alternates failures and successes
            # every step (an outside tester's chaos run logged 375 pairs of lines in 70 s)
            self._outage_logged = self._outages.due()
            if self._outage_logged:
                log.error("redis unavailable; holding running requests", extra={
                    "error": str(exc), "during": what, "running": len(self.running),
                    "outages_since_last_line": self._outages.held})
        self.stop.wait(0.5)

    def _hold(self) -> None:
        """While Redis is away: after ``outage_hold_s`` the running sequences are failed (their gateways gave up)."""
        if time.monotonic() - self.outage_since > self.cfg.outage_hold_s:
            for run in self.running.values():
                if run.seq.finish is None:
                    run.seq.fail(f"the backbone lost Redis for more than {self.cfg.outage_hold_s:g} s")

    def _idle_read(self) -> list:
        try:
            if self._may_reread():
                return self._reread()
            t0 = time.monotonic()
            reply = self.r.xreadgroup(BACKBONE_GROUP, self.consumer, {self.stream: ">"},
                                      count=self.cfg.max_running, block=self.cfg.block_ms)
            self.gate.observe(time.monotonic() - t0 - self.cfg.block_ms / 1000)
        except RedisError as exc:
            self.reread = True
            self._redis_failed(exc, "read")
            return []
        self._recovered()
        return reply[0][1] if reply else []

    def _may_reread(self) -> bool:
        """A re-read is due, and no reclaim is in flight: the entries it claims are pending on us, and are its own to
        tell their gateways about (a re-read would run them too)."""
        return self.reread and not self.reclaimer.busy

    def _reread(self, just_read: list = ()) -> list:
        """After a failed read: the plans delivered to this worker that it does not hold (their reply was lost)."""
        held = ({run.entry_id for run in self.running.values()} | {e for e, _ in [*self.waiting, *just_read]}
                | {o.entry_id for o in self.outbox})
        entries = [(e, f) for e, f in own_pending(self.r, self.stream, BACKBONE_GROUP, self.consumer, 4096)
                   if e not in held]
        self.reread = False
        self._recovered()
        if entries:
            log.warning("taking up plans delivered during a Redis failure", extra={"count": len(entries)})
        return entries

    def _recovered(self) -> None:
        if self.outage_since is not None:
            if self._outage_logged:
                log.warning("redis is back", extra={"outage_s": round(time.monotonic() - self.outage_since, 2),
                                                    "running": len(self.running)})
            self.outage_since = None

    def _reclaim(self) -> None:
        """Plans pending on dead consumers: tell each plan's gateway its worker was lost (it migrates the request,
        knowing what was already streamed), or dead-letter a plan past ``max_deliveries``; on the reclaim thread
        (``_orphans``). Not while the step's Redis is away."""
        failure = self.reclaimer.poll(may_start=self.outage_since is None)
        if isinstance(failure, Exception):
            # Claimed entries whose notice did not go out are pending on us now: the re-read runs them from the
            # start (same plan, same seed: the same tokens, joined by position at the gateway).
            self.reread = True
            if isinstance(failure, RedisError) and is_nogroup(failure):
                self._redis_failed(failure, "reclaim")  # recreates the group

    def _orphans(self, claimed: list[Claimed]) -> None:
        """On the reclaim thread, with the fetches' client (a shorter socket timeout)."""
        pipe = self.fetch_r.pipeline(transaction=False)
        for entry in claimed:
            self._orphaned(pipe, entry)
        pipe.execute()

    def _count_stats(self, final: bool = False) -> None:
        """Write the tokens sent and the cancellations since the last write to the stats hash, on the stats thread
        (see ``STATS_EVERY_S``; a last time when stopping); the counts of a write that failed go again."""
        if self.counting is not None:
            if not self.counting.done() and not final:
                return
            tokens, cancelled = self.counting.result()  # when stopping, waits for it (bounded by its timeouts)
            self.counting, self.tokens, self.cancelled = None, self.tokens + tokens, self.cancelled + cancelled
        now = time.monotonic()
        # Cancellations at once (rare; a client that cancels, then reads the counter, sees it as it did when it was
        # written with the step's events), tokens once per STATS_EVERY_S.
        if not (self.cancelled or (self.tokens and (final or now - self.counted_at >= STATS_EVERY_S))):
            return
        self.counting = self.stats_io.submit(self._write_stats, self.tokens, self.cancelled)
        self.tokens, self.cancelled, self.counted_at = 0, 0, now

    def _write_stats(self, tokens: int, cancelled: int) -> tuple[int, int]:
        """On the stats thread, with the fetches' client (a shorter socket timeout): what it could not count."""
        try:
            pipe = self.fetch_r.pipeline(transaction=False)
            pipe.hincrby(self.stats_key, "tokens", tokens)
            pipe.hincrby(self.stats_key, "cancelled", cancelled)
            pipe.execute()
        except (RedisError, RedisClusterException) as exc:
            if self._stats_errors.due():  # on the stats thread alone: its own throttle
                log.warning("the stats counters were not written; their counts go with the next write", extra={
                    "error": f"{type(exc).__name__}: {exc}", "repeated": self._stats_errors.held})
            return tokens, cancelled
        return 0, 0

    def _orphaned(self, pipe, entry: Claimed) -> None:
        try:
            plan = m.decode(fields_payload(entry.fields), m.PromptPlan)
        except (m.WireError, KeyError) as exc:
            log.error("dropping undecodable plan", extra={"entry": entry.entry_id, "error": str(exc)})
            dead_letter(pipe, self.keys.dead_letter(), self.stream, entry, f"undecodable: {exc}")
            ack_delete(pipe, self.stream, BACKBONE_GROUP, entry.entry_id)
            return
        if entry.deliveries > self.cfg.max_deliveries:
            code, error = m.ErrorCode.GAVE_UP, (
                f"the request was taken by {entry.deliveries - 1} backbone workers that all died; it was moved to "
                "the dead-letter stream")
            dead_letter(pipe, self.keys.dead_letter(), self.stream, entry, error)
        else:
            code, error = m.ErrorCode.WORKER_LOST, f"backbone worker {entry.consumer} died"
        log.warning("plan of a dead worker", extra={"request_id": plan.request_id, "attempt": plan.attempt,
                                                    "from": entry.consumer, "code": code.value})
        ev = self._error_event(plan, code, error, worker=entry.consumer)
        send_reply(pipe, plan.reply_to, m.encode(ev))
        ack_delete(pipe, self.stream, BACKBONE_GROUP, entry.entry_id)

    # -- Plans --------------------------------------------------------------------------------------------------

    def _enqueue(self, entry_id: bytes, fields: dict) -> None:
        try:
            plan = m.decode(fields_payload(fields), m.PromptPlan)
        except (m.WireError, KeyError) as exc:  # nobody to tell: without a plan there is no reply stream
            log.error("dropping undecodable plan", extra={"entry": entry_id, "error": str(exc)})
            # kept in the dead-letter stream for the operator (a gateway of another version, a hand-made entry)
            self.outbox.append(Out("", None, entry_id, dead=(Claimed(entry_id, fields, 1, ""), f"undecodable: {exc}")))
            return
        key = run_key(plan)
        if key in self.running or any(run_key(p) == key for _, p in self.waiting):
            # The same attempt queued twice (a client retry of an XADD whose reply was lost): run it once.
            log.warning("dropping a duplicate plan", extra={"request_id": plan.request_id, "attempt": plan.attempt})
            self.outbox.append(Out("", None, entry_id))
            return
        self.waiting.append((entry_id, plan))
        self._tell_waiting(plan, time.monotonic())

    def _tell_waiting(self, plan: m.PromptPlan, now: float) -> None:
        """Tell the plan's gateway that this worker holds it, not started (an event with no token), as it is read
        and every HELD_EVENT_S after: its gateway then knows whom to watch, and moves it to another replica as soon
        as this worker leaves the live set. Untold, a plan read by a worker that died waited for a replacement to
        reclaim it, its first token 13-14 s after the kill against 7 s for the requests that had begun (an outside
        tester's). Its deadline is then this worker's to keep (``_start_waiting``): its gateway waits on the token
        timeout, which these events renew, not on the first-token timeout."""
        self.told_waiting[run_key(plan)] = now
        self.outbox.append(Out(plan.reply_to, m.TokenEvent(
            request_id=plan.request_id, token_ids=[], prompt_tokens=len(plan.token_ids) - plan.resumed,
            completion_tokens=plan.resumed, attempt=plan.attempt, worker=self.consumer), None))

    def _fetch_ahead(self) -> None:
        """Start the fetches of the first waiting plans: as many as could start now (at least one), not counting
        plans whose fetch is stalled or backing off, and never more running at once than the pool has threads (a
        fetch queued behind stalled ones would stall too), half of them at most fetching again what Redis failed."""
        if self.prefetch is None:
            return
        now = time.monotonic()
        ahead = max(1, self.cfg.max_running - len(self.running))
        running = [key for key, f in self.fetched.items() if not f.future.done()]
        busy, retrying = len(running), sum(1 for key in running if key in self.backoff)
        for _, plan in self.waiting:
            if ahead <= 0 or busy >= FETCH_THREADS:
                break
            key = run_key(plan)
            fetch = self.fetched.get(key)
            if fetch is None:
                waiting_out, failures = self._backing_off(key, now)
                if waiting_out or (failures and retrying >= FETCH_THREADS // 2):
                    continue  # Redis failed its last fetch: again after its backoff, on a thread left for retries
                self.fetched[key] = Fetch(self.prefetch.submit(self._fetch_guarded, plan), now)
                busy += 1
                retrying += bool(failures)
                ahead -= 1
            elif not fetch.stalled(now):
                ahead -= 1

    def _backing_off(self, key: str, now: float) -> tuple[bool, int]:
        """(whether the plan waits out the backoff of a fetch Redis failed, how many of its fetches Redis failed)."""
        failures, not_before = self.backoff.get(key, (0, 0.0))
        return not_before > now, failures

    def _fetch_guarded(self, plan: m.PromptPlan) -> list[tuple[str, torch.Tensor]]:
        """:meth:`_fetch_media` on the prefetch thread: what escapes it but Redis and the plan's own faults fails
        this plan alone."""
        try:
            return self._fetch_media(plan)
        except (RedisError, RedisClusterException, StepFailure):  # Redis (a Cluster's own errors too): again later
            raise
        except Exception as exc:
            log.exception("fetching a plan's tensors failed", extra={"request_id": plan.request_id})
            raise StepFailure(m.ErrorCode.INTERNAL, f"the backbone could not read this request's tensors "
                                                    f"({type(exc).__name__})") from exc

    def _media_for(self, plan: m.PromptPlan) -> list[tuple[str, torch.Tensor]] | None:
        """The plan's fetched tensors; None while its fetch is running (the plans behind it are tried: it starts on a
        later step). Raises what the fetch raised; a Redis failure sets the plan's backoff."""
        key = run_key(plan)
        if self.prefetch is None:  # fetching ahead is off (--sync-io)
            future = Future()
            try:
                future.set_result(self._fetch_guarded(plan))
            except Exception as exc:  # noqa: BLE001 -- handed on below, as the pool's future would
                future.set_exception(exc)
        else:
            if key not in self.fetched:  # not fetched ahead (moved up after a refusal, or its backoff just ended)
                self.fetched[key] = Fetch(self.prefetch.submit(self._fetch_guarded, plan), time.monotonic())
            future = self.fetched[key].future
            if not future.done():
                return None
            del self.fetched[key]
        try:
            media = future.result()
        except (RedisError, RedisClusterException):
            failures = self.backoff.get(key, (0, 0.0))[0] + 1
            self.backoff[key] = failures, time.monotonic() + min(FETCH_BACKOFF_S * 2 ** (failures - 1),
                                                                 FETCH_BACKOFF_MAX_S)
            raise
        self.backoff.pop(key, None)
        return media

    def _forget(self, plan: m.PromptPlan) -> None:
        """The plan left the line (started, refused): its fetch ahead and backoff are not needed any more."""
        key = run_key(plan)
        self.fetched.pop(key, None)
        self.backoff.pop(key, None)

    def _start_waiting(self) -> list[tuple[Sequence, torch.Tensor]]:
        """Start queued plans in arrival order while a slot is free and the KV pool holds their prompt, once their
        tensors are fetched. A plan that cannot start gets an error event (in the outbox) and the next one is
        tried. A plan whose tensors are on their way stops the line (arrival order); one whose fetch has stalled
        (``FETCH_STALLED_S``) or that Redis failed (it is fetched again after a backoff) keeps its place and the
        plans behind it are tried: one Redis Cluster node away or hanging holds only the plans with keys there,
        never those whose keys live elsewhere (an outside tester's chaos runs: text-only requests timed out behind
        them). A plan waiting for free KV blocks stops the line too."""
        starting: list[tuple[Sequence, torch.Tensor]] = []
        failed: list[Exception] = []  # Redis failures of this step's fetches
        skipped = 0  # plans left in line (their fetch stalled, backing off, or failed)
        held = False  # the line stopped at a plan whose fetch is on its way
        # Plans past their deadline leave the line wherever they are in it, slots free or not: their gateways wait
        # as long as this worker tells them it holds them (``_tell_waiting``).
        now = clock.now()  # the gateway's deadline, on the clock they share
        if any(now > plan.deadline for _, plan in self.waiting):
            late = [(e, p) for e, p in self.waiting if now > p.deadline]
            self.waiting = deque((e, p) for e, p in self.waiting if now <= p.deadline)
            for entry_id, plan in late:
                self._refuse(plan, entry_id, m.ErrorCode.DEADLINE,
                             "the request waited past its deadline for a backbone")
        self._fetch_ahead()
        i = 0
        while i < len(self.waiting) and len(self.running) < self.cfg.max_running:
            entry_id, plan = self.waiting[i]
            try:
                seq = self.engine.new_sequence(plan.request_id, len(plan.token_ids), plan.sampling, plan.resumed)
            except PlanError as exc:
                del self.waiting[i]
                self._refuse(plan, entry_id, m.ErrorCode.BAD_PLAN, str(exc))
                continue
            if not self.engine.fits_pool(seq):
                del self.waiting[i]
                error, limit = self.engine.pool_refusal(seq)
                self._refuse(plan, entry_id, m.ErrorCode.BAD_PLAN, error, limit=limit)
                continue
            if not self.engine.admissible(seq):
                break  # its prompt waits for free KV blocks (running sequences finish and free theirs)
            if self.prefetch is not None and run_key(plan) not in self.fetched:
                waiting_out, failures = self._backing_off(run_key(plan), time.monotonic())
                if waiting_out or (failures and skipped):
                    i += 1  # Redis failed its last fetch: again after its backoff (see _fetch_ahead)
                    skipped += 1
                    continue
                if skipped:
                    break  # past the plans fetched ahead (the first in line is fetched now, whatever the window)
            try:
                media = self._media_for(plan)
            except (RedisError, RedisClusterException) as exc:
                failed.append(exc)
                media = None
                if self._fetch_errors.due():
                    log.error("could not fetch a queued request's tensors; trying again", extra={
                        "request_id": plan.request_id, "error": f"{type(exc).__name__}: {exc}",
                        "repeated": self._fetch_errors.held})
            except StepFailure as exc:
                del self.waiting[i]
                self._refuse(plan, entry_id, exc.code, exc.error, exc.silent)
                continue
            if media is None:
                fetch = self.fetched.get(run_key(plan))
                if fetch is not None and not fetch.stalled(time.monotonic()):
                    held = True  # on its way (milliseconds, as a rule): the line keeps its order
                    break
                i += 1
                skipped += 1
                continue
            del self.waiting[i]
            self._forget(plan)
            try:
                starting.append((seq, self.engine.start(seq, plan.token_ids, media,
                                                        [r.tensor_key for r in plan.media], plan.cache_salt)))
            except PlanError as exc:
                self.engine.release(seq)
                self._refuse(plan, entry_id, m.ErrorCode.BAD_PLAN, str(exc))
                continue
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:  # a bug, or memory: this plan only
                log.exception("could not start a request", extra={"request_id": plan.request_id})
                self.engine.release(seq)
                self._refuse(plan, entry_id, m.ErrorCode.INTERNAL,
                             f"the backbone could not start this request ({type(exc).__name__})")
                continue
            self.running[run_key(plan)] = Running(seq, plan, entry_id)
        if not starting and not self.running and (skipped or held):
            if failed and len(failed) == skipped:  # every plan in line failed: Redis is away (pauses 0.5 s)
                self._redis_failed(failed[-1], "fetch")
            else:  # nothing to stall: wait a little (bounded) for a fetch, else the next loop
                wait([f.future for f in self.fetched.values() if not f.future.done()] or [Future()], timeout=0.5,
                     return_when=FIRST_COMPLETED)
        return starting

    def _fetch_media(self, plan: m.PromptPlan) -> list[tuple[str, torch.Tensor]]:
        """The plan's encoder outputs, in one round trip that also checks the request was not cancelled while queued
        and that its gateway is alive."""
        pipe = self.fetch_r.pipeline(transaction=False)
        pipe.get(cancel_key(plan.reply_to, plan.request_id))
        pipe.exists(alive(plan.reply_to))
        for ref in plan.media:
            pipe.hget(ref.tensor_key, "data")
        cancel, owner_alive, *blobs = pipe.execute(raise_on_error=False)  # a cache entry's error is its own
        for result in (cancel, owner_alive):
            if key_error(result):  # the plan named a key of another type: it fails alone (kept, it held the line)
                raise StepFailure(m.ErrorCode.INTERNAL, f"the request's reply keys cannot be read ({result})")
            if isinstance(result, Exception):
                raise result
        if not owner_alive:
            raise StepFailure(m.ErrorCode.CANCELLED, "the gateway of this request is gone", silent=True)
        if _cancelled(cancel, plan.attempt):
            raise StepFailure(m.ErrorCode.CANCELLED, "the request was cancelled while queued")
        out = []
        for ref, data in zip(plan.media, blobs):
            if data is None:  # expired; or a hash left without its tensor, dropped so that it is encoded again
                self._drop_cached(ref)
                raise StepFailure(m.ErrorCode.MEDIA_EXPIRED, f"cached {ref.modality.value} tensor expired")
            try:
                tensor = self._cached_tensor(ref, data)
            except CodecError as exc:
                # A damaged entry (not a tensor, not this prompt's shape, or not a hash at all) is dropped and the
                # request's media encoded again, as for an expired one: kept, every request sending that media
                # failed (a 500, a 400 blaming the client, a 503 "Redis unavailable") while lookups refreshed it.
                log.warning("a cached tensor was unreadable; dropped", extra={
                    "request_id": plan.request_id, "key": ref.tensor_key, "error": str(exc)})
                self._drop_cached(ref)
                raise StepFailure(m.ErrorCode.MEDIA_EXPIRED, f"cached {ref.modality.value} tensor was unreadable "
                                                             f"({exc}); dropped") from exc
            if self.engine.model.device.type == "cuda":
                tensor = tensor.pin_memory()  # so fusing copies it to the GPU without waiting
            out.append((ref.modality.value, tensor))
        return out

    def _drop_cached(self, ref: m.MediaRef) -> None:
        """Delete a cache entry found damaged (best effort: the gateway's lookup drops it too)."""
        with contextlib.suppress(RedisError, RedisClusterException):
            self.fetch_r.delete(ref.tensor_key)

    def _cached_tensor(self, ref: m.MediaRef, data) -> torch.Tensor:
        """A cache entry's tensor, CodecError unless it is one of ``ref``'s rows by the model's width."""
        if isinstance(data, Exception):  # the key holds another type than a hash (WRONGTYPE)
            raise CodecError(f"the entry is not a tensor hash ({type(data).__name__}: {data})")
        tensor = decode_tensor(data)
        width = self.engine.model.cfg.hidden_size
        if tensor.dim() != 2 or tensor.shape[0] != ref.num_tokens or tensor.shape[1] != width:
            raise CodecError(f"shape {list(tensor.shape)}, where the plan has {ref.num_tokens} rows of {width}")
        # An encoder publishes only finite outputs (encoders/worker.py checks them): these are damage, not a model's
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CodecError("it holds values that are not finite")
        return tensor

    def _error_event(self, plan: m.PromptPlan, code: m.ErrorCode, error: str, worker: str | None = None,
                     limit: str | None = None) -> m.TokenEvent:
        # A request its client withdrew is routine (info); the others are worth an operator's look.
        log.log(logging.INFO if code == m.ErrorCode.CANCELLED else logging.WARNING, "request failed",
                extra={"request_id": plan.request_id, "code": code.value, "error": error})
        return m.TokenEvent(request_id=plan.request_id, token_ids=[], prompt_tokens=len(plan.token_ids) - plan.resumed,
                            completion_tokens=plan.resumed, finish=m.FinishReason.ERROR, code=code, error=error,
                            attempt=plan.attempt, worker=self.consumer if worker is None else worker, limit=limit)

    def _refuse(self, plan: m.PromptPlan, entry_id: bytes, code: m.ErrorCode, error: str, silent: bool = False,
                limit: str | None = None) -> None:
        """Queue the plan's ack and (unless its gateway is gone) its error event for the next round trip.

        A continuation (a migrated request) that does not fit is the service's fault, not the client's: a backbone
        accepted the same request before. It fails as internal, never as a bad request."""
        self._forget(plan)
        if plan.resumed and code == m.ErrorCode.BAD_PLAN:
            log.error("a migrated request does not fit this backbone", extra={"request_id": plan.request_id,
                                                                              "error": error})
            code, error, limit = (m.ErrorCode.INTERNAL,
                                  f"the backbone this request moved to could not continue it: {error}", None)
        if silent:
            log.info("dropped", extra={"request_id": plan.request_id, "error": error})
        ev = None if silent else self._error_event(plan, code, error, limit=limit)
        self.outbox.append(Out(plan.reply_to, ev, entry_id))

    # -- The step's round trip ----------------------------------------------------------------------------------

    def _exchange(self, admit: bool) -> list:
        """Send the outbox and every running request's new tokens, ack what finished, check cancellations and
        gateways, read new plans, and wait for the answer. Nothing is forgotten before Redis took it: on a failure
        the same events go again next time (with the tokens produced since), and the gateway skips tokens it
        already has."""
        ex = self._prepare_exchange(admit)
        if self.io is None:  # --sync-io: on this thread (bounded by the client's timeouts only)
            return self._apply_exchange(ex, self._execute(ex))
        self.inflight = (ex, self.io.submit(self._execute, ex))
        return self._settle()  # bounded by round_trip_timeout_s

    def _prepare_exchange(self, admit: bool) -> Exchange:
        """The round trip's commands, built from the state now (main thread); what it sent is remembered so that
        :meth:`_apply_exchange` forgets exactly that, whatever steps ran in between."""
        pipe = self.r.pipeline(transaction=False)
        ex = Exchange(pipe, outbox=len(self.outbox))
        now = time.monotonic()
        for out in self.outbox:
            first = len(pipe)
            if out.ev is not None:
                send_reply(pipe, out.reply_to, m.encode(out.ev))
            if out.dead is not None:
                dead_letter(pipe, self.keys.dead_letter(), self.stream, *out.dead)
            if out.entry_id is not None:
                ack_delete(pipe, self.stream, BACKBONE_GROUP, out.entry_id)
            ex.outbox_spans.append((first, len(pipe)))
        for key, run in self.running.items():
            seq = run.seq
            if not seq.pending and seq.finish is None and now - run.told < HELD_EVENT_S:
                continue  # nothing new (a held step)
            run.told = now
            failed = seq.finish == m.FinishReason.ERROR
            ev = run.event(self.consumer, seq.output[len(seq.output) - seq.pending :], self.dtype, finish=seq.finish,
                           code=(run.code or m.ErrorCode.INTERNAL) if failed else None, error=seq.error)
            first = len(pipe)
            send_reply(pipe, run.plan.reply_to, m.encode(ev))
            ex.sent.append((key, seq.pending, seq.finish is not None))
            if seq.finish is not None:
                ack_delete(pipe, self.stream, BACKBONE_GROUP, run.entry_id)
            ex.sent_spans.append((first, len(pipe)))
        waiting = {run_key(plan): plan for _, plan in self.waiting}
        self.told_waiting = {k: t for k, t in self.told_waiting.items() if k in waiting}
        for key, plan in waiting.items():
            if now - self.told_waiting.get(key, now) >= HELD_EVENT_S:
                self._tell_waiting(plan, now)  # into the outbox: sent with the next round trip
        ex.alive = [k for k, run in self.running.items() if run.seq.finish is None]
        ex.checks_at = len(pipe)
        for key in ex.alive:
            plan = self.running[key].plan
            pipe.get(cancel_key(plan.reply_to, plan.request_id))
        ex.owners = sorted({self.running[k].plan.reply_to for k in ex.alive})
        ex.owners_at = len(pipe)
        for reply_to in ex.owners:
            pipe.exists(alive(reply_to))
        room = self.cfg.max_running - len(ex.alive) - len(self.waiting)
        ex.admit = admit
        if admit and room > 0:
            ex.read_at = len(pipe)
            pipe.xreadgroup(BACKBONE_GROUP, self.consumer, {self.stream: ">"}, count=room)
        return ex

    def _execute(self, ex: Exchange) -> list | RedisError:
        """The round trip itself: the only part that may run on the I/O thread (it touches no worker state but the
        reclaim gate's timing)."""
        try:
            t0 = time.monotonic()
            results = ex.pipe.execute(raise_on_error=False)
            self.gate.observe(time.monotonic() - t0)
            return results
        except RedisError as exc:
            return exc
        except RedisClusterException as exc:  # the cluster client's own (not a RedisError): a failed round trip too
            return RedisConnectionError(f"{type(exc).__name__}: {exc}")

    def _apply_exchange(self, ex: Exchange, results: list | RedisError) -> list:
        """Forget what Redis took, act on cancellations and dead gateways, return the plans read (main thread)."""
        if not isinstance(results, RedisError):
            # A Redis that refuses writes (full under noeviction, a read-only replica, loading) answers the round
            # trip with an error per write: nothing this exchange sent can be counted as delivered, or a request's
            # tokens were dropped and it was logged finished while its gateway waited out its timeout (an outside
            # tester's run). Held as an outage: no step, the same events sent again until Redis takes them. So is a
            # round trip no node answered.
            refused = next((r for r in results if _refuses_writes(r)), None)
            if refused is not None or (results and all(map(lost_node, results))):
                results = refused or results[0]
        if isinstance(results, RedisError):
            self.reread = self.reread or ex.read_at is not None
            self._redis_failed(results, "step")
            return []
        self._recovered()
        # A Redis Cluster node that did not answer (its commands' replies are its error; cache/client.py): what it
        # was to take goes again, the rest stands. Only the requests whose gateways' streams it holds wait for it
        # (the plans read, if the plan queue is its, are read again).
        lost = {i for i, r in enumerate(results) if lost_node(r)}

        def taken(span: tuple[int, int]) -> bool:
            return lost.isdisjoint(range(*span))

        now = time.monotonic()
        kept = [out if out.since is not None else out._replace(since=now)
                for out, span in zip(self.outbox[: ex.outbox], ex.outbox_spans) if not taken(span)]
        self.outbox[: ex.outbox] = kept
        for (key, count, finished), span in zip(ex.sent, ex.sent_spans):
            run = self.running.get(key)
            if run is None:
                continue
            if not taken(span):
                run.undelivered_since = run.undelivered_since or now
                continue
            run.undelivered_since = None
            self.tokens += count
            run.seq.pending -= count  # tokens produced since the exchange was built go next time
            if finished:
                del self.running[key]
                self.engine.release(run.seq)
                handed_back = run.code == m.ErrorCode.WORKER_LOST  # not an error: its gateway moves it on
                log.info("handed back" if handed_back else "finished", extra={
                    "request_id": run.plan.request_id, "attempt": run.plan.attempt,
                    "finish": "handed_back" if handed_back else run.seq.finish.value,
                    "completion_tokens": run.seq.completion_tokens})
        if lost:
            self._node_away(results[min(lost)])
            self._drop_undelivered(now)
        dead_owners = {o for o, ok in zip(ex.owners, results[ex.owners_at : ex.owners_at + len(ex.owners)])
                       if ok == 0}
        for key, cancel in zip(ex.alive, results[ex.checks_at : ex.checks_at + len(ex.alive)]):
            run = self.running.get(key)
            if run is None or run.seq.finish is not None:
                continue  # it finished (or left) since: its end goes out with the next exchange
            if run.plan.reply_to in dead_owners:
                self._cancel(key, "its gateway is gone", silent=True)
            elif not isinstance(cancel, Exception) and _cancelled(cancel, run.plan.attempt):
                self._cancel(key, "cancelled by its gateway")
        errors = [r for i, r in enumerate(results) if isinstance(r, Exception) and i not in lost]
        for exc in errors:
            if is_nogroup(exc):
                self._redis_failed(exc, "read")
                return []
        if errors and self._round_trip_errors.due():  # one line per 10 s however many steps fail
            log.error("step round trip: a command failed", extra={"error": str(errors[0]),
                                                                  "repeated": self._round_trip_errors.held})
        read = results[ex.read_at] if ex.read_at is not None else None
        if ex.read_at in lost:
            self.reread = True  # what it read, if it read, is pending on us: read again once the queue answers
        new = read[0][1] if read and not isinstance(read, Exception) else []
        if self._may_reread() and ex.admit and ex.read_at not in lost:
            try:
                new = list(new) + self._reread(new)
            except RedisError as exc:
                self._redis_failed(exc, "read")
        return new

    def _node_away(self, error: Exception) -> None:
        """Part of the round trip failed: a Redis Cluster node did not answer. The reclaim gate starts its clock
        again (that node may hold the live set, whose beats then lapsed)."""
        self.gate.broken()
        if self._node_errors.due():
            log.warning("a redis node did not answer: the requests whose gateways it serves wait for it", extra={
                "error": str(error), "held": sum(r.undelivered_since is not None for r in self.running.values()),
                "repeated": self._node_errors.held})

    def _drop_undelivered(self, now: float) -> None:
        """Requests (and outbox events) whose gateway's node has not taken an event for ``outage_hold_s`` are
        dropped, as a whole outage's are failed: their gateways gave up by then. Their plans are still acked."""
        limit = self.cfg.outage_hold_s
        for key, run in list(self.running.items()):
            if run.undelivered_since is not None and now - run.undelivered_since > limit:
                del self.running[key]
                self.engine.release(run.seq)
                log.error("dropped: its gateway's redis node did not take its events", extra={
                    "request_id": run.plan.request_id, "attempt": run.plan.attempt, "held_s": limit})
                self.outbox.append(Out("", None, run.entry_id))
        for i, out in enumerate(self.outbox):
            if out.ev is not None and out.since is not None and now - out.since > limit:
                log.error("dropped an event: its gateway's redis node did not take it", extra={
                    "request_id": out.ev.request_id, "held_s": limit})
                self.outbox[i] = Out("", None, out.entry_id)

    def _cancel(self, key: str, why: str, silent: bool = False) -> None:
        """Stop a running attempt now; its ack (and, unless its gateway is gone, a cancelled event) go out with
        the next round trip."""
        run = self.running.pop(key)
        self.engine.release(run.seq)
        log.info("cancelled", extra={"request_id": run.plan.request_id, "attempt": run.plan.attempt, "why": why,
                                     "completion_tokens": run.seq.completion_tokens})
        ev = None if silent else run.event(self.consumer, [], finish=m.FinishReason.CANCELLED)
        self.outbox.append(Out(run.plan.reply_to, ev, run.entry_id))
        self.cancelled += 1

    def _fail_all(self, error: str) -> None:
        """On exit: hand every request still held back to its gateway (``worker_lost``, with the tokens not yet
        sent), which migrates it to another replica; one last round trip."""
        for run in self.running.values():
            if run.seq.finish is None:
                run.seq.fail(error)
                run.code = m.ErrorCode.WORKER_LOST
        for entry_id, plan in self.waiting:
            self._refuse(plan, entry_id, m.ErrorCode.WORKER_LOST, error)
        self.waiting.clear()
        self.fetched.clear()
        self.backoff.clear()
        if self.running or self.outbox:
            self._exchange(admit=False)
        if self.running or self.outbox:
            log.error("could not hand requests back (Redis away); their plans stay pending and the next live "
                      "replica reclaims them", extra={"requests": len(self.running) + len(self.outbox)})
        for run in self.running.values():
            self.engine.release(run.seq)
        self.running.clear()


def _cancelled(value: bytes | None, attempt: int) -> bool:
    """Whether a cancel key's value (the lowest attempt still wanted) cancels ``attempt``."""
    try:
        return value is not None and attempt < int(value)
    except ValueError:
        return True


def serve(cfg: BackboneConfig, model_dir: str, threads: int | None = None) -> None:
    from backbone.kv import pool_blocks
    from backbone.loader import load_shard
    from backbone.model import DecoderConfig
    from backbone.pipeline import DrainLink, Peers, PipelineHead, StageWorker, agree_blocks, init_group, watch_drain
    from models.spec import ModelSpec
    from router.lifecycle import stop_on_signals, tune_allocator

    stop = stop_on_signals()
    tune_allocator()
    if threads:
        torch.set_num_threads(threads)
    spec = ModelSpec.from_dir(model_dir)
    text = spec.config["text_config"]
    layers = cfg.layers or even_layers(DecoderConfig.from_text_config(text).num_layers, cfg.num_shards, cfg.shard)
    device, dtype = resolve_placement(cfg.device, cfg.dtype)
    if cfg.max_batched_tokens is None:
        cfg = dataclasses.replace(cfg, max_batched_tokens=STEP_TOKENS.get(device.type, STEP_TOKENS["cpu"]))
    if cfg.max_step_ms is None:
        cfg = dataclasses.replace(cfg, max_step_ms=STEP_MS.get(device.type, STEP_MS["cpu"]))
    cfg = dataclasses.replace(cfg, max_step_ms=cfg.max_step_ms or None)  # 0: none
    if device.type == "cuda" and device.index is None and cfg.num_shards > 1:
        device = torch.device("cuda", cfg.shard % torch.cuda.device_count())  # shards spread over the visible GPUs
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # so NCCL and the caching allocator use the one this shard runs on
    log.info("loading shard", extra={"shard": cfg.shard, "num_shards": cfg.num_shards, "device": str(device),
                                     "dtype": str(dtype).removeprefix("torch."),
                                     "layers": f"{layers.start}:{layers.stop}"})
    if cfg.num_shards == 1:
        try:
            engine = load_engine(spec, layers, cfg.kv_cache_bytes, None, dtype, device, cfg.max_batched_tokens,
                                 cfg.max_running, cfg.gpu_memory_utilization, attention=cfg.attention,
                                 eager=cfg.eager, max_step_ms=cfg.max_step_ms,
                                 defer=cfg.overlap_io and device.type == "cuda", prefix_cache=cfg.prefix_cache)
        except ValueError as exc:
            raise SystemExit(f"tributary backbone: {exc}") from None
        worker = BackboneWorker(cfg, engine, stop)
        if threads and device.type == "cpu":  # a budgeted process follows its re-divisions
            worker.on_threads = torch.set_num_threads
        worker.run()
        return
    hops = init_group(cfg.dist_url, cfg.shard, cfg.num_shards, device, cfg.pipeline_timeout_s)
    # A shard told to stop has shard 0 drain the whole replica (the others only follow the pipe); shard 0 listens,
    # and follows the others' beats: it heartbeats for the replica only while every shard's process runs.
    peers = Peers(cfg.num_shards) if cfg.shard == 0 else None
    watch_drain(lambda: DrainLink(cfg.dist_url), stop, rank=cfg.shard, peers=peers)
    model, names = load_shard(spec.path, text, layers, dtype, device, cfg.attention)
    log.info("shard loaded", extra={"shard": cfg.shard, "tensors": len(names)})
    # Every shard sizes a pool for its own layers; the replica takes the smallest (one block table for all).
    blocks = agree_blocks(pool_blocks(model, cfg.kv_cache_bytes, cfg.gpu_memory_utilization, cfg.max_batched_tokens,
                                      cfg.max_running, spec.max_context, share=hops.share))
    if blocks < 1:
        raise SystemExit("tributary backbone: no memory left for the KV cache on some shard (lower "
                         "--max-batched-tokens, raise --gpu-memory-utilization, or give --kv-cache-gb)")
    model.allocate_pool(blocks)
    if cfg.shard == 0:
        warn_small_pool(model, spec.max_context)
    if not cfg.eager:  # every shard replays its decode steps (the same --max-running on every shard)
        model.capture_graphs(cfg.max_running, spec.max_context)
    if cfg.shard > 0:  # driven by shard 0 through the pipe; it stops us when it stops (a drain we ask for included)
        metrics = None
        stage = StageWorker(model, cfg.shard, cfg.num_shards, hops)
        if cfg.metrics_port:  # this shard's own KV pool (shard 0 serves the scheduler's metrics), and its /live
            registry = CollectorRegistry()
            registry.register(BackboneCollector(lambda: pool_usage(model.pool)))
            metrics = serve_metrics(registry, cfg.metrics_port, cfg.metrics_host, f"backbone shard {cfg.shard}",
                                    live=lambda: stage.live(cfg.stall_s))
        try:
            stage.run()
        except RuntimeError as exc:  # gloo / NCCL: a peer shard is gone
            _pipe_gone(cfg.shard, exc)
        finally:
            stop_metrics(metrics)
        _leave_group()
        return
    head = PipelineHead(cfg.num_shards, hops)
    worker = None
    try:
        engine = Engine(model, spec.placeholder_ids, spec.eos_token_ids, spec.max_context, head,
                        cfg.max_batched_tokens, cfg.micro_batches, cfg.max_step_ms, prefix_cache=cfg.prefix_cache)
        worker = BackboneWorker(cfg, engine, stop)
        worker.peers_ok = peers.ok
        worker.run()
    except RuntimeError as exc:
        if worker is None or not worker.pipe_broken:
            raise
        _pipe_gone(cfg.shard, exc)  # its requests were handed back to their gateways already
    finally:
        if worker is None or not worker.pipe_broken:
            try:
                head.stop()  # the other shards exit (a broken pipe: they time out on their own)
            except RuntimeError as exc:  # a peer went meanwhile: nobody left to tell
                log.warning("could not send the stop down the pipe (a peer shard is gone)",
                            extra={"shard": cfg.shard, "error": " ".join(str(exc).split())[:300]})
            else:
                _leave_group()


def _leave_group() -> None:
    """After a clean stop: the process group's threads are ended before the interpreter's, else the shard aborted
    on its way out ("terminate called without an active exception", exit -6: an outside tester's logs)."""
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 -- leaving anyway
        log.warning("could not leave the pipeline's process group", extra={"error": f"{type(exc).__name__}: {exc}"})


def _pipe_gone(shard: int, exc: RuntimeError) -> None:
    """A peer shard of this replica is gone (killed, crashed): one log line, not a traceback, and a non-zero exit.
    The replica's shards cannot go on without each other: ``tributary up`` restarts them together; by hand, restart
    every shard of the replica."""
    log.error("the pipeline is broken (a peer shard is gone); this shard exits: restart every shard of the replica",
              extra={"shard": shard, "error": " ".join(str(exc).split())[:300]})
    raise SystemExit(1) from None


def even_layers(num_layers: int, shards: int, index: int) -> range:
    """Shard ``index``'s layers when ``num_layers`` are split as evenly as possible (earlier shards take the extra)."""
    if not 0 <= index < shards <= num_layers:
        raise ValueError(f"shard {index} of {shards} does not fit {num_layers} layers")
    base, extra = divmod(num_layers, shards)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))

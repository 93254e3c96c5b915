"""The backbone worker loop: take prompt plans when there is room, prefill, decode, stream token events back.

One Redis round trip per step carries that step's token events (one XADD per request, pipelined), the acks of
finished requests, the cancellation checks of running ones and, when there is room, the read of new plans. A plan
stays pending in the ``backbone`` group until its request finishes. On SIGTERM the worker stops taking plans,
finishes the running ones (up to ``drain_timeout_s``), then fails what is left with a clear error and exits.

Faults are per request: a plan that cannot be decoded, validated, fetched or fused, and a sequence whose forward or
sampling fails (backbone/engine.py), ends with an error event for that request alone; the loop and every other
request go on. Only a broken pipeline (a peer shard gone) ends the process, and its supervisor restarts it.
"""

from __future__ import annotations

import logging
import os
from collections import deque
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import torch
from redis.exceptions import RedisError

from backbone.engine import Engine, Sequence, load_engine
from backbone.fusion import PlanError
from cache.client import connect
from cache.codec import CodecError, decode_tensor
from cache.keys import BACKBONE_GROUP, Keys
from cache.streams import ensure_group, fields_payload, payload_fields
from router import messages as m
from router.liveness import Heartbeat

log = logging.getLogger(__name__)


@dataclass
class BackboneConfig:
    redis_url: str
    prefix: str = "trib"
    max_running: int = 16  # sequences decoding at once; further plans wait in the stream
    kv_cache_bytes: int | None = None  # KV memory for all running sequences (each reserves prompt + max_tokens)
    shard: int = 0  # this process's place in its pipeline replica
    num_shards: int = 1
    layers: range | None = None  # this shard's layers (default: an even split)
    dist_url: str = ""  # torch.distributed rendezvous of the replica, e.g. tcp://10.0.0.5:29500
    block_ms: int = 1000  # idle read wait (bounds how late a stop is noticed)
    drain_timeout_s: float = 30.0  # on SIGTERM, how long running requests may take to finish
    stall_s: float = 60.0  # a loop that has not come round for this long stops heartbeating (router/liveness.py)


@dataclass
class Running:
    seq: Sequence
    plan: m.PromptPlan
    entry_id: bytes


class StepFailure(Exception):
    def __init__(self, code: m.ErrorCode, error: str):
        super().__init__(error)
        self.code, self.error = code, error


class BackboneWorker:
    def __init__(self, cfg: BackboneConfig, engine: Engine, stop: threading.Event):
        self.cfg, self.engine, self.stop = cfg, engine, stop
        self.keys = Keys(cfg.prefix)
        self.stream = self.keys.gen()
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.r = connect(cfg.redis_url)
        self.running: dict[str, Running] = {}
        self.waiting: deque[tuple[bytes, m.PromptPlan]] = deque()  # read, not started (slots or KV memory full)
        self.stats_key = self.keys.stats("backbone")

    def run(self) -> None:
        ensure_group(self.r, self.stream, BACKBONE_GROUP)
        heartbeat = Heartbeat(self.cfg.redis_url, self.keys, "backbone", self.consumer, self.cfg.stall_s).start()
        log.info("backbone ready", extra={"consumer": self.consumer, "max_running": self.cfg.max_running,
                                          "kv_budget_bytes": self.engine.kv_budget_bytes})
        new: list = []
        drain_deadline = None
        try:
            while True:
                heartbeat.tick()  # the heartbeat goes stale if this loop stops coming round
                if self.stop.is_set() and drain_deadline is None:
                    drain_deadline = time.monotonic() + self.cfg.drain_timeout_s
                    log.info("draining", extra={"running": len(self.running), "waiting": len(self.waiting)})
                # Plans already read are ours to start even while draining: nobody else would take them.
                busy = self.running or self.waiting or new
                if drain_deadline is not None and (not busy or time.monotonic() > drain_deadline):
                    break
                # 1) Idle: block for plans (the only blocking call; with work in hand, reads ride the step's pipe).
                if not busy:
                    new = self._idle_read()
                    if self.engine.pipeline is not None:
                        self.engine.pipeline.keepalive()  # tells the other shards shard 0 is alive
                    continue
                # 2) Queue the plans read last round; start waiting ones while slots and KV memory allow.
                for entry_id, fields in new:
                    self._enqueue(entry_id, fields)
                errors: list[tuple] = []
                decoding = [r.seq for r in self.running.values()]
                starting = self._start_waiting(errors)
                # 3) One forward: the starting sequences' prompts and the next token of every running one.
                t0 = time.perf_counter()
                self._step(decoding, starting)
                if starting:
                    ms = round((time.perf_counter() - t0) * 1e3, 2)
                    for seq, _ in starting:
                        log.info("prefilled", extra={"request_id": seq.request_id, "prompt_tokens": seq.prompt_len,
                                                     "ms": ms, "batch": len(decoding) + len(starting)})
                # 4) One round trip: events, acks, cancellation checks, and the next plans if there is room.
                new = self._exchange(errors, admit=drain_deadline is None)
        finally:
            self._fail_all("the backbone worker is shutting down")
            heartbeat.stop()
            log.info("backbone stopped", extra={"consumer": self.consumer})

    def _step(self, decoding: list[Sequence], starting: list) -> None:
        """The engine isolates each request's faults itself; what still escapes is a bug in the batch assembly or a
        broken pipeline. The first fails the step's sequences (with their own errors) and the loop goes on; the
        second ends the process (its shards cannot go on without each other)."""
        try:
            self.engine.step(decoding, starting)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            if self.engine.pipeline is not None and isinstance(exc, RuntimeError):
                raise  # gloo/NCCL errors are RuntimeErrors: the replica's pipe is broken
            log.exception("step failed outside any one request; failing its sequences")
            for seq in decoding + [s for s, _ in starting]:
                if seq.finish is None:
                    seq.fail(f"internal error in the backbone step ({type(exc).__name__})")

    def _idle_read(self) -> list:
        try:
            reply = self.r.xreadgroup(BACKBONE_GROUP, self.consumer, {self.stream: ">"},
                                      count=self.cfg.max_running, block=self.cfg.block_ms)
        except RedisError as exc:  # the client already retried with backoff: Redis is down or was reset
            if "NOGROUP" in str(exc):  # a restarted Redis without persistence lost the group
                ensure_group(self.r, self.stream, BACKBONE_GROUP)
            else:
                log.error("redis unavailable; retrying", extra={"error": str(exc)})
                self.stop.wait(1.0)
            return []
        return reply[0][1] if reply else []

    def _enqueue(self, entry_id: bytes, fields: dict) -> None:
        try:
            plan = m.decode(fields_payload(fields), m.PromptPlan)
        except (m.WireError, KeyError) as exc:  # nobody to tell: without a plan there is no reply stream
            log.error("dropping undecodable plan", extra={"entry": entry_id, "error": str(exc)})
            self.r.xack(self.stream, BACKBONE_GROUP, entry_id)
            return
        self.waiting.append((entry_id, plan))

    def _start_waiting(self, errors: list) -> list[tuple[Sequence, torch.Tensor]]:
        """Start queued plans in arrival order while a slot and their whole KV cache are free. A plan that cannot
        start gets an error event (in ``errors``) and the next one is tried."""
        starting: list[tuple[Sequence, torch.Tensor]] = []
        while self.waiting and len(self.running) < self.cfg.max_running:
            entry_id, plan = self.waiting[0]
            try:
                seq = self.engine.new_sequence(plan.request_id, len(plan.token_ids), plan.sampling)
            except PlanError as exc:
                self.waiting.popleft()
                errors.append(self._error_event(plan, entry_id, m.ErrorCode.BAD_PLAN, str(exc)))
                continue
            if not self.engine.fits(seq):
                if self.running:
                    break  # wait for a running sequence to finish and free its KV cache
                self.waiting.popleft()
                errors.append(self._error_event(plan, entry_id, m.ErrorCode.BAD_PLAN, (
                    f"the request needs {self.engine.kv_bytes(seq)} bytes of KV cache; this backbone has "
                    f"{self.engine.kv_budget_bytes}")))
                continue
            self.waiting.popleft()
            try:
                if time.time() > plan.deadline:
                    raise StepFailure(m.ErrorCode.DEADLINE, "the request waited past its deadline for a backbone")
                starting.append((seq, self.engine.start(seq, plan.token_ids, self._fetch_media(plan))))
            except StepFailure as exc:
                errors.append(self._error_event(plan, entry_id, exc.code, exc.error))
                continue
            except PlanError as exc:
                self.engine.release(seq)
                errors.append(self._error_event(plan, entry_id, m.ErrorCode.BAD_PLAN, str(exc)))
                continue
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:  # a bug, or memory: this plan only
                log.exception("could not start a request", extra={"request_id": plan.request_id})
                self.engine.release(seq)
                errors.append(self._error_event(plan, entry_id, m.ErrorCode.INTERNAL,
                                                f"the backbone could not start this request ({type(exc).__name__})"))
                continue
            self.running[plan.request_id] = Running(seq, plan, entry_id)
        return starting

    def _fetch_media(self, plan: m.PromptPlan) -> list[tuple[str, torch.Tensor]]:
        """The plan's encoder outputs, in one round trip that also checks the request was not cancelled while queued."""
        pipe = self.r.pipeline(transaction=False)
        pipe.exists(self.keys.cancel(plan.request_id))
        for ref in plan.media:
            pipe.hget(ref.tensor_key, "data")
        cancelled, *blobs = pipe.execute()
        if cancelled:
            raise StepFailure(m.ErrorCode.CANCELLED, "the request was cancelled while queued")
        out = []
        for ref, data in zip(plan.media, blobs):
            if data is None:
                raise StepFailure(m.ErrorCode.MEDIA_EXPIRED, f"cached {ref.modality.value} tensor expired")
            try:
                tensor = decode_tensor(data)
            except CodecError as exc:
                raise StepFailure(m.ErrorCode.INTERNAL, str(exc)) from exc
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise StepFailure(m.ErrorCode.INTERNAL, f"cached {ref.modality.value} tensor holds non-finite values")
            out.append((ref.modality.value, tensor))
        return out

    def _error_event(self, plan: m.PromptPlan, entry_id: bytes, code: m.ErrorCode, error: str) -> tuple:
        log.warning("request failed", extra={"request_id": plan.request_id, "code": code.value, "error": error})
        ev = m.TokenEvent(request_id=plan.request_id, token_ids=[], prompt_tokens=len(plan.token_ids),
                          completion_tokens=0, finish=m.FinishReason.ERROR, code=code, error=error)
        return plan.reply_to, ev, entry_id

    def _exchange(self, errors: list[tuple], admit: bool) -> list:
        pipe = self.r.pipeline(transaction=False)
        tokens = 0
        for reply_to, ev, entry_id in errors:
            pipe.xadd(reply_to, payload_fields(m.encode(ev)))
            pipe.xack(self.stream, BACKBONE_GROUP, entry_id)
        for rid, run in list(self.running.items()):
            seq = run.seq
            failed = seq.finish == m.FinishReason.ERROR
            if failed:
                log.error("request failed", extra={"request_id": rid, "code": "internal", "error": seq.error})
            ev = m.TokenEvent(request_id=rid, token_ids=seq.output[len(seq.output) - seq.pending :],
                              prompt_tokens=seq.prompt_len, completion_tokens=len(seq.output), finish=seq.finish,
                              code=m.ErrorCode.INTERNAL if failed else None, error=seq.error)
            tokens += seq.pending
            seq.pending = 0
            pipe.xadd(run.plan.reply_to, payload_fields(m.encode(ev)))
            if seq.finish is not None:
                pipe.xack(self.stream, BACKBONE_GROUP, run.entry_id)
                del self.running[rid]
                self.engine.release(seq)
                log.info("finished", extra={"request_id": rid, "finish": seq.finish.value,
                                            "completion_tokens": len(seq.output)})
        alive, checks_at = list(self.running), len(pipe)
        for rid in alive:
            pipe.exists(self.keys.cancel(rid))
        pipe.hincrby(self.stats_key, "tokens", tokens)
        room, read_at = self.cfg.max_running - len(self.running) - len(self.waiting), None
        if admit and room > 0:
            read_at = len(pipe)
            pipe.xreadgroup(BACKBONE_GROUP, self.consumer, {self.stream: ">"}, count=room)
        results = pipe.execute()
        for rid, cancelled in zip(alive, results[checks_at : checks_at + len(alive)]):
            if cancelled:
                self._cancel(rid)
        read = results[read_at] if read_at is not None else None
        return read[0][1] if read else []

    def _cancel(self, rid: str) -> None:
        run = self.running.pop(rid)
        self.engine.release(run.seq)
        log.info("cancelled", extra={"request_id": rid, "completion_tokens": len(run.seq.output)})
        pipe = self.r.pipeline(transaction=False)
        ev = m.TokenEvent(request_id=rid, token_ids=[], prompt_tokens=run.seq.prompt_len,
                          completion_tokens=len(run.seq.output), finish=m.FinishReason.CANCELLED)
        pipe.xadd(run.plan.reply_to, payload_fields(m.encode(ev)))
        pipe.xack(self.stream, BACKBONE_GROUP, run.entry_id)
        pipe.hincrby(self.stats_key, "cancelled", 1)
        pipe.execute()

    def _fail_all(self, error: str) -> None:
        held = [(run.plan, run.entry_id) for run in self.running.values()] + [(p, e) for e, p in self.waiting]
        if not held:
            return
        pipe = self.r.pipeline(transaction=False)
        for plan, entry_id in held:
            _, ev, _ = self._error_event(plan, entry_id, m.ErrorCode.INTERNAL, error)
            pipe.xadd(plan.reply_to, payload_fields(m.encode(ev)))
            pipe.xack(self.stream, BACKBONE_GROUP, entry_id)
        pipe.execute()
        for run in self.running.values():
            self.engine.release(run.seq)
        self.running.clear()
        self.waiting.clear()


def serve(cfg: BackboneConfig, model_dir: str, threads: int | None = None) -> None:
    from backbone.loader import load_shard
    from backbone.model import DecoderConfig
    from backbone.pipeline import PipelineHead, StageWorker, init_group
    from models.spec import ModelSpec
    from router.lifecycle import stop_on_signals, tune_allocator

    stop = stop_on_signals()
    tune_allocator()
    if threads:
        torch.set_num_threads(threads)
    spec = ModelSpec.from_dir(model_dir)
    text = spec.config["text_config"]
    layers = cfg.layers or even_layers(DecoderConfig.from_text_config(text).num_layers, cfg.num_shards, cfg.shard)
    log.info("loading shard", extra={"shard": cfg.shard, "num_shards": cfg.num_shards,
                                     "layers": f"{layers.start}:{layers.stop}"})
    if cfg.num_shards == 1:
        BackboneWorker(cfg, load_engine(spec, layers, cfg.kv_cache_bytes), stop).run()
        return
    init_group(cfg.dist_url, cfg.shard, cfg.num_shards)
    if cfg.shard > 0:  # driven by shard 0 through the pipe; it stops us when it stops
        model, names = load_shard(spec.path, text, layers)
        log.info("shard loaded", extra={"shard": cfg.shard, "tensors": len(names)})
        StageWorker(model, cfg.shard, cfg.num_shards).run()
        return
    head = PipelineHead(cfg.num_shards)
    try:
        BackboneWorker(cfg, load_engine(spec, layers, cfg.kv_cache_bytes, head), stop).run()
    finally:
        head.stop()


def even_layers(num_layers: int, shards: int, index: int) -> range:
    """Shard ``index``'s layers when ``num_layers`` are split as evenly as possible (earlier shards take the extra)."""
    if not 0 <= index < shards <= num_layers:
        raise ValueError(f"shard {index} of {shards} does not fit {num_layers} layers")
    base, extra = divmod(num_layers, shards)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))

"""Pipeline shards linked by torch.distributed: shard 0 schedules and embeds, every shard runs its layers with its own
KV caches, the last one applies norm + lm_head and samples.

Hops (:class:`Hops`): the control messages (header, step table, releases, the sampled ids) are small host tensors
over gloo. Hidden states go device to device over NCCL when every shard runs on its own GPU; when any shard runs on a
CPU, or two share a GPU (NCCL cannot link a GPU to itself), they go over gloo staged through host memory. The shards
agree on it at start-up by exchanging their devices' UUIDs. The NCCL path has not run yet (only single-GPU machines
were at hand): it is marked unverified in docs/architecture.md.

Per step, shard 0 sends down the pipe a header, a table describing the step's segments (which sequence, which
positions, and for a sequence's first step its KV capacity and sampling parameters) and the hidden states [T, H];
each middle shard forwards them after its layers; the last shard sends the sampled token ids [B] back to shard 0.
Sequences that ended are listed in the next header so every shard frees their caches. A row that failed on any
shard (backbone/isolation.py) is flagged in the table as it travels on, and the last shard answers -1 for it, so one
request's fault fails that request alone on every shard. Shard 0 sends a no-op when
idle (so a silent pipe means a dead shard 0 and the others exit after ``timeout_s``) and a stop when it exits.
"""

from __future__ import annotations

import datetime
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from backbone.isolation import forward_isolating
from backbone.model import DecoderShard, Segment, SequenceCache, to_device
from backbone.sampling import Sampler, sample_rows
from router.messages import SamplingParams

log = logging.getLogger(__name__)

OP_STEP, OP_NOOP, OP_STOP = 1, 2, 3
HEADER_LEN = 4  # op, segments, tokens, releases
SEGMENT_COLS = 7  # seq id, start, length, capacity, seed, failed (0/1), draws made (the sampler's counter)
FAILED = -1  # the token id the last shard answers for a row that failed
NOOP_EVERY_S = 5.0


@dataclass
class Hops:
    """How hidden states travel to the next shard: over ``nccl`` (a group of GPU shards, device tensors) or, with
    ``nccl`` None, over the default gloo group staged through host memory (pinned, so the copies do not wait)."""

    device: torch.device
    nccl: object | None = None

    @property
    def backend(self) -> str:
        return "nccl" if self.nccl is not None else "gloo"

    def send_hidden(self, hidden: torch.Tensor, dst: int) -> None:
        if self.nccl is not None:
            dist.send(hidden.contiguous(), dst=dst, group=self.nccl)
        else:
            dist.send(hidden.contiguous().cpu(), dst=dst)

    def recv_hidden(self, shape: tuple[int, int], dtype: torch.dtype, src: int) -> torch.Tensor:
        if self.nccl is not None:
            buf = torch.empty(shape, dtype=dtype, device=self.device)
            dist.recv(buf, src=src, group=self.nccl)
            return buf
        buf = torch.empty(shape, dtype=dtype, pin_memory=self.device.type == "cuda")
        dist.recv(buf, src=src)
        return to_device(buf, device=self.device)


def device_identity(device: torch.device) -> list[int]:
    """[kind, uuid high, uuid low] as int64s: kind 0 a CPU, 1 a GPU known by its UUID, 2 a GPU without one."""
    if device.type != "cuda":
        return [0, 0, 0]
    digits = re.sub("[^0-9a-f]", "", str(getattr(torch.cuda.get_device_properties(device), "uuid", "")).lower())
    if len(digits) != 32:
        return [2, 0, 0]
    value = uuid.UUID(digits).int

    def signed(x: int) -> int:
        return x - (1 << 64) if x >= 1 << 63 else x

    return [1, signed(value >> 64), signed(value & ((1 << 64) - 1))]


def hop_backend(identities: list[tuple[int, int, int]], nccl_available: bool) -> str:
    """``nccl`` when every shard is on a GPU known by its UUID and no two share one, else ``gloo``."""
    on_own_gpus = all(kind == 1 for kind, _, _ in identities) and len(set(identities)) == len(identities)
    return "nccl" if on_own_gpus and nccl_available else "gloo"


def init_group(url: str, rank: int, world: int, device: torch.device | str = "cpu", timeout_s: float = 120.0
               ) -> Hops:
    """Join the replica's gloo group, agree on the hidden states' hop backend, and return the hops."""
    device = torch.device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world, timeout=timeout)
    mine = torch.tensor(device_identity(device), dtype=torch.long)
    everyone = [torch.empty(3, dtype=torch.long) for _ in range(world)]
    dist.all_gather(everyone, mine)
    backend = hop_backend([tuple(t.tolist()) for t in everyone], dist.is_nccl_available())
    hops = Hops(device, dist.new_group(backend="nccl", timeout=timeout) if backend == "nccl" else None)
    log.info("pipeline group ready", extra={"rank": rank, "world": world, "hidden_states_over": backend,
                                            "device": str(device)})
    return hops


@dataclass
class StepTable:
    """What one step is about: rows of (seq id, start, length, capacity, seed, failed, draws) + (temperature,
    top_p)."""

    ints: torch.Tensor  # [n, SEGMENT_COLS] int64
    floats: torch.Tensor  # [n, 2] float64
    releases: torch.Tensor  # [r] int64: sequences every shard must forget

    def segments(self, caches: dict[int, SequenceCache]) -> list[Segment]:
        return [Segment(caches[int(sid)], int(start), int(length)) for sid, start, length, *_ in self.ints.tolist()]


@dataclass
class PipelineHead:
    """Shard 0's end of the pipe (its engine calls :meth:`run_rest` instead of sampling locally)."""

    world: int
    hops: Hops = field(default_factory=lambda: Hops(torch.device("cpu")))
    releases: list[int] = field(default_factory=list)
    last_send: float = 0.0

    def run_rest(self, ints: torch.Tensor, floats: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Send the step down the pipe; returns the last shard's sampled ids [B] (FAILED for a failed row)."""
        releases = torch.tensor(self.releases, dtype=torch.long)
        self.releases.clear()
        _send_step(1, ints, floats, releases, hidden, self.hops)
        tokens = torch.empty(ints.shape[0], dtype=torch.long)
        dist.recv(tokens, src=self.world - 1)
        self.last_send = time.monotonic()
        return tokens

    def keepalive(self) -> None:
        if time.monotonic() - self.last_send >= NOOP_EVERY_S:
            dist.send(torch.tensor([OP_NOOP, 0, 0, 0], dtype=torch.long), dst=1)
            self.last_send = time.monotonic()

    def stop(self) -> None:
        dist.send(torch.tensor([OP_STOP, 0, 0, 0], dtype=torch.long), dst=1)


def _send_step(dst: int, ints, floats, releases, hidden, hops: Hops) -> None:
    dist.send(torch.tensor([OP_STEP, ints.shape[0], hidden.shape[0], releases.numel()], dtype=torch.long), dst=dst)
    dist.send(ints.contiguous(), dst=dst)
    dist.send(floats.contiguous(), dst=dst)
    if releases.numel():
        dist.send(releases.contiguous(), dst=dst)
    hops.send_hidden(hidden, dst)


class StageWorker:
    """Shards 1..N-1: receive a step, run the layers, pass it on (or sample, on the last shard)."""

    def __init__(self, model: DecoderShard, rank: int, world: int, hops: Hops | None = None):
        self.model, self.rank, self.world = model, rank, world
        self.hops = hops or Hops(model.device)
        self.caches: dict[int, SequenceCache] = {}
        self.samplers: dict[int, Sampler] = {}

    def run(self) -> None:
        header = torch.empty(HEADER_LEN, dtype=torch.long)
        while True:
            dist.recv(header, src=self.rank - 1)
            op, n, tokens, n_release = (int(x) for x in header)
            if op == OP_STOP:
                if self.rank + 1 < self.world:
                    dist.send(header, dst=self.rank + 1)
                log.info("pipeline stopped", extra={"rank": self.rank})
                return
            if op == OP_NOOP:
                if self.rank + 1 < self.world:
                    dist.send(header, dst=self.rank + 1)
                continue
            table, hidden = self._recv_step(n, tokens, n_release)
            self._step(table, hidden)

    def _recv_step(self, n: int, tokens: int, n_release: int) -> tuple[StepTable, torch.Tensor]:
        ints, floats = torch.empty(n, SEGMENT_COLS, dtype=torch.long), torch.empty(n, 2, dtype=torch.float64)
        releases = torch.empty(n_release, dtype=torch.long)
        src = self.rank - 1
        dist.recv(ints, src=src)
        dist.recv(floats, src=src)
        if n_release:
            dist.recv(releases, src=src)
        hidden = self.hops.recv_hidden((tokens, self.model.cfg.hidden_size), self.model.dtype, src)
        return StepTable(ints, floats, releases), hidden

    @torch.inference_mode()
    def _step(self, table: StepTable, hidden: torch.Tensor) -> None:
        for sid in table.releases.tolist():
            self.caches.pop(sid, None)
            self.samplers.pop(sid, None)
        rows = table.ints.tolist()
        for (sid, start, _, capacity, seed, _, draws), (temperature, top_p) in zip(rows, table.floats.tolist()):
            if start == 0:  # a sequence's first step: its cache (and, on the last shard, its sampler)
                self.caches[sid] = self.model.new_cache(capacity)
                if self.model.is_last:  # a migrated request's sampler resumes at its draw count
                    self.samplers[sid] = Sampler(SamplingParams(max_tokens=1, temperature=temperature,
                                                                top_p=top_p, seed=seed), draws)
        hidden, failed = forward_isolating(self.model, hidden, table.segments(self.caches))
        for i in failed:
            log.error("request failed on this shard", extra={"rank": self.rank, "seq": rows[i][0],
                                                              "error": failed[i]})
            table.ints[i, 5] = 1
        if not self.model.is_last:
            _send_step(self.rank + 1, table.ints, table.floats, table.releases, hidden, self.hops)
            return
        ends = to_device(table.ints[:, 2].cumsum(0) - 1, device=hidden.device)
        logits = self.model.logits(hidden[ends])  # [B, V]
        results = sample_rows([self.samplers[row[0]] for row in rows], logits)
        tokens = []
        for row, flagged, result in zip(rows, table.ints[:, 5].tolist(), results):
            if isinstance(result, str) and not flagged:
                log.error("request failed on this shard", extra={"rank": self.rank, "seq": row[0], "error": result})
            tokens.append(FAILED if flagged or isinstance(result, str) else result)
        dist.send(torch.tensor(tokens, dtype=torch.long), dst=0)  # [B]

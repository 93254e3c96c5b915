"""Pipeline shards linked by torch.distributed (gloo on CPU; NCCL between GPUs): shard 0 schedules and embeds, every
shard runs its layers with its own KV caches, the last one applies norm + lm_head and samples.

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
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from backbone.isolation import forward_isolating
from backbone.model import DecoderShard, Segment, SequenceCache
from backbone.sampling import Sampler, sample_rows
from router.messages import SamplingParams

log = logging.getLogger(__name__)

OP_STEP, OP_NOOP, OP_STOP = 1, 2, 3
HEADER_LEN = 4  # op, segments, tokens, releases
SEGMENT_COLS = 7  # seq id, start, length, capacity, seed, failed (0/1), draws made (the sampler's counter)
FAILED = -1  # the token id the last shard answers for a row that failed
NOOP_EVERY_S = 5.0


def init_group(url: str, rank: int, world: int, timeout_s: float = 120.0) -> None:
    # gloo with host staging (hidden states go through host memory between shards), whatever the shards' devices:
    # right for shards on CPUs or sharing one GPU. Device-to-device NCCL hops between GPUs are not built yet.
    backend = "gloo"
    dist.init_process_group(backend, init_method=url, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    log.info("pipeline group ready", extra={"rank": rank, "world": world, "backend": backend})


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
    releases: list[int] = field(default_factory=list)
    last_send: float = 0.0

    def run_rest(self, ints: torch.Tensor, floats: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Send the step down the pipe; returns the last shard's sampled ids [B] (FAILED for a failed row)."""
        releases = torch.tensor(self.releases, dtype=torch.long)
        self.releases.clear()
        _send_step(1, ints, floats, releases, hidden)
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


def _send_step(dst: int, ints, floats, releases, hidden) -> None:
    dist.send(torch.tensor([OP_STEP, ints.shape[0], hidden.shape[0], releases.numel()], dtype=torch.long), dst=dst)
    dist.send(ints.contiguous(), dst=dst)
    dist.send(floats.contiguous(), dst=dst)
    if releases.numel():
        dist.send(releases.contiguous(), dst=dst)
    dist.send(hidden.contiguous().cpu(), dst=dst)  # host staging (gloo)


class StageWorker:
    """Shards 1..N-1: receive a step, run the layers, pass it on (or sample, on the last shard)."""

    def __init__(self, model: DecoderShard, rank: int, world: int):
        self.model, self.rank, self.world = model, rank, world
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
        hidden = torch.empty(tokens, self.model.cfg.hidden_size, dtype=self.model.dtype)
        src = self.rank - 1
        dist.recv(ints, src=src)
        dist.recv(floats, src=src)
        if n_release:
            dist.recv(releases, src=src)
        dist.recv(hidden, src=src)
        return StepTable(ints, floats, releases), hidden.to(self.model.device)

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
            _send_step(self.rank + 1, table.ints, table.floats, table.releases, hidden)
            return
        ends = (table.ints[:, 2].cumsum(0) - 1).to(hidden.device)
        logits = self.model.logits(hidden[ends])  # [B, V]
        results = sample_rows([self.samplers[row[0]] for row in rows], logits)
        tokens = []
        for row, flagged, result in zip(rows, table.ints[:, 5].tolist(), results):
            if isinstance(result, str) and not flagged:
                log.error("request failed on this shard", extra={"rank": self.rank, "seq": row[0], "error": result})
            tokens.append(FAILED if flagged or isinstance(result, str) else result)
        dist.send(torch.tensor(tokens, dtype=torch.long), dst=0)  # [B]

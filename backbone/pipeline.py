"""Pipeline shards linked by torch.distributed: shard 0 schedules and embeds, every shard runs its layers with its own
paged KV pool, the last one applies norm + lm_head and samples.

Hops (:class:`Hops`): the control messages (header, step table, block tables, the sampled ids) are small host tensors
over gloo. Hidden states go device to device over NCCL when every shard runs on its own GPU; when any shard runs on a
CPU, or two share a GPU (NCCL cannot link a GPU to itself), they go over gloo staged through host memory. The shards
agree on it at start-up by exchanging their devices' UUIDs. The NCCL path has not run yet (only single-GPU machines
were at hand): it is marked unverified in docs/architecture.md.

Every shard's pool has the same number of blocks (the smallest any shard can hold: :func:`agree_blocks`) and shard 0
owns the block tables, so the other shards keep no per-request state. Per step, shard 0 sends down the pipe a
header, a table describing the step's rows (which sequence, which positions, its sampling parameters and draw count,
whether to sample it), each row's block table and the hidden states [T, H]; each middle shard forwards them after
its layers; the last shard sends back one answer per row [B]: the sampled token, NO_TOKEN for a prefill chunk that
does not end its prompt, FAILED for a row that failed. Sends are queued (isend), so shard 0 may have several steps in
flight (its engine's micro-batches, backbone/engine.py): every shard runs them, and the answers come back, in the
order sent. A row that failed on any shard (backbone/isolation.py) is
flagged in the table as it travels on, so one request's fault fails that request alone on every shard. Shard 0 sends
a no-op when idle (so a silent pipe means a dead shard 0 and the others exit after ``timeout_s``) and a stop when it
exits. A shard other than 0 told to stop asks shard 0 to drain the replica (:class:`DrainLink`).
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
from backbone.model import DecoderShard, Segment
from backbone.sampling import Drawn, results, sample_params
from backbone.staging import ToHost, to_device

log = logging.getLogger(__name__)

OP_STEP, OP_NOOP, OP_STOP = 1, 2, 3
HEADER_LEN = 4  # op, rows, tokens, block-table width
SEGMENT_COLS = 7  # seq id, start, length, seed, failed (0/1), draws made (the sampler's counter), sample (0/1)
FAILED = -1  # the token id the last shard answers for a row that failed
NO_TOKEN = -2  # ... for a row it did not sample (a prefill chunk that does not reach the prompt's end)
NOOP_EVERY_S = 5.0


@dataclass
class Hops:
    """How hidden states travel to the next shard: over ``nccl`` (a group of GPU shards, device tensors) or, with
    ``nccl`` None, over the default gloo group staged through pinned host memory. Over gloo the device-to-host copy
    is queued without waiting (:class:`backbone.staging.ToHost`) and the send is posted once the copy is done, at the
    latest before the next message this shard sends or waits for (:meth:`flush`): gloo reads a host buffer and
    knows nothing of CUDA streams, and messages to one peer must be posted in order. So shard 0 schedules its next
    micro-batch while the device still computes this one."""

    device: torch.device
    nccl: object | None = None
    share: int = 1  # shards of this replica on this shard's GPU (itself included): they split its memory
    pending: "_StagedSend | None" = None  # hidden states whose copy to the host is queued, not yet posted

    @property
    def backend(self) -> str:
        return "nccl" if self.nccl is not None else "gloo"

    def isend_hidden(self, hidden: torch.Tensor, dst: int, keep: list) -> object:
        """Queue the hidden states to ``dst``; the tensor sent is appended to ``keep`` (alive until the send
        completes). Over gloo the send is posted by :meth:`flush` (or by waiting for the work returned)."""
        if self.nccl is not None:
            keep.append(hidden.contiguous())
            return dist.isend(keep[-1], dst=dst, group=self.nccl)
        self.flush()
        self.pending = _StagedSend(ToHost(hidden.contiguous()), dst)
        keep.append(self.pending)
        return self.pending

    def flush(self) -> None:
        """Post the hidden states queued for the host, once their copy is done: before any other message."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.post()

    def recv_hidden(self, shape: tuple[int, int], dtype: torch.dtype, src: int) -> torch.Tensor:
        if self.nccl is not None:
            buf = torch.empty(shape, dtype=dtype, device=self.device)
            dist.recv(buf, src=src, group=self.nccl)
            return buf
        buf = torch.empty(shape, dtype=dtype, pin_memory=self.device.type == "cuda")
        dist.recv(buf, src=src)
        return to_device(buf, device=self.device)


class _StagedSend:
    """A gloo send of a tensor whose copy to the host is queued: posted (the copy waited for) by :meth:`post`,
    :meth:`wait` waits for the send too."""

    def __init__(self, staged: ToHost, dst: int):
        self.staged, self.dst, self.work = staged, dst, None

    def post(self) -> None:
        if self.work is None:
            self.work = dist.isend(self.staged.wait(), dst=self.dst)

    def wait(self) -> None:
        self.post()
        self.work.wait()


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
    identities = [tuple(t.tolist()) for t in everyone]
    backend = hop_backend(identities, dist.is_nccl_available())
    share = identities.count(identities[rank]) if identities[rank][0] == 1 else 1
    hops = Hops(device, dist.new_group(backend="nccl", timeout=timeout) if backend == "nccl" else None, share)
    log.info("pipeline group ready", extra={"rank": rank, "world": world, "hidden_states_over": backend,
                                            "device": str(device)})
    return hops


DRAIN_KEY = "tributary/drain"  # set in the replica's rendezvous store by a shard told to stop
BEAT_KEY = "tributary/beat/{rank}"  # counted up each second by shard ``rank`` > 0 (its process runs)
PEER_SILENT_S = 10.0  # a shard whose count has not moved for this long is presumed frozen or gone


class DrainLink:
    """How a shard other than 0, told to stop (SIGTERM), has its whole replica drain: only shard 0 can (it holds
    the requests; the others only follow the pipe), so the shard sets a key in the replica's rendezvous store
    (``--dist-url``'s TCPStore, hosted by shard 0) and goes on serving; shard 0 polls the key, drains (finishes or
    hands back its requests) and sends the stop down the pipe, which ends every shard. Each side uses a store client
    of its own, so the pipe's traffic and these checks never share a connection."""

    def __init__(self, url: str, timeout_s: float = 10.0):
        host, _, port = url.removeprefix("tcp://").rpartition(":")
        host = host.removeprefix("[").removesuffix("]")  # tcp://[::1]:29500
        self.store = dist.TCPStore(host, int(port), None, is_master=False, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))

    def request(self, rank: int) -> None:
        self.store.set(DRAIN_KEY, str(rank))
        log.info("asked shard 0 to drain the replica", extra={"rank": rank})

    def requested(self) -> bool:
        return self.store.check([DRAIN_KEY])

    def beat(self, rank: int) -> None:
        self.store.add(BEAT_KEY.format(rank=rank), 1)

    def beats(self, world: int) -> list[int]:
        """Each other shard's count of beats (0 for one that has not beaten yet)."""
        return [self.store.add(BEAT_KEY.format(rank=rank), 0) for rank in range(1, world)]


class Peers:
    """Shard 0's view of the other shards' processes, from their beats in the replica's store: one that is frozen
    (stopped, swapped out, a hung host) sends nothing and answers nothing, and shard 0 waits on the pipe for its
    ``--pipeline-timeout`` (120 s) while its own loop looks merely busy. Its heartbeat goes on meanwhile, so gateways
    kept counting the replica as live, routed new requests to it and moved its requests only at their token timeout,
    and ``tributary up`` killed it only once the loop's stall timeout had passed (70-100 s in an outside tester's
    runs). Shard 0's heartbeat now stops while a shard is silent (:meth:`ok`): its requests move to another replica
    and the watchdog restarts the replica, as for a frozen single-shard worker."""

    def __init__(self, world: int, silent_s: float = PEER_SILENT_S):
        self.world, self.silent_s = world, silent_s
        self._last: list[int] | None = None
        self._since = [time.monotonic()] * (world - 1)  # when each shard's count last moved (or the watch began)
        self.silent: int | None = None  # the first shard found silent, or None

    def observe(self, beats: list[int], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        last, self._last = self._last, beats
        for i, count in enumerate(beats):
            if last is None or count != last[i]:
                self._since[i] = now
        silent = next((i + 1 for i, t in enumerate(self._since) if now - t > self.silent_s), None)
        if silent != self.silent:
            if silent is not None:
                log.error("a pipeline shard has been silent for %.0f s (frozen or gone): this replica stops "
                          "heartbeating, so its requests move elsewhere and it is restarted", self.silent_s,
                          extra={"shard": silent})
            else:
                log.warning("every pipeline shard beats again", extra={"shard": self.silent})
        self.silent = silent

    def ok(self) -> bool:
        return self.silent is None


def watch_drain(link_factory, stop, every_s: float = 1.0, rank: int = 0, peers: Peers | None = None):
    """A daemon thread: on shard 0, set ``stop`` once another shard asked for a drain, and follow the other
    shards' beats (``peers``); on another shard, beat each ``every_s`` and ask for the drain once ``stop`` is set.
    ``link_factory()`` makes the :class:`DrainLink` (in the thread: the store may take a moment); a link that fails
    is made again at the next turn."""
    import threading

    def run() -> None:
        link, failing = None, False
        while True:
            try:
                link = link or link_factory()
                if rank == 0:
                    if stop.wait(every_s):
                        return
                    if link.requested():
                        log.info("a shard asked for a drain: draining the replica")
                        stop.set()
                    if peers is not None:
                        peers.observe(link.beats(peers.world))
                else:
                    if stop.wait(every_s):
                        link.request(rank)
                        return
                    link.beat(rank)
                failing = False
            except Exception as exc:  # noqa: BLE001 -- the store gone (shard 0 exited): the pipe's timeout ends us
                if not failing:
                    log.warning("the replica's store does not answer: this shard stops when shard 0 does, or its "
                                "pipe times out", extra={"rank": rank, "error": f"{type(exc).__name__}: {exc}"})
                failing, link = True, None
                if stop.wait(every_s):
                    return

    thread = threading.Thread(target=run, name="drain-link", daemon=True)
    thread.start()
    return thread


def agree_blocks(blocks: int) -> int:
    """The replica's pool size: the smallest any shard can hold (a block id must be valid on every shard)."""
    t = torch.tensor([blocks], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


@dataclass
class StepTable:
    """What one step is about: rows of (seq id, start, length, seed, failed, draws, sample) + (temperature, top_p),
    and each row's block table (padded with 0 to the widest)."""

    ints: torch.Tensor  # [n, SEGMENT_COLS] int64
    floats: torch.Tensor  # [n, 2] float64
    tables: torch.Tensor  # [n, width] int64

    def segments(self, block_size: int) -> list[Segment]:
        out = []
        for (_, start, length, *_), table in zip(self.ints.tolist(), self.tables.tolist()):
            out.append(Segment(table[: -(-(start + length) // block_size)], start, length))
        return out


def block_tables(segments: list[Segment]) -> torch.Tensor:
    width = max(1, max(len(g.blocks) for g in segments))
    return torch.tensor([g.blocks + [0] * (width - len(g.blocks)) for g in segments], dtype=torch.long)


@dataclass
class Sent:
    """A step sent down the pipe: its sends (the tensors they read stay referenced until they complete)."""

    rows: int
    works: list = field(default_factory=list)
    tensors: list = field(default_factory=list)

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works, self.tensors = [], []


@dataclass
class PipelineHead:
    """Shard 0's end of the pipe: its engine sends each step with :meth:`send` instead of sampling locally, and
    collects the last shard's answers with :meth:`answers`, in the order sent (several steps may be in flight)."""

    world: int
    hops: Hops = field(default_factory=lambda: Hops(torch.device("cpu")))
    last_send: float = 0.0

    def send(self, ints: torch.Tensor, floats: torch.Tensor, segments: list[Segment], hidden: torch.Tensor) -> Sent:
        """Send a step down the pipe without waiting for it to arrive."""
        sent = _send_step(1, StepTable(ints, floats, block_tables(segments)), hidden, self.hops)
        self.last_send = time.monotonic()
        return sent

    def answers(self, sent: Sent) -> torch.Tensor:
        """The last shard's answer per row of a step sent [B]: a token, NO_TOKEN for a row not sampled (a prefill
        chunk), FAILED for a row that failed. Steps are answered in the order they were sent."""
        self.hops.flush()  # the last shard answers once every shard had the step
        tokens = torch.empty(sent.rows, dtype=torch.long)
        dist.recv(tokens, src=self.world - 1)
        sent.wait()  # the step reached the last shard: its sends are long done
        return tokens

    def keepalive(self) -> None:
        if time.monotonic() - self.last_send >= NOOP_EVERY_S:
            self.hops.flush()
            dist.send(torch.tensor([OP_NOOP, 0, 0, 0], dtype=torch.long), dst=1)
            self.last_send = time.monotonic()

    def stop(self) -> None:
        self.hops.flush()
        dist.send(torch.tensor([OP_STOP, 0, 0, 0], dtype=torch.long), dst=1)


def _send_step(dst: int, table: StepTable, hidden, hops: Hops) -> Sent:
    """Queue a step's messages to ``dst`` (isend: the sender goes on computing while they travel)."""
    hops.flush()  # the step before's hidden states go first
    header = torch.tensor([OP_STEP, table.ints.shape[0], hidden.shape[0], table.tables.shape[1]], dtype=torch.long)
    tensors = [header, table.ints.contiguous(), table.floats.contiguous(), table.tables.contiguous()]
    sent = Sent(table.ints.shape[0], [dist.isend(t, dst=dst) for t in tensors], tensors)
    sent.works.append(hops.isend_hidden(hidden, dst, sent.tensors))
    return sent


class StageWorker:
    """Shards 1..N-1: receive a step, run the layers, pass it on (or sample, on the last shard). Stateless but for
    the KV pool: every row carries its block table and its sampling parameters and draw count."""

    def __init__(self, model: DecoderShard, rank: int, world: int, hops: Hops | None = None):
        if model.pool is None:
            raise ValueError("the shard has no KV pool (DecoderShard.allocate_pool)")
        self.model, self.rank, self.world = model, rank, world
        self.hops = hops or Hops(model.device)
        self.sent: Sent | None = None  # the previous step's sends, completed before the next ones are queued
        self.busy_since: float | None = None  # when the step in hand began (None: waiting for the next one)

    def live(self, stall_s: float) -> bool:
        """This shard's ``/live`` (router/metrics.py): waiting for a step is live however long it lasts (the
        replica may be idle); a step in hand (its receives, layers and sends) for more than ``stall_s`` is not."""
        since = self.busy_since
        return since is None or time.monotonic() - since <= stall_s

    def run(self) -> None:
        header = torch.empty(HEADER_LEN, dtype=torch.long)
        while True:
            self.busy_since = None
            dist.recv(header, src=self.rank - 1)
            self.busy_since = time.monotonic()
            op, n, tokens, width = (int(x) for x in header)
            if op in (OP_STOP, OP_NOOP) and self.sent is not None:
                self.sent.wait()  # in order behind the step before
            if op == OP_STOP:
                if self.rank + 1 < self.world:
                    dist.send(header, dst=self.rank + 1)
                log.info("pipeline stopped", extra={"rank": self.rank})
                return
            if op == OP_NOOP:
                if self.rank + 1 < self.world:
                    dist.send(header, dst=self.rank + 1)
                continue
            table, hidden = self._recv_step(n, tokens, width)
            self._step(table, hidden)

    def _recv_step(self, n: int, tokens: int, width: int) -> tuple[StepTable, torch.Tensor]:
        table = StepTable(torch.empty(n, SEGMENT_COLS, dtype=torch.long), torch.empty(n, 2, dtype=torch.float64),
                          torch.empty(n, width, dtype=torch.long))
        src = self.rank - 1
        dist.recv(table.ints, src=src)
        dist.recv(table.floats, src=src)
        dist.recv(table.tables, src=src)
        hidden = self.hops.recv_hidden((tokens, self.model.cfg.hidden_size), self.model.dtype, src)
        return table, hidden

    @torch.inference_mode()
    def _step(self, table: StepTable, hidden: torch.Tensor) -> None:
        rows = table.ints.tolist()
        segments = table.segments(self.model.pool.block_size)
        params = []  # the last shard samples: each row's (temperature, top_p, seed, draws)
        if self.model.is_last:
            floats = table.floats.tolist()
            params = [(*floats[i], row[3], row[5]) for i, row in enumerate(rows)]
        # Every row sampled here: the head's graph samples too.
        every = params if self.model.is_last and all(row[6] for row in rows) else None
        decoded = self.model.decode(segments, hidden=hidden, params=every)  # a CUDA graph's step, if it can
        if isinstance(decoded, Drawn):
            self._answer(rows, [FAILED if row[4] else t for row, t in zip(rows, results(decoded.both.tolist()))])
            return
        if decoded is not None:
            hidden, failed = decoded, {}
        else:
            hidden, failed = forward_isolating(self.model, hidden, segments)
        for i in failed:
            log.error("request failed on this shard", extra={"rank": self.rank, "seq": rows[i][0],
                                                              "error": failed[i]})
            table.ints[i, 4] = 1
        if self.sent is not None:
            self.sent.wait()
        if not self.model.is_last:
            self.sent = _send_step(self.rank + 1, table, hidden, self.hops)
            self.hops.flush()  # nothing else for this shard to do meanwhile: the next shard waits for them
            return
        flagged = table.ints[:, 4].tolist()
        pick = [i for i, row in enumerate(rows) if row[6] and not flagged[i]]
        tokens = [FAILED if flagged[i] else NO_TOKEN for i in range(len(rows))]
        if pick:
            ends = to_device((table.ints[:, 2].cumsum(0) - 1)[pick], device=hidden.device)
            for i, result in zip(pick, sample_params([params[i] for i in pick], self.model.logits(hidden[ends]))):
                tokens[i] = result
        self._answer(rows, tokens)

    def _answer(self, rows: list[list[int]], tokens: list[int | str]) -> None:
        """Send the step's answers back to shard 0: a token, NO_TOKEN, or FAILED (a reason is logged here)."""
        if self.sent is not None:
            self.sent.wait()  # the previous step's answers went out (a no-op once waited)
        for row, result in zip(rows, tokens):
            if isinstance(result, str):
                log.error("request failed on this shard", extra={"rank": self.rank, "seq": row[0], "error": result})
        answer = torch.tensor([FAILED if isinstance(t, str) else t for t in tokens], dtype=torch.long)  # [B]
        self.sent = Sent(len(tokens), [dist.isend(answer, dst=0)], [answer])

"""CUDA graphs for decode steps ([cuda-graphs]).

At small batch a decode step of a 1B-7B model is a few milliseconds of HBM reads, while eager PyTorch launches about
fifteen kernels per layer from Python: the launches, not the reads, set the pace. One graph per batch-size bucket
replays a shard's whole decode step (the embedding on the first shard, then every layer) as one launch. The final
norm, lm_head and sampling stay eager: sampling is per request (its own seed and draw count).

Why graphs and not ``torch.compile``: the one data-dependent part of a step, attention over each sequence's context,
is the Triton paged kernel (backbone/attention.py), which reads lengths and block tables from device memory. So a
decode step has static shapes for a given batch size, which is all CUDA graphs need. ``torch.compile`` would add a
compile per bucket at start-up, minutes for a 7B model, plus recompiles on its shape guards; its ``reduce-overhead``
mode records these same graphs.

Static buffers: one device buffer holds every per-step input for the largest bucket: token ids, positions, KV slots,
starts, lengths, offsets, the kernel's tiles and the block tables. Each bucket's graph reads the first rows. A step
writes a pinned host copy (two, used in turn) and sends it in ONE asynchronous copy, then replays. A batch is padded
to its bucket with rows at position 0 that attend to, and write, only the pool's padding block (backbone/kv.py).

Capture runs at start-up, largest bucket first, with all buckets sharing one memory pool; its time and memory are
logged. Only pure decode steps replay a graph, and only when every sequence's last input is a generated token;
prefill chunks, and steps larger than the largest bucket, run eagerly. ``--eager`` turns graphs off, and CPUs always
run eagerly. The static-buffer path also runs uncaptured (``capture=False``): the CPU tests exercise the padding and
the buffers that way, with the Triton kernel under its interpreter.
"""

from __future__ import annotations

import logging
import time

import torch

from backbone.attention import Segment, StepMeta, TritonAttention
from router.progress import Progress

log = logging.getLogger(__name__)

GRAPH_TOL = 1e-2  # a replay runs the eager step's kernels on the same inputs: anything beyond rounding is a fault
FIELDS = ("ids", "positions", "slots", "starts", "lengths", "offsets", "tile_seg", "tile_off")


def buckets_up_to(n: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every multiple of 16, up to and including ``n``."""
    if n < 1:
        raise ValueError("the largest decode batch must be >= 1")
    out = {b for b in (1, 2, 4, 8) if b < n} | set(range(16, n, 16)) | {n}
    return sorted(out)


class DecodeGraphs:
    def __init__(self, model, max_batch: int, max_context: int, capture: bool | None = None):
        if model.pool is None:
            raise ValueError("the shard has no KV pool yet (DecoderShard.allocate_pool)")
        if not isinstance(model.attention, TritonAttention):
            raise ValueError(f"decode graphs need the Triton attention backend, not {model.attention.name}")
        self.model, self.pool = model, model.pool
        self.bs = self.pool.block_size
        self.width = -(-max_context // self.bs)  # block-table columns: a whole context
        self.buckets = buckets_up_to(max_batch)
        self.max_batch = n = self.buckets[-1]
        self.captured = model.device.type == "cuda" if capture is None else capture
        size = len(FIELDS) * n + n * self.width
        pin = model.device.type == "cuda"
        self.host = [torch.zeros(size, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self.sent: list[torch.cuda.Event | None] = [None, None]  # the copy out of each host buffer
        self.turn = 0
        self.dev = torch.zeros(size, dtype=torch.long, device=model.device)
        self.hidden_in = None if model.is_first else torch.zeros(n, model.cfg.hidden_size, dtype=model.dtype,
                                                                  device=model.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.replays = dict.fromkeys(self.buckets, 0)  # steps run per bucket
        for host in self.host:
            self._pad(host.numpy(), 0, n)

    # -- buffers ------------------------------------------------------------------------------------------------

    def _field(self, buf, name: str, rows: int):
        n = self.max_batch
        i = FIELDS.index(name)
        return buf[i * n : i * n + rows]

    def _tables(self, buf):
        return buf[len(FIELDS) * self.max_batch :].reshape(self.max_batch, self.width)

    def _pad(self, h, a: int, b: int) -> None:
        """Rows [a, b) of host buffer ``h`` (NumPy) become padding: position 0 of the padding block."""
        rows = range(a, b)
        for name, values in (("ids", 0), ("positions", 0), ("slots", self.pool.padding_block * self.bs),
                             ("starts", 0), ("lengths", 1), ("tile_off", 0)):
            self._field(h, name, self.max_batch)[a:b] = values
        self._field(h, "offsets", self.max_batch)[a:b] = rows
        self._field(h, "tile_seg", self.max_batch)[a:b] = rows
        self._tables(h)[a:b, 0] = self.pool.padding_block

    def _meta(self, b: int) -> StepMeta:
        """Bucket ``b``'s step description: views of the static device buffer (the Triton backend's layout)."""
        v = {name: self._field(self.dev, name, b) for name in FIELDS}
        tables = self._tables(self.dev)[:b]
        return StepMeta(v["positions"], v["slots"], {
            "tables": tables, "starts": v["starts"], "lengths": v["lengths"], "offsets": v["offsets"],
            "tile_seg": v["tile_seg"], "tile_off": v["tile_off"], "block_m": 16, "block_size": self.bs})

    def _body(self, b: int) -> torch.Tensor:
        """The step as captured: bucket ``b``'s rows through this shard's layers -> hidden [b, H]."""
        if self.model.is_first:
            hidden = self.model.embed(self._field(self.dev, "ids", b))
        else:
            hidden = self.hidden_in[:b]
        return self.model.forward(hidden, [], self._meta(b))

    # -- use ----------------------------------------------------------------------------------------------------

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def fits(self, segments: list[Segment]) -> bool:
        """Whether a step can replay a graph: decodes only (one new token each), no more than the largest bucket."""
        return 0 < len(segments) <= self.max_batch and all(
            s.length == 1 and s.start < self.width * self.bs for s in segments)

    @torch.inference_mode()
    def run(self, segments: list[Segment], ids: list[int] | None = None, hidden: torch.Tensor | None = None
            ) -> torch.Tensor:
        """One decode step (``fits``) -> hidden [len(segments), H]: ``ids`` the tokens at the segments' positions
        (first shard), or ``hidden`` [len(segments), H] from the previous shard."""
        n, b = len(segments), self.bucket(len(segments))
        turn = self.turn
        if self.sent[turn] is not None:
            self.sent[turn].synchronize()  # the copy out of this buffer two steps ago (long done)
        h = self.host[turn].numpy()
        bs = self.bs
        positions = [s.start for s in segments]
        self._field(h, "ids", n)[:] = ids if ids is not None else 0
        self._field(h, "positions", n)[:] = positions
        self._field(h, "starts", n)[:] = positions
        self._field(h, "slots", n)[:] = [s.blocks[p // bs] * bs + p % bs for s, p in zip(segments, positions)]
        self._field(h, "lengths", n)[:] = 1
        self._field(h, "offsets", n)[:] = range(n)
        self._field(h, "tile_seg", n)[:] = range(n)
        self._field(h, "tile_off", n)[:] = 0
        tables = self._tables(h)
        for i, s in enumerate(segments):
            tables[i, : len(s.blocks)] = s.blocks
        self._pad(h, n, b)
        if self.captured:
            self.dev.copy_(self.host[turn], non_blocking=True)
            self.sent[turn] = torch.cuda.Event()
            self.sent[turn].record()
        else:
            self.dev.copy_(self.host[turn])
        self.turn = 1 - turn
        if hidden is not None:
            self.hidden_in[:n].copy_(hidden)
        self.replays[b] += 1
        if b in self.graphs:
            self.graphs[b].replay()
            out = self.outputs[b]
        else:
            out = self._body(b)
        return out[:n].clone()  # the graph's output is overwritten by the next replay

    @torch.inference_mode()
    def capture(self) -> dict:
        """Record one graph per bucket (largest first, one shared memory pool); returns what it took."""
        if not self.captured:
            return {"buckets": [], "seconds": 0.0, "memory_mib": 0.0}
        device = self.model.device
        t0 = time.perf_counter()
        torch.cuda.synchronize(device)
        free0 = torch.cuda.mem_get_info(device)[0]
        self.dev.copy_(self.host[0])  # every row padding
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks its kernels, the rotary moves over
            for b in reversed(self.buckets):
                self._body(b)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        mempool = torch.cuda.graph_pool_handle()
        progress = Progress("capturing decode CUDA graphs", len(self.buckets), extra={"device": str(device)})
        for b in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                self.outputs[b] = self._body(b)
            self.graphs[b] = graph
            progress.advance()
        progress.done()
        torch.cuda.synchronize(device)
        took = {"buckets": self.buckets, "seconds": round(time.perf_counter() - t0, 2),
                "memory_mib": round((free0 - torch.cuda.mem_get_info(device)[0]) / 2**20, 1)}
        took["replay_vs_eager"] = self.self_check()
        log.info("captured decode CUDA graphs", extra=took)
        return took

    @torch.inference_mode()
    def self_check(self) -> float:
        """The largest bucket replayed against the same step run eagerly, on made-up inputs (every row at position 0
        of the padding block, so no sequence's KV is touched): the largest deviation relative to the output's scale.
        Raises if it exceeds GRAPH_TOL (a capture that went wrong is refused, not served)."""
        b, h = self.max_batch, self.host[0].numpy()
        self._pad(h, 0, b)
        self._field(h, "ids", b)[:] = [1 + i % (self.model.cfg.vocab_size - 1) for i in range(b)]
        self.dev.copy_(self.host[0])
        if self.hidden_in is not None:
            self.hidden_in.normal_()
        if b in self.graphs:
            self.graphs[b].replay()
        got = self.outputs[b].clone() if b in self.graphs else self._body(b)
        want = self._body(b)
        self._field(h, "ids", b)[:] = 0
        err = float((got.float() - want.float()).abs().max()) / max(1.0, float(want.float().abs().max()))
        if not err <= GRAPH_TOL:
            raise RuntimeError(f"the decode graph's replay deviates from the eager step by {err:.3g}")
        return err

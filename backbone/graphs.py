"""CUDA graphs for decode steps ([cuda-graphs]).

At small batch a decode step of a 1B-7B model is a few milliseconds of HBM reads, while eager PyTorch launches about
fifteen kernels per layer from Python: the launches, not the reads, set the pace. One graph per batch-size bucket
replays a shard's whole decode step (the embedding on the first shard, then every layer) as one launch. On the last
shard a second graph per bucket replays the head: the final norm, lm_head and the batched sampler
(backbone/sampling.py), whose per-row parameters (temperature, top_p, seed, draw) are static buffers like the rest.
The sampler has three graphs per bucket: greedy (argmax only), random (temperature and the noise over the
vocabulary) and random with nucleus (top_p's sort over the vocabulary too); the host picks one from the rows'
parameters, as the eager sampler skips the random work for greedy steps and the sort when no row truncates. A
step's only host sync is then the copy of its tokens.

Why graphs and not ``torch.compile``: the one data-dependent part of a step, attention over each sequence's context,
is the Triton paged kernel (backbone/attention.py), which reads lengths and block tables from device memory. So a
decode step has static shapes for a given batch size, which is all CUDA graphs need. ``torch.compile`` would add a
compile per bucket at start-up, minutes for a 7B model, plus recompiles on its shape guards; its ``reduce-overhead``
mode records these same graphs.

Static buffers: one device buffer holds every per-step input for the largest bucket: token ids, positions, KV slots,
starts, lengths, offsets, the kernel's tiles, the sampling parameters (floats stored as their float64 bits) and the
block tables. Each bucket's graph reads the first rows. A step writes a pinned host copy (two, used in turn) and
sends it in ONE asynchronous copy (the fields and its bucket's table rows), then replays. A batch is padded to its
bucket with rows at position 0 that attend to, and write, only the pool's padding block (backbone/kv.py).

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
from backbone.sampling import GREEDY_BELOW, Drawn, sample_batch
from router.progress import Progress

log = logging.getLogger(__name__)

HEAD_GREEDY, HEAD_RANDOM, HEAD_NUCLEUS = 0, 1, 2  # the head's graphs: argmax; + temperature and noise; + top_p's sort
HEADS = {HEAD_GREEDY: "greedy", HEAD_RANDOM: "random", HEAD_NUCLEUS: "random with nucleus"}
GRAPH_TOL = 1e-2  # a replay runs the eager step's kernels on the same inputs: anything beyond rounding is a fault
FIELDS = ("ids", "positions", "slots", "starts", "lengths", "offsets", "tile_seg", "tile_off", "seeds", "draws",
          "temperature", "top_p")  # the last two: float64 bits


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
        self.heads: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (bucket, HEAD_*) -> the head's graph
        self.head_outputs: dict[tuple[int, int], torch.Tensor] = {}  # ... its [2, bucket]: tokens, status
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
                             ("starts", 0), ("lengths", 1), ("tile_off", 0), ("seeds", 0), ("draws", 0),
                             ("temperature", 0), ("top_p", 0)):  # 0 is 0.0's bits: greedy
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
            "tile_seg": v["tile_seg"], "tile_off": v["tile_off"], "block_m": 16, "block_size": self.bs,
            "decode": True})

    def _body(self, b: int) -> torch.Tensor:
        """The step as captured: bucket ``b``'s rows through this shard's layers -> hidden [b, H]."""
        if self.model.is_first:
            hidden = self.model.embed(self._field(self.dev, "ids", b))
        else:
            hidden = self.hidden_in[:b]
        return self.model.forward(hidden, [], self._meta(b))

    def _head(self, hidden: torch.Tensor, b: int, kind: int) -> torch.Tensor:
        """The head as captured (``kind``: HEAD_GREEDY, HEAD_RANDOM or HEAD_NUCLEUS): hidden [b, H] -> [2, b] int64,
        each row's token and sampling status."""
        temperature, top_p = (self._field(self.dev, name, b).view(torch.float64).float()
                              for name in ("temperature", "top_p"))
        tokens, status = sample_batch(self.model.logits(hidden), temperature, top_p, self._field(self.dev, "seeds", b),
                                      self._field(self.dev, "draws", b), kind != HEAD_GREEDY, kind == HEAD_NUCLEUS)
        return torch.stack([tokens, status.to(torch.int64)])

    # -- use ----------------------------------------------------------------------------------------------------

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def fits(self, segments: list[Segment]) -> bool:
        """Whether a step can replay a graph: decodes only (one new token each), no more than the largest bucket."""
        return 0 < len(segments) <= self.max_batch and all(
            s.length == 1 and s.start < self.width * self.bs for s in segments)

    @property
    def samples(self) -> bool:
        """Whether steps can end in the head's graph (the last shard, head captured; uncaptured: always)."""
        return self.model.is_last and (bool(self.heads) or not self.captured)

    @torch.inference_mode()
    def run(self, segments: list[Segment], ids: list[int] | None = None, hidden: torch.Tensor | None = None,
            params: list[tuple[float, float, int, int]] | None = None) -> torch.Tensor | Drawn:
        """One decode step (``fits``) -> hidden [len(segments), H]: ``ids`` the tokens at the segments' positions
        (first shard), or ``hidden`` [len(segments), H] from the previous shard. With ``params`` (each row's
        temperature, top_p, seed as int64, draw: what :func:`backbone.sampling.sample_params` takes) on a shard
        that ``samples``: the rows' draws, still on the device (:class:`backbone.sampling.Drawn`)."""
        n, b = len(segments), self.bucket(len(segments))
        params = params if params is not None and self.samples else None
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
        kind = HEAD_GREEDY
        if params is not None:
            temperature, top_p, seeds, draws = zip(*params)
            if any(t >= GREEDY_BELOW and p < 1.0 for t, p in zip(temperature, top_p)):
                kind = HEAD_NUCLEUS
            elif any(t >= GREEDY_BELOW for t in temperature):
                kind = HEAD_RANDOM
            self._field(h, "seeds", n)[:] = seeds
            self._field(h, "draws", n)[:] = draws
            self._field(h, "temperature", n).view("float64")[:] = temperature
            self._field(h, "top_p", n).view("float64")[:] = top_p
        self._pad(h, n, b)
        # The fields and the bucket's table rows (a prefix of the buffer): a whole table for a 128k-token context
        # is 8,192 columns, 4 MB at the largest bucket, most of it rows this step does not read.
        m = len(FIELDS) * self.max_batch + b * self.width
        if self.captured:
            self.dev[:m].copy_(self.host[turn][:m], non_blocking=True)
            self.sent[turn] = torch.cuda.Event()
            self.sent[turn].record()
        else:
            self.dev[:m].copy_(self.host[turn][:m])
        self.turn = 1 - turn
        if hidden is not None:
            self.hidden_in[:n].copy_(hidden)
        self.replays[b] += 1
        if b in self.graphs:
            self.graphs[b].replay()
            out = self.outputs[b]
        else:
            out = self._body(b)
        if params is None:
            return out[:n].clone()  # the graph's output is overwritten by the next replay
        if (b, kind) in self.heads:
            self.heads[b, kind].replay()
            both = self.head_outputs[b, kind]
        else:
            both = self._head(out, b, kind)
        # Still on the device: the caller queues its copy to the host before the next replay overwrites it.
        return Drawn(both[:, :n])

    @torch.inference_mode()
    def capture(self) -> dict:
        """Record one graph per bucket (largest first, one shared memory pool); returns what it took."""
        if not self.captured:
            return {"buckets": [], "seconds": 0.0, "memory_mib": 0.0}
        device = self.model.device
        t0 = time.perf_counter()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # capturing empties the allocator's cache: measure from an empty one
        reserved0 = torch.cuda.memory_reserved(device)  # the graphs' private pool is reserved by this process
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
        if self.model.is_last:
            try:
                self._capture_heads(mempool)
            except Exception as exc:  # the body's graphs still serve; the head runs eagerly
                self.heads.clear()
                self.head_outputs.clear()
                log.error("capturing the sampling head's CUDA graphs failed; it runs eagerly",
                          extra={"error": f"{type(exc).__name__}: {exc}"})
            torch.cuda.synchronize(device)
        took = {"buckets": self.buckets, "seconds": round(time.perf_counter() - t0, 2),
                "memory_mib": round((torch.cuda.memory_reserved(device) - reserved0) / 2**20, 1)}
        took["replay_vs_eager"] = self.self_check()
        log.info("captured decode CUDA graphs", extra=took)
        return took

    def _capture_heads(self, mempool) -> None:
        """The head's graphs (each HEAD_* kind) for every bucket, reading the body graphs' outputs."""
        device = self.model.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: the sort's and the reductions' workspaces
            for b in reversed(self.buckets):
                for kind in HEADS:
                    self._head(self.outputs[b], b, kind)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        for b in reversed(self.buckets):
            for kind in HEADS:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=mempool):
                    self.head_outputs[b, kind] = self._head(self.outputs[b], b, kind)
                self.heads[b, kind] = graph

    @torch.inference_mode()
    def self_check(self) -> float:
        """The largest bucket replayed against the same step run eagerly, on made-up inputs: the largest deviation
        relative to the output's scale. Raises if it exceeds GRAPH_TOL (a capture that went wrong is refused, not
        served).

        Every row writes its own KV slot (the padding block's, then free blocks', each row at its offset in its
        block, attending to the rows before it there): rows writing one slot with different values would leave
        whichever write lands last, which differs between two runs of the same step on a GPU. Should the pool be
        too small for a slot per row, the rows beyond repeat earlier rows exactly (same slot, same inputs)."""
        b, h, bs = self.max_batch, self.host[0].numpy(), self.bs
        borrowed: list[int] = []
        self.pool.grow(borrowed, min(-(-b // bs) - 1, self.pool.free) * bs)
        blocks = [self.pool.padding_block, *borrowed]
        rows = [i % (len(blocks) * bs) for i in range(b)]  # the distinct row each row repeats (itself, mostly)
        try:
            self._pad(h, 0, b)
            positions = [r % bs for r in rows]
            self._field(h, "ids", b)[:] = [1 + r % (self.model.cfg.vocab_size - 1) for r in rows]
            self._field(h, "positions", b)[:] = positions
            self._field(h, "starts", b)[:] = positions
            self._field(h, "slots", b)[:] = [blocks[r // bs] * bs + r % bs for r in rows]
            self._tables(h)[:b, 0] = [blocks[r // bs] for r in rows]
            self.dev.copy_(self.host[0])
            if self.hidden_in is not None:
                self.hidden_in.normal_()
                self.hidden_in[:b].copy_(self.hidden_in[rows])
            if b in self.graphs:
                self.graphs[b].replay()
            got = self.outputs[b].clone() if b in self.graphs else self._body(b)
            want = self._body(b)
            if self.model.is_last:  # the head's graphs against the eager head on the same hidden states
                g = torch.Generator().manual_seed(0)
                self._field(h, "seeds", b)[:] = torch.randint(-2**62, 2**62, (b,), generator=g).numpy()
                self._field(h, "draws", b)[:] = range(b)
                self._field(h, "temperature", b).view("float64")[:] = [0.0 if r % 3 == 0 else 0.8 for r in rows]
                self._field(h, "top_p", b).view("float64")[:] = [1.0 if r % 2 else 0.9 for r in rows]
                self.dev.copy_(self.host[0])
                for kind in HEADS:
                    if (b, kind) in self.heads:
                        self.heads[b, kind].replay()
                        head = self.head_outputs[b, kind].clone()
                        if not torch.equal(head, self._head(self.outputs[b], b, kind)):
                            raise RuntimeError(f"the head's graph ({HEADS[kind]}) samples other tokens than the "
                                               "eager head on the same hidden states")
        finally:
            self._pad(h, 0, b)
            self._field(h, "ids", b)[:] = 0
            self.pool.release(borrowed)
        err = float((got.float() - want.float()).abs().max()) / max(1.0, float(want.float().abs().max()))
        if not err <= GRAPH_TOL:
            raise RuntimeError(f"the decode graph's replay deviates from the eager step by {err:.3g}")
        return err

"""CUDA graphs of an encoder's forward, one per batch-size bucket ([gpu-encoders]).

An encoder's forward in eager PyTorch is hundreds of kernel launches from Python (a ViT-L/14 tower: ~20 per layer).
On a large GPU the launches, not the kernels, set its pace below batch 32: on an H200, LLaVA-1.5's tower took ~13 ms
at batch 1 and at batch 8 alike (bench/README.md), where its FLOPs need 0.5 ms an image. And the launching thread
shares the host: the encoder worker's preprocessing threads decode and resize the next batch meanwhile, and every
launch then waits its turn for the GIL and a core (``bench/dispatch.py`` measures that slowdown on the host). A
replayed graph is one launch whatever the host is doing.

An encoder's input has one shape per checkpoint (images are resized and cropped to the tower's size; audio is padded
to the extractor's window), so a graph per batch size is all it needs: batches are padded to the next bucket (1, 2,
4, 8, then every multiple of 8 up to the worker's ``--max-batch``, at most MAX_GRAPH_BATCH). The rows are
independent in every encoder (attention and convolutions run within an item), so the padding rows, which keep
whatever an earlier batch left there, change nothing in the real rows, and the output is cut to them.

Static buffers: the inputs (in the compute dtype: the copy into them is the cast) and, for an encoder that masks its
padding (Qwen2-Audio), the real lengths. Each bucket's graph reads their first rows and writes its own output buffer,
which the next replay of any bucket may overwrite: the caller copies what it keeps before launching more work, on
the same stream (the encoder worker's payload copies are queued right behind the forward, encoders/runtime.py).

Capture runs once at start-up (largest bucket first, one shared memory pool; its time and memory are logged), then
a self-check replays the smallest and the largest bucket against the same forward run eagerly; a capture that fails
or deviates is dropped and the encoder runs eagerly (logged as an error). ``--eager`` turns graphs off; CPUs always
run eagerly, and an input of another shape, or a batch beyond the largest bucket, runs eagerly. The static-buffer
path also runs uncaptured (``capture=False``): the CPU tests exercise the padding and the buffers that way.
"""

from __future__ import annotations

import logging
import time

import torch

from backbone.staging import to_device
from router.progress import Progress

log = logging.getLogger(__name__)

GRAPH_TOL = 1e-2  # a replay runs the eager forward's kernels on the same inputs: anything beyond rounding is a fault
# The largest batch with a graph: past it a forward's kernels take long enough to hide its launches, while each
# bucket's capture costs start-up time and the largest one's activations stay reserved.
MAX_GRAPH_BATCH = 64


def encoder_buckets(n: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every multiple of 8, up to and including ``n``. (Finer than the
    decode steps' buckets: an encoder batch is compute-bound, so padding 17 images to 32 would cost 15 images' work.)"""
    if n < 1:
        raise ValueError("the largest encoder batch must be >= 1")
    return sorted({b for b in (1, 2, 4, 8) if b < n} | set(range(16, n, 8)) | {n})


class EncoderGraphs:
    """Graphs of ``runtime.eager`` for inputs [B, *item_shape], B <= max_batch (and lengths [B] if ``lengths``)."""

    def __init__(self, runtime, item_shape: tuple[int, ...], max_batch: int, lengths: bool = False,
                 capture: bool | None = None):
        self.runtime, self.device = runtime, runtime.device
        self.item_shape = tuple(item_shape)
        self.buckets = encoder_buckets(min(max_batch, MAX_GRAPH_BATCH))
        self.max_batch = n = self.buckets[-1]
        self.captured = self.device.type == "cuda" if capture is None else capture
        self.inputs = torch.zeros((n, *self.item_shape), dtype=runtime.dtype, device=self.device)
        # A padding row's length: the whole input (valid for every encoder; an earlier batch's rows replace it).
        self.full = self.item_shape[-1]
        self.lengths = torch.full((n,), self.full, dtype=torch.long, device=self.device) if lengths else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def fits(self, batch: torch.Tensor, lengths: torch.Tensor | None) -> bool:
        return (tuple(batch.shape[1:]) == self.item_shape and 0 < len(batch) <= self.max_batch
                and batch.is_floating_point() and (lengths is None) == (self.lengths is None))

    def _body(self, b: int) -> torch.Tensor:
        return self.runtime.eager(self.inputs[:b], None if self.lengths is None else self.lengths[:b])

    def forward(self, batch: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """[n, N, H] in the compute dtype on the device: a view of the bucket's output buffer, valid until the next
        replay of any bucket (the buckets share one memory pool, so a larger bucket's activations may lie where a
        smaller one's output is). Work queued on the same stream before that replay sees this batch's output: the
        encoder worker queues its copies to the host right behind the forward."""
        n = len(batch)
        b = self.bucket(n)
        self.inputs[:n].copy_(batch, non_blocking=True)  # from the device, or pinned memory: not waited for
        if self.lengths is not None:
            self.lengths[:n].copy_(to_device(lengths, torch.long, self.device))
        if b in self.graphs:
            self.graphs[b].replay()
            return self.outputs[b][:n]
        return self._body(b)[:n]

    @torch.inference_mode()
    def capture(self) -> dict:
        """Record one graph per bucket (largest first, one shared memory pool), then check them; returns what it
        took. Raises if a capture fails or a replay deviates from the eager forward (the graphs are then dropped).

        Everything runs with the encoder's device current (a worker on ``cuda:N`` never makes it so otherwise), and
        the caller's stream is current again afterwards even if a capture failed midway (``torch.cuda.graph`` then
        raises before it restores it). Such a failure may leave the graphs' memory pool reserved."""
        if not self.captured:
            return {"buckets": [], "seconds": 0.0, "memory_mib": 0.0}
        device = self.device
        t0 = time.perf_counter()
        try:
            with torch.cuda.device(device), torch.cuda.stream(torch.cuda.current_stream(device)):
                took = self._capture(device)
                took["seconds"] = round(time.perf_counter() - t0, 2)
                took["replay_vs_eager"] = self.self_check()
        except Exception:
            self.graphs.clear()
            self.outputs.clear()
            raise
        return took

    def _capture(self, device: torch.device) -> dict:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # capturing empties the allocator's cache: measure from an empty one
        reserved0 = torch.cuda.memory_reserved(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        if self.lengths is not None:  # warm up the masked path too (a batch of whole inputs may skip the mask)
            self.lengths.fill_(max(1, self.full // 2))
        with torch.cuda.stream(side):  # warm-up: cuBLAS and cuDNN pick their kernels, lazy buffers are made
            for b in reversed(self.buckets):
                self._body(b)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        if self.lengths is not None:
            self.lengths.fill_(self.full)
        mempool = torch.cuda.graph_pool_handle()
        capturing = torch.cuda.Stream(device)
        progress = Progress("capturing encoder CUDA graphs", len(self.buckets), extra={"device": str(device)})
        for b in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool, stream=capturing):
                self.outputs[b] = self._body(b)
            self.graphs[b] = graph
            progress.advance()
        progress.done()
        torch.cuda.synchronize(device)
        return {"buckets": self.buckets,
                "memory_mib": round((torch.cuda.memory_reserved(device) - reserved0) / 2**20, 1)}

    @torch.inference_mode()
    def self_check(self) -> float:
        """The smallest and the largest bucket replayed against the same forward run eagerly, on random inputs (and
        lengths from half the input to all of it): the largest deviation relative to the output's scale. Raises if it
        exceeds GRAPH_TOL."""
        errors = []
        g = torch.Generator(device=self.device).manual_seed(0)
        try:
            for b in sorted({self.buckets[0], self.buckets[-1]}):
                self.inputs[:b].normal_(generator=g)
                if self.lengths is not None:
                    self.lengths[:b] = torch.randint(max(1, self.full // 2), self.full + 1, (b,), generator=g,
                                                     device=self.device)
                if b in self.graphs:
                    self.graphs[b].replay()
                got = self.outputs[b].clone() if b in self.graphs else self._body(b)
                want = self._body(b)
                err = float((got.float() - want.float()).abs().max()) / max(1.0, float(want.float().abs().max()))
                errors.append(err)
        finally:
            self.inputs.zero_()
            if self.lengths is not None:
                self.lengths.fill_(self.full)
        if not all(err <= GRAPH_TOL for err in errors):  # NaN included
            raise RuntimeError(f"the encoder graph's replay deviates from the eager forward by {errors}")
        return max(errors)

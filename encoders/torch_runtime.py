"""Encoder runtime that runs the encoder + projector with PyTorch on a CPU or a CUDA device, in fp32, bf16 or fp16.

A batch reaches the device from pinned host memory in a non-blocking copy (or is assembled there by the worker) and is
cast to the compute dtype there. ``forward`` leaves the output on the device in the compute dtype (the worker casts it
to the wire dtype and checks it there, encoders/runtime.py); ``run`` brings it to the host. After :meth:`capture`,
``forward`` replays a CUDA graph for the batches it fits (encoders/graphs.py)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from backbone.staging import to_device

log = logging.getLogger(__name__)


class TorchRuntime:
    name = "torch"

    def __init__(self, module: nn.Module, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.module = module.to(self.device, dtype).eval()
        self.graphs = None  # encoders.graphs.EncoderGraphs, once captured

    def capture(self, item_shape: tuple[int, ...], max_batch: int, lengths: bool = False,
                capture: bool | None = None) -> dict | None:
        """CUDA graphs of the forward for inputs [B, *item_shape] up to ``max_batch`` (``capture=False``: the same
        static buffers, run eagerly; the CPU tests' path). If capturing fails or its self-check does, the error is
        logged and the forward stays eager: returns None."""
        from encoders.graphs import EncoderGraphs

        graphs = EncoderGraphs(self, item_shape, max_batch, lengths, capture)
        try:
            took = graphs.capture()
        except Exception as exc:
            log.error("capturing the encoder's CUDA graphs failed; it runs eagerly",
                      extra={"error": f"{type(exc).__name__}: {exc}", "item_shape": list(item_shape)})
            return None
        self.graphs = graphs
        log.info("captured encoder CUDA graphs" if graphs.captured else "encoder graph buffers ready (not captured)",
                 extra=dict(took, item_shape=list(item_shape)))
        return took

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """On the runtime's device (from the host: pinned, without waiting), floats in the compute dtype."""
        x = to_device(x, device=self.device)
        return x.to(self.dtype) if x.is_floating_point() else x

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, H] in the compute dtype, on the runtime's device: a graph's output buffer (valid until the next
        replay of any of them, encoders/graphs.py) when one fits the batch, else computed eagerly."""
        if self.graphs is not None and self.graphs.fits(batch, lengths):
            return self.graphs.forward(batch, lengths)
        return self.eager(batch, lengths)

    @torch.inference_mode()
    def eager(self, batch: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = self._to_device(batch)
        return self.module(x) if lengths is None else self.module(x, self._to_device(lengths))

    def run(self, batch: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward(batch, lengths).cpu()  # [B, N, H] in the compute dtype

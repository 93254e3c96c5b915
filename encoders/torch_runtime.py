"""Encoder runtime that runs the encoder + projector with PyTorch on a CPU or a CUDA device, in fp32, bf16 or fp16.

A batch reaches the device from pinned host memory in a non-blocking copy (or is assembled there by the worker) and is
cast to the compute dtype there. ``forward`` leaves the output on the device in the compute dtype (the worker casts it
to the wire dtype and checks it there, encoders/runtime.py); ``run`` brings it to the host."""

from __future__ import annotations

import torch
from torch import nn

from backbone.staging import to_device


class TorchRuntime:
    name = "torch"

    def __init__(self, module: nn.Module, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.module = module.to(self.device, dtype).eval()

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """On the runtime's device (from the host: pinned, without waiting), floats in the compute dtype."""
        x = to_device(x, device=self.device)
        return x.to(self.dtype) if x.is_floating_point() else x

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, H] in the compute dtype, on the runtime's device."""
        x = self._to_device(batch)
        return self.module(x) if lengths is None else self.module(x, self._to_device(lengths))

    def run(self, batch: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward(batch, lengths).cpu()  # [B, N, H] in the compute dtype

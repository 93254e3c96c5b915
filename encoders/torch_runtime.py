"""Encoder runtime that runs the encoder + projector with PyTorch on a CPU or a CUDA device."""

from __future__ import annotations

import torch
from torch import nn


class TorchRuntime:
    name = "torch"

    def __init__(self, module: nn.Module, device: str = "cpu"):
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()

    @torch.inference_mode()
    def run(self, batch: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None:
            return self.module(batch.to(self.device)).float().cpu()
        return self.module(batch.to(self.device), lengths.to(self.device)).float().cpu()

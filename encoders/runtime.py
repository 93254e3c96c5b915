"""The one small interface every encoder runtime implements (torch now; ONNX Runtime joins in [encoders])."""

from __future__ import annotations

from typing import Protocol

import torch


class EncoderRuntime(Protocol):
    name: str

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch of preprocessed inputs [B, ...] -> embeddings [B, N, H] on the CPU."""
        ...

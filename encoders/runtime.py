"""The one small interface every encoder runtime implements (torch, ONNX Runtime)."""

from __future__ import annotations

from typing import Protocol

import torch


class EncoderRuntime(Protocol):
    name: str

    def run(self, batch: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """A batch of preprocessed inputs [B, ...] -> embeddings [B, N, H] on the CPU.

        ``lengths`` [B] (int64): the real extent of each input along its padded axis, for encoders whose output
        depends on it (Qwen2-Audio's attention mask over the real mel frames); None for the others."""
        ...

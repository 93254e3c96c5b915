"""Per-request sampling: greedy at temperature 0, else temperature + nucleus (top_p) with a per-request generator,
so the same seed gives the same tokens whatever else the batch holds."""

from __future__ import annotations

import secrets

import torch

from router.messages import SamplingParams


class Sampler:
    def __init__(self, params: SamplingParams):
        self.temperature, self.top_p = params.temperature, params.top_p
        self.generator = torch.Generator().manual_seed(
            params.seed if params.seed is not None else secrets.randbits(63)
        )

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] (float32) -> one token id."""
        if self.temperature <= 0.0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_probs, dim=-1)
            sorted_probs[(cum - sorted_probs) >= self.top_p] = 0.0  # keep the smallest prefix reaching top_p
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))

"""The one small interface every encoder runtime implements (torch, ONNX Runtime), and the per-item fault isolation
the worker runs it under."""

from __future__ import annotations

import logging
from typing import Protocol

import torch

log = logging.getLogger(__name__)


class EncoderRuntime(Protocol):
    name: str

    def run(self, batch: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """A batch of preprocessed inputs [B, ...] -> embeddings [B, N, H] on the CPU.

        ``lengths`` [B] (int64): the real extent of each input along its padded axis, for encoders whose output
        depends on it (Qwen2-Audio's attention mask over the real mel frames); None for the others."""
        ...


def run_isolating(runtime: EncoderRuntime, batch: torch.Tensor, lengths: torch.Tensor | None) -> list:
    """One forward over batch [B, ...]; per item its output [N, H], or the reason (a str) it failed.

    If the batched forward raises, each item runs alone, so only the items that fail alone fail (an out-of-memory
    batch then succeeds item by item). An output that is not finite fails its item alone."""
    def run(x, n):
        return runtime.run(x) if n is None else runtime.run(x, n)

    try:
        out = run(batch, lengths)  # [B, N, H]
        finite = torch.isfinite(out).flatten(1).all(1).tolist()  # [B], one reduction for the batch
        outputs: list = list(out)
    except Exception:
        log.exception("batched encoder forward failed; running its items one at a time", extra={"batch": len(batch)})
        outputs = []
        for i in range(len(batch)):
            try:
                outputs.append(run(batch[i : i + 1], None if lengths is None else lengths[i : i + 1])[0])
            except Exception as exc:  # its text (a runtime's, with source paths) goes to the log, not the client
                log.warning("encoder forward failed on one input", exc_info=True, extra={"item": i})
                outputs.append(f"the encoder failed on this input ({type(exc).__name__})")
        finite = [isinstance(o, str) or bool(torch.isfinite(o).all()) for o in outputs]
    return [o if ok else "the encoder produced non-finite values for this input" for o, ok in zip(outputs, finite)]

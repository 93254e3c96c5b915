"""The one small interface every encoder runtime implements (torch, ONNX Runtime), and the per-item fault isolation
the worker runs it under."""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from backbone.staging import ToHost

log = logging.getLogger(__name__)


class EncoderRuntime(Protocol):
    name: str

    def run(self, batch: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """A batch of preprocessed inputs [B, ...] -> embeddings [B, N, H] on the CPU.

        ``lengths`` [B] (int64): the real extent of each input along its padded axis, for encoders whose output
        depends on it (Qwen2-Audio's attention mask over the real mel frames); None for the others.

        A runtime may also have ``forward`` (same arguments), which leaves the embeddings where they were computed:
        the worker then casts and checks them there, before the one copy to the host."""
        ...


def run_isolating(runtime: EncoderRuntime, batch: torch.Tensor, lengths: torch.Tensor | None,
                  wire: torch.dtype | None = None) -> list:
    """One forward over batch [B, ...]; per item its output [N, H] on the host (cast to ``wire`` if given), or the
    reason (a str) it failed.

    The cast and the finiteness check run where the forward ran (on a GPU: one reduction for the batch, instead of
    a pass over every item's bf16 rows on the host, which costs more than the forward), then the batch comes to
    the host in one copy. If the batched forward raises, each item runs alone, so only the items that fail alone
    fail (an out-of-memory batch then succeeds item by item). An output that is not finite (after the cast: an fp16
    wire overflows past 65504) fails its item alone."""
    forward = getattr(runtime, "forward", runtime.run)

    def run(x, n):
        out = forward(x) if n is None else forward(x, n)
        return out if wire is None else out.to(wire)

    try:
        out = run(batch, lengths)  # [B, N, H]
        finite = torch.isfinite(out).flatten(1).all(1).tolist()  # [B], one reduction for the batch
        outputs: list = list(ToHost(out).wait())
    except Exception:
        log.exception("batched encoder forward failed; running its items one at a time", extra={"batch": len(batch)})
        outputs = []
        for i in range(len(batch)):
            try:
                one = run(batch[i : i + 1], None if lengths is None else lengths[i : i + 1])
                outputs.append(ToHost(one).wait()[0])
            except Exception as exc:  # its text (a runtime's, with source paths) goes to the log, not the client
                log.warning("encoder forward failed on one input", exc_info=True, extra={"item": i})
                outputs.append(f"the encoder failed on this input ({type(exc).__name__})")
        finite = [isinstance(o, str) or bool(torch.isfinite(o).all()) for o in outputs]
    where = "" if wire is None else f" in {str(wire).removeprefix('torch.')}"
    bad = f"the encoder produced values that are not finite (NaN or infinity){where} for this input"
    return [o if ok else bad for o, ok in zip(outputs, finite)]

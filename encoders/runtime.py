"""The one small interface every encoder runtime implements (torch, ONNX Runtime), and the per-item fault isolation
the worker runs it under."""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from cache.codec import Payload, tensor_payloads

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
                  wire: torch.dtype | None = None, counts: list[int] | None = None) -> list[Payload | str]:
    """One forward over batch [B, ...]; per item the safetensors payload of its first ``counts[i]`` output rows
    (all of them if None) [n, H], cast to ``wire`` if given, or the reason (a str) it failed.

    The cast and the finiteness check run where the forward ran (on a GPU: one reduction for the batch, instead of
    a pass over every item's rows on the host, which costs more than the forward); then every item's rows are copied
    once, straight into their payload's place in pinned memory (cache/codec.py). If the batched forward raises, each
    item runs alone, so only the items that fail alone fail (an out-of-memory batch then succeeds item by item). An
    output that is not finite (after the cast: an fp16 wire overflows past 65504) fails its item alone."""
    forward = getattr(runtime, "forward", runtime.run)

    def run(x, n):
        out = forward(x) if n is None else forward(x, n)
        return out if wire is None else out.to(wire)

    try:
        out = run(batch, lengths)  # [B, N, H]
        n = [out.shape[1]] * len(out) if counts is None else [min(c, out.shape[1]) for c in counts]
        real = torch.arange(out.shape[1], device=out.device) < torch.tensor(n, device=out.device)[:, None]  # [B, N]
        finite = (torch.isfinite(out).all(-1) | ~real).all(1)  # [B]: one reduction over every item's real rows
        outputs: list = tensor_payloads([out[i, : n[i]] for i in range(len(out))])
        ok = finite.tolist()  # the copies above waited for the device already
    except Exception:
        log.exception("batched encoder forward failed; running its items one at a time", extra={"batch": len(batch)})
        outputs = []
        for i in range(len(batch)):
            try:
                one = run(batch[i : i + 1], None if lengths is None else lengths[i : i + 1])[0]
                outputs.append(tensor_payloads([one if counts is None else one[: counts[i]]])[0])
            except Exception as exc:  # its text (a runtime's, with source paths) goes to the log, not the client
                log.warning("encoder forward failed on one input", exc_info=True, extra={"item": i})
                outputs.append(f"the encoder failed on this input ({type(exc).__name__})")
        ok = [isinstance(o, str) or bool(torch.isfinite(o.tensor).all()) for o in outputs]
    where = "" if wire is None else f" in {str(wire).removeprefix('torch.')}"
    bad = f"the encoder produced values that are not finite (NaN or infinity){where} for this input"
    return [o if good else bad for o, good in zip(outputs, ok)]

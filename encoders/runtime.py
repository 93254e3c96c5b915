"""The one small interface every encoder runtime implements (torch, ONNX Runtime), and the per-item fault isolation
the worker runs it under."""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from backbone.staging import ToHost, to_device
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


class Outputs:
    """A batch's outputs on their way to the host (:func:`launch_isolating`): per item its payload, or why it
    failed, once :meth:`result` has waited for the device."""

    def __init__(self, items: list, finite: ToHost | None = None, bad: str = ""):
        self.items, self.finite, self.bad = items, finite, bad

    def result(self) -> list[Payload | str]:
        """Waits for the copies (on a GPU: up to this batch's flags, queued after its payloads, not the work queued
        after them)."""
        if self.finite is None:
            return self.items
        return [item if good else self.bad for item, good in zip(self.items, self.finite.tolist())]


def launch_isolating(runtime: EncoderRuntime, batch: torch.Tensor, lengths: torch.Tensor | None,
                     wire: torch.dtype | None = None, counts: list[int] | None = None) -> Outputs:
    """One forward over batch [B, ...], queued: per item the safetensors payload of its first ``counts[i]`` output
    rows (all of them if None) [n, H], cast to ``wire`` if given, or the reason (a str) it failed, from
    :meth:`Outputs.result`.

    The cast and the finiteness check run where the forward ran (on a GPU: one reduction for the batch, instead of
    a pass over every item's rows on the host, which costs more than the forward); then every item's rows are copied
    once, straight into their payload's place in pinned memory (cache/codec.py), with the per-item flags beside
    them. On a GPU nothing here waits for the device: the caller launches the next batch while this one finishes and
    comes to the host, and waits in :meth:`Outputs.result` (the encoder worker does, on its publishing thread).

    If the batched forward raises, each item runs alone (and is waited for), so only the items that fail alone
    fail (an out-of-memory batch then succeeds item by item). An output that is not finite (after the cast: an fp16
    wire overflows past 65504) fails its item alone."""
    forward = getattr(runtime, "forward", runtime.run)
    where = "" if wire is None else f" in {str(wire).removeprefix('torch.')}"
    bad = f"the encoder produced values that are not finite (NaN or infinity){where} for this input"

    def run(x, n):
        out = forward(x) if n is None else forward(x, n)
        return out if wire is None else out.to(wire)

    try:
        out = run(batch, lengths)  # [B, N, H]
        n = [out.shape[1]] * len(out) if counts is None else [min(c, out.shape[1]) for c in counts]
        rows = to_device(n, torch.long, out.device)  # [B], without waiting (a pageable copy would wait for the forward)
        real = torch.arange(out.shape[1], device=out.device) < rows[:, None]  # [B, N]
        finite = (torch.isfinite(out).all(-1) | ~real).all(1)  # [B]: one reduction over every item's real rows
        payloads = tensor_payloads([out[i, : n[i]] for i in range(len(out))], wait=False)
        return Outputs(payloads, ToHost(finite), bad)  # the flags' copy is queued after the payloads', on their stream
    except Exception:
        log.exception("batched encoder forward failed; running its items one at a time", extra={"batch": len(batch)})
    outputs: list = []
    for i in range(len(batch)):
        try:
            one = run(batch[i : i + 1], None if lengths is None else lengths[i : i + 1])[0]
            item = tensor_payloads([one if counts is None else one[: counts[i]]])[0]
            outputs.append(item if bool(torch.isfinite(item.tensor).all()) else bad)
        except Exception as exc:  # its text (a runtime's, with source paths) goes to the log, not the client
            log.warning("encoder forward failed on one input", exc_info=True, extra={"item": i})
            outputs.append(f"the encoder failed on this input ({type(exc).__name__})")
    return Outputs(outputs)


def run_isolating(runtime: EncoderRuntime, batch: torch.Tensor, lengths: torch.Tensor | None,
                  wire: torch.dtype | None = None, counts: list[int] | None = None) -> list[Payload | str]:
    """:func:`launch_isolating`, waited for."""
    return launch_isolating(runtime, batch, lengths, wire, counts).result()

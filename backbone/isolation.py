"""Per-request fault isolation for a batched forward: one sequence's failure fails that sequence alone.

A step runs every sequence's new tokens through the layers at once. If that forward raises, the batch is run again
one segment at a time, and only the segments that still fail alone are reported as failed (their output rows are
zero). Re-running is safe because a forward writes K/V only at the slots of its new tokens (a rerun writes the same
ones) and the engine advances a sequence's computed positions only after the step succeeded for it.

This is the slow path of a rare event (an out-of-memory batch also lands here and then succeeds one by one): the
batch is logged once with its traceback, each failed sequence once by the caller.
"""

from __future__ import annotations

import logging

import torch

from backbone.model import Segment

log = logging.getLogger(__name__)


def forward_isolating(model, hidden: torch.Tensor, segments: list[Segment], meta=None
                      ) -> tuple[torch.Tensor, dict[int, str]]:
    """``model.forward`` over hidden [T, H] (``meta``: the step's prepared description, if any); returns (hidden
    [T, H], {segment index: reason} for those that failed alone)."""
    try:
        return model.forward(hidden, segments, meta), {}
    except Exception:
        log.exception("batched forward failed; running its sequences one at a time", extra={"batch": len(segments)})
    out = torch.zeros_like(hidden)  # [T, H]
    failed: dict[int, str] = {}
    offset = 0
    for i, seg in enumerate(segments):
        rows = slice(offset, offset + seg.length)
        offset += seg.length
        try:
            out[rows] = model.forward(hidden[rows], [seg])
        except Exception as exc:
            failed[i] = f"the forward pass failed for this request ({type(exc).__name__}: {exc})"
    return out, failed

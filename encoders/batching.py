"""Dynamic batching of encode jobs: read up to ``max_batch`` entries, waiting at most ``max_wait_ms`` for a batch
to fill once the first job is in hand, then group the prepared inputs by shape so each group is one forward pass."""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from encoders.preprocess import Prepared

FILL_POLLS = 10  # non-blocking reads while a batch fills (at most ~this many per max_wait_ms)
MIN_POLL_S = 0.0005


def read_batch(r, group: str, consumer: str, stream: str, max_batch: int, max_wait_ms: float,
               block_ms: int | None) -> list:
    """Entries for one batch: block up to ``block_ms`` for the first (None: do not block), then up to
    ``max_wait_ms`` for the rest.

    The fill wait polls (non-blocking XREADGROUP every ``max_wait_ms / FILL_POLLS``) instead of using BLOCK: Redis and
    Valkey time a blocked client out only on their cron tick, every 1000/hz ms (100 ms at the default hz 10), so
    ``BLOCK 2`` held a lone job for up to 100 ms (17-68 ms measured with max_wait_ms=10, bench/encoders.py)."""
    reply = r.xreadgroup(group, consumer, {stream: ">"}, count=max_batch, block=block_ms)
    entries = list(reply[0][1]) if reply else []
    deadline = time.monotonic() + max_wait_ms / 1000
    step = max(MIN_POLL_S, max_wait_ms / 1000 / FILL_POLLS)
    while entries and len(entries) < max_batch:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(step, left))
        reply = r.xreadgroup(group, consumer, {stream: ">"}, count=max_batch - len(entries))
        if reply and reply[0][1]:
            entries.extend(reply[0][1])
    return entries


def shape_groups(prepared: list[tuple[int, Prepared]], pin: bool = False,
                 device: torch.device | None = None) -> list[tuple[list[int], torch.Tensor]]:
    """(indices, stacked batch [B, ...]) per input shape. Images share one shape; a Whisper-style encoder takes a
    fixed window, so audio does too; an encoder with variable lengths gets one bucket per length.

    ``device`` (a GPU): each batch is assembled there, every item copied without waiting from the pinned memory its
    pool thread put it in (the worker's ``_timed``), so the loop's thread makes no host copy of the batch (43 MB for
    32 images at 336 px) while the device waits. ``pin``: stack on the host into pinned memory instead (one
    non-blocking copy later)."""
    groups: dict[tuple, list[tuple[int, Prepared]]] = defaultdict(list)
    for i, p in prepared:
        groups[tuple(p.data.shape)].append((i, p))
    out = []
    for items in groups.values():
        first = items[0][1].data
        if device is not None and device.type == "cuda":
            batch = torch.empty((len(items), *first.shape), dtype=first.dtype, device=device)
            for k, (_, p) in enumerate(items):
                batch[k].copy_(p.data, non_blocking=True)  # from pinned memory: queued, not waited for
        else:
            batch = torch.empty((len(items), *first.shape), dtype=first.dtype, pin_memory=pin)
            torch.stack([p.data for _, p in items], out=batch)
        out.append(([i for i, _ in items], batch))
    return out


def batch_lengths(items: list[Prepared]) -> torch.Tensor | None:
    """The ``lengths`` [B] (int64) of one forward pass: each item's real length, or None when the encoder takes
    none (every item's ``length`` is None)."""
    known = [p.length is not None for p in items]
    if not any(known):
        return None
    if not all(known):
        raise ValueError("a batch mixes inputs with and without a real length")
    return torch.tensor([p.length for p in items], dtype=torch.long)

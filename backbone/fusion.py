"""Fusion at the first shard: token embeddings with encoder outputs spliced in at the placeholder positions.

As the reference LLaVA / Qwen2-Audio models do (``masked_scatter``): the placeholder positions of one modality take
that modality's tensors' rows in prompt order. Counts and positions are found on the host, from the token ids the
plan carries, and reach the device in asynchronous copies with the rows: fusing never waits for the device.
"""

from __future__ import annotations

import torch

from backbone.staging import to_device


class PlanError(ValueError):
    """The plan does not fit the model: placeholder counts and tensor rows disagree, or a width differs."""


def fuse(embed_tokens, token_ids: list[int] | torch.Tensor, media: list[tuple[str, torch.Tensor]],
         placeholder_ids: dict[str, int], device: torch.device | str = "cpu", generated: int = 0) -> torch.Tensor:
    """token_ids [S] (host); media: (modality, rows [n, H]) in prompt order -> inputs_embeds [1, S, H] on
    ``device`` (the embedding's).

    ``generated``: the last tokens were sampled by the model (a migrated request's, resumed here). They are text
    whatever their ids: a model may sample a placeholder id, which it then read through the embedding table, as it
    reads it here."""
    ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    device = torch.device(device)
    embeds = embed_tokens(to_device(ids, torch.long, device).unsqueeze(0))  # [1, S, H]
    prompt = ids[: len(ids) - generated]
    for modality, placeholder in placeholder_ids.items():
        positions = [i for i, t in enumerate(prompt) if t == placeholder]
        rows = [t for mod, t in media if mod == modality]
        want = len(positions)
        have = sum(t.shape[0] for t in rows)
        if want != have:
            raise PlanError(f"{modality}: {want} placeholder tokens but {have} encoder rows")
        if not rows:
            continue
        for t in rows:  # every part, before torch.cat (which would raise a RuntimeError on mixed widths)
            if t.dim() != 2 or t.shape[1] != embeds.shape[2]:
                raise PlanError(f"{modality}: encoder rows of shape {list(t.shape)} do not fit model width "
                                f"{embeds.shape[2]}")
        if len(rows) == 1:
            spliced = to_device(rows[0], device=device).to(embeds.dtype)
        else:  # each part copied into place on the device (a host concatenation would copy them all once more)
            spliced = torch.empty((have, embeds.shape[2]), dtype=embeds.dtype, device=device)
            at = 0
            for t in rows:
                spliced[at : at + t.shape[0]].copy_(to_device(t, device=device))
                at += t.shape[0]
        embeds[0].index_copy_(0, to_device(positions, torch.long, device), spliced)
    return embeds

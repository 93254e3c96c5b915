"""Fusion at the first shard: token embeddings with encoder outputs spliced in at the placeholder positions.

As the reference LLaVA / Qwen2-Audio models do (``masked_scatter``): the placeholder positions of one modality take
that modality's tensors' rows in prompt order.
"""

from __future__ import annotations

import torch


class PlanError(ValueError):
    """The plan does not fit the model: placeholder counts and tensor rows disagree, or a width differs."""


def fuse(embed_tokens: torch.nn.Module, token_ids: torch.Tensor, media: list[tuple[str, torch.Tensor]],
         placeholder_ids: dict[str, int]) -> torch.Tensor:
    """token_ids [S]; media: (modality, rows [n, H]) in prompt order -> inputs_embeds [1, S, H]."""
    embeds = embed_tokens(token_ids.unsqueeze(0))  # [1, S, H]
    for modality, placeholder in placeholder_ids.items():
        mask = token_ids == placeholder  # [S]
        rows = [t for mod, t in media if mod == modality]
        want = int(mask.sum())
        have = sum(t.shape[0] for t in rows)
        if want != have:
            raise PlanError(f"{modality}: {want} placeholder tokens but {have} encoder rows")
        if not rows:
            continue
        for t in rows:  # every part, before torch.cat (which would raise a RuntimeError on mixed widths)
            if t.dim() != 2 or t.shape[1] != embeds.shape[2]:
                raise PlanError(f"{modality}: encoder rows of shape {list(t.shape)} do not fit model width "
                                f"{embeds.shape[2]}")
        spliced = torch.cat(rows).to(embeds.device, embeds.dtype)  # [want, H]
        embeds[0, mask] = spliced
    return embeds

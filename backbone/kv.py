"""All KV-cache handling in one place.

transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache`` (the old name is deprecated; 5.17, as
on some GPU hosts, knows only the old one), so the argument name is resolved once per model class here.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from transformers import DynamicCache


@lru_cache(maxsize=None)
def _cache_arg(model_cls: type) -> str:
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(config) -> DynamicCache:
    return DynamicCache(config=config)


def run_decoder(decoder, inputs_embeds: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Feed ``inputs_embeds`` [1, S, H] after what ``cache`` holds; returns the final-norm hidden states [1, S, H].

    Positions continue from the cache's length, so a decode step feeds one new token and never re-runs the prompt.
    """
    start = cache.get_seq_length()
    position_ids = torch.arange(start, start + inputs_embeds.shape[1]).unsqueeze(0)  # [1, S]
    kwargs = {_cache_arg(type(decoder)): cache}
    out = decoder(inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=True, **kwargs)
    return out.last_hidden_state

"""Loads one backbone shard straight from the checkpoint's safetensors: its layers, plus the embedding on the first
shard and the final norm and lm_head on the last. Nothing else is read (the returned names prove it).

The language model lives under ``language_model.`` in every family served (the demo trimodal layout, and
transformers 5's LLaVA and Qwen2-Audio): ``language_model.model.{embed_tokens,layers.N,norm}`` and
``language_model.lm_head``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from backbone.model import DecoderConfig, DecoderShard
from models.checkpoint import read_matching
from models.spec import ModelError

PREFIX = "language_model."
_LAYER = re.compile(r"^language_model\.model\.layers\.(\d+)\.(.+)$")


def load_shard(model_dir: Path, text_config: dict, layers: range | None = None,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", attention: str = "auto"
               ) -> tuple[DecoderShard, list[str]]:
    """The shard's weights (its KV pool comes later: ``DecoderShard.allocate_pool``) and the names it read."""
    cfg = DecoderConfig.from_text_config(text_config)
    layers = layers if layers is not None else range(cfg.num_layers)
    if not (0 <= layers.start < layers.stop <= cfg.num_layers and layers.step == 1):
        raise ModelError(f"layers {layers.start}:{layers.stop} are not a range of 0:{cfg.num_layers}")
    first, last = layers.start == 0, layers.stop == cfg.num_layers
    embed_name, norm_name = PREFIX + "model.embed_tokens.weight", PREFIX + "model.norm.weight"
    head_name = PREFIX + "lm_head.weight"
    singles = set()
    if first or (last and cfg.tie_word_embeddings):
        singles.add(embed_name)
    if last:
        singles |= {norm_name} | (set() if cfg.tie_word_embeddings else {head_name})

    def wanted(name: str) -> bool:
        match = _LAYER.match(name)
        return int(match.group(1)) in layers if match else name in singles

    tensors = read_matching(model_dir, wanted, dtype, device)
    per_layer: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    for name, t in tensors.items():
        if match := _LAYER.match(name):
            per_layer[int(match.group(1)) - layers.start][match.group(2)] = t
    missing = [n for n in singles if n not in tensors] + [f"layer {layers.start + i}" for i, w in
                                                          enumerate(per_layer) if not w]
    if missing:
        raise ModelError(f"{model_dir} lacks {missing}")
    embed, norm, head = tensors.get(embed_name), tensors.get(norm_name), tensors.get(head_name)
    names = sorted(tensors)
    tensors.clear()  # the layers' tensors now live in per_layer alone: fusing one frees its parts
    shard = DecoderShard(cfg, per_layer, layers.start, embed if first else None, norm,
                         (embed if cfg.tie_word_embeddings else head) if last else None, attention)
    return shard, names

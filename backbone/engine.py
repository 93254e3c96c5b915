"""The decode engine: prefill a fused prompt, then advance every running sequence one token per step.

It knows nothing of Redis or HTTP: the worker feeds it, and the in-process benchmark drives the very same code.
One shard holding every layer for now; a step is written over a list of sequences so that [backbone] can swap the
per-sequence forward for one batched forward (continuous batching) and split the layers over pipeline shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from backbone.fusion import fuse
from backbone.kv import new_cache, run_decoder
from backbone.sampling import Sampler
from router.messages import FinishReason, SamplingParams


@dataclass
class Sequence:
    request_id: str
    prompt_len: int
    max_tokens: int  # already clamped to the context left after the prompt
    stop_ids: frozenset[int]
    sampler: Sampler
    cache: object = None
    output: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    pending: int = 0  # tokens produced since the last emitted event

    def append(self, token: int) -> None:
        self.output.append(token)
        self.pending += 1
        if token in self.stop_ids:
            self.finish = FinishReason.STOP
        elif len(self.output) >= self.max_tokens:
            self.finish = FinishReason.LENGTH


class Engine:
    def __init__(self, lm, placeholder_ids: dict[str, int], eos_ids: list[int], max_context: int):
        self.lm = lm  # a *ForCausalLM: .model (embeddings, layers, norm) and .lm_head
        self.placeholder_ids = placeholder_ids
        self.eos_ids = frozenset(eos_ids)
        self.max_context = max_context

    def new_sequence(self, request_id: str, prompt_len: int, params: SamplingParams) -> Sequence:
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_ids))
        room = self.max_context - prompt_len
        return Sequence(request_id, prompt_len, min(params.max_tokens, room), frozenset(stop), Sampler(params))

    @torch.inference_mode()
    def prefill(self, seq: Sequence, token_ids: list[int], media: list[tuple[str, torch.Tensor]]) -> None:
        """Fuse and run the whole prompt, filling the sequence's KV cache; samples its first token."""
        ids = torch.tensor(token_ids, dtype=torch.long)  # [S]
        embeds = fuse(self.lm.model.embed_tokens, ids, media, self.placeholder_ids)  # [1, S, H]
        seq.cache = new_cache(self.lm.config)
        hidden = run_decoder(self.lm.model, embeds, seq.cache)  # [1, S, H]
        seq.append(self._sample(seq, hidden[:, -1]))

    @torch.inference_mode()
    def step(self, running: list[Sequence]) -> None:
        """One decode step: each unfinished sequence feeds its last token through the layers and samples the next."""
        for seq in running:
            if seq.finish is not None:
                continue
            last = torch.tensor([[seq.output[-1]]], dtype=torch.long)  # [1, 1]
            hidden = run_decoder(self.lm.model, self.lm.model.embed_tokens(last), seq.cache)  # [1, 1, H]
            seq.append(self._sample(seq, hidden[:, -1]))

    def _sample(self, seq: Sequence, hidden: torch.Tensor) -> int:
        logits = self.lm.lm_head(hidden)[0].float()  # [V]
        return seq.sampler(logits)

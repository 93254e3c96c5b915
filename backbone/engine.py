"""The decode engine: continuous batching over one model shard that holds every layer.

Each ``step`` runs ONE forward over a ragged batch: the fused prompts of sequences starting this step and the last
token of every running sequence (each decode step feeds only the new token, reusing the KV cache). New sequences
join at the next step; finished or cancelled ones leave by being dropped from the list, freeing their KV cache.
It knows nothing of Redis or HTTP: the worker feeds it, and the in-process benchmark drives the very same code.

One request's fault stays its own: a forward that raises is re-run one sequence at a time (backbone/isolation.py),
and a row of logits that is not finite or cannot be sampled fails that sequence alone (``finish`` ERROR, ``error``
says why); every other sequence of the step goes on.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import msgspec
import torch

from backbone.fusion import PlanError, fuse
from backbone.isolation import forward_isolating
from backbone.model import DecoderShard, Segment, SequenceCache
from backbone.pipeline import PipelineHead
from backbone.sampling import Sampler, sample_rows, seed64
from router.messages import FinishReason, SamplingParams


@dataclass
class Sequence:
    request_id: str
    sid: int  # the engine's id for it, shared with the other pipeline shards
    prompt_len: int
    max_tokens: int  # already clamped to the context left after the prompt
    stop_ids: frozenset[int]
    sampler: Sampler
    cache: SequenceCache | None = None
    params: SamplingParams | None = None
    output: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    pending: int = 0  # tokens produced since the last emitted event
    error: str | None = None  # why it failed, when ``finish`` is ERROR

    @property
    def capacity(self) -> int:
        return self.prompt_len + self.max_tokens

    def append(self, token: int) -> None:
        self.output.append(token)
        self.pending += 1
        if token in self.stop_ids:
            self.finish = FinishReason.STOP
        elif len(self.output) >= self.max_tokens:
            self.finish = FinishReason.LENGTH

    def fail(self, error: str) -> None:
        self.finish, self.error = FinishReason.ERROR, error


class Engine:
    def __init__(self, model: DecoderShard, placeholder_ids: dict[str, int], eos_ids: list[int], max_context: int,
                 kv_budget_bytes: int | None = None, pipeline: PipelineHead | None = None):
        self.model = model  # every layer, or shard 0's when ``pipeline`` links it to the others
        self.pipeline = pipeline
        self._next_sid = 0
        self.placeholder_ids = placeholder_ids
        self.eos_ids = frozenset(eos_ids)
        self.max_context = max_context
        self.kv_budget_bytes = kv_budget_bytes  # None: bounded only by the worker's max_running
        self.kv_used_bytes = 0

    def new_sequence(self, request_id: str, prompt_len: int, params: SamplingParams) -> Sequence:
        """PlanError if the sampling parameters are out of range (a gateway validates them; a plan may come from
        anywhere)."""
        check_sampling(params)
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_ids))
        room = self.max_context - prompt_len
        # Fix the seed here (as int64, the form the pipeline carries), so whichever shard samples uses the same one.
        seed = secrets.randbits(63) if params.seed is None else seed64(params.seed)
        params = msgspec.structs.replace(params, seed=seed)
        self._next_sid += 1
        return Sequence(request_id, self._next_sid, prompt_len, min(params.max_tokens, room), frozenset(stop),
                        Sampler(params), params=params)

    def kv_bytes(self, seq: Sequence) -> int:
        return SequenceCache.nbytes(self.model.cfg, len(self.model.layers), seq.capacity, self.model.dtype)

    def fits(self, seq: Sequence) -> bool:
        """Whether the sequence's whole KV cache (prompt + max tokens) fits the budget now."""
        return self.kv_budget_bytes is None or self.kv_used_bytes + self.kv_bytes(seq) <= self.kv_budget_bytes

    def start(self, seq: Sequence, token_ids: list[int], media: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """Fuse the prompt (PlanError if it does not fit) and allocate the KV cache; returns embeds [S, H]."""
        vocab = self.model.cfg.vocab_size
        if not token_ids or min(token_ids) < 0 or max(token_ids) >= vocab:
            raise PlanError(f"the prompt is empty or holds token ids outside the vocabulary [0, {vocab})")
        ids = torch.tensor(token_ids, dtype=torch.long)  # [S]
        embeds = fuse(self.model.embed, ids, media, self.placeholder_ids)[0]  # [S, H]
        seq.cache = self.model.new_cache(seq.capacity)
        self.kv_used_bytes += self.kv_bytes(seq)
        return embeds

    def release(self, seq: Sequence) -> None:
        if seq.cache is not None:
            self.kv_used_bytes -= self.kv_bytes(seq)
            seq.cache = None
            if self.pipeline is not None:
                self.pipeline.releases.append(seq.sid)  # the other shards forget it with the next message

    @torch.inference_mode()
    def step(self, running: list[Sequence], starting: list[tuple[Sequence, torch.Tensor]] = ()) -> None:
        """One forward: prefill every starting sequence, advance every unfinished running one by one token. A
        sequence that fails is finished with ERROR (``seq.error``); the others are unaffected."""
        decoding = [s for s in running if s.finish is None]
        if not decoding and not starting:
            return
        # 1) The step's new tokens, sequence after sequence: whole prompts, then last tokens.
        last = torch.tensor([s.output[-1] for s in decoding], dtype=torch.long)  # [B_dec]
        parts = [e for _, e in starting] + ([self.model.embed(last)] if decoding else [])
        segments = [Segment(s.cache, 0, e.shape[0]) for s, e in starting]
        segments += [Segment(s.cache, s.cache.length, 1) for s in decoding]
        seqs = [s for s, _ in starting] + decoding
        # 2) One pass through this shard's layers (one segment at a time only if the batch raised).
        hidden, failed = forward_isolating(self.model, torch.cat(parts), segments)  # [T, H]
        if self.pipeline is not None:
            # 3') The other shards run the rest; the last one samples and sends the ids back (-1: failed there).
            ints = torch.tensor([[s.sid, g.start, g.length, s.capacity, s.params.seed, i in failed]
                                 for i, (s, g) in enumerate(zip(seqs, segments))], dtype=torch.long)  # [B, 6]
            floats = torch.tensor([[s.params.temperature, s.params.top_p] for s in seqs], dtype=torch.float64)
            results = [t if t >= 0 else "this request failed on a later pipeline shard (see its log)"
                       for t in self.pipeline.run_rest(ints, floats, hidden).tolist()]
        else:
            # 3) Logits at each sequence's last position, one sampler per sequence.
            ends = torch.tensor([seg.length for seg in segments]).cumsum(0) - 1  # [B]
            results = sample_rows([s.sampler for s in seqs], self.model.logits(hidden[ends]))  # logits [B, V]
        for i, (seq, result) in enumerate(zip(seqs, results)):
            if i in failed:
                seq.fail(failed[i])
            elif isinstance(result, str):
                seq.fail(result)
            else:
                seq.append(result)

    def prefill(self, seq: Sequence, token_ids: list[int], media: list[tuple[str, torch.Tensor]]) -> None:
        """Start one sequence alone (its first token is sampled)."""
        self.step([], [(seq, self.start(seq, token_ids, media))])


def check_sampling(params: SamplingParams) -> None:
    """PlanError naming the first sampling parameter out of range."""
    if not params.max_tokens >= 1:
        raise PlanError(f"max_tokens must be >= 1, got {params.max_tokens}")
    if not (math.isfinite(params.temperature) and params.temperature >= 0):
        raise PlanError(f"temperature must be a finite number >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise PlanError(f"top_p must be in (0, 1], got {params.top_p}")
    try:
        if params.seed is not None:
            seed64(params.seed)
    except ValueError as exc:
        raise PlanError(str(exc)) from exc


def load_engine(spec, layers: range | None = None, kv_budget_bytes: int | None = None,
                pipeline: PipelineHead | None = None) -> Engine:
    from backbone.loader import load_shard

    model, _ = load_shard(spec.path, spec.config["text_config"], layers)
    return Engine(model, spec.placeholder_ids, spec.eos_token_ids, spec.max_context, kv_budget_bytes, pipeline)

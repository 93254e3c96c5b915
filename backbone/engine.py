"""The decode engine: continuous batching with chunked prefill and preemption over one model shard's paged KV.

A sequence's inputs are its prompt (fused embeddings, on the device until the whole prompt is in the KV pool; fused
again after a preemption) followed by its generated tokens; ``computed`` counts the positions whose K/V are in the
pool. Each ``step`` schedules, for every sequence, the next positions to compute and runs ONE forward over them all
(backbone/model.py):

1. every decoding sequence (one position left: its last token) advances by one, so running streams never stall;
2. then sequences still prefilling (new ones, and preempted ones recomputing) take chunks within the step's budget
   (backbone/budget.py: ``max_batched_tokens``, decodes count too; or, with ``max_step_ms``, as many positions as
   fit that time in a step that carries decodes), the fewest positions left to compute first (ties: oldest first),
   so a short prompt that arrives while long ones are prefilling gets its first token within a step or two instead
   of after all of theirs. A long prompt still advances whenever the shorter ones leave budget over (they become
   decodes, at most one position each); and a prefilling sequence passed over ``aging_steps`` steps in a row (32;
   no chunk, or one short of what the step could give) goes before every other prompt until it gets one, so a
   steady stream of short prompts cannot starve it. The first in line that finds no free block for its chunk is
   not overtaken by those behind it;
3. a row whose chunk reaches its last input is sampled; a prefill chunk that does not is not.

KV blocks are taken as positions are computed. With the prefix cache (``prefix_cache``, backbone/kv.py), a sequence
about to compute its prompt from the start first takes the blocks the pool holds for the longest run of its prompt's
full blocks (the same token ids, the same media, the same tenant), at most all but its last prompt position, which
it computes to sample its first token; every full prompt block it computes is registered once its step has landed
(every shard ran it). Its ``cached`` positions are reported as the usage's cached tokens.

When a decode finds the pool empty, the newest sequence that holds blocks of its own (not only prefix-cache blocks
others hold too, whose release would free nothing) is preempted: its blocks are freed and it
is recomputed later from its prompt and the tokens it already generated (its sampler resumes at its draw count, so
its text is what an undisturbed run gives); its client sees only a pause. A preempted sequence stays parked until
the free blocks, less those promised to sequences still prefilling, hold its whole length and one more block per
decoding sequence (their growth while it recomputes): recomputing as soon as any block was free made it the newest
holder again, preempted at the next block boundary of any older decode, over and over (an outside tester saw one
sequence preempted 93 times in 109 s, three quarters of the positions computed being recompute). New sequences are
admitted (``admissible``) only while no sequence is parked (preempted ones go first) and the free blocks, less those
promised to sequences still prefilling, hold their prompt; one whose prompt + max_tokens exceeds the whole pool can
never run and is refused (``fits_pool``).

Pipeline micro-batches: with shards after this one (``pipeline``), a step's answers come back only after every
shard ran it. The sequences are dealt into ``micro_batches`` lanes (default: one per shard on GPUs, one on CPUs:
``default_micro_batches``; a new sequence joins the lane with the fewest), each
lane is scheduled on its own, and ``step`` sends one lane's step down the pipe and returns without waiting for it:
while shard 1 runs lane A's step, shard 0 runs lane B's. A lane's next step is scheduled only once its previous
answers are back (``Flight``), and every shard runs steps in the order sent, so a block freed while a step is in
flight is never overwritten before that step read it. A sequence in flight is never preempted; a decode that needs a
block while the only other holders are in flight waits a step (keeping its KV) rather than preempting itself.

Deferred tokens (``defer``, the worker's mode on GPUs): without a pipeline, a step's sampled tokens are queued for the
host (pinned memory, an event) and applied when the next ``step`` starts (or at ``settle``), so the caller's host work
between two steps (the worker's Redis round trip) runs while the device computes. The next step is scheduled only after
they are applied, so the tokens and the scheduling are those of the synchronous mode.

One request's fault stays its own: a forward that raises is re-run one sequence at a time (backbone/isolation.py),
and a row of logits that is not finite or cannot be sampled fails that sequence alone (``finish`` ERROR, ``error``
says why); every other sequence of the step goes on. It knows nothing of Redis or HTTP: the worker feeds it, and the
in-process benchmarks drive the very same code.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

import msgspec
import torch

from backbone.budget import StepBudget
from backbone.fusion import PlanError, fuse
from backbone.isolation import forward_isolating
from backbone.kv import prefix_hashes
from backbone.model import DecoderShard, Segment
from backbone.pipeline import NO_TOKEN, PipelineHead, Sent
from backbone.sampling import Drawn, Sampler, draw_rows, results, seed64
from backbone.staging import ToHost, to_device
from router.messages import FinishReason, SamplingParams

log = logging.getLogger(__name__)

MAX_BATCHED_TOKENS = 2048
AGING_STEPS = 32  # steps in a row a prefilling sequence may be passed over before it goes first


@dataclass
class Sequence:
    request_id: str
    sid: int  # the engine's id for it, shared with the other pipeline shards
    prompt_len: int
    max_tokens: int  # already clamped to the context left after the prompt
    stop_ids: frozenset[int]
    sampler: Sampler
    params: SamplingParams | None = None
    output: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    pending: int = 0  # tokens produced since the last emitted event
    error: str | None = None  # why it failed, when ``finish`` is ERROR
    resumed: int = 0  # a migrated request's tokens generated before, the tail of its prompt (see PromptPlan)
    blocks: list[int] = field(default_factory=list)  # its block table (the pool's block ids, in position order)
    computed: int = 0  # positions whose K/V are in the pool
    prompt_embeds: torch.Tensor | None = None  # [prompt_len, H] on the device (shard 0), while its prompt is read
    # (token ids, media rows on the host): what its prompt is fused from again when a preemption has it recomputed
    fusion: tuple[list[int], list[tuple[str, torch.Tensor]]] | None = None
    preempted: int = 0  # how often its blocks were taken back
    lane: int = 0  # its pipeline micro-batch (always 0 without a pipeline)
    skipped: int = 0  # steps in a row it was prefilling and passed over (the scheduler's aging guard)
    hashes: list[bytes] = field(default_factory=list)  # its prompt's full blocks' prefix hashes (the prefix cache)
    registered: int = 0  # of its blocks, those registered in (or taken from) the prefix cache
    cached: int = 0  # prompt positions its first start here took from the prefix cache (usage: cached tokens)

    @property
    def prompt_tokens(self) -> int:
        """The client's prompt (a continuation's prompt ends with its ``resumed`` tokens)."""
        return self.prompt_len - self.resumed

    @property
    def completion_tokens(self) -> int:
        return self.resumed + len(self.output)

    @property
    def capacity(self) -> int:
        """Positions it may ever hold: the prompt and every token it may generate."""
        return self.prompt_len + self.max_tokens

    @property
    def length(self) -> int:
        """Its input positions so far: the prompt, then every generated token (the last one not yet computed)."""
        return self.prompt_len + len(self.output)

    def append(self, token: int) -> None:
        self.output.append(token)
        self.pending += 1
        if token in self.stop_ids:
            self.finish = FinishReason.STOP
        elif len(self.output) >= self.max_tokens:
            self.finish = FinishReason.LENGTH

    def fail(self, error: str) -> None:
        self.finish, self.error = FinishReason.ERROR, error


@dataclass
class Flight:
    """A step whose answers are not applied yet: sent down the pipe (``sent``), or run here (``results``; or
    ``drawn``, its sampled tokens still on their way to the host)."""

    lane: int
    rows: list[tuple[Sequence, int]]
    failed: dict[int, str]  # row -> why it failed on this shard
    sent: Sent | None = None
    results: list | None = None
    drawn: ToHost | None = None  # sampled here, on its way to the host: tokens and statuses of ``drawn_rows``
    drawn_rows: list[int] = field(default_factory=list)
    launched: float = 0.0  # perf_counter at launch (the step budget learns from launch to answers)


class Engine:
    def __init__(self, model: DecoderShard, placeholder_ids: dict[str, int], eos_ids: list[int], max_context: int,
                 pipeline: PipelineHead | None = None, max_batched_tokens: int = MAX_BATCHED_TOKENS,
                 micro_batches: int = 0, max_step_ms: float | None = None, defer: bool = False,
                 aging_steps: int = AGING_STEPS, prefix_cache: bool = True):
        if model.pool is None:
            raise ValueError("the model has no KV pool (DecoderShard.allocate_pool)")
        if max_batched_tokens < 1:
            raise ValueError("max_batched_tokens must be >= 1")
        self.model = model  # every layer, or shard 0's when ``pipeline`` links it to the others
        self.pool = model.pool
        self.pipeline = pipeline
        self._next_sid = 0
        self.placeholder_ids = placeholder_ids
        self.eos_ids = frozenset(eos_ids)
        self.max_context = max_context
        self.budget = StepBudget(max_batched_tokens, max_step_ms)
        if aging_steps < 1:
            raise ValueError("aging_steps must be >= 1")
        self.aging_steps = aging_steps  # a prefilling sequence passed over this many steps in a row goes first
        self.active: dict[int, Sequence] = {}  # started and not released
        self.preemptions = 0
        # A preempted sequence is parked until its whole length and a block per decode fit, and no new one is admitted
        # ahead of it. False (bench/preemption.py's comparison only): it recomputes as soon as a block is free, and
        # new sequences are admitted whenever their prompt fits (the policy before an outside tester found it thrash).
        self.park_preempted = True
        if micro_batches < 0:
            raise ValueError("micro_batches must be >= 0 (0: auto)")
        self.lanes = 1  # without a pipeline a step is applied before it returns
        if pipeline is not None:
            self.lanes = micro_batches or default_micro_batches(pipeline.world, model.device)
        self.flights: deque[Flight] = deque()  # sent, answers not yet applied (oldest first)
        self._next_lane = 0
        self.steps = 0  # steps run
        self.positions = [0, 0]  # positions computed by the steps run: decodes, prompt (prefill and recompute)
        self.timed = [0, 0.0]  # steps timed by the budget (those that sampled), and their seconds in all
        self.overlapped = 0  # ... sent while another was still in flight
        # Without a pipeline: a step's tokens are applied at the start of the next ``step`` (or ``settle``), so the
        # caller's host work between two steps (the worker's round trip) runs while the device computes.
        self.defer = defer
        self.prefix_cache = prefix_cache  # prompts share the KV blocks of the prefixes they have in common

    @property
    def max_batched_tokens(self) -> int:
        """The step budget's cap: positions one step computes at most (decodes included)."""
        return self.budget.max_tokens

    @max_batched_tokens.setter
    def max_batched_tokens(self, value: int) -> None:
        if value < 1:
            raise ValueError("max_batched_tokens must be >= 1")
        self.budget.max_tokens = value
        self.budget.min_chunk = min(self.budget.min_chunk, value)

    def new_sequence(self, request_id: str, prompt_len: int, params: SamplingParams, resumed: int = 0) -> Sequence:
        """PlanError if the sampling parameters are out of range (a gateway validates them; a plan may come from
        anywhere). ``resumed``: the last tokens of the prompt were generated by an earlier attempt (a migration);
        the sampler continues at that draw."""
        check_sampling(params)
        if not 0 <= resumed < prompt_len:
            raise PlanError(f"resumed must be in [0, prompt length {prompt_len}), got {resumed}")
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_ids))
        room = self.max_context - prompt_len
        if room < 1:  # computed past the model's positions, it answered one token (an outside auditor's)
            raise PlanError(f"the prompt's {prompt_len} tokens leave no room in the model's context of "
                            f"{self.max_context} tokens")
        if params.default_budget and self.pool.num_blocks * self.pool.block_size - prompt_len > 0:
            room = min(room, self.pool.num_blocks * self.pool.block_size - prompt_len)  # a pool short of the context
        # Fix the seed here (as int64, the form the pipeline carries), so whichever shard samples uses the same one.
        seed = secrets.randbits(63) if params.seed is None else seed64(params.seed)
        params = msgspec.structs.replace(params, seed=seed)
        self._next_sid += 1
        return Sequence(request_id, self._next_sid, prompt_len, min(params.max_tokens, room), frozenset(stop),
                        Sampler(params, resumed), params=params, resumed=resumed)

    # -- admission ------------------------------------------------------------------------------------------------

    def fits_pool(self, seq: Sequence) -> bool:
        """Whether the sequence could ever finish: its prompt and every token it may generate fit the whole pool."""
        return self.pool.blocks_for(seq.capacity) <= self.pool.num_blocks

    def pool_refusal(self, seq: Sequence) -> tuple[str, str]:
        """Why a sequence that does not ``fits_pool`` is refused, in the client's terms, and what is too long
        (``TokenEvent.limit``): its prompt alone, or its prompt and the max_tokens it named (a default budget is
        lowered to the pool: it is never the reason)."""
        pool = self.pool
        if seq.params.default_budget and seq.prompt_len >= pool.num_blocks * pool.block_size:
            return (f"the prompt is {seq.prompt_len} tokens; this backbone's KV pool holds "
                    f"{pool.num_blocks * pool.block_size} (less than the model's context)"), "prompt"
        return (f"the request needs {pool.blocks_for(seq.capacity)} KV blocks of {pool.block_size} tokens "
                f"(prompt + max_tokens = {seq.capacity} tokens); this backbone's pool has {pool.num_blocks}"), "budget"

    def admissible(self, seq: Sequence) -> bool:
        """Whether to start it now: no preempted sequence is parked (they go first), and the free blocks, less those
        that sequences still prefilling will take, hold its prompt and first token."""
        if self.park_preempted and any(self._parked(s) for s in self.active.values()):
            return False
        return self.pool.free - self._promised() >= self.pool.blocks_for(seq.prompt_len + 1)

    def _promised(self, but: Sequence | None = None) -> int:
        """Blocks that sequences still prefilling (``but`` aside; parked ones are not counted: each waits to resume
        on its own, and counting the others would have two parked sequences wait for each other for good) will take
        to reach their first token."""
        return sum(max(0, self.pool.blocks_for(s.length + 1) - len(s.blocks)) for s in self.active.values()
                   if s is not but and s.finish is None and s.computed < s.length - 1 and not self._parked(s))

    @staticmethod
    def _parked(seq: Sequence) -> bool:
        """Preempted and not recomputing yet."""
        return seq.preempted > 0 and not seq.blocks and seq.finish is None

    def _resumable(self, seq: Sequence, decodes: int) -> bool:
        """Whether a parked sequence may start recomputing: the free blocks, less what the others still prefilling
        will take, hold its whole length and a block of growth for each of the ``decodes`` decoding sequences."""
        if not self.park_preempted:
            return True
        return self.pool.free - self._promised(but=seq) >= self.pool.blocks_for(seq.length + 1) + decodes

    def start(self, seq: Sequence, token_ids: list[int], media: list[tuple[str, torch.Tensor]],
              keys: list[str] | None = None, salt: str = "") -> torch.Tensor:
        """Fuse the prompt (PlanError if it does not fit) and keep it on the device for the sequence's prefill
        chunks; returns the embeddings [S, H]. Once the whole prompt is in the KV pool the embeddings are dropped
        (a 4k-token prompt is 32 MB of a 4096-wide model's bf16, which no pool sizing counts), and fused again from
        the token ids and the media rows kept on the host if a preemption has the sequence recomputed.

        ``keys``: each media part's tensor key (its content), ``salt``: the tenant's cache namespace: with them (or
        without media) the prompt may share the prefix cache's blocks. A migrated request's generated tail is never
        shared (its ids are text whatever they are)."""
        vocab = self.model.cfg.vocab_size
        if not token_ids or min(token_ids) < 0 or max(token_ids) >= vocab:
            raise PlanError(f"the prompt is empty or holds token ids outside the vocabulary [0, {vocab})")
        if len(token_ids) != seq.prompt_len:
            raise PlanError(f"the plan has {len(token_ids)} token ids for a prompt of {seq.prompt_len}")
        seq.fusion = (token_ids, media)
        seq.prompt_embeds = self._fuse(seq)
        if self.prefix_cache and (keys is not None and len(keys) == len(media) or not media):
            parts = [(mod, key, t.shape[0]) for (mod, t), key in zip(media, keys or ())]
            seq.hashes = prefix_hashes(token_ids[: seq.prompt_len - seq.resumed], parts, self.placeholder_ids,
                                       self.pool.block_size, salt)
        load = [0] * self.lanes
        for s in self.active.values():
            load[s.lane] += 1
        seq.lane = load.index(min(load))
        self.active[seq.sid] = seq
        return seq.prompt_embeds

    def _fuse(self, seq: Sequence) -> torch.Tensor:
        token_ids, media = seq.fusion
        return fuse(self.model.embed, token_ids, media, self.placeholder_ids, self.model.device,
                    generated=seq.resumed)[0]

    @torch.inference_mode()
    def prompt_hidden(self, seq: Sequence, token_ids: list[int], media: list[tuple[str, torch.Tensor]]
                      ) -> torch.Tensor:
        """Start a sequence and run its whole prompt in one forward, without sampling: its hidden states [S, H]
        (reference checks; the sequence then decodes as usual)."""
        embeds = self.start(seq, token_ids, media)
        if not self.pool.grow(seq.blocks, seq.prompt_len):
            raise RuntimeError("the KV pool has no room for this prompt")
        hidden = self.model.forward(embeds, [Segment(seq.blocks, 0, seq.prompt_len)])
        seq.computed = seq.prompt_len
        return hidden

    def release(self, seq: Sequence) -> None:
        """Forget a sequence (finished, failed or cancelled): its blocks go back to the pool."""
        self._free(seq)

    # -- one step -------------------------------------------------------------------------------------------------

    def _preempt(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.computed = seq.registered = 0
        seq.preempted += 1
        self.preemptions += 1
        log.info("preempted", extra={"request_id": seq.request_id, "tokens": seq.length,
                                     "free_blocks": self.pool.free})

    def schedule(self, seqs: list[Sequence]) -> list[tuple[Sequence, int]]:
        """(sequence, new positions) for this step, taking the blocks they need (see the module docstring)."""
        bs = self.pool.block_size
        rows: list[tuple[Sequence, int]] = []
        taken: set[int] = set()
        preempted: set[int] = set()
        flying = {seq.sid for f in self.flights for seq, _ in f.rows}  # their steps use their blocks: never victims
        for seq in [s for s in seqs if s.length - s.computed == 1]:  # decodes, oldest first
            if seq.sid in preempted:
                continue  # an older sequence needed its blocks this step
            while not self.pool.grow(seq.blocks, seq.computed + 1):
                victim = self._victim(taken | flying | {seq.sid})
                if victim is None:
                    break
                self._preempt(victim)
                preempted.add(victim.sid)
            if self.pool.blocks_for(seq.computed + 1) > len(seq.blocks):
                holders = [s for s in self.active.values() if s is not seq and s.blocks]
                if not holders:
                    seq.fail(f"the KV pool ({self.pool.num_blocks} blocks of {bs} tokens) cannot hold this sequence")
                    self._free(seq)
                elif any(s.sid in flying for s in holders):
                    pass  # holders in flight cannot be victims now: it waits a step, keeping its KV
                else:  # every other holder is scheduled this step: it waits for their blocks
                    self._preempt(seq)
                    preempted.add(seq.sid)
                continue
            rows.append((seq, 1))
            taken.add(seq.sid)
        budget = self.budget.tokens(len(rows)) - len(rows)
        prefilling = [s for s in seqs if s.finish is None and s.length - s.computed > 1 and s.sid not in preempted]
        # Shortest remaining prefill first (ties: oldest first), so a short prompt is not queued behind long ones;
        # a sequence passed over ``aging_steps`` steps in a row goes before them all (the aged: oldest first).
        prefilling.sort(key=lambda s: (0, 0) if s.skipped >= self.aging_steps else (1, s.length - s.computed))
        share = max(0, budget)  # what the step has for prompt chunks
        chunks: dict[int, int] = {}
        decodes = len(rows)
        for seq in prefilling:
            if budget <= 0:
                break
            if self._parked(seq) and not self._resumable(seq, decodes):
                continue  # it waits for room to recompute all of it; those behind it may go on
            if seq.hashes and not seq.blocks and not seq.computed:
                self._share_prefix(seq)
            n = min(seq.length - seq.computed, budget, (len(seq.blocks) + self.pool.free) * bs - seq.computed)
            if n <= 0:
                break  # the first in line waits for blocks: nobody behind it takes them first
            self.pool.grow(seq.blocks, seq.computed + n)
            rows.append((seq, n))
            taken.add(seq.sid)
            chunks[seq.sid] = n
            budget -= n
        for seq in prefilling if share else ():  # a chunk short of what the step could give: passed over
            fair = min(seq.length - seq.computed, self.budget.min_chunk, share)
            seq.skipped = 0 if chunks.get(seq.sid, 0) >= fair else seq.skipped + 1
        return rows

    def _share_prefix(self, seq: Sequence) -> None:
        """Start its block table with the prefix cache's blocks for its prompt, all but its last position at most
        (computed to sample from)."""
        seq.blocks = self.pool.share(seq.hashes[: (seq.length - 1) // self.pool.block_size])
        seq.registered = len(seq.blocks)
        seq.computed = len(seq.blocks) * self.pool.block_size
        if not seq.preempted:
            seq.cached = seq.computed
        if seq.computed:
            log.debug("prefix cached", extra={"request_id": seq.request_id, "tokens": seq.computed})

    def _victim(self, keep: set[int]) -> Sequence | None:
        """The newest unfinished sequence holding blocks, outside ``keep``; one whose blocks are all shared (a prompt
        that took its prefix from the cache and waits for room to compute the rest) only when no other gives any
        block back: preempting it would free nothing and park it."""
        holders = [s for s in self.active.values() if s.blocks and s.finish is None and s.sid not in keep]
        return max(holders, key=lambda s: (self.pool.sole(s.blocks) > 0, s.sid)) if holders else None

    def _free(self, seq: Sequence) -> None:
        """A finished sequence's KV and prompt are never read again: they go back at once."""
        self.pool.release(seq.blocks)
        seq.computed = seq.registered = 0
        seq.prompt_embeds = seq.fusion = None
        self.active.pop(seq.sid, None)

    def _inputs(self, rows: list[tuple[Sequence, int]]) -> torch.Tensor:
        """hidden [T, H]: prompt rows from each prompt's embeddings, generated tokens embedded in one lookup."""
        pieces: list = []
        gen_ids: list[int] = []
        for seq, n in rows:
            a, b, s = seq.computed, seq.computed + n, seq.prompt_len
            if a < s:
                if seq.prompt_embeds is None:  # recomputed after a preemption
                    seq.prompt_embeds = self._fuse(seq)
                pieces.append(seq.prompt_embeds[a : min(b, s)])
            if b > s:
                lo = len(gen_ids)
                gen_ids += seq.output[max(a, s) - s : b - s]
                pieces.append((lo, len(gen_ids)))
        gen = self.model.embed(to_device(gen_ids, torch.long, self.model.device)) if gen_ids else None
        if all(isinstance(p, tuple) for p in pieces):
            return gen  # a pure decode step
        return torch.cat([gen[p[0] : p[1]] if isinstance(p, tuple) else p for p in pieces])

    @torch.inference_mode()
    def step(self, running: list[Sequence], starting: list[tuple[Sequence, torch.Tensor]] = ()) -> None:
        """Run the next step over ``running`` and the sequences ``starting`` now (their prompts already fused by
        :meth:`start`). Without a pipeline: one forward over this step's scheduled positions, applied before it returns
        (with ``defer``: when the next step starts). With one: the next lane that has work sends its step down the pipe
        (first applying that lane's previous answers) and returns; with no lane to send, the oldest answers in flight
        are applied. A sequence that fails is finished with ERROR (``seq.error``); the others are unaffected."""
        seqs, seen = [], set()
        for seq in [*running, *(s for s, _ in starting)]:
            if seq.finish is None and seq.sid not in seen:
                seen.add(seq.sid)
                seqs.append(seq)
        for _ in range(self.lanes):
            lane = self._next_lane
            self._next_lane = (lane + 1) % self.lanes
            while any(f.lane == lane for f in self.flights):
                self._land(self.flights.popleft())
            rows = self.schedule([s for s in seqs if s.lane == lane and s.finish is None])
            if rows:
                flight = self._launch(lane, rows)
                if flight.sent is None and not (self.defer and flight.drawn is not None):
                    self._land(flight)
                elif flight.sent is None:
                    self.flights.append(flight)  # its tokens are applied when the next step starts
                else:
                    self.overlapped += bool(self.flights)
                    self.flights.append(flight)
                return
        if self.flights:
            self._land(self.flights.popleft())

    def settle(self) -> None:
        """Apply every step still in flight (before holding the loop, or exiting)."""
        while self.flights:
            self._land(self.flights.popleft())

    def _launch(self, lane: int, rows: list[tuple[Sequence, int]]) -> Flight:
        """This shard's forward over the step's rows; then either sample here or send the rest down the pipe."""
        self.steps += 1
        decodes = sum(1 for seq, n in rows if n == 1 and seq.computed + 1 == seq.length)
        self.positions[0] += decodes
        self.positions[1] += sum(n for _, n in rows) - decodes
        t0 = time.perf_counter()
        segments = [Segment(seq.blocks, seq.computed, n) for seq, n in rows]
        sampled = [seq.computed + n == seq.length for seq, n in rows]
        hidden, failed = None, {}
        # Decodes of generated tokens: a CUDA graph. Without a pipeline this shard samples too, and the head's graph
        # samples every row: so only when each row is sampled. A preempted sequence recomputing its generated tokens
        # a position a step (the budget's last one after the decodes) is a length-1 row that must not be: it got a
        # token mid-recompute, and its text diverged from there (an outside auditor's). The pipeline's last shard
        # checks the same per step (``StageWorker._step``).
        if all(seq.computed >= seq.prompt_len for seq, _ in rows) and (self.pipeline is not None or all(sampled)):
            params = None if self.pipeline is not None else [
                (s.temperature, s.top_p, s.seed, s.draws) for s in (seq.sampler for seq, _ in rows)]
            hidden = self.model.decode(segments, ids=[seq.output[seq.computed - seq.prompt_len] for seq, _ in rows],
                                       params=params)
            if isinstance(hidden, Drawn):
                for seq, _ in rows:
                    seq.sampler.draws += 1
                return Flight(lane, rows, failed, drawn=ToHost(hidden.both), drawn_rows=list(range(len(rows))),
                              launched=t0)
        if hidden is None:
            meta = self.model.prepare(segments)
            hidden, failed = forward_isolating(self.model, self._inputs(rows), segments, meta)  # [T, H]
        flight = Flight(lane, rows, failed, launched=t0)
        if self.pipeline is not None:
            # The other shards run the rest; the last one samples the rows marked and sends every row's answer
            # back (a token, NO_TOKEN for a prefill chunk, FAILED for a row that failed there).
            ints = torch.tensor([[seq.sid, g.start, g.length, seq.params.seed, i in failed,
                                  seq.resumed + len(seq.output), sampled[i]]
                                 for i, ((seq, _), g) in enumerate(zip(rows, segments))], dtype=torch.long)
            floats = torch.tensor([[seq.params.temperature, seq.params.top_p] for seq, _ in rows],
                                  dtype=torch.float64)
            flight.sent = self.pipeline.send(ints, floats, segments, hidden)
            return flight
        idx = [i for i, flag in enumerate(sampled) if flag]
        if idx:
            if len(idx) == len(rows) == hidden.shape[0]:  # one row per sequence, each sampled: no gather
                last_rows = hidden
            else:
                last = list(itertools.accumulate(g.length for g in segments))  # one past each row's last position
                last_rows = hidden[to_device([last[i] - 1 for i in idx], torch.long, self.model.device)]
            flight.drawn = ToHost(draw_rows([rows[i][0].sampler for i in idx], self.model.logits(last_rows)))
            flight.drawn_rows = idx
        else:
            flight.results = [NO_TOKEN] * len(rows)
        return flight

    def _land(self, flight: Flight) -> None:
        """Apply a step's answers: tokens appended, chunks counted, failures finished."""
        answers = flight.results
        if flight.drawn is not None:
            answers = [NO_TOKEN] * len(flight.rows)
            for i, result in zip(flight.drawn_rows, results(flight.drawn.tolist())):
                answers[i] = result
        elif answers is None:
            answers = [t if t >= 0 or t == NO_TOKEN else "this request failed on a later pipeline shard (see its log)"
                       for t in self.pipeline.answers(flight.sent).tolist()]
        # The step's compute is over once its answers are on the host (a sampled token on a GPU; any step on a CPU,
        # which runs synchronously); a GPU step that sampled nothing may still be running, so it is not timed.
        if self.model.device.type != "cuda" or any(r != NO_TOKEN for r in answers):
            took = time.perf_counter() - flight.launched
            self.budget.observe(sum(n for _, n in flight.rows), took)
            self.timed[0] += 1
            self.timed[1] += took
        for i, ((seq, n), result) in enumerate(zip(flight.rows, answers)):
            if self.active.get(seq.sid) is not seq or seq.finish is not None:
                continue  # released (cancelled) or ended by the worker while the step was in flight
            if i in flight.failed:
                seq.fail(flight.failed[i])
            elif isinstance(result, str):
                seq.fail(result)
            else:
                seq.computed += n
                if seq.computed >= seq.prompt_len:
                    seq.prompt_embeds = None  # in the KV pool now (see start)
                if seq.registered < len(seq.hashes):  # its full prompt blocks, computed on every shard now
                    full = min(seq.computed // self.pool.block_size, len(seq.hashes))
                    for i in range(seq.registered, full):
                        self.pool.register(seq.blocks[i], seq.hashes[i])
                    seq.registered = max(seq.registered, full)
                if result != NO_TOKEN:
                    if self.pipeline is not None:
                        seq.sampler.draws += 1  # drawn on the last shard
                    seq.append(result)
            if seq.finish is not None:
                self._free(seq)

    def prefill(self, seq: Sequence, token_ids: list[int], media: list[tuple[str, torch.Tensor]]) -> None:
        """Start one sequence alone and run it until its first token is sampled (its prompt may take several
        chunks)."""
        self.start(seq, token_ids, media)
        while not seq.output and seq.finish is None:
            self.step([seq])


def default_micro_batches(shards: int, device: torch.device) -> int:
    """One micro-batch per shard when the shards run on GPUs (each has its own device to keep busy); one step at a
    time on CPUs, where the shards of a machine share its cores: measured on 2 cores (bench/README.md), two
    micro-batches left no core for Redis and the clients and cost 0.69x decode tokens/s at 8 streams."""
    return shards if device.type == "cuda" else 1


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


def warn_small_pool(model, max_context: int) -> None:
    """Say at start when the pool cannot hold one full context (a pipeline replica's shard 0 too)."""
    tokens = model.pool.num_blocks * model.pool.block_size
    if tokens < max_context:
        log.warning("the KV pool holds fewer tokens than the model's context: longer requests are refused, and a "
                    "request naming no max_tokens gets at most what the pool holds (raise --kv-cache-gb or "
                    "--gpu-memory-utilization)", extra={"pool_tokens": tokens, "max_context": max_context})


def load_engine(spec, layers: range | None = None, kv_cache_bytes: int | None = None,
                pipeline: PipelineHead | None = None, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", max_batched_tokens: int = MAX_BATCHED_TOKENS,
                max_running: int = 16, gpu_memory_utilization: float = 0.9, num_blocks: int | None = None,
                attention: str = "auto", eager: bool = False, max_step_ms: float | None = None,
                defer: bool = False, prefix_cache: bool = True) -> Engine:
    """Shard 0's (or the only shard's) engine: its layers from the checkpoint, then a KV pool of ``num_blocks``
    (default: sized by backbone/kv.py's ``pool_blocks``), then (on a GPU, unless ``eager``) the decode step's CUDA
    graphs for up to ``max_running`` sequences."""
    from backbone.kv import pool_blocks
    from backbone.loader import load_shard

    model, _ = load_shard(spec.path, spec.config["text_config"], layers, dtype, device, attention)
    if num_blocks is None:
        num_blocks = pool_blocks(model, kv_cache_bytes, gpu_memory_utilization, max_batched_tokens, max_running,
                                 spec.max_context)
    if num_blocks < 1:
        raise ValueError("no memory left for the KV cache (lower --max-batched-tokens, raise "
                         "--gpu-memory-utilization, or give --kv-cache-gb)")
    model.allocate_pool(num_blocks)
    warn_small_pool(model, spec.max_context)
    if not eager:
        model.capture_graphs(max_running, spec.max_context)
    return Engine(model, spec.placeholder_ids, spec.eos_token_ids, spec.max_context, pipeline, max_batched_tokens,
                  max_step_ms=max_step_ms, defer=defer, prefix_cache=prefix_cache)

"""backbone/engine.py's scheduler: chunked prefill under a token budget, decodes that always advance, preemption when
the paged KV pool runs out, admission by free blocks. Every sequence must give the tokens it gives alone.

"Alone" up to float arithmetic: a batch, a chunk or a recompute changes the shapes of the matmuls, which changes
the last bits of the logits (measured ~1e-5 here), so a choice decided by less than that may fairly flip and the
texts part from there. :func:`same_tokens` allows exactly that: the tokens must be equal up to the first step where
the lone run's choice was a near tie (top-2 logit gap, or for a seeded sample the exponential race's relative gap,
under 1e-3), and a test fails if too few steps were compared to prove anything."""

from __future__ import annotations

import pytest
import torch

from backbone.engine import Engine
from backbone.loader import load_shard
from backbone.sampling import exponential_noise
from router.messages import FinishReason, SamplingParams
from tests.unit.test_engine import MEDIA_PROMPT, PROMPTS, ids_of, media_rows


@pytest.fixture(scope="module")
def tok(tiny_spec):
    return tiny_spec.load_tokenizer()


@pytest.fixture(scope="module")
def model(tiny_spec):
    return load_shard(tiny_spec.path, tiny_spec.config["text_config"])[0]


def engine_with(model, tiny_spec, blocks: int, budget: int = 2048) -> Engine:
    model.allocate_pool(blocks)
    return Engine(model, tiny_spec.placeholder_ids, eos_ids=[], max_context=tiny_spec.max_context,
                  max_batched_tokens=budget, prefix_cache=False)  # the scheduling policy on prompts computed whole


def params(n, **kw):
    return SamplingParams(max_tokens=n, temperature=kw.pop("temperature", 0.0), ignore_eos=True, **kw)


def drive(engine, prompts, ps, media=None, limit=2000):
    """Start every prompt at once and step until all finish; returns the sequences and the steps taken."""
    seqs = []
    for i, (ids, p) in enumerate(zip(prompts, ps)):
        seq = engine.new_sequence(f"r{i}", len(ids), p)
        engine.start(seq, ids, list(media[i]) if media and media[i] else [])
        seqs.append(seq)
    steps = 0
    while any(s.finish is None for s in seqs):
        engine.step(seqs)
        steps += 1
        assert steps < limit, "the scheduler stopped making progress"
    return seqs, steps


def alone(model, tiny_spec, ids, p, media=()):
    engine = engine_with(model, tiny_spec, 256)
    (seq,), _ = drive(engine, [ids], [p], [media])
    return seq.output


NEAR_TIE = 1e-3


def reference(model, tiny_spec, ids, p, media=()):
    """The tokens alone, and how clear each choice was (see the module docstring)."""
    out = alone(model, tiny_spec, ids, p, media)
    engine = engine_with(model, tiny_spec, 256)
    margins = []
    for k in range(len(out)):
        # The generated tokens as a migrated request's (resumed): text, whatever their ids (one may be a
        # placeholder's).
        seq = engine.new_sequence("m", len(ids) + k, params(1, seed=p.seed, temperature=p.temperature), resumed=k)
        logits = engine.model.logits(engine.prompt_hidden(seq, ids + out[:k], list(media))[-1:])[0]
        engine.release(seq)
        if p.temperature == 0:
            top = logits.topk(2).values
            margins.append(float(top[0] - top[1]))
        else:
            race = torch.softmax(logits / p.temperature, -1) / exponential_noise(
                torch.tensor([seq.params.seed]), torch.tensor([k]), logits.shape[-1])[0]
            top = race.topk(2).values
            margins.append(float((top[0] - top[1]) / top[0]))
    return out, margins


def same_tokens(got: list[int], want: list[int], margins: list[float]) -> int:
    """Assert ``got`` equals ``want`` up to the first near tie (where they may part); returns the steps compared."""
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        if a != b:
            assert margins[k] < NEAR_TIE, f"token {k} differs ({a} != {b}) though the choice was clear ({margins[k]})"
            return k
        if margins[k] < NEAR_TIE:
            return k + 1
    return len(want)


def long_prompt(tok, n=60):
    ids = ids_of(tok, " ".join(PROMPTS) * 4)[:n]
    assert len(ids) == n
    return ids


def test_a_prompt_in_chunks_gives_the_tokens_of_a_whole_prefill(model, tiny_spec, tok):
    ids = long_prompt(tok)
    want = alone(model, tiny_spec, ids, params(8))
    for budget in (1, 7, 16, 59):
        engine = engine_with(model, tiny_spec, 256, budget)
        (seq,), steps = drive(engine, [ids], [params(8)])
        assert seq.output == want, budget
        assert steps == -(-len(ids) // budget) + 7  # the prompt's chunks, then one token a step


def test_chunks_that_cut_through_media_rows(model, tiny_spec, tok):
    ids = ids_of(tok, MEDIA_PROMPT)
    want = alone(model, tiny_spec, ids, params(6), media_rows())
    engine = engine_with(model, tiny_spec, 256, 3)
    (seq,), _ = drive(engine, [ids], [params(6)], [media_rows()])
    assert seq.output == want


def test_running_streams_advance_every_step_while_a_long_prompt_is_chunked(model, tiny_spec, tok):
    short = [ids_of(tok, p) for p in PROMPTS[1:]]
    refs = [reference(model, tiny_spec, ids, params(30)) for ids in short]
    engine = engine_with(model, tiny_spec, 256, 8)
    running = []
    for i, ids in enumerate(short):
        seq = engine.new_sequence(f"s{i}", len(ids), params(30))
        engine.prefill(seq, ids, [])
        running.append(seq)
    big = engine.new_sequence("big", 60, params(4))
    engine.start(big, long_prompt(tok), [])
    while not big.output:
        before = [len(s.output) for s in running]
        engine.step(running + [big])
        assert [len(s.output) for s in running] == [b + 1 for b in before]  # a token each, every step
    compared = 0
    for seq, (want, margins) in zip(running, refs):
        while seq.finish is None:
            engine.step([seq])
        compared += same_tokens(seq.output, want, margins)
    assert compared >= 30


def test_sequences_joining_and_leaving_mid_batch_give_their_own_tokens(model, tiny_spec, tok):
    prompts = [ids_of(tok, p) for p in PROMPTS] + [long_prompt(tok, 40)]
    lengths = [3, 9, 5, 7]
    refs = [reference(model, tiny_spec, ids, params(n)) for ids, n in zip(prompts, lengths)]
    engine = engine_with(model, tiny_spec, 256, 12)
    seqs, step = [], 0
    while len(seqs) < len(prompts) or any(s.finish is None for s in seqs):
        if step % 2 == 0 and len(seqs) < len(prompts):  # a new one every other step
            i = len(seqs)
            seq = engine.new_sequence(f"j{i}", len(prompts[i]), params(lengths[i]))
            engine.start(seq, prompts[i], [])
            seqs.append(seq)
        engine.step([s for s in seqs if s.finish is None])
        step += 1
    assert sum(same_tokens(s.output, *ref) for s, ref in zip(seqs, refs)) >= 16


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_pool_too_small_for_everyone_preempts_and_still_finishes_all(model, tiny_spec, tok, temperature):
    """Four sequences that need 4 blocks each at the end, in a pool of 9: some are preempted (their blocks freed,
    recomputed later from prompt + generated tokens) and each gives its tokens alone (seeded sampling resumes at its
    draw)."""
    base = long_prompt(tok, 60)
    prompts = [base[i : i + 20] for i in (0, 10, 20, 30)]
    ps = [params(40, temperature=temperature, seed=100 + i) for i in range(4)]
    refs = [reference(model, tiny_spec, ids, p) for ids, p in zip(prompts, ps)]
    engine = engine_with(model, tiny_spec, 9, 64)
    seqs, _ = drive(engine, prompts, ps)
    assert engine.preemptions > 0 and any(s.preempted for s in seqs)
    assert sum(same_tokens(s.output, *ref) for s, ref in zip(seqs, refs)) >= 80
    assert all(s.finish == FinishReason.LENGTH for s in seqs)
    assert engine.pool.free == 9  # finished sequences gave every block back


def test_a_preempted_sequence_is_not_preempted_again_and_again_while_it_recomputes(model, tiny_spec, tok):
    """An outside tester's finding: a preempted sequence started recomputing as soon as a block was free, so it was
    the newest holder again when any older decode crossed a block boundary, and was preempted again (one sequence 93
    times in 109 s; three quarters of the positions computed were recompute). Parked until its whole length and a
    block per decode fit, it recomputes about once. Here (6 sequences of 20 + 60 in a pool of 12 blocks), before:
    22 preemptions, 11 of one sequence, 927 prompt positions computed for 120 of prompts."""
    base = long_prompt(tok, 60)
    prompts = [base[i : i + 20] for i in range(0, 30, 5)]
    ps = [params(60, temperature=0.8, seed=200 + i) for i in range(6)]
    refs = [reference(model, tiny_spec, ids, p) for ids, p in zip(prompts, ps)]
    engine = engine_with(model, tiny_spec, 12, 64)
    seqs, _ = drive(engine, prompts, ps)
    assert engine.preemptions > 0 and max(s.preempted for s in seqs) <= 2, [s.preempted for s in seqs]
    assert engine.positions[1] <= 120 + 4 * 80, engine.positions  # recomputes: a few sequences' lengths, once
    assert sum(same_tokens(s.output, *ref) for s, ref in zip(seqs, refs)) >= 120
    assert engine.pool.free == 12


def test_no_new_sequence_is_admitted_ahead_of_a_parked_one(model, tiny_spec, tok):
    engine = engine_with(model, tiny_spec, 6, 64)
    old, new = (engine.new_sequence(f"s{i}", 20, params(40)) for i in range(2))
    engine.start(old, long_prompt(tok, 20), [])
    assert engine.admissible(new)
    engine.schedule([old])
    engine._preempt(old)  # as a decode that found the pool empty would
    assert engine.pool.free == 6 and not engine.admissible(new)  # room enough, but the parked one goes first
    assert engine.schedule([old]) == [(old, 20)]  # nothing decodes: it resumes at once
    assert engine.admissible(new)


def test_a_preempted_prompt_with_media_is_fused_again_and_its_embeddings_are_not_kept_meanwhile(model, tiny_spec,
                                                                                                 tok):
    """A prompt's fused embeddings leave the device once the prompt is in the KV pool (no pool sizing counts them);
    a preempted sequence is fused again from its token ids and media rows kept on the host, and still gives its
    tokens alone."""
    ids = ids_of(tok, MEDIA_PROMPT)
    rows = [media_rows(seed) for seed in range(4)]
    ps = [params(64 - len(ids)) for _ in range(4)]
    refs = [reference(model, tiny_spec, ids, p, r) for p, r in zip(ps, rows)]
    engine = engine_with(model, tiny_spec, 9, 64)
    fused = []
    engine._fuse = lambda seq, fuse=engine._fuse: fused.append(seq.sid) or fuse(seq)
    seqs = []
    for i, (p, r) in enumerate(zip(ps, rows)):
        seqs.append(engine.new_sequence(f"m{i}", len(ids), p))
        engine.start(seqs[-1], ids, list(r))
    steps = 0
    while any(s.finish is None for s in seqs):
        engine.step(seqs)
        for s in seqs:
            assert s.prompt_embeds is None or s.computed < s.prompt_len
        steps += 1
        assert steps < 2000
    assert 4 < len(fused) <= 4 + engine.preemptions  # fused again only if preempted after its prefill
    assert sum(same_tokens(s.output, *ref) for s, ref in zip(seqs, refs)) >= 40  # of 124, up to near ties
    assert all(s.fusion is None for s in seqs) and engine.pool.free == 9


def test_admission_counts_free_blocks_and_what_prefilling_sequences_will_take(model, tiny_spec, tok):
    engine = engine_with(model, tiny_spec, 6, 4)
    first = engine.new_sequence("a", 60, params(4))
    assert engine.fits_pool(first) and engine.admissible(first)  # 64 positions: 4 of the 6 blocks
    engine.start(first, long_prompt(tok), [])
    engine.step([first])  # one 4-token chunk: 1 block taken, 3 more promised
    # 5 free, 3 promised to the first: 2 left, enough for a 31-position prompt (2 blocks), not a 41 (3 blocks).
    assert engine.admissible(engine.new_sequence("b", 30, params(2)))
    assert not engine.admissible(engine.new_sequence("b", 40, params(2)))
    huge = engine.new_sequence("c", 90, params(10))
    assert not engine.fits_pool(huge)  # 100 positions > 96 the pool holds: it could never finish


def test_a_sequence_the_pool_cannot_hold_fails_alone(model, tiny_spec, tok):
    engine = engine_with(model, tiny_spec, 2, 64)
    ids = long_prompt(tok, 20)
    seq = engine.new_sequence("r", len(ids), params(40))
    engine.start(seq, ids, [])
    for _ in range(50):
        if seq.finish is not None:
            break
        engine.step([seq])
    assert seq.finish == FinishReason.ERROR and "KV pool" in seq.error
    assert engine.pool.free == 2


def test_a_decode_waits_rather_than_preempting_itself_while_the_other_holders_are_in_flight(model, tiny_spec):
    """With pipeline micro-batches, sequences of another lane may be in flight (their step is on a later shard):
    they cannot be victims. An older decode that needs a block then waits a step keeping its KV, instead of
    throwing its own away; once the flight has landed, the newest holder is preempted as usual."""
    from backbone.engine import Flight

    engine = engine_with(model, tiny_spec, 2)
    old, new = (engine.new_sequence(r, 16, params(4)) for r in ("old", "new"))
    for seq in (old, new):
        engine.start(seq, [1] + [20 + i for i in range(15)], [])
    engine.step([old, new])  # both prompts (one block each), first tokens drawn: the pool is full
    assert engine.pool.free == 0 and len(old.output) == len(new.output) == 1
    engine.flights.append(Flight(lane=1, rows=[(new, 1)], failed={}))  # ``new`` is in flight on another lane
    blocks, computed = list(old.blocks), old.computed
    assert engine.schedule([old]) == []
    assert (old.blocks, old.computed, engine.preemptions) == (blocks, computed, 0)  # it kept its KV
    engine.flights.clear()  # landed
    assert engine.schedule([old]) == [(old, 1)] and new.preempted == 1 and engine.preemptions == 1


def test_a_step_time_target_sizes_the_chunks_riding_with_decodes_and_keeps_the_tokens(model, tiny_spec, tok):
    """``max_step_ms``: the chunk a step carries beside decodes is what the learned cost fits in the target (never
    the whole cap here), a step without decodes takes the cap, and every sequence still gives its own tokens."""
    short = [ids_of(tok, p) for p in PROMPTS[1:]]
    refs = [reference(model, tiny_spec, ids, params(30)) for ids in short]
    engine = engine_with(model, tiny_spec, 256, 48)
    engine.budget = type(engine.budget)(48, target_ms=1e-3)  # below any step: chunks shrink to min_chunk
    running = []
    for i, ids in enumerate(short):
        seq = engine.new_sequence(f"s{i}", len(ids), params(30))
        engine.prefill(seq, ids, [])  # alone: no decodes, whole-cap chunks
        running.append(seq)
    big = engine.new_sequence("big", 60, params(4))
    engine.start(big, long_prompt(tok), [])
    chunks = []
    while not big.output:
        before = big.computed
        engine.step(running + [big])
        chunks.append(big.computed - before)
    assert chunks == [16, 16, 16, 12]  # min_chunk each, then the rest
    compared = 0
    for seq, (want, margins) in zip(running, refs):
        while seq.finish is None:
            engine.step([seq])
        compared += same_tokens(seq.output, want, margins)
    assert compared >= 30


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_deferred_steps_give_the_tokens_of_synchronous_ones(model, tiny_spec, tok, temperature):
    """``defer`` (the worker's mode on GPUs): a step's tokens stay on their way to the host until the next step starts
    (or ``settle``), so the caller's work between steps overlaps the device's. Same tokens as applying each step before
    it returns, with sequences joining mid-way, chunks, preemption and a release while a step is in flight."""
    base = long_prompt(tok, 60)
    prompts = [base[i : i + 20] for i in (0, 10, 20, 30)]
    ps = [params(24 + 4 * i, temperature=temperature, seed=7 + i) for i in range(4)]
    outs = {}
    for defer in (False, True):
        model.allocate_pool(9)  # small: preemptions happen
        engine = Engine(model, tiny_spec.placeholder_ids, eos_ids=[], max_context=tiny_spec.max_context,
                        max_batched_tokens=16, defer=defer)
        seqs, steps, in_flight = [], 0, 0
        while len(seqs) < len(prompts) or any(s.finish is None for s in seqs):
            if steps % 2 == 0 and len(seqs) < len(prompts):
                i = len(seqs)
                seq = engine.new_sequence(f"d{i}", len(prompts[i]), ps[i])
                engine.start(seq, prompts[i], [])
                seqs.append(seq)
            engine.step([s for s in seqs if s.finish is None])
            in_flight += bool(engine.flights)
            steps += 1
            assert steps < 500
        engine.settle()
        outs[defer] = [s.output for s in seqs]
        assert bool(in_flight) == defer and not engine.flights
        assert engine.pool.free == 9 and engine.preemptions > 0
    assert outs[False] == outs[True]
    # A sequence released while its step is in flight: the step's answer for it is dropped, the others land.
    model.allocate_pool(32)
    engine = Engine(model, tiny_spec.placeholder_ids, eos_ids=[], max_context=tiny_spec.max_context, defer=True)
    a, b = (engine.new_sequence(r, 20, params(5)) for r in ("a", "b"))
    for seq, ids in ((a, prompts[0]), (b, prompts[1])):
        engine.start(seq, ids, [])
    engine.step([a, b])
    assert engine.flights and not a.output  # the first tokens are still on their way
    engine.release(a)
    engine.settle()
    assert not a.output and len(b.output) == 1 and engine.pool.free == 32 - len(b.blocks)


def test_a_short_prompt_arriving_behind_long_prefills_gets_its_first_token_within_a_step_or_two(
        model, tiny_spec, tok):
    """The outside tester's case, scaled down: four long prompts are prefilling (in 16-position chunks) when a short
    one arrives. Shortest remaining prefill first: its first token comes at once, not after every long prompt's
    chunks (first come, first served took 13 more steps); the long ones still all finish, and every sequence gives
    its tokens alone."""
    base = long_prompt(tok, 120)
    longs = [base[i : i + 60] for i in (0, 20, 40, 60)]
    short = base[110:120]
    refs = [reference(model, tiny_spec, ids, params(8)) for ids in [*longs, short]]
    engine = engine_with(model, tiny_spec, 256, 16)
    seqs = []
    for i, ids in enumerate(longs):
        seq = engine.new_sequence(f"long{i}", len(ids), params(8))
        engine.start(seq, ids, [])
        seqs.append(seq)
    for _ in range(2):
        engine.step(seqs)
    assert not any(s.output for s in seqs) and 0 < sum(s.computed for s in seqs) < 4 * 60
    quick = engine.new_sequence("short", len(short), params(8))
    engine.start(quick, short, [])
    seqs.append(quick)
    waited = 0
    while not quick.output:
        engine.step(seqs)
        waited += 1
    assert waited <= 2
    steps = 0
    while any(s.finish is None for s in seqs):
        engine.step(seqs)
        steps += 1
        assert steps < 200, "the scheduler stopped making progress"
    assert all(s.finish == FinishReason.LENGTH for s in seqs)
    assert sum(same_tokens(s.output, *ref) for s, ref in zip(seqs, refs)) >= 30
    assert engine.pool.free == 256


def test_a_long_prompt_is_not_starved_by_a_steady_stream_of_short_ones(model, tiny_spec, tok):
    """A new 8-position prompt every step, each done with its first token, fills an 8-position budget on its own:
    shortest first alone would never give the long prompt a chunk. Passed over ``aging_steps`` steps in a row, it
    goes first for a step, so it advances a chunk at least every ``aging_steps + 1`` steps and finishes; the short
    ones all finish too, and the long one gives its tokens alone."""
    ids = long_prompt(tok, 60)
    short = long_prompt(tok, 68)[60:]
    want, margins = reference(model, tiny_spec, ids, params(4))

    def stream(aging_steps: int, steps: int):
        engine = engine_with(model, tiny_spec, 256, 8)
        engine.aging_steps = aging_steps
        big = engine.new_sequence("big", len(ids), params(4))
        engine.start(big, ids, [])
        seqs, step = [big], 0
        for step in range(steps):
            seq = engine.new_sequence(f"s{step}", len(short), params(1))
            engine.start(seq, short, [])
            seqs.append(seq)
            engine.step([s for s in seqs if s.finish is None])
            if big.finish is not None:
                break
        while any(s.finish is None for s in seqs[1:]):  # the stream stops: the short ones left drain
            engine.step([s for s in seqs[1:] if s.finish is None])
        return big, seqs[1:], step + 1

    big, shorts, _ = stream(10**9, 60)  # no aging: the long prompt never gets a chunk
    assert big.computed == 0 and not big.output and all(s.finish == FinishReason.LENGTH for s in shorts)
    big, shorts, steps = stream(4, 200)
    assert big.finish == FinishReason.LENGTH and steps <= (-(-60 // 8) + 4) * 5
    assert all(s.finish == FinishReason.LENGTH for s in shorts)
    assert same_tokens(big.output, want, margins) >= 3


def test_the_prefill_order_bench_measures_both_orders(model, tiny_spec, tok):
    """bench/prefill_order.py's measurement on the tiny model: oldest first (its aging guard at 0) keeps the short
    prompt behind the long ones' chunks; the scheduler's own order gives it its first token in the step after it
    arrives. Keeps the bench honest (it compares what it says it compares)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "prefill_order.py"
    spec = importlib.util.spec_from_file_location("prefill_order_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    base = long_prompt(tok, 120)
    longs, short = [base[0:60], base[30:90], base[60:120]], base[110:120]
    engine = engine_with(model, tiny_spec, 256, 16)
    engine.aging_steps = 0
    oldest = bench.first_tokens(engine, longs, short)
    engine.aging_steps = 32
    shortest = bench.first_tokens(engine, longs, short)
    assert shortest["short"][0] == 1
    assert oldest["short"][0] >= 3 * 60 // 16 - 2  # behind every long prompt's chunks
    assert engine.pool.free == 256


def test_a_default_budget_is_lowered_to_what_a_pool_short_of_the_context_holds(model, tiny_spec):
    """An outside tester's finding: with a pool of 640 tokens under a 1,024-token context, a 542-token prompt naming
    no max_tokens was refused (the gateway's default 256 did not fit the pool), though 98 tokens had room. A
    budget the gateway chose is lowered to the pool; one the client named is still refused whole."""
    engine = engine_with(model, tiny_spec, 4, 64)  # 64 tokens
    chosen = engine.new_sequence("d", 40, SamplingParams(max_tokens=256, default_budget=True))
    named = engine.new_sequence("n", 40, SamplingParams(max_tokens=256))
    assert chosen.max_tokens == 24 and engine.fits_pool(chosen)
    assert named.max_tokens == 256 and not engine.fits_pool(named)
    error, limit = engine.pool_refusal(named)
    assert "prompt + max_tokens = 296 tokens" in error and limit == "budget"
    # A prompt the pool cannot hold at all: said so, not in terms of a default max_tokens the client never sent.
    whole = engine.new_sequence("w", 70, SamplingParams(max_tokens=256, default_budget=True))
    assert not engine.fits_pool(whole)
    assert engine.pool_refusal(whole) == ("the prompt is 70 tokens; this backbone's KV pool holds 64 (less than the "
                                          "model's context)", "prompt")


def test_the_preemption_bench_compares_the_two_policies(model, tiny_spec, tok):
    """bench/preemption.py's driver on the tiny model under a pool too small for the load: both policies finish every
    request with the same tokens (greedy), and the eager one (recompute as soon as a block is free, new sequences
    admitted ahead) preempts more and recomputes more prompt positions, which is what the bench measures."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "preemption.py"
    spec = importlib.util.spec_from_file_location("preemption_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    reqs = bench.workload(12, 1.0, tiny_spec.config["text_config"]["vocab_size"], seed=3)
    engine = engine_with(model, tiny_spec, 16, 64)
    runs = {}
    for park in (True, False):
        engine.park_preempted = park
        runs[park] = bench.run(engine, reqs, max_running=8)
        assert engine.pool.free == 16 and len(runs[park]["outputs"]) == 12
    engine.park_preempted = True
    parked, eager = runs[True], runs[False]
    assert parked["outputs"] == eager["outputs"]
    assert eager["preemptions"] > parked["preemptions"] and eager["prompt_ratio"] > parked["prompt_ratio"]


def test_a_recomputing_row_never_takes_the_decode_graph_that_samples_every_row(model, tiny_spec, monkeypatch):
    """The head's decode graph samples every row. A preempted sequence recomputing its generated tokens a position
    a step (the budget's last one after the decodes) is a length-1 row that must not be sampled: taking the graph,
    it got a token mid-recompute and its text diverged (an outside auditor's, under an uncaptured graph). The graph
    is for steps whose every row is sampled; the graph is spied on here (a CPU has none), the step going eager."""
    engine = engine_with(model, tiny_spec, 64, budget=2)
    d, r = engine.new_sequence("d", 3, params(30)), engine.new_sequence("r", 3, params(12))
    engine.start(d, [1, 40, 41], [])
    engine.start(r, [1, 50, 51], [])
    while len(r.output) < 6:
        engine.step([d, r])
    engine._preempt(r)  # as a decode that found the pool empty would
    asked = []

    def decode(segments, ids=None, hidden=None, params=None):
        rows = [(g.start, g.length) for g in segments]
        asked.append(params is not None and any(start + 1 < r.length and start == r.computed for start, _ in rows))
        return None  # no graph fits: the eager path runs

    monkeypatch.setattr(engine.model, "decode", decode)
    recomputing = 0
    while r.finish is None:
        recomputing += r.computed + 1 < r.length and r.computed >= r.prompt_len
        engine.step([d, r])
    assert recomputing and asked and not any(asked), asked  # it recomputed, and never through the sampling graph

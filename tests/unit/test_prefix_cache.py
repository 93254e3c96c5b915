"""backbone/kv.py + backbone/engine.py: the prefix cache. Prompts that begin alike share the KV blocks of that
beginning (the same token ids, the same media, the same salt), and what a sequence computes from them is what it
computes from scratch."""

from __future__ import annotations

import pytest
import torch

from backbone.engine import Engine
from backbone.kv import KVPool, prefix_hashes
from backbone.loader import load_shard
from router.messages import SamplingParams

BS = 16


def pool(blocks=8) -> KVPool:
    return KVPool(1, blocks, BS, 1, 4, torch.float32, "cpu")


def test_a_shared_block_is_counted_by_its_holders_and_kept_once_none_holds_it_until_evicted():
    p = pool(4)
    a: list[int] = []
    assert p.grow(a, 3 * BS) and p.free == 1
    first = a[0]
    p.register(a[0], b"h0")
    p.register(a[1], b"h1")
    b = p.share([b"h0", b"h1", b"h2"])  # the run stops at the first hash not held
    assert b == a[:2] and p.hits == 2
    p.release(a)
    assert p.free == 2  # a[2] free; a[0], a[1] still held by b
    p.release(b)
    assert p.free == 4 and p.cached == 2  # nobody holds them; their content is kept
    assert p.share([b"h0"]) == [first] and p.free == 3  # taken back from the cache
    c: list[int] = []
    assert p.grow(c, 3 * BS)  # the free list runs out: the idle cached block is evicted
    assert p.free == 0 and p.cached == 1 and p.share([b"h1"]) == []
    assert not p.grow(c, 4 * BS)


def test_a_table_naming_a_block_twice_gives_it_back_once():
    p = pool(2)
    a: list[int] = []
    p.grow(a, BS)
    p.register(a[0], b"h")
    held = p.share([b"h"])
    p.release(a + a)  # corrupted: the same block twice
    assert p.free == 1  # still held by ``held``
    p.release(held)
    assert p.free == 2


def test_prefix_hashes_cover_full_blocks_and_change_with_tokens_media_and_salt():
    ids = list(range(100, 100 + 3 * BS + 5))
    h = prefix_hashes(ids, [], {}, BS)
    assert len(h) == 3 and h == prefix_hashes(ids, [], {}, BS)  # the last partial block is not hashed
    other = ids[: BS + 3] + [7] + ids[BS + 4 :]
    assert prefix_hashes(other, [], {}, BS)[0] == h[0] and prefix_hashes(other, [], {}, BS)[1:] != h[1:]
    assert prefix_hashes(ids, [], {}, BS, salt="bob")[0] != h[0]  # tenants share nothing
    img = [1] * 20 + [9] * 8 + [2] * 30  # an image's 8 rows at positions 20-27: in the second block
    first = prefix_hashes(img, [("image", "key-a", 8)], {"image": 9}, BS)
    second = prefix_hashes(img, [("image", "key-b", 8)], {"image": 9}, BS)
    assert first[0] == second[0] and first[1] != second[1] and first[2] != second[2]
    # two images side by side: the second begins where the first's rows end, in the third block
    two = [1] * 20 + [9] * 22 + [2] * 20  # 14 rows at 20-33, then 8 at 34-41
    a = prefix_hashes(two, [("image", "x", 14), ("image", "y", 8)], {"image": 9}, BS)
    b = prefix_hashes(two, [("image", "x", 14), ("image", "z", 8)], {"image": 9}, BS)
    assert a[:2] == b[:2] and a[2] != b[2]


@pytest.fixture(scope="module")
def shard(tiny_spec):
    model = load_shard(tiny_spec.path, tiny_spec.config["text_config"])[0]
    model.allocate_pool(64)
    return model


def engine_of(shard, tiny_spec, prefix_cache=True) -> Engine:
    shard.allocate_pool(64)  # a fresh pool (and cache) for each engine
    return Engine(shard, tiny_spec.placeholder_ids, eos_ids=[], max_context=tiny_spec.max_context,
                  max_batched_tokens=24, prefix_cache=prefix_cache)


def greedy(n=8) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def run(engine, ids, salt="", params=None, step_with=()):
    """One sequence to its end (chunked: 24 positions a step), its logits' argmax tokens and its cached count."""
    seq = engine.new_sequence("r", len(ids), params or greedy())
    engine.start(seq, ids, [], [], salt)
    while seq.finish is None:
        engine.step([seq, *step_with])
    return seq


PROMPT = [(17 * i + 5) % 200 + 10 for i in range(70)]  # 4 full blocks and 6 positions


def test_a_repeated_prompt_takes_its_blocks_from_the_cache_and_generates_the_same_tokens(shard, tiny_spec):
    eng = engine_of(shard, tiny_spec)
    first = run(eng, PROMPT)
    assert first.cached == 0 and eng.pool.cached == 4  # its full prompt blocks, registered as they landed
    again = run(eng, PROMPT)
    assert again.cached == 4 * BS and again.output == first.output
    diverging = PROMPT[: 2 * BS + 3] + [1] + PROMPT[2 * BS + 4 :]  # the same first two blocks
    assert run(eng, diverging).cached == 2 * BS
    assert run(eng, PROMPT, salt="another tenant").cached == 0
    exact = PROMPT[: 4 * BS]  # a prompt of whole blocks: its last position is computed, to sample from
    assert run(eng, exact).cached == 3 * BS
    from prometheus_client import CollectorRegistry, generate_latest

    from router.metrics import BackboneCollector, pool_usage

    registry = CollectorRegistry()
    registry.register(BackboneCollector(lambda: pool_usage(eng.pool), engine=eng))
    scraped = generate_latest(registry).decode()
    assert f"tributary_prefix_cache_hit_tokens_total {float(again.cached + 2 * BS + 3 * BS)}" in scraped, scraped
    assert "tributary_prefix_cache_blocks " in scraped and "tributary_kv_cache_usage_perc 0.0" in scraped
    off = engine_of(shard, tiny_spec, prefix_cache=False)
    assert run(off, PROMPT).output == first.output and run(off, PROMPT).cached == 0 and off.pool.cached == 0


def test_logits_from_a_cached_prefix_are_those_computed_from_scratch(shard, tiny_spec):
    """The first token's logits of a prompt whose prefix came from the cache, against the same prompt computed
    whole by an engine without the cache."""
    def first_logits(eng):
        seq = eng.new_sequence("r", len(PROMPT), greedy(1))
        eng.start(seq, PROMPT, [], [], "")
        captured = []
        real = eng.model.logits
        eng.model.logits = lambda h: captured.append(real(h)) or captured[-1]
        try:
            while seq.finish is None:
                eng.step([seq])
        finally:
            del eng.model.logits
        return seq, captured[-1]

    cold_seq, cold = first_logits(engine_of(shard, tiny_spec, prefix_cache=False))
    eng = engine_of(shard, tiny_spec)
    first_logits(eng)
    warm_seq, warm = first_logits(eng)
    assert cold_seq.cached == 0 and warm_seq.cached == 4 * BS
    torch.testing.assert_close(warm, cold, rtol=1e-4, atol=1e-4)


def test_sequences_sharing_a_prefix_run_side_by_side_and_through_preemption(shard, tiny_spec):
    """Two sequences on the same prefix step together in a pool small enough to preempt one; both give the tokens
    each gives alone, and every block comes back."""
    alone = run(engine_of(shard, tiny_spec), PROMPT, params=greedy(40)).output
    shard.allocate_pool(9)  # 144 positions: two sequences of 70 + 40 do not fit side by side unshared
    eng = Engine(shard, tiny_spec.placeholder_ids, eos_ids=[], max_context=tiny_spec.max_context,
                 max_batched_tokens=24)
    a = eng.new_sequence("a", len(PROMPT), greedy(40))
    eng.start(a, PROMPT, [], [], "")
    while a.computed < 4 * BS:  # a's prompt blocks are registered
        eng.step([a])
    b = eng.new_sequence("b", len(PROMPT), greedy(40))
    eng.start(b, PROMPT, [], [], "")
    while a.finish is None or b.finish is None:
        eng.step([s for s in (a, b) if s.finish is None])
    assert eng.preemptions >= 1 and b.cached == 4 * BS and a.output == alone and b.output == alone
    assert eng.pool.free == eng.pool.num_blocks


def test_a_prompt_with_media_is_shared_only_with_the_same_media(shard, tiny_spec):
    eng = engine_of(shard, tiny_spec)
    img = tiny_spec.placeholder_ids["image"]
    ids = PROMPT[:20] + [img] * 4 + PROMPT[20:60]
    rows = torch.randn(4, shard.cfg.hidden_size, generator=torch.Generator().manual_seed(1))

    def go(key, media_rows=rows, keys=True):
        seq = eng.new_sequence("m", len(ids), greedy(4))
        eng.start(seq, ids, [("image", media_rows)], [key] if keys else None, "")
        while seq.finish is None:
            eng.step([seq])
        return seq

    first = go("key-1")
    assert go("key-1").cached == 3 * BS and go("key-1").output == first.output
    assert go("key-2", rows * 2).cached == BS  # only the block before the image
    assert go("key-1", keys=False).cached == 0  # media without their keys: nothing shared


def test_a_sequence_holding_only_shared_blocks_is_not_preempted_for_nothing(shard, tiny_spec):
    """The newest sequence took its prefix from the cache and waits for room; an older decode needs a block. The
    victim is the older sequence with blocks of its own: preempting the newest would free nothing."""
    shard.allocate_pool(4)
    eng = Engine(shard, tiny_spec.placeholder_ids, eos_ids=[], max_context=tiny_spec.max_context,
                 max_batched_tokens=24)
    ids = PROMPT[: 2 * BS]

    def decoding(name, prompt):
        seq = eng.new_sequence(name, len(prompt), greedy(40))
        eng.start(seq, prompt, [], [], "")
        assert eng.pool.grow(seq.blocks, len(prompt))
        seq.computed, seq.output = len(prompt), [5]  # its prompt computed, its first token drawn
        return seq

    a = decoding("a", ids)
    for block, h in zip(a.blocks, a.hashes):
        eng.pool.register(block, h)
    b = decoding("b", [t + 1 for t in ids])
    c = eng.new_sequence("c", 2 * BS + 8, greedy(4))
    eng.start(c, ids + PROMPT[40:48], [], [], "")
    eng._share_prefix(c)
    assert c.computed == 2 * BS and eng.pool.sole(c.blocks) == 0 and eng.pool.free == 0
    rows = dict((s.request_id, n) for s, n in eng.schedule([a, b, c]))
    assert b.preempted == 1 and c.preempted == 0 and eng.preemptions == 1
    assert rows == {"a": 1, "c": 8}  # b's blocks: one for a's next position, one for the rest of c's prompt

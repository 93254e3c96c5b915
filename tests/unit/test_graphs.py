"""Decode CUDA graphs (backbone/graphs.py): buckets, the padding block, and the static-buffer step.

On a CPU the static-buffer path runs uncaptured, with the Triton kernel under its interpreter: the same buffers,
padding rows and bucket choice a GPU replays, compared token for token with the eager engine. Capture itself needs a
GPU (tests/unit/test_gpu_engine.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from backbone.engine import load_engine
from backbone.graphs import DecodeGraphs, buckets_up_to
from backbone.kv import KVPool
from tests.unit.test_attention import INTERPRETER_PATCH, ROOT


def test_buckets_cover_every_batch_up_to_the_largest():
    assert buckets_up_to(1) == [1]
    assert buckets_up_to(16) == [1, 2, 4, 8, 16]
    assert buckets_up_to(40) == [1, 2, 4, 8, 16, 32, 40]
    for n in (3, 17, 64):
        buckets = buckets_up_to(n)
        assert buckets[-1] == n and all(any(b >= k for b in buckets) for k in range(1, n + 1))
    with pytest.raises(ValueError):
        buckets_up_to(0)


def test_the_padding_block_is_never_handed_out():
    pool = KVPool(2, 3, 16, 1, 4, dtype=torch.float32, device="cpu")
    assert pool.padding_block == 3 and pool.k.shape[1] == 4  # one block more than is handed out
    table: list[int] = []
    assert pool.grow(table, 3 * 16) and not pool.grow(table, 3 * 16 + 1)
    assert sorted(table) == [0, 1, 2]
    pool.release(table + [pool.padding_block])  # a table naming it cannot put it in the free list
    assert pool.free == 3 and pool.padding_block not in pool._free


def test_graphs_need_the_triton_kernel(tiny_spec):
    engine = load_engine(tiny_spec, attention="torch", num_blocks=8)
    with pytest.raises(ValueError, match="Triton"):
        DecodeGraphs(engine.model, max_batch=4, max_context=tiny_spec.max_context)
    assert engine.model.graphs is None and engine.model.capture_graphs(4, tiny_spec.max_context) is None  # a CPU


STATIC_STEPS = INTERPRETER_PATCH + textwrap.dedent("""
    from backbone.engine import load_engine
    from backbone.graphs import DecodeGraphs
    from models.spec import ModelSpec
    from router.messages import SamplingParams

    spec = ModelSpec.from_dir(sys.argv[1])
    prompts = [[1, 286, 274, 203, 56], [1, 20, 21, 22, 203, 7, 9, 11], [1, 40, 41], [1, 50, 51], [1, 60]]
    outs, sampled = {}, []
    import backbone.graphs as graphs_module

    head = graphs_module.DecodeGraphs._head

    def spy(self, hidden, b, kind):  # which head variants the static steps ran
        sampled.append(kind)
        return head(self, hidden, b, kind)

    graphs_module.DecodeGraphs._head = spy
    for static in (False, True):
        engine = load_engine(spec, attention="triton", num_blocks=64)
        if static:  # buckets 1, 2, 4: five decodes run eagerly, four fill bucket 4, three pad it, then 2 and 1
            engine.model.graphs = DecodeGraphs(engine.model, max_batch=4, max_context=spec.max_context,
                                               capture=False)
            free = engine.pool.free
            assert engine.model.graphs.self_check() == 0.0  # the start-up check's code path (uncaptured: eager twice)
            # Each of its rows wrote a slot of its own (on a GPU, rows sharing a slot make the check fail by chance),
            # and the blocks it borrowed went back.
            slots = engine.model.graphs._field(engine.model.graphs.dev, "slots", 4).tolist()
            assert len(set(slots)) == 4 and engine.pool.free == free, (slots, free)
            big = DecodeGraphs(engine.model, max_batch=40, max_context=spec.max_context, capture=False)
            assert big.self_check() == 0.0  # 40 rows: the padding block and two borrowed blocks
            slots = big._field(big.dev, "slots", 40).tolist()
            assert len(set(slots)) == 40 and engine.pool.free == free, (slots, free)
            engine.pool.k[:, engine.pool.padding_block] = 7.0  # a sentinel the padding rows overwrite at slot 0
        seqs = []
        for i, ids in enumerate(prompts):  # odd rows sample, even rows are greedy; row 1 truncates (top_p), row 3
            seq = engine.new_sequence(f"r{i}", len(ids), SamplingParams(  # not, and runs on after row 1 ends
                max_tokens=3 + 2 * i, temperature=0.8 * (i % 2), top_p=0.9 if i == 1 else 1.0, seed=i,
                ignore_eos=True))
            engine.start(seq, ids, [])
            seqs.append(seq)
        while any(s.finish is None for s in seqs):
            engine.step(seqs)
        outs[static] = [s.output for s in seqs]
        if static:
            replays = engine.model.graphs.replays
            written = bool((engine.pool.k[:, engine.pool.padding_block, 0] != 7.0).all())
    assert outs[False] == outs[True], outs
    assert all(replays[b] > 0 for b in (1, 2, 4)), replays
    assert written, "the padding rows did not write the padding block's slot 0"
    assert set(sampled) == {0, 1, 2}, sampled  # greedy-only steps, sampling steps with and without truncation
    print("ok", replays)
""")


def test_static_buffer_decode_steps_equal_the_eager_engine_under_the_interpreter(tiny_model):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", STATIC_STEPS, str(tiny_model)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().startswith("ok"), proc.stdout + proc.stderr[-3000:]

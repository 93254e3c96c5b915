"""backbone/attention.py: one attention call over a step's sequences through their block tables.

The torch backend is held to a dense per-sequence computation; the Triton kernel to the torch backend, on a CPU under
Triton's interpreter (fp32 and fp16, and the whole engine decoding on it; the interpreter's bf16 ``tl.dot`` is
broken, so bf16 is checked on a GPU by ``pytest -m gpu``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from backbone.attention import LoopAttention, Segment, TorchAttention
from backbone.kv import KVPool

ROOT = Path(__file__).resolve().parents[2]
HQ, HKV, D, BS, BLOCKS = 4, 2, 16, 16, 48


def case(seed: int, dtype=torch.float32):
    """A pool with shuffled blocks and a step mixing a decode, a first prefill chunk, a middle chunk, a one-token
    prompt and a whole prompt; q [T, Hq, D]."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(BLOCKS * BS, HKV, D, generator=g).to(dtype)
    v = torch.randn(BLOCKS * BS, HKV, D, generator=g).to(dtype)
    free = torch.randperm(BLOCKS, generator=g).tolist()

    def take(n):
        return [free.pop() for _ in range(n)]

    segments = [Segment(take(3), 40, 1), Segment(take(2), 0, 20), Segment(take(4), 33, 17), Segment(take(1), 0, 1),
                Segment(take(3), 0, 37)]
    q = torch.randn(sum(s.length for s in segments), HQ, D, generator=g).to(dtype)
    return q, k, v, segments


def dense(q, k, v, segments, scale):
    out, offset = [], 0
    for s in segments:
        ctx = s.start + s.length
        slots = torch.tensor([s.blocks[p // BS] * BS + p % BS for p in range(ctx)])
        ks, vs = k[slots].float().repeat_interleave(HQ // HKV, 1), v[slots].float().repeat_interleave(HQ // HKV, 1)
        qs = q[offset : offset + s.length].float()
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        causal = torch.arange(ctx)[None, :] <= (s.start + torch.arange(s.length))[:, None]
        p = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        out.append(torch.einsum("hqk,khd->qhd", p, vs))
        offset += s.length
    return torch.cat(out)


@pytest.mark.parametrize("backend", [TorchAttention(), LoopAttention()], ids=["padded", "loop"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_padded_sdpa_call_equals_each_sequence_alone(seed, backend):
    q, k, v, segments = case(seed)
    meta = backend.prepare(segments, BS, torch.device("cpu"))
    got = backend(q, k, v, meta, D ** -0.5)
    assert got.shape == q.shape
    torch.testing.assert_close(got, dense(q, k, v, segments, D ** -0.5), atol=1e-5, rtol=1e-5)
    want_pos = [p for s in segments for p in range(s.start, s.start + s.length)]
    assert meta.positions.tolist() == want_pos
    assert meta.slots.tolist() == [s.blocks[p // BS] * BS + p % BS for s in segments
                                   for p in range(s.start, s.start + s.length)]


def test_the_pool_hands_out_each_block_once():
    pool = KVPool(2, 8, BS, HKV, D, torch.float32, "cpu")
    a, b = [], []
    assert pool.grow(a, 40) and len(a) == 3 and pool.free == 5
    assert not pool.grow(b, 6 * BS) and b == [] and pool.free == 5  # all or nothing
    assert pool.grow(b, 5 * BS) and pool.free == 0 and not set(a) & set(b)
    stale = list(a)
    pool.release(a)
    pool.release(stale)  # a second release of the same blocks changes nothing
    pool.release([99, -1])  # nor do ids that were never handed out
    assert pool.free == 3 and a == []


def poisoned(seed: int, dtype=torch.float32):
    """``case``, with NaN in every slot of the pool no sequence of the step has written: a former owner's stale
    K/V (a float16 overflow), block 0 (the padding columns' block) included."""
    q, k, v, segments = case(seed, dtype)
    written = torch.zeros(BLOCKS * BS, dtype=torch.bool)
    for seg in segments:
        for p in range(seg.start + seg.length):
            written[seg.blocks[p // BS] * BS + p % BS] = True
    k[~written], v[~written] = float("nan"), float("nan")
    return q, k, v, segments


@pytest.mark.parametrize("backend", [TorchAttention(), LoopAttention()], ids=["padded", "loop"])
def test_no_slot_past_a_sequences_end_reaches_its_output(backend):
    """A masked slot's weight is 0, but 0 x NaN is NaN: one request's non-finite K/V failed every other request of
    its step (read through the padding columns) and later owners of its blocks (an outside auditor's)."""
    q, k, v, segments = poisoned(0)
    got = backend(q, k, v, backend.prepare(segments, BS, torch.device("cpu")), D ** -0.5)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, dense(q, k, v, segments, D ** -0.5), atol=1e-5, rtol=1e-5)


INTERPRETER_PATCH = textwrap.dedent("""
    import sys
    import torch
    import triton.runtime.interpreter as ti

    # Triton 3.6's interpreter turns a loaded scalar (a 1-element array) into a loop bound with int(array), which
    # NumPy >= 2.4 refuses; take the element instead (only the interpreter is patched, never compiled kernels).
    _orig = ti._patch_lang_tensor

    def _patched(tensor, scope):
        _orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    ti._patch_lang_tensor = _patched
    sys.path.insert(0, ".")
""")

INTERPRETED = INTERPRETER_PATCH + textwrap.dedent("""
    from tests.unit.test_attention import BS, D, case
    from backbone.attention import TorchAttention, TritonAttention

    for seed, dtype, tol in ((0, torch.float32, 1e-5), (1, torch.float32, 1e-5), (2, torch.float16, 2e-3)):
        q, k, v, segments = case(seed, dtype)
        cpu = torch.device("cpu")
        ref = TorchAttention()(q, k, v, TorchAttention().prepare(segments, BS, cpu), D ** -0.5)
        got = TritonAttention()(q, k, v, TritonAttention().prepare(segments, BS, cpu), D ** -0.5)
        err = float((got.float() - ref.float()).abs().max())
        print(dtype, err)
        assert err <= tol, (seed, dtype, err)
    from tests.unit.test_attention import dense, poisoned
    q, k, v, segments = poisoned(3)  # stale NaN past each sequence's end: never in its output
    got = TritonAttention()(q, k, v, TritonAttention().prepare(segments, BS, torch.device("cpu")), D ** -0.5)
    assert bool(torch.isfinite(got).all()), "stale NaN reached the kernel's output"
    assert float((got - dense(q, k, v, segments, D ** -0.5)).abs().max()) <= 1e-5
    from backbone.attention import self_check
    assert self_check(TritonAttention(), torch.device("cpu"), torch.float32) <= 1e-4  # the start-up check passes
    assert self_check(TritonAttention(False), torch.device("cpu"), torch.float32) <= 1e-4

    # Decode-only steps (the grouped kernel: one program per sequence and KV head) for several head groupings, a
    # group of 3 included (a tile of 16 rows holds 3), against torch and the general kernel.
    from backbone.attention import Segment
    g = torch.Generator().manual_seed(5)
    decodes = [Segment([5, 2], 20, 1), Segment([4], 0, 1), Segment([7, 0, 3], 40, 1), Segment([1, 6], 31, 1)]
    for hq, hkv in ((8, 2), (4, 4), (6, 2), (8, 1)):
        k, v = (torch.randn(8 * BS, hkv, D, generator=g) for _ in range(2))
        q = torch.randn(len(decodes), hq, D, generator=g)
        cpu = torch.device("cpu")
        ref = TorchAttention()(q, k, v, TorchAttention().prepare(decodes, BS, cpu), D ** -0.5)
        meta = TritonAttention().prepare(decodes, BS, cpu)
        assert meta.extra["decode"]
        grouped = TritonAttention()(q, k, v, meta, D ** -0.5)
        general = TritonAttention(False)(q, k, v, meta, D ** -0.5)
        for got in (grouped, general):
            assert float((got - ref).abs().max()) <= 1e-5, (hq, hkv, float((got - ref).abs().max()))

    # The whole engine on the kernel: three prompts in 6-token chunks, then decoding, token for token the torch
    # backend's (same shapes on both sides, so nothing but the attention arithmetic differs).
    from backbone.engine import load_engine
    from models.spec import ModelSpec
    from router.messages import SamplingParams

    spec = ModelSpec.from_dir(sys.argv[1])
    outs = {}
    for name in ("torch", "triton"):
        engine = load_engine(spec, attention=name, max_batched_tokens=6, num_blocks=64)
        seqs = []
        for i, ids in enumerate([[1, 286, 274, 203, 56], [1, 20, 21, 22, 203, 7, 9, 11], [1, 40, 41]]):
            seq = engine.new_sequence(f"r{i}", len(ids), SamplingParams(max_tokens=6, temperature=0.0,
                                                                        ignore_eos=True))
            engine.start(seq, ids, [])
            seqs.append(seq)
        while any(s.finish is None for s in seqs):
            engine.step(seqs)
        outs[name] = [s.output for s in seqs]
    assert outs["torch"] == outs["triton"], outs
    print("ok")
""")


def test_the_triton_kernel_equals_the_torch_backend_under_the_interpreter(tiny_model):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", INTERPRETED, str(tiny_model)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr[-3000:]

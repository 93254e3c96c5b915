"""The fused residual-add + RMSNorm and SiLU-and-mul kernels (backbone/kernels.py): on the CPU under Triton's
interpreter, against the torch ops, alone and as the whole engine's ops."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from backbone.kernels import TorchOps, ops_for, rms_norm
from tests.unit.test_attention import INTERPRETER_PATCH, ROOT


def test_cpus_use_the_torch_ops_which_are_the_reference_math():
    assert isinstance(ops_for(torch.device("cpu"), torch.float32), TorchOps)
    g = torch.Generator().manual_seed(1)
    x, r, w = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g), torch.rand(32, generator=g)
    normed, residual = TorchOps.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(residual, r + x) and torch.equal(normed, rms_norm(r + x, w, 1e-5))


INTERPRETED = INTERPRETER_PATCH + textwrap.dedent("""
    from backbone.kernels import TritonOps, TorchOps, ops_check

    cpu = torch.device("cpu")
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        err = ops_check(TritonOps(), cpu, dtype)
        print(dtype, err)
        assert err <= tol, (dtype, err)
    # Wide rows: the norm's block covers a non-power-of-two width, the activation spans several blocks.
    g = torch.Generator().manual_seed(2)
    x, r, w = torch.randn(2, 1000, generator=g), torch.randn(2, 1000, generator=g), torch.rand(1000, generator=g)
    for got, want in zip(TritonOps.add_rms_norm(x, r, w, 1e-6), TorchOps.add_rms_norm(x, r, w, 1e-6)):
        assert float((got - want).abs().max()) <= 1e-5
    gu = torch.randn(2, 2 * 2500, generator=g)
    got, want = TritonOps.silu_mul(gu[:, :2500], gu[:, 2500:]), TorchOps.silu_mul(gu[:, :2500], gu[:, 2500:])
    assert float((got - want).abs().max()) <= 1e-5

    # The whole engine on the fused ops: token for token the torch ops' greedy output.
    from backbone.engine import load_engine
    from models.spec import ModelSpec
    from router.messages import SamplingParams

    spec = ModelSpec.from_dir(sys.argv[1])
    outs = {}
    for ops in (TorchOps(), TritonOps()):
        engine = load_engine(spec, num_blocks=64)
        engine.model.ops = ops
        seqs = []
        for i, ids in enumerate([[1, 286, 274, 203, 56], [1, 20, 21, 22, 203, 7, 9, 11], [1, 40, 41]]):
            seq = engine.new_sequence(f"r{i}", len(ids), SamplingParams(max_tokens=8, temperature=0.0,
                                                                        ignore_eos=True))
            engine.start(seq, ids, [])
            seqs.append(seq)
        while any(s.finish is None for s in seqs):
            engine.step(seqs)
        outs[ops.name] = [s.output for s in seqs]
    assert outs["torch"] == outs["triton"], outs
    print("ok")
""")


def test_the_fused_kernels_equal_the_torch_ops_under_the_interpreter(tiny_model):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", INTERPRETED, str(tiny_model)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr[-3000:]

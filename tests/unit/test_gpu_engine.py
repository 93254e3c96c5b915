"""The backbone on a CUDA device against the CPU fp32 path, on the tiny demo model (``pytest -m gpu``; skipped where
no GPU is visible, as in CI). Not yet run on a GPU: written for [gpu-engine] before a machine was at hand."""

from __future__ import annotations

import pytest
import torch

from backbone.engine import load_engine
from backbone.model import Segment
from backbone.sampling import sample_batch
from router.messages import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def prompt_logits(engine, ids: list[int]) -> torch.Tensor:
    seq = engine.new_sequence("g", len(ids), SamplingParams(max_tokens=1, temperature=0.0))
    hidden = engine.model.forward(engine.start(seq, ids, []), [Segment(seq.cache, 0, len(ids))])
    engine.release(seq)
    return engine.model.logits(hidden[-1:])[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_logits_agree_with_cpu_fp32(tiny_spec, dtype):
    cpu = load_engine(tiny_spec, dtype=torch.float32)
    gpu = load_engine(tiny_spec, dtype=dtype, device="cuda")
    assert gpu.model.device.type == "cuda" and gpu.model.new_cache(4).k[0].device.type == "cuda"
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # bf16 keeps 8 bits of mantissa
    for ids in ([1, 286, 274, 203, 56], [1, 20, 21, 22, 203, 7, 9, 11], [1, 40, 41]):
        ref, got = prompt_logits(cpu, ids), prompt_logits(gpu, ids).cpu()
        scale = float(ref.abs().max())
        assert float((got - ref).abs().max()) <= tol * max(scale, 1.0), (ids, dtype)


def test_greedy_decoding_on_the_device_equals_the_cpu_in_fp32(tiny_spec):
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outputs = []
    for device in ("cpu", "cuda"):
        engine = load_engine(tiny_spec, dtype=torch.float32, device=device)
        seqs = [engine.new_sequence(f"r{i}", len(ids), params) for i, ids in enumerate(([1, 286, 274], [1, 40, 41]))]
        for seq, ids in zip(seqs, ([1, 286, 274], [1, 40, 41])):
            engine.prefill(seq, ids, [])
        while any(s.finish is None for s in seqs):
            engine.step(seqs)
        outputs.append([s.output for s in seqs])
    assert outputs[0] == outputs[1]


def test_batched_sampling_on_the_device_draws_what_the_cpu_draws():
    """The noise is integer arithmetic, identical on both devices; the probabilities differ in the last bits, so a
    race decided by less than that may flip: nearly every draw agrees."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 4096, generator=gen) * 3
    temperature, top_p = torch.full((32,), 0.8), torch.full((32,), 0.95)
    seeds, draws = torch.arange(32, dtype=torch.int64) * 104729, torch.full((32,), 5, dtype=torch.int64)
    agree = 0
    for draw in range(10):
        cpu, _ = sample_batch(logits, temperature, top_p, seeds, draws + draw)
        gpu, _ = sample_batch(*(t.cuda() for t in (logits, temperature, top_p, seeds, draws + draw)))
        agree += int((cpu == gpu.cpu()).sum())
    assert agree >= 0.97 * 320

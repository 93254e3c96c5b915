"""The backbone on a CUDA device against the CPU fp32 path, on the tiny demo model (``pytest -m gpu``; skipped where
no GPU is visible, as in CI). Not yet run on a GPU: written for [gpu-engine] before a machine was at hand."""

from __future__ import annotations

import pytest
import torch

from backbone.attention import Segment
from backbone.engine import load_engine
from backbone.sampling import sample_batch
from router.messages import SamplingParams

KV = 256 * 2**20  # an explicit pool: the default takes 90% of the GPU, and several engines live in one test process
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def prompt_logits(engine, ids: list[int]) -> torch.Tensor:
    seq = engine.new_sequence("g", len(ids), SamplingParams(max_tokens=1, temperature=0.0))
    hidden = engine.prompt_hidden(seq, ids, [])
    engine.release(seq)
    return engine.model.logits(hidden[-1:])[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_logits_agree_with_cpu_fp32(tiny_spec, dtype):
    cpu = load_engine(tiny_spec, dtype=torch.float32)
    gpu = load_engine(tiny_spec, kv_cache_bytes=KV, dtype=dtype, device="cuda")
    assert gpu.model.device.type == "cuda" and gpu.pool.k.device.type == "cuda"
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # bf16 keeps 8 bits of mantissa
    for ids in ([1, 286, 274, 203, 56], [1, 20, 21, 22, 203, 7, 9, 11], [1, 40, 41]):
        ref, got = prompt_logits(cpu, ids), prompt_logits(gpu, ids).cpu()
        scale = float(ref.abs().max())
        assert float((got - ref).abs().max()) <= tol * max(scale, 1.0), (ids, dtype)


def test_greedy_decoding_on_the_device_equals_the_cpu_in_fp32(tiny_spec):
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outputs = []
    for device in ("cpu", "cuda"):
        engine = load_engine(tiny_spec, kv_cache_bytes=KV, dtype=torch.float32, device=device)
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


def test_seeded_sampling_on_the_device_is_the_same_alone_and_among_eight(tiny_spec):
    """fp32 on the GPU: a seeded request draws its own noise whatever shares the batch; only the logits may differ in
    the last bits between batch shapes (cuBLAS picks kernels by shape), which can flip a race decided by less than
    that, so at least 6 of 8 requests must give the same 12 tokens alone and together (in bf16 nothing is claimed
    beyond the noise: its batched matmuls are not batch-invariant)."""
    engine = load_engine(tiny_spec, kv_cache_bytes=KV, dtype=torch.float32, device="cuda")
    prompts = [[1, 20 + i, 21 + i, 203] for i in range(8)]

    def run(batch: list[int]) -> list[list[int]]:
        seqs = [engine.new_sequence(f"s{i}", len(prompts[i]), SamplingParams(
            max_tokens=12, temperature=0.9, top_p=0.9, seed=1000 + i, ignore_eos=True)) for i in batch]
        engine.step([], [(s, engine.start(s, prompts[i], [])) for s, i in zip(seqs, batch)])
        while any(s.finish is None for s in seqs):
            engine.step(seqs)
        for s in seqs:
            engine.release(s)
        return [s.output for s in seqs]

    together = run(list(range(8)))
    alone = [run([i])[0] for i in range(8)]
    assert sum(a == t for a, t in zip(alone, together)) >= 6


def test_real_shape_llava_on_the_device_matches_transformers_in_bf16(tmp_path):
    """llava-tiny drawn on the GPU in bf16 (as llava-1b and llava-1.5-7b are for the bench): transformers loads it
    onto the GPU, and our backbone's logits agree with its within bf16 tolerance."""
    from transformers import LlavaForConditionalGeneration

    from models.real_shapes import write_llava
    from models.spec import ModelSpec

    path = write_llava(tmp_path / "llava-tiny", "llava-tiny", seed=0, device="cuda", dtype=torch.bfloat16)
    ref = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.bfloat16).to("cuda").eval()
    engine = load_engine(ModelSpec.from_dir(path), kv_cache_bytes=KV, dtype=torch.bfloat16, device="cuda")
    ids = [1, 300, 301, 302, 17, 900, 5]
    seq = engine.new_sequence("r", len(ids), SamplingParams(max_tokens=1, temperature=0.0))
    ours = engine.model.logits(engine.prompt_hidden(seq, ids, []))
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor([ids], device="cuda")).logits[0].float()
    scale = float(theirs.abs().max())
    assert float((ours - theirs).abs().max()) <= 5e-2 * max(scale, 1e-3)


def test_two_pipeline_shards_sharing_the_gpu_match_one_cpu_shard(tiny_model, tiny_spec, redis_server):
    """Two shard processes on the one GPU (fp32): the hidden states go over gloo through pinned host memory (NCCL
    cannot link a GPU to itself) and the greedy tokens equal one CPU shard's."""
    import subprocess

    import redis

    from cache.embedded import free_port
    from cache.streams import payload_fields
    from router import messages as m
    from tests.integration.procs import hold_lease, start_tier, stop_tier
    from tests.integration.test_backbone_worker import events, plan
    from tests.integration.test_pipeline_shards import KEYS, PROMPTS, reference, start_cmd

    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    url, device = f"tcp://127.0.0.1:{free_port()}", ["--device", "cuda", "--dtype", "float32", "--kv-cache-gb", "0.25"]
    last = subprocess.Popen([*start_cmd(tiny_model, redis_server.url), "--shard", "1", "--num-shards", "2",
                             "--dist-url", url, *device], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    head = None
    try:
        head = start_tier(["backbone", "--model", str(tiny_model), "--shard", "0", "--num-shards", "2",
                           "--dist-url", url, *device], redis_server.url, "backbone")
        for i, ids in enumerate(PROMPTS):
            hold_lease(r, "reply:gpu")
            r.xadd(KEYS.gen(), payload_fields(m.encode(plan(f"g{i}", "reply:gpu", ids, 8, temperature=0.0))))
        got = events(r, "reply:gpu", {f"g{i}" for i in range(len(PROMPTS))})
        for i, ids in enumerate(PROMPTS):
            assert [t for ev in got if ev.request_id == f"g{i}" for t in ev.token_ids] == reference(tiny_spec, ids, 8)
        assert stop_tier(head)[0] == 0
        assert last.wait(30) == 0
    finally:
        for p in (head, last):
            if p is not None and p.poll() is None:
                p.kill()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_the_triton_paged_kernel_equals_the_torch_backend_on_the_gpu(dtype, tol):
    """The CUDA attention backend against the CPU reference backend, on the cases of tests/unit/test_attention.py
    (decodes, chunks mid-prompt, one-token prompts, shuffled blocks, GQA), and at a real head size."""
    from backbone.attention import TorchAttention, TritonAttention, backend_for
    from tests.unit.test_attention import BS, D, case

    # The engine's start-up self-check keeps the kernel (a failing one would fall back to torch SDPA).
    assert backend_for(torch.device("cuda"), "auto", dtype).name == "triton-paged"

    for seed in range(3):
        q, k, v, segments = case(seed, dtype)
        ref = TorchAttention()(q.float(), k.float(), v.float(), TorchAttention().prepare(segments, BS, torch.device(
            "cpu")), D ** -0.5)
        gpu = TritonAttention()
        got = gpu(q.cuda(), k.cuda(), v.cuda(), gpu.prepare(segments, BS, torch.device("cuda")), D ** -0.5)
        assert float((got.float().cpu() - ref).abs().max()) <= tol, (seed, dtype)
    # head_dim 128, 32 query heads over 8 KV heads, a 1,000-token context: the bench's shapes
    g = torch.Generator().manual_seed(5)
    k = torch.randn(80 * 16, 8, 128, generator=g).to(dtype)
    v = torch.randn(80 * 16, 8, 128, generator=g).to(dtype)
    segments = [Segment(list(range(0, 63)), 999, 1), Segment(list(range(63, 80)), 0, 256)]
    q = torch.randn(257, 32, 128, generator=g).to(dtype)
    ref = TorchAttention()(q.float(), k.float(), v.float(), TorchAttention().prepare(segments, 16, torch.device(
        "cpu")), 128 ** -0.5)
    gpu = TritonAttention()
    got = gpu(q.cuda(), k.cuda(), v.cuda(), gpu.prepare(segments, 16, torch.device("cuda")), 128 ** -0.5)
    assert float((got.float().cpu() - ref).abs().max()) <= tol
    # A decode-only step at those shapes: the grouped decode kernel (4 query heads per KV head in one program).
    decodes = [Segment(list(range(0, 63)), 999, 1), Segment(list(range(63, 80)), 200, 1), Segment([5], 3, 1)]
    q = torch.randn(3, 32, 128, generator=g).to(dtype)
    ref = TorchAttention()(q.float(), k.float(), v.float(), TorchAttention().prepare(decodes, 16, torch.device(
        "cpu")), 128 ** -0.5)
    meta = gpu.prepare(decodes, 16, torch.device("cuda"))
    assert meta.extra["decode"] and gpu.grouped
    got = gpu(q.cuda(), k.cuda(), v.cuda(), meta, 128 ** -0.5)
    assert float((got.float().cpu() - ref).abs().max()) <= tol


def test_decode_graphs_replay_what_eager_steps_compute(tiny_spec):
    """[cuda-graphs]: captured decode graphs (buckets 1, 2, 4, 8 for --max-running 8), the sampling head's included
    (greedy and random), against eager steps, fp32, with batches that shrink through every bucket and one beyond the
    largest (run eagerly)."""
    prompts = [[1, 286, 274, 203, 56], [1, 20, 21, 22, 203, 7, 9, 11], [1, 40, 41], [1, 50, 51], [1, 60]] * 2
    outputs, replays = [], None
    for eager in (True, False):
        engine = load_engine(tiny_spec, kv_cache_bytes=KV, dtype=torch.float32, device="cuda", max_running=8,
                             eager=eager)
        assert (engine.model.graphs is None) == eager
        seqs = []
        for i, ids in enumerate(prompts):
            seq = engine.new_sequence(f"r{i}", len(ids), SamplingParams(  # odd rows sample, even rows are greedy
                max_tokens=3 + 2 * i, temperature=0.8 * (i % 2), top_p=0.9, seed=i, ignore_eos=True))
            engine.start(seq, ids, [])
            seqs.append(seq)
        while any(s.finish is None for s in seqs):
            engine.step(seqs)
        outputs.append([s.output for s in seqs])
        if not eager:
            replays = engine.model.graphs.replays
            assert sorted(engine.model.graphs.graphs) == [1, 2, 4, 8]
            assert sorted(engine.model.graphs.heads) == [(b, r) for b in (1, 2, 4, 8) for r in (False, True)]
    assert outputs[0] == outputs[1]
    assert all(replays[b] > 0 for b in (1, 2, 4, 8)), replays


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_and_activation_kernels_pass_their_check_on_the_device(tiny_spec, dtype):
    from backbone.kernels import OPS_TOL, TritonOps, ops_check

    assert ops_check(TritonOps(), torch.device("cuda"), dtype) <= (1e-5 if dtype == torch.float32 else OPS_TOL)
    engine = load_engine(tiny_spec, kv_cache_bytes=KV, dtype=dtype, device="cuda")
    assert engine.model.ops.name == "triton"  # what the shard runs (it falls back to torch only on a failed check)


def test_the_fused_race_kernel_passes_its_check_and_draws_what_the_torch_race_draws_on_the_device():
    """backbone/sampling.race_triton, what a step with no truncating row samples with on CUDA: its start-up check,
    then a 128k vocabulary at batch 64 against the torch race on the same device (log's last bit may part a near
    tie: nearly every draw agrees)."""
    from backbone.sampling import fused_race_ok, race_check, race_triton

    assert race_check(torch.device("cuda")) <= 1 and fused_race_ok(torch.device("cuda"))
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, 128256, generator=gen) * 3).cuda()
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3] * 16).cuda()
    seeds = (torch.arange(64, dtype=torch.int64) * 7919).cuda()
    agree = 0
    for draw in range(5):
        draws = torch.full((64,), draw, dtype=torch.int64, device="cuda")
        torch_race = sample_batch(logits, temperature, torch.ones(64, device="cuda"), seeds, draws, True, True)[0]
        agree += int((race_triton(logits, temperature, seeds, draws)[0] == torch_race).sum())
    assert agree >= 0.99 * 320

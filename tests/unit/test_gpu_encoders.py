"""[gpu-encoders] on a CUDA device (``pytest -m gpu``; skipped where no GPU is visible, as in CI): the encoders in
bf16 on the GPU against fp32 on the CPU, the worker's pinned batches, and outputs copied from the device straight into
their payloads in pinned memory."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from encoders.batching import shape_groups
from encoders.loader import load_preprocessor, load_runtime
from tests.media import png_bytes, wav_bytes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("modality", ["image", "audio"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoders_on_the_device_agree_with_cpu_fp32(tiny_spec, modality, dtype):
    pre = load_preprocessor(tiny_spec, modality)
    media = [png_bytes(50, 40, seed=s) for s in range(4)] if modality == "image" else [wav_bytes(1.0, seed=s)
                                                                                      for s in range(4)]
    (_, batch), = shape_groups(list(enumerate(pre(x) for x in media)), pin=True)
    assert batch.is_pinned()
    ref = load_runtime(tiny_spec, modality).run(batch)
    got = load_runtime(tiny_spec, modality, device="cuda", dtype=dtype).run(batch)
    assert got.dtype == dtype and got.device.type == "cpu"
    scale = float(ref.abs().max())
    tol = 1e-4 if dtype == torch.float32 else 0.05
    assert float((got.float() - ref).abs().max()) <= tol * max(scale, 1.0)


def test_outputs_are_copied_from_the_device_straight_into_pinned_payloads(tiny_spec):
    """run_isolating on the GPU: each item's first ``counts`` rows land in its safetensors payload, in pinned memory,
    equal to the device's output (one copy each, no staging tensor)."""
    from cache.codec import decode_tensor
    from encoders.runtime import launch_isolating, run_isolating

    pre = load_preprocessor(tiny_spec, "image")
    (_, batch), = shape_groups(list(enumerate(pre(png_bytes(50, 40, seed=s)) for s in range(4))), pin=True)
    runtime = load_runtime(tiny_spec, "image", device="cuda", dtype=torch.bfloat16)
    ref = runtime.run(batch)  # [B, N, H] bf16 on the host
    counts = [ref.shape[1], 5, 1, ref.shape[1]]
    out = run_isolating(runtime, batch, None, torch.bfloat16, counts)
    for i, p in enumerate(out):
        assert p.tensor.is_pinned() and p.tensor.dtype == torch.bfloat16
        assert torch.equal(decode_tensor(p.data), ref[i, : counts[i]])
    # Launched back to back, as the worker does (the second before the first is waited for): each batch's outputs
    # are its own, though the device may reuse the first one's memory for the second.
    flipped = batch.flip(0).contiguous().pin_memory()
    ref_flipped = runtime.run(flipped)
    first, second = (launch_isolating(runtime, b, None, torch.bfloat16) for b in (batch, flipped))
    for got, want in ((second.result(), ref_flipped), (first.result(), ref)):
        assert all(torch.equal(decode_tensor(p.data), w) for p, w in zip(got, want))


def test_a_batch_is_assembled_on_the_device_from_pinned_items(tiny_spec):
    """The worker's GPU path (encoders/batching.py): items pinned by the pool, the batch built on the device from
    non-blocking copies, equal to the host stack, and the runtime takes it as it is."""
    pre = load_preprocessor(tiny_spec, "image")
    items = [(i, pre(png_bytes(50, 40, seed=s))) for i, s in enumerate(range(3))]
    pinned = [(i, replace(p, data=p.data.pin_memory())) for i, p in items]
    (idx, on_device), = shape_groups(pinned, device=torch.device("cuda"))
    (_, on_host), = shape_groups(items)
    assert idx == [0, 1, 2] and on_device.device.type == "cuda"
    assert torch.equal(on_device.cpu(), on_host)
    runtime = load_runtime(tiny_spec, "image", device="cuda")
    assert torch.equal(runtime.run(on_device), runtime.run(on_host))


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 2e-2) -> bool:
    return float((got.float() - want.float()).abs().max()) <= tol * max(1.0, float(want.float().abs().max()))


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_encoder_graphs_replay_what_the_eager_forward_computes(tiny_spec, modality):
    """Captured at start-up (encoders/graphs.py): every batch size up to the largest bucket, padded or not, gives
    each item what the eager forward gives it; a batch beyond the largest bucket runs eagerly."""
    pre = load_preprocessor(tiny_spec, modality)
    media = [png_bytes(50, 40, seed=s) for s in range(9)] if modality == "image" else [wav_bytes(0.5 + s / 10, seed=s)
                                                                                      for s in range(9)]
    (_, batch), = shape_groups(list(enumerate(pre(x) for x in media)), pin=True)
    runtime = load_runtime(tiny_spec, modality, device="cuda", dtype=torch.bfloat16)
    want = runtime.run(batch)
    took = runtime.capture(pre.input_shape, 8)
    assert took is not None and took["buckets"] == [1, 2, 4, 8] and sorted(runtime.graphs.graphs) == [1, 2, 4, 8]
    assert took["replay_vs_eager"] <= 1e-2
    for n in range(1, 9):
        assert _close(runtime.run(batch[:n]), want[:n]), n
    assert _close(runtime.run(batch[3:6]), want[3:6])  # bucket 4, its padding row left by the batch before
    assert _close(runtime.run(batch), want)  # 9 > 8: eager


def test_graph_outputs_launched_back_to_back_are_each_their_own(tiny_spec):
    """A replay writes its bucket's output buffer, which the next replay of any bucket may overwrite (one shared
    memory pool); the worker launches batch N+1 before N's payloads are waited for. Those copies are queued before the
    next replay on the same stream, so each batch keeps its own outputs: here buckets 4, 2, 4, 1, 4, none waited for
    before the last is launched."""
    from cache.codec import decode_tensor
    from encoders.runtime import launch_isolating

    pre = load_preprocessor(tiny_spec, "image")
    (_, batch), = shape_groups(list(enumerate(pre(png_bytes(50, 40, seed=s)) for s in range(4))), pin=True)
    runtime = load_runtime(tiny_spec, "image", device="cuda", dtype=torch.bfloat16)
    assert runtime.capture(pre.input_shape, 4) is not None
    flipped = batch.flip(0).contiguous().pin_memory()
    batches = [batch, flipped[:2], flipped, batch[2:3], batch]
    refs = [runtime.run(b) for b in batches]  # each waited for alone
    launched = [launch_isolating(runtime, b, None, torch.bfloat16) for b in batches]
    for k, (out, want) in enumerate(zip(launched, refs)):
        assert all(torch.equal(decode_tensor(p.data), w) for p, w in zip(out.result(), want)), k


def test_graphs_of_an_encoder_that_masks_its_padding_take_each_rows_length(hf_checkpoint):
    from models.spec import ModelSpec

    spec = ModelSpec.from_dir(hf_checkpoint("qwen2-audio-a"))
    pre = load_preprocessor(spec, "audio")
    items = [pre(wav_bytes(s, seed=i)) for i, s in enumerate((0.4, 1.5, 0.9))]
    (_, batch), = shape_groups(list(enumerate(items)), pin=True)
    lengths = torch.tensor([p.length for p in items])
    runtime = load_runtime(spec, "audio", device="cuda", dtype=torch.bfloat16)
    want = runtime.run(batch, lengths)
    assert runtime.capture(pre.input_shape, 4, lengths=True) is not None
    assert _close(runtime.run(batch, lengths), want)
    assert _close(runtime.run(batch[[2, 0]], lengths[[2, 0]]), want[[2, 0]])


def test_a_capture_that_fails_midway_leaves_the_encoder_eager_on_its_stream(tiny_spec):
    """A host sync inside the captured forward makes the capture fail (torch.cuda.graph then raises before it puts
    the caller's stream back): the encoder serves eagerly, on the stream it had, with the same outputs."""
    pre = load_preprocessor(tiny_spec, "image")
    (_, batch), = shape_groups(list(enumerate(pre(png_bytes(50, 40, seed=s)) for s in range(3))), pin=True)
    runtime = load_runtime(tiny_spec, "image", device="cuda", dtype=torch.bfloat16)
    want = runtime.run(batch)
    stream = torch.cuda.current_stream()
    runtime.module.register_forward_hook(lambda mod, args, out: out * (1.0 if out.sum().item() == out.sum().item()
                                                                      else 1.0))
    assert runtime.capture(pre.input_shape, 4) is None and runtime.graphs is None
    assert torch.cuda.current_stream() == stream
    assert torch.equal(runtime.run(batch), want)

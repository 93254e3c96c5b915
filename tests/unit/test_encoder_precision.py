"""[gpu-encoders]: encoders computing in bf16/fp16, the dtype flags' resolution, and the wire dtype's default."""

from __future__ import annotations

import pytest
import torch

from encoders.loader import load_preprocessor, load_runtime
from encoders.worker import EncoderConfig
from tests.media import png_bytes, wav_bytes


@pytest.mark.parametrize("modality", ["image", "audio"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_encoders_stay_close_to_fp32(tiny_spec, modality, dtype):
    pre = load_preprocessor(tiny_spec, modality)
    media = [png_bytes(50, 40, seed=s) for s in (1, 2)] if modality == "image" else [wav_bytes(1.0, seed=s)
                                                                                      for s in (1, 2)]
    batch = torch.stack([pre(x).data for x in media])
    ref = load_runtime(tiny_spec, modality).run(batch)
    got = load_runtime(tiny_spec, modality, dtype=dtype).run(batch)
    assert got.dtype == dtype and ref.dtype == torch.float32  # outputs come back in the compute dtype
    assert got.shape == ref.shape
    scale = float(ref.abs().max())
    err = (got.float() - ref).abs()
    # A half-precision tower is off by a few units in its last place per layer; a wrong one is off by O(1).
    assert float(err.max()) <= 0.05 * scale, (float(err.max()), scale)
    assert float(err.mean()) <= 0.01 * scale
    assert float(torch.nn.functional.cosine_similarity(got.float().flatten(1), ref.flatten(1)).min()) > 0.999


def test_dtype_flags_resolve_and_the_wire_follows_the_compute_dtype():
    cpu = EncoderConfig(redis_url="redis://x", modality="image")
    assert (cpu.dtype, cpu.wire_dtype) == ("float32", "float32")  # auto on a CPU
    gpu = EncoderConfig(redis_url="redis://x", modality="image", device="cuda:0")
    assert (gpu.dtype, gpu.wire_dtype) == ("bfloat16", "bfloat16")  # auto on a GPU (torch): bf16 end to end
    onnx = EncoderConfig(redis_url="redis://x", modality="image", device="cuda:0", runtime="onnx")
    assert onnx.dtype == "float32"  # ONNX runs the fp32 export
    wire = EncoderConfig(redis_url="redis://x", modality="image", runtime="onnx", wire_dtype="bfloat16")
    assert (wire.dtype, wire.wire_dtype) == ("float32", "bfloat16")
    with pytest.raises(ValueError, match="ONNX"):
        EncoderConfig(redis_url="redis://x", modality="image", runtime="onnx", dtype="bfloat16")
    with pytest.raises(ValueError):
        EncoderConfig(redis_url="redis://x", modality="image", dtype="int8")

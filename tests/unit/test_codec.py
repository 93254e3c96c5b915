"""cache/codec.py: tensors <-> safetensors bytes, and refusal of anything else."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import save as st_save

from cache.codec import WIRE_DTYPES, CodecError, decode_tensor, encode_tensor


def _sample(shape=(5, 7), seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_float32_round_trip_is_exact():
    t = _sample()
    out = decode_tensor(encode_tensor(t, "float32"))
    assert out.dtype == torch.float32
    assert out.shape == t.shape
    assert torch.equal(out, t)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_round_trip_equals_the_cast(dtype):
    t = _sample((4, 3, 6), seed=1)
    out = decode_tensor(encode_tensor(t, dtype))
    assert out.dtype == WIRE_DTYPES[dtype]
    assert out.shape == t.shape
    assert torch.equal(out, t.to(WIRE_DTYPES[dtype]))  # bit-exact: the cast is the only loss
    assert torch.allclose(out.float(), t, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_from_other_dtypes_and_layouts(dtype):
    # A non-contiguous float64 view is cast and made contiguous on the way out.
    t = torch.arange(24, dtype=torch.float64).reshape(4, 6).t()
    assert not t.is_contiguous()
    out = decode_tensor(encode_tensor(t, dtype))
    assert out.dtype == WIRE_DTYPES[dtype]
    assert torch.equal(out.double(), t)  # small integers are exact in every wire dtype


def test_empty_rows_round_trip():
    t = torch.zeros((0, 8))
    out = decode_tensor(encode_tensor(t))
    assert out.shape == (0, 8)


def test_metadata_does_not_change_the_tensor():
    t = _sample()
    assert torch.equal(decode_tensor(encode_tensor(t, metadata={"n": "5"})), t)


def test_unsupported_wire_dtype_refused():
    with pytest.raises(CodecError, match="int8"):
        encode_tensor(_sample(), "int8")


@pytest.mark.parametrize("data", [
    b"",
    b"garbage",
    b"\x00" * 64,
    b"\xff" * 8 + b"{}",
    bytes(range(256)),
])
def test_garbage_bytes_refused(data):
    with pytest.raises(CodecError):
        decode_tensor(data)


def test_truncated_payload_refused():
    data = encode_tensor(_sample((16, 16)))
    with pytest.raises(CodecError):
        decode_tensor(data[: len(data) // 2])


def test_pickle_payload_refused():
    buf = io.BytesIO()
    torch.save({"t": _sample()}, buf)
    with pytest.raises(CodecError):
        decode_tensor(buf.getvalue())


@pytest.mark.parametrize("tensors", [
    {"x": torch.ones(2, 2)},
    {"t": torch.ones(2, 2), "u": torch.zeros(1)},
    {"T": torch.ones(2)},
])
def test_other_tensor_names_refused(tensors):
    with pytest.raises(CodecError, match="'t'"):
        decode_tensor(st_save(tensors))


def test_codec_error_is_a_value_error():
    assert issubclass(CodecError, ValueError)

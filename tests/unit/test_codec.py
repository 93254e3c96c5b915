"""cache/codec.py: tensors <-> safetensors bytes (written here, in one copy, as safetensors writes them), and refusal
of anything else."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import save as st_save

from cache.codec import WIRE_DTYPES, CodecError, decode_tensor, encode_tensor, tensor_payloads


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


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(5, 7), (0, 8), (576, 24), (3,), (2, 3, 4)])
@pytest.mark.parametrize("metadata", [None, {"n": "5"}])
def test_payloads_are_the_bytes_safetensors_writes(dtype, shape, metadata):
    t = _sample(shape).to(WIRE_DTYPES[dtype])
    want = st_save({"t": t}, metadata=metadata)
    assert encode_tensor(t, dtype, metadata) == want
    assert bytes(tensor_payloads([t], metadata)[0].data) == want


def test_payloads_of_a_batch_share_one_buffer_and_outlive_their_tensors():
    """Several tensors (dtypes and row counts differing, as a batch's items do) in one host buffer: each payload is
    its own safetensors bytes, 8-byte aligned, its ``tensor`` the rows inside it; the buffer lives as long as a
    payload does."""
    tensors = [_sample((n, 6), seed=n).to(dt) for n, dt in ((3, torch.float16), (7, torch.bfloat16), (1, torch.float32),
                                                           (0, torch.float16))]
    payloads = tensor_payloads(tensors)
    for t, p in zip(tensors, payloads):
        assert bytes(p.data) == st_save({"t": t})
        assert torch.equal(p.tensor, t) and p.tensor.data_ptr() % 8 == 0
    views = [p.data for p in payloads]
    del payloads, tensors
    import gc

    gc.collect()
    assert [decode_tensor(v).shape for v in views] == [(3, 6), (7, 6), (1, 6), (0, 6)]


def test_payload_of_an_unsupported_dtype_refused():
    with pytest.raises(CodecError, match="int64"):
        tensor_payloads([torch.zeros(2, dtype=torch.int64)])


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

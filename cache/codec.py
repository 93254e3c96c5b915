"""Tensor <-> bytes, through safetensors only (never pickle: a cache entry must not be able to run code)."""

from __future__ import annotations

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CodecError(ValueError):
    """The bytes are not a safetensors payload of the expected shape."""


def encode_tensor(tensor: torch.Tensor, dtype: str = "float32", metadata: dict[str, str] | None = None) -> bytes:
    """Serialize one tensor (cast to the wire dtype) under the name ``t``."""
    if dtype not in WIRE_DTYPES:
        raise CodecError(f"unsupported wire dtype {dtype!r}; expected one of {sorted(WIRE_DTYPES)}")
    t = tensor.detach().to("cpu", WIRE_DTYPES[dtype]).contiguous()
    return st_save({"t": t}, metadata=metadata)


def decode_tensor(data: bytes) -> torch.Tensor:
    """Inverse of :func:`encode_tensor`; the caller casts to its compute dtype."""
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CodecError(f"not a safetensors payload: {exc}") from exc
    if set(tensors) != {"t"}:
        raise CodecError(f"expected one tensor named 't', got {sorted(tensors)}")
    return tensors["t"]

"""Tensor <-> bytes, through safetensors only (never pickle: a cache entry must not be able to run code).

Payloads are written here rather than by ``safetensors.torch.save``: that makes two host copies of the data (to a
numpy buffer, then into the serialized bytes; 1.5 GB/s measured, slower than the encoder's forward on a GPU). Here
the header is formatted once and the data land in the payload in one copy: from a GPU straight into pinned memory
(:func:`tensor_payloads`). The bytes are the ones ``save`` writes (tests/unit/test_codec.py), and the reader is
safetensors' own.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_ALIGN = 8  # each payload (and so each tensor's data) starts 8-byte aligned in a batch's buffer


class CodecError(ValueError):
    """The bytes are not a safetensors payload of the expected shape."""


@dataclass(frozen=True)
class Payload:
    """One tensor's safetensors bytes, ``data`` (a memoryview of a shared host buffer, which it keeps alive; Redis
    is sent it without a copy), and ``tensor``, the same rows as a host tensor inside it."""

    data: memoryview
    tensor: torch.Tensor


def _header(tensor: torch.Tensor, metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length and the JSON header safetensors writes for one tensor named ``t``, padded with spaces so
    the data start 8-byte aligned."""
    if tensor.dtype not in _ST_DTYPES:
        raise CodecError(f"unsupported tensor dtype {tensor.dtype}; expected one of {sorted(WIRE_DTYPES)}")
    head: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    head["t"] = {"dtype": _ST_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                 "data_offsets": [0, tensor.numel() * tensor.element_size()]}
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % _ALIGN)
    return struct.pack("<Q", len(text)) + text


def tensor_payloads(tensors: list[torch.Tensor], metadata: dict[str, str] | None = None,
                    wait: bool = True) -> list[Payload]:
    """The payloads of several tensors (each in its own dtype, one of ``WIRE_DTYPES``), laid out in one host buffer.
    Each tensor's data are written there by one copy: from a GPU, queued straight into pinned memory and waited for
    once for all of them (``wait=False``: not waited for; the caller waits for the device's current stream, e.g.
    through ``backbone.staging.ToHost``, before the payloads are read); from the host, one memcpy. Nothing else
    touches the data."""
    heads = [_header(t, metadata) for t in tensors]
    sizes = [len(h) + t.numel() * t.element_size() for h, t in zip(heads, tensors)]
    starts, end = [], 0
    for size in sizes:
        starts.append(end)
        end += size + (-size % _ALIGN)
    devices = {t.device for t in tensors if t.device.type == "cuda"}
    flat = torch.empty(end, dtype=torch.uint8, pin_memory=bool(devices))  # [bytes]
    rows = []
    for t, head, start, size in zip(tensors, heads, starts, sizes):
        flat[start : start + len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        dst = flat[start + len(head) : start + size].view(t.dtype).view(t.shape)
        dst.copy_(t, non_blocking=t.device.type == "cuda")
        rows.append(dst)
    for device in devices if wait else ():  # the copies were queued on its current stream: one wait for the batch
        torch.cuda.current_stream(device).synchronize()
    view = memoryview(flat.numpy())
    return [Payload(view[start : start + size], dst) for start, size, dst in zip(starts, sizes, rows)]


def encode_tensor(tensor: torch.Tensor, dtype: str = "float32", metadata: dict[str, str] | None = None) -> bytes:
    """Serialize one tensor (cast to the wire dtype) under the name ``t``."""
    if dtype not in WIRE_DTYPES:
        raise CodecError(f"unsupported wire dtype {dtype!r}; expected one of {sorted(WIRE_DTYPES)}")
    t = tensor.detach().to(WIRE_DTYPES[dtype])
    return bytes(tensor_payloads([t], metadata)[0].data)


def decode_tensor(data: bytes) -> torch.Tensor:
    """Inverse of :func:`encode_tensor`; the caller casts to its compute dtype."""
    try:
        tensors = st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CodecError(f"not a safetensors payload: {exc}") from exc
    if set(tensors) != {"t"}:
        raise CodecError(f"expected one tensor named 't', got {sorted(tensors)}")
    return tensors["t"]

"""Reading a checkpoint directory: its safetensors files, tensor by tensor, and its fingerprint.

Tiers read only the tensors they run (``read_tensors`` with a prefix), straight from the files: nothing loads the
whole model first.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors import safe_open as _safe_open

FINGERPRINT_FILE = "tributary-fingerprint.json"


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: a single ``model.safetensors`` or the files of its index."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def safe_open(path: str, **kw):
    """safetensors' ``safe_open``, a file it cannot read being a ModelError naming it (not "invalid header length")."""
    from models.family import ModelError

    try:
        return _safe_open(path, **kw)
    except SafetensorError as exc:
        raise ModelError(f"{path}: not a readable safetensors file ({exc})") from None


def read_tensors(model_dir: Path, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor whose name starts with ``prefix``, keyed by the rest of its name."""
    out: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name.startswith(prefix):
                    t = f.get_tensor(name)
                    out[name[len(prefix) :]] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    if not out:
        raise KeyError(f"no tensor named {prefix}* in {model_dir}")
    return out


def read_matching(model_dir: Path, wanted, dtype: torch.dtype | None = None,
                  device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor whose full name satisfies ``wanted(name)``, by full name, on ``device``. safetensors maps the
    files and opens each tensor onto the device, so only the bytes of the tensors read are touched. A read that takes
    more than a few seconds logs its progress (router/progress.py)."""
    from router.progress import Progress

    files = weight_files(model_dir)
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            total += sum(_nbytes(f.get_slice(name)) for name in f.keys() if wanted(name))
    progress = Progress("reading weights", total, "B", extra={"model": Path(model_dir).name})
    out: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                if wanted(name):
                    t = f.get_tensor(name)
                    progress.advance(t.numel() * t.element_size())
                    out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    progress.done()
    return out


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(tensor_slice) -> int:
    """Bytes of a tensor in a safetensors file, from its header (nothing is read)."""
    n = 1
    for d in tensor_slice.get_shape():
        n *= d
    return n * _DTYPE_BYTES.get(tensor_slice.get_dtype(), 4)


def fingerprint(model_dir: Path) -> str:
    """A content hash of the weights and configs, computed once and kept beside the checkpoint when writable.

    It is part of every cache key, so two checkpoints never share cached encoder outputs.
    """
    cached = model_dir / FINGERPRINT_FILE
    # Not the cache, nor another process's copy of it being written (below).
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith(FINGERPRINT_FILE))
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    try:
        data = json.loads(cached.read_text())
        if data.get("files") == stamp:
            return data["sha256"]
    except (OSError, ValueError, AttributeError, KeyError):  # none yet, or unreadable: hashed again below
        pass
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    digest = h.hexdigest()
    # Written aside and renamed into place: every tier's process hashes a new checkpoint at once, and one read
    # another's half-written file (an empty one: JSONDecodeError, and `up` stopped at start-up).
    tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"sha256": digest, "files": stamp}))
        os.replace(tmp, cached)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only checkpoint (a mounted volume) is hashed again by each process
    return digest

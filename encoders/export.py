"""ONNX export of each encoder (+ projector) with a dynamic batch axis, checked against torch before it is used.

``tributary export-onnx --model DIR`` runs it; a worker started with ``--runtime onnx`` runs it on first use. Files
go next to the checkpoint (``DIR/onnx/<modality>/``) when that is writable, else to a cache folder keyed by the
checkpoint's fingerprint. A manifest records the fingerprint and the parity measured; a manifest for another
fingerprint means a stale export, which is redone.

An encoder that takes real lengths (Qwen2-Audio: ``forward(x, lengths)``) is exported with two inputs, ``x`` and
``lengths`` (int64 [B]), both on the dynamic batch axis, and checked with lengths that make its padding mask matter.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from models.spec import ModelSpec

log = logging.getLogger(__name__)

# Largest |ORT - torch| accepted on random inputs (fp32). Kernels differ in summation order and fused ops; 1e-3 is
# about 1000x the differences measured on the demo encoders (~1e-6) and far below a difference that matters
# downstream. An export above it is refused.
PARITY_TOLERANCE = 1e-3
MODEL_FILE, MANIFEST_FILE = "model.onnx", "manifest.json"


class ExportError(RuntimeError):
    pass


@dataclass(frozen=True)
class ExportResult:
    path: Path
    max_abs_diff: float
    seconds: float


def onnx_root(spec: ModelSpec) -> Path:
    if os.access(spec.path, os.W_OK):
        return spec.path / "onnx"
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "tributary" / "onnx" / spec.fingerprint[:32]


def example_input(spec: ModelSpec, modality: str, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if modality == "image":
        size = spec.config["vision_config"]["image_size"]
        return torch.randn(batch, 3, size, size, generator=g)  # [B, 3, S, S]
    audio = spec.config["audio_config"]
    frames = 2 * audio["max_source_positions"]
    return torch.randn(batch, audio["num_mel_bins"], frames, generator=g)  # [B, mels, window frames]


def example_lengths(spec: ModelSpec, modality: str, batch: int, seed: int = 0) -> torch.Tensor | None:
    """Real lengths [B] for an encoder that takes them (Qwen2-Audio), else None. The first is a third of the window,
    so the traced graph always applies the padding mask (one that hides nothing is the same as none)."""
    if modality not in spec.family.takes_lengths:
        return None
    frames = example_input(spec, modality, 1).shape[-1]
    g = torch.Generator().manual_seed(seed + 1000)
    lengths = torch.randint(1, frames + 1, (batch,), generator=g)
    lengths[0] = max(1, frames // 3)
    return lengths


def _inputs(spec: ModelSpec, modality: str, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    lengths = example_lengths(spec, modality, batch, seed)
    x = example_input(spec, modality, batch, seed)
    return (x,) if lengths is None else (x, lengths)


def ensure_onnx(spec: ModelSpec, modality: str, progress: Callable[[str], None] = log.info) -> Path:
    """The checked ONNX file for this checkpoint's encoder, exporting it first if needed (one process at a time)."""
    target = onnx_root(spec) / modality
    if _fresh(target, spec):
        progress(f"using the {modality} encoder's ONNX export made for this checkpoint: {target / MODEL_FILE}")
        return target / MODEL_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{modality}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be exporting the same model
        if not _fresh(target, spec):
            export(spec, modality, target, progress)
    return target / MODEL_FILE


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's own chatter kept out of the logs: onnxscript's and onnx_ir's INFO lines (one per rewrite rule
    and deduplicated initializer: hundreds per export) and torch.export's FutureWarnings about its own internals.
    Their warnings and errors still show."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|copyreg)")
            # x and lengths share their batch axis, by design: one name for both, which the exporter says at WARNING
            # as if the dynamic batch were lost (an outside tester's reading); batches still run (test_onnx).
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used, since it shares")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export(spec: ModelSpec, modality: str, target: Path, progress: Callable[[str], None] = log.info) -> ExportResult:
    from encoders.loader import load_torch_module

    if modality not in spec.modalities:  # said before the "exporting" line, not after it
        raise ExportError(f"{spec.name} has no {modality} encoder (it has: {', '.join(spec.modalities)})")
    t0 = time.perf_counter()
    progress(f"exporting the {modality} encoder of {spec.name} to ONNX (one time, ~10 s) ...")
    module = load_torch_module(spec, modality)
    tmp = Path(tempfile.mkdtemp(prefix=f".{modality}-", dir=target.parent))
    try:
        batch = torch.export.Dim("batch", min=1, max=1024)
        args = _inputs(spec, modality, 2)
        with torch.inference_mode(False), torch.no_grad(), _quiet_exporter():
            # One input (x [B, ...]), or two for an encoder that masks padding (x, lengths [B] int64).
            torch.onnx.export(module, args, str(tmp / MODEL_FILE), dynamo=True,
                              dynamic_shapes=tuple({0: batch} for _ in args), input_names=["x", "lengths"][: len(args)],
                              output_names=["y"], optimize=True, verbose=False)
        progress(f"checking the {modality} export against torch ...")
        diff = parity(module, tmp / MODEL_FILE, spec, modality)
        if diff > PARITY_TOLERANCE:
            raise ExportError(f"{modality} ONNX export differs from torch by {diff:.3g} > {PARITY_TOLERANCE}")
        seconds = time.perf_counter() - t0
        (tmp / MANIFEST_FILE).write_text(json.dumps({
            "fingerprint": spec.fingerprint, "modality": modality, "max_abs_diff": diff,
            "tolerance": PARITY_TOLERANCE, "torch": torch.__version__, "seconds": round(seconds, 2)}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"{modality} encoder exported: max |onnx - torch| = {diff:.2e} (tolerance {PARITY_TOLERANCE}) "
             f"in {seconds:.1f} s -> {target / MODEL_FILE}")
    return ExportResult(target / MODEL_FILE, diff, seconds)


def parity(module: torch.nn.Module, path: Path, spec: ModelSpec, modality: str) -> float:
    """Max |ORT - torch| over random batches of size 1 and 3 (3 also exercises the dynamic batch axis)."""
    from encoders.onnx_runtime import OnnxRuntime

    runtime = OnnxRuntime(path)
    worst = 0.0
    for batch, seed in ((1, 1), (3, 2)):
        args = _inputs(spec, modality, batch, seed)
        with torch.inference_mode():
            ref = module(*args)
        worst = max(worst, float((runtime.run(*args) - ref).abs().max()))
    return worst


def _fresh(target: Path, spec: ModelSpec) -> bool:
    manifest = target / MANIFEST_FILE
    if not (manifest.exists() and (target / MODEL_FILE).exists()):
        return False
    return json.loads(manifest.read_text()).get("fingerprint") == spec.fingerprint

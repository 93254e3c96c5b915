"""Builds a modality's preprocessor and runtime from a checkpoint, loading only that encoder's weights.

What to build comes from the checkpoint's family (``spec.family``: models/trimodal.py, models/llava.py,
models/qwen2_audio.py); a modality the family does not have is refused here, before any weight is read.
"""

from __future__ import annotations

import logging

import torch

from encoders.preprocess import AudioPreprocessor, ImagePreprocessor
from models.media import MAX_AUDIO_S
from models.spec import ModelError, ModelSpec

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnx")


def _check(spec: ModelSpec, modality: str) -> None:
    if modality not in ("image", "audio"):
        raise ValueError(f"unknown modality {modality!r}")
    if modality not in spec.modalities:
        raise ModelError(f"{spec.name} ({spec.family.model_type}) takes no {modality} input; it takes "
                         f"{', '.join(spec.modalities)}")


def load_preprocessor(spec: ModelSpec, modality: str, max_audio_seconds: float = MAX_AUDIO_S):
    _check(spec, modality)
    impl = spec.family.impl
    if modality == "image":
        return ImagePreprocessor(spec.preprocess["image"], impl.image_tokens(spec.config))
    return AudioPreprocessor(spec.preprocess["audio"], impl.audio_tokens(spec.config),
                             keep_length="audio" in spec.family.takes_lengths, max_seconds=max_audio_seconds)


def load_torch_module(spec: ModelSpec, modality: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The encoder + projector as one module: preprocessed batch [B, ...] (and, for a family whose encoder masks
    padding, the real lengths [B]) -> embeddings [B, N, H]."""
    _check(spec, modality)
    return spec.family.impl.load_encoder(spec.path, spec.config, modality, dtype)


def load_runtime(spec: ModelSpec, modality: str, runtime: str = "torch", device: str = "cpu",
                 threads: int | None = None, dtype: torch.dtype = torch.float32):
    if runtime == "torch":
        from encoders.torch_runtime import TorchRuntime

        return TorchRuntime(load_torch_module(spec, modality, dtype), device, dtype)
    if dtype != torch.float32:
        raise ValueError("the ONNX runtime runs the float32 export")
    if runtime == "onnx":
        from encoders.export import ensure_onnx
        from encoders.onnx_runtime import OnnxRuntime

        _check(spec, modality)
        return OnnxRuntime(ensure_onnx(spec, modality), device, threads)
    raise ValueError(f"unknown runtime {runtime!r}; expected one of {RUNTIMES}")

"""Builds a modality's preprocessor and runtime from a checkpoint, loading only that encoder's weights."""

from __future__ import annotations

import logging

import torch

from encoders.preprocess import AudioPreprocessor, ImagePreprocessor
from models import trimodal
from models.spec import ModelSpec

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnx")


def load_preprocessor(spec: ModelSpec, modality: str):
    if modality == "image":
        return ImagePreprocessor(spec.preprocess["image"], trimodal.image_output_length(spec.config))
    if modality == "audio":
        return AudioPreprocessor(spec.preprocess["audio"], trimodal.audio_output_length)
    raise ValueError(f"unknown modality {modality!r}")


def load_torch_module(spec: ModelSpec, modality: str) -> torch.nn.Module:
    """The encoder + projector as one module: preprocessed batch [B, ...] -> embeddings [B, N, H]."""
    loaders = {"image": trimodal.load_image_encoder, "audio": trimodal.load_audio_encoder}
    if modality not in loaders:
        raise ValueError(f"unknown modality {modality!r}")
    return loaders[modality](spec.path, spec.config)


def load_runtime(spec: ModelSpec, modality: str, runtime: str = "torch", device: str = "cpu",
                 threads: int | None = None):
    if runtime == "torch":
        from encoders.torch_runtime import TorchRuntime

        return TorchRuntime(load_torch_module(spec, modality), device)
    if runtime == "onnx":
        from encoders.export import ensure_onnx
        from encoders.onnx_runtime import OnnxRuntime

        return OnnxRuntime(ensure_onnx(spec, modality), device, threads)
    raise ValueError(f"unknown runtime {runtime!r}; expected one of {RUNTIMES}")

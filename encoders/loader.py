"""Builds a modality's preprocessor and runtime from a checkpoint, loading only that encoder's weights."""

from __future__ import annotations

from models import trimodal
from models.spec import ModelSpec

from encoders.preprocess import AudioPreprocessor, ImagePreprocessor
from encoders.torch_runtime import TorchRuntime


def load_preprocessor(spec: ModelSpec, modality: str):
    if modality == "image":
        return ImagePreprocessor(spec.preprocess[modality], trimodal.image_output_length(spec.config))
    if modality == "audio":
        return AudioPreprocessor(spec.preprocess[modality], trimodal.audio_output_length)
    raise ValueError(f"unknown modality {modality!r}")


def load_runtime(spec: ModelSpec, modality: str, device: str = "cpu") -> TorchRuntime:
    loaders = {"image": trimodal.load_image_encoder, "audio": trimodal.load_audio_encoder}
    if modality not in loaders:
        raise ValueError(f"unknown modality {modality!r}")
    return TorchRuntime(loaders[modality](spec.path, spec.config), device)

"""Media decoding and preprocessing in the worker (never in the gateway), driven by the checkpoint's processor config.

Images: Pillow decode (allow-listed formats, a pixel cap), EXIF rotation, RGB, shortest-edge resize, centre crop,
normalize. Audio: soundfile decode, mono, torchaudio resampling to the extractor's rate, Whisper log-mel features.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}
MAX_IMAGE_PIXELS = 40_000_000


class MediaError(ValueError):
    """The client's bytes are not a usable image or audio clip (the gateway turns this into a 400)."""


@dataclass(frozen=True)
class Prepared:
    """One media part ready for its encoder: ``data`` has no batch axis; ``num_tokens`` rows of output are kept."""

    data: torch.Tensor
    num_tokens: int


class ImagePreprocessor:
    def __init__(self, cfg: dict, num_tokens: int):
        from torchvision.transforms import InterpolationMode

        self.size = int(cfg["image_size"])
        self.mean, self.std = list(cfg["image_mean"]), list(cfg["image_std"])
        self.interp = InterpolationMode(cfg.get("resample", "bicubic"))
        self.num_tokens = num_tokens

    def __call__(self, data: bytes) -> Prepared:
        from PIL import Image, ImageOps
        from torchvision.transforms.v2 import functional as F

        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.format not in IMAGE_FORMATS:
                    raise MediaError(f"image format {img.format} is not accepted (accepted: {sorted(IMAGE_FORMATS)})")
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise MediaError(f"image of {img.width}x{img.height} pixels exceeds {MAX_IMAGE_PIXELS} pixels")
                img = ImageOps.exif_transpose(img).convert("RGB")
                pixels = F.pil_to_tensor(img)  # [3, H, W] uint8
        except MediaError:
            raise
        except Exception as exc:  # Pillow raises many types (UnidentifiedImageError, OSError, DecompressionBomb...)
            raise MediaError(f"cannot decode image: {exc}") from exc
        x = F.resize(pixels, [self.size], interpolation=self.interp, antialias=True)  # shortest edge -> size
        x = F.center_crop(x, [self.size, self.size])
        x = F.normalize(x.float() / 255.0, self.mean, self.std)  # [3, S, S]
        return Prepared(x, self.num_tokens)


class AudioPreprocessor:
    def __init__(self, cfg: dict, output_length):
        from transformers import WhisperFeatureExtractor

        self.rate = int(cfg["sampling_rate"])
        self.extractor = WhisperFeatureExtractor(
            feature_size=cfg["feature_size"],
            sampling_rate=self.rate,
            hop_length=cfg["hop_length"],
            chunk_length=cfg["chunk_length"],
            n_fft=cfg["n_fft"],
        )
        self.output_length = output_length

    def __call__(self, data: bytes) -> Prepared:
        import soundfile as sf
        import torchaudio.functional as AF

        try:
            wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # [T, C]
        except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError
            raise MediaError(f"cannot decode audio: {exc}") from exc
        if wave.shape[0] == 0:
            raise MediaError("audio clip is empty")
        mono = torch.from_numpy(np.ascontiguousarray(wave.mean(axis=1)))
        if rate != self.rate:
            mono = AF.resample(mono, rate, self.rate)
        feats = self.extractor(
            mono.numpy(), sampling_rate=self.rate, return_tensors="pt", return_attention_mask=True
        )
        frames = int(feats["attention_mask"].sum())  # real (unpadded) mel frames, capped by the window
        return Prepared(feats["input_features"][0], self.output_length(frames))  # [mels, window frames]

"""Test media made on the fly: images and audio clips as the bytes a client would send."""

from __future__ import annotations

import base64
import io

import numpy as np


def png_bytes(width: int = 40, height: int = 30, seed: int = 0, mode: str = "RGB") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = (rng.random((height, width, channels)) * 255).astype("uint8")
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(width: int = 40, height: int = 30, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8")).save(buf, "JPEG")
    return buf.getvalue()


def wav_bytes(seconds: float = 1.0, rate: int = 16000, seed: int = 0, channels: int = 1) -> bytes:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    samples = (rng.standard_normal((int(seconds * rate), channels)) * 0.1).astype("float32")
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV")
    return buf.getvalue()


def pcm16(seconds: float, seed: int = 0, rate: int = 24000) -> bytes:
    """Speech-level noise as the Realtime API's input audio: PCM16 little-endian mono (24 kHz)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * rate)) * 3000).astype("<i2").tobytes()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()

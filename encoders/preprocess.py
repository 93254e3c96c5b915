"""Media decoding and preprocessing in the worker (never in the gateway), driven by the checkpoint's processor config.

Images: Pillow decode (allow-listed formats, a pixel cap), EXIF rotation, RGB, shortest-edge resize, centre crop,
normalize. Audio: soundfile decode, mono, then models.audio: resampling to the extractor's rate and Whisper log-mel
features.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from models.audio import AudioConfig, Features, StreamingFeatures
from models.media import (
    IMAGE_NAMES,
    MAX_AUDIO_S,
    UNKNOWN_FRAMES,
    MediaHeaderError,
    audio_sample_budget,
    check_audio,
    check_image,
)


class MediaError(ValueError):
    """The client's bytes are not a usable image or audio clip (the gateway turns this into a 400).

    Its message goes back to the client (through Redis, then the gateway, which names the part): it says what was
    wrong in the client's terms and never carries a decoder's own words. Those are in ``detail``, for the worker's
    log."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")
IMAGE_ACCEPTED = ", ".join(IMAGE_NAMES[:-1]) + " or " + IMAGE_NAMES[-1]
AUDIO_ACCEPTED = "WAV, MP3, FLAC or OGG"


def _reason(exc: BaseException) -> str:
    """A decoder's message, for the log: its type and text without the Python object reprs it embeds
    (``<_io.BytesIO object at 0x7f...>``)."""
    text = _OBJECT_REPR.sub("", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True)
class Prepared:
    """One media part ready for its encoder: ``data`` has no batch axis; ``num_tokens`` rows of output are kept.

    ``length``: for an encoder whose output depends on how much of ``data`` is real (Qwen2-Audio masks the padded
    mel frames in attention), the real extent along the padded axis; it reaches the runtime as ``lengths``.
    None for encoders that take the padded input alone (images, the demo's audio encoder)."""

    data: torch.Tensor
    num_tokens: int
    length: int | None = None


# PIL resample codes (as in Hugging Face processor configs) -> torchvision interpolation names.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class ImagePreprocessor:
    """A Hugging Face ``CLIPImageProcessor``-style config (``size``, ``crop_size``, ``resample``, ``rescale_factor``,
    ``image_mean``, ``image_std``, ``do_*``) applied with torchvision, as transformers' own torchvision backend does.

    Valid oddities are converted, not refused: EXIF rotation is applied; palette, CMYK, 16-bit and grayscale images
    become RGB; transparency is composited onto white (as transformers' ``convert_to_rgb`` does).
    """

    def __init__(self, cfg: dict, num_tokens: int):
        from torchvision.transforms import InterpolationMode

        size = cfg.get("size", {})
        self.resize = cfg.get("do_resize", True)
        self.shortest_edge = size.get("shortest_edge")
        self.exact = None if self.shortest_edge else [size["height"], size["width"]]
        crop = cfg.get("crop_size") or {}
        self.crop = [crop["height"], crop["width"]] if cfg.get("do_center_crop", False) else None
        resample = cfg.get("resample", 3)
        if resample not in _RESAMPLE:
            raise ValueError(f"resample={resample} is not supported (supported: {_RESAMPLE})")
        self.interp = InterpolationMode(_RESAMPLE[resample])
        # Rescale and normalize fused into one affine map of the uint8 pixels, computed in the same order as
        # transformers' torchvision backend (mean * (1 / rescale_factor), then (x - mean) / std), so the results
        # are bit-identical to it, not just close.
        self.rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None
        self.mean = self.std = None
        if cfg.get("do_normalize", True):
            self.mean, self.std = torch.tensor(cfg["image_mean"]), torch.tensor(cfg["image_std"])
            if self.rescale is not None:
                self.mean, self.std = self.mean * (1.0 / self.rescale), self.std * (1.0 / self.rescale)
                self.rescale = None
            self.mean, self.std = self.mean.view(3, 1, 1), self.std.view(3, 1, 1)
        self.num_tokens = num_tokens
        # Every image's [3, H, W] after resizing and cropping, when the config fixes it (None: it follows the image's
        # aspect ratio). Graphs are captured for it (encoders/graphs.py).
        self.input_shape = ((3, *self.crop) if self.crop else (3, *self.exact) if self.resize and self.exact
                            else None)
        self.keep_length = False

    def __call__(self, data: bytes) -> Prepared:
        from torchvision.transforms.v2 import functional as F

        x = decode_image(data)  # [3, H, W] uint8
        if self.resize:
            x = F.resize(x, [self.shortest_edge] if self.shortest_edge else self.exact,
                         interpolation=self.interp, antialias=True)
        if self.crop:
            x = _center_crop(x, *self.crop)
        y = x.float()
        if self.mean is not None:
            y = (y - self.mean) / self.std
        elif self.rescale is not None:
            y = y * self.rescale
        return Prepared(y, self.num_tokens)  # [3, S, S]


def _center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre crop as transformers does it: the offset is floor((size - crop) / 2). torchvision's ``center_crop``
    rounds it instead (half to even), which shifts the crop by one pixel when size - crop is 3 mod 4 (e.g. a 70x64
    image resized to 35x32 and cropped to 32x32). A crop larger than the image pads with zeros first, as both do."""
    from torchvision.transforms.v2 import functional as F

    h, w = x.shape[-2:]
    if height > h or width > w:
        pad_w, pad_h = max(width - w, 0), max(height - h, 0)
        x = F.pad(x, [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2], fill=0)
        h, w = x.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return x[..., top : top + height, left : left + width]


def decode_image(data: bytes) -> torch.Tensor:
    """Bytes -> RGB uint8 [3, H, W], or MediaError. Only allow-listed formats, at most models.media's
    MAX_IMAGE_PIXELS."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    from torchvision.transforms.v2 import functional as F

    fmt = None
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            try:
                check_image(img.format, img.width, img.height, data)  # the limits the gateway checked, again
            except MediaHeaderError as exc:
                raise MediaError(str(exc)) from None  # models.media's words are the client's already
            return F.pil_to_tensor(_to_rgb(ImageOps.exif_transpose(img)))
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError("the image has too many pixels to decode", _reason(exc)) from None
    except Exception as exc:  # Pillow raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        if isinstance(exc, UnidentifiedImageError):
            raise MediaError(f"it is not an image in an accepted format: expected {IMAGE_ACCEPTED} data (got "
                             f"{len(data)} bytes)", _reason(exc)) from None
        raise MediaError(f"the {fmt or 'image'} data is truncated or corrupt (got {len(data)} bytes)",
                         _reason(exc)) from None


def _to_rgb(img):
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits, not clip
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    # Any alpha band or transparency key (a palette entry, or a tRNS colour in an RGB / L / 1-bit PNG) is composited
    # onto white, as transformers' convert_to_rgb decides it; only then the rest becomes RGB.
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


class AudioPreprocessor:
    """A ``WhisperFeatureExtractor`` config: log-mel features padded (or cut) to the extractor's window, computed by
    ``models.audio`` (the code the Realtime WebSocket streams with, so a clip appended piece by piece gets bitwise
    the features it gets here in one piece).

    ``output_length(real mel frames)`` gives the rows kept; ``keep_length`` puts the real frame count in
    ``Prepared.length`` for an encoder that masks the padding (Qwen2-Audio)."""

    def __init__(self, cfg: dict, output_length, keep_length: bool = False, max_seconds: float = MAX_AUDIO_S):
        self.cfg = AudioConfig.of(cfg)
        self.rate = self.cfg.rate
        self.output_length = output_length
        self.keep_length = keep_length
        self.max_seconds = max_seconds
        self.input_shape = (self.cfg.n_mels, self.cfg.frames)  # every clip is padded or cut to the window

    def __call__(self, data: bytes) -> Prepared:
        wave, rate = self.decode(data)
        if wave.shape[0] == 0:
            raise MediaError("audio clip is empty")
        # A clip holding NaN or infinity is refused once its features are made (the worker's finiteness check); the
        # arithmetic on it meanwhile is expected, not a warning to log for each such clip.
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            stream = StreamingFeatures(self.cfg, rate)
            stream.feed(np.ascontiguousarray(wave.mean(axis=1), dtype=np.float32))
            return self._prepared(stream.finish())

    def from_features(self, blob: bytes) -> Prepared:
        """Features computed elsewhere (the gateway streams them while a Realtime client appends audio); a
        ValueError if they do not fit this encoder's config."""
        return self._prepared(Features.from_bytes(blob, self.cfg))

    def _prepared(self, f: Features) -> Prepared:
        return Prepared(torch.from_numpy(f.full()), self.output_length(f.length),  # [mels, window frames]
                        f.length if self.keep_length else None)

    def decode(self, data: bytes) -> tuple[np.ndarray, int]:
        """Samples [T, C] (float32) and their rate. Decoding stops past ``max_seconds``, so a small, highly compressed
        file cannot make the decoder produce gigabytes: a clip longer than that is refused. (The whole clip is
        decoded up to the cap, not just the extractor's window: resampling a cut clip is not bitwise the
        reference's.)"""
        import soundfile as sf

        try:
            f = sf.SoundFile(io.BytesIO(data))
        except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError
            raise MediaError(f"it is not an audio clip in an accepted format: expected {AUDIO_ACCEPTED} data (got "
                             f"{len(data)} bytes)", _reason(exc)) from None
        with f:
            rate, channels = f.samplerate, f.channels
            try:  # the limits the gateway checked, again (a job may come from any gateway); frames are read below
                # the frames only where the header does not say them (refused: libsndfile cannot read to the end)
                check_audio(str(f.format), rate, channels, f.frames if f.frames >= UNKNOWN_FRAMES else None,
                            self.max_seconds, self.rate)
            except MediaHeaderError as exc:
                raise MediaError(str(exc)) from None
            budget = audio_sample_budget(self.max_seconds)
            cap = min(math.ceil(self.max_seconds * rate), budget // channels)
            try:
                wave = f.read(frames=cap + 1, dtype="float32", always_2d=True)  # [T, C]
            except Exception as exc:
                raise MediaError(f"the {f.format} audio data is truncated or corrupt (got {len(data)} bytes)",
                                 _reason(exc)) from None
        if wave.shape[0] > cap:
            raise MediaError(f"audio longer than {self.max_seconds:g} s, or more than {budget} samples "
                             f"over its {channels} channels")
        return wave, rate

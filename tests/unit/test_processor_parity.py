"""Our worker-side preprocessing equals the checkpoint's own transformers processors on real-looking inputs.

Images: ``ImagePreprocessor`` vs ``transformers.CLIPImageProcessor(**preprocessor_config["image"])`` (transformers'
torchvision backend), compared on ``pixel_values[0]``.

Tolerance: EXACT (bitwise). Both sides decode with Pillow, composite transparency onto white the same way, resize the
same uint8 [3, H, W] tensor with torchvision's antialiased bicubic kernel (deterministic on the CPU), crop at the
same offset and apply the same fused normalize ``(x - mean * (1 / rescale)) / (std * (1 / rescale))`` in fp32. Two
real differences were found and fixed in encoders/preprocess.py to get here: torchvision's ``center_crop`` rounds
the crop offset half-to-even where transformers floors it (a one-pixel shift when size - crop = 3 mod 4, e.g. 70x64;
differences up to ~0.5), and tRNS colour-key transparency in RGB / 1-bit PNGs was not composited onto white. The
fused normalize in another operation order gave ~4e-7; if a future transformers reorders it again, ~1e-6 is the
expected order of a harmless difference, anything larger is a real mismatch.

Audio: ``AudioPreprocessor`` vs ``WhisperFeatureExtractor(**preprocessor_config["audio"])`` on the reference
waveform (torchaudio-resampled). Not bitwise: the features are computed by ``models.audio`` (numpy, in blocks of
frames, so that the Realtime WebSocket can stream them and get bitwise what the encoder computes from a whole clip;
tests/unit/test_audio_features.py holds that). Measured against transformers' torch path: up to 5e-5 on log-mel
values of order 1 (numpy's float32 FFT vs torch's, and a resampling kernel computed in float64 where torchaudio's is
float32); 2e-4 is the bound, far below any real feature difference (a mislabelled rate differs by 0.05 on average).
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

from encoders.preprocess import AudioPreprocessor, ImagePreprocessor, decode_image
from models.trimodal import audio_output_length, image_output_length

# ---- image inputs ---------------------------------------------------------------------------------------------


def photo(width: int, height: int, seed: int = 0):
    """A smooth, photo-like RGB picture: per-channel gradients, a soft blob, mild sensor noise (not pure noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    blob = np.exp(-(((u - 0.6) ** 2) + ((v - 0.4) ** 2)) / 0.05)
    arr = np.stack([40 + 170 * u + 40 * blob, 60 + 150 * v * (1 - 0.3 * u), 200 - 120 * u * v + 30 * blob], -1)
    arr += rng.normal(0, 4, arr.shape)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


def encode(img, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def opened(data: bytes):
    """What a transformers user passes: the file opened with Pillow, as is (mode, palette, info kept)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def ours_as_pil(data: bytes):
    """The RGB picture our decode step produces (for modes the reference cannot take as they are)."""
    from PIL import Image

    return Image.fromarray(decode_image(data).permute(1, 2, 0).numpy(), "RGB")


def rgba_partial(width=48, height=36):
    from PIL import Image

    rgb = np.asarray(photo(width, height, seed=2))
    y, x = np.mgrid[0:height, 0:width]
    alpha = np.clip(255 * x / (width - 1), 0, 255).astype(np.uint8)  # transparent on the left -> opaque on the right
    alpha[: height // 3] = 255
    alpha[-3:] = 0
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def palette(transparent: bool):
    img = photo(45, 37, seed=3).quantize(colors=32)
    if transparent:
        img.info["transparency"] = int(np.asarray(img)[0, 0])  # the top-left colour's palette entry
    return img


def rgb_colour_key():
    """An RGB PNG with a tRNS colour key: one exact colour (a band of pure green) is transparent."""
    arr = np.asarray(photo(40, 30, seed=4)).copy()
    arr[10:20] = (0, 255, 0)
    from PIL import Image

    return Image.fromarray(arr, "RGB")


def gray16():
    from PIL import Image

    y, x = np.mgrid[0:40, 0:52]
    arr = (x * 1000 + y * 300 + np.random.default_rng(5).integers(0, 200, (40, 52))).astype(np.uint16)
    return Image.fromarray(arr)  # mode I;16, values up to ~63000


def exif_rotated_jpeg() -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the viewer rotates it 90 degrees clockwise
    return encode(photo(60, 24, seed=6), "JPEG", quality=92, exif=exif)


# id -> (bytes, how the reference gets its PIL image)
#   "opened": the file opened with Pillow, untouched; transformers' convert_to_rgb handles the mode itself.
#   "loaded": transformers.image_utils.load_image(base64), its own loader, which applies the EXIF orientation.
#   "decoded": our decoded RGB image; needed only where transformers has no (or a different, deliberate) handling:
#              16-bit grayscale (Pillow's convert clips every value above 255 to white; we scale 65535 -> 255).
CASES = {
    "photo-33x17": (lambda: encode(photo(33, 17)), "opened"),
    "photo-640x481": (lambda: encode(photo(640, 481, seed=1), "JPEG", quality=90), "opened"),
    "photo-17x300": (lambda: encode(photo(17, 300, seed=7)), "opened"),
    "crop-offset-70x64": (lambda: encode(photo(70, 64, seed=8)), "opened"),  # resized 35x32: floor vs round
    "crop-offset-32x39": (lambda: encode(photo(32, 39, seed=9)), "opened"),
    "gray-L": (lambda: encode(photo(50, 31, seed=10).convert("L")), "opened"),
    "gray-L-jpeg": (lambda: encode(photo(50, 31, seed=10).convert("L"), "JPEG"), "opened"),
    "rgba-partial": (lambda: encode(rgba_partial()), "opened"),
    "gray-alpha-LA": (lambda: encode(rgba_partial().convert("LA")), "opened"),
    "palette": (lambda: encode(palette(False)), "opened"),
    "palette-transparent": (lambda: encode(palette(True), transparency=palette(True).info["transparency"]),
                            "opened"),
    "gif-transparent": (lambda: encode(palette(True), "GIF", transparency=palette(True).info["transparency"]),
                        "opened"),
    "rgb-colour-key": (lambda: encode(rgb_colour_key(), transparency=(0, 255, 0)), "opened"),
    "cmyk-jpeg": (lambda: encode(photo(41, 29, seed=11).convert("CMYK"), "JPEG", quality=95), "opened"),
    "webp": (lambda: encode(photo(45, 60, seed=12), "WEBP", quality=90), "opened"),
    "exif-orientation-6": (exif_rotated_jpeg, "loaded"),
    "gray-16bit": (lambda: encode(gray16()), "decoded"),
}


def reference_image(data: bytes, how: str):
    if how == "opened":
        return opened(data)
    if how == "loaded":
        from transformers.image_utils import load_image

        return load_image(base64.b64encode(data).decode())
    return ours_as_pil(data)


# ---- image fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cfg(tiny_spec) -> dict:
    return tiny_spec.preprocess["image"]


@pytest.fixture(scope="module")
def small_cfg(tiny_cfg) -> dict:
    """The 'small' demo's sizes (224, CLIP's own) with the same processor settings."""
    return dict(tiny_cfg, size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})


def pair(cfg: dict, config_for_tokens: dict):
    from transformers import CLIPImageProcessor

    return ImagePreprocessor(cfg, image_output_length(config_for_tokens)), CLIPImageProcessor(**cfg)


def reference(processor, img) -> torch.Tensor:
    return processor(images=img, return_tensors="pt")["pixel_values"][0]


# ---- image parity ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_image_matches_clip_image_processor(tiny_spec, tiny_cfg, case):
    make, how = CASES[case]
    data = make()
    ours, ref = pair(tiny_cfg, tiny_spec.config)
    size = tiny_cfg["crop_size"]["height"]
    got = ours(data).data
    want = reference(ref, reference_image(data, how))
    assert got.shape == want.shape == (3, size, size)
    assert torch.equal(got, want), f"max |diff| = {float((got - want).abs().max()):.3g}"


@pytest.mark.parametrize("case", ["photo-640x481", "photo-17x300", "crop-offset-70x64", "rgba-partial", "cmyk-jpeg"])
def test_image_matches_at_224(tiny_spec, small_cfg, case):
    make, how = CASES[case]
    data = make()
    ours, ref = pair(small_cfg, tiny_spec.config)
    got = ours(data).data
    want = reference(ref, reference_image(data, how))
    assert got.shape == want.shape == (3, 224, 224)
    assert torch.equal(got, want), f"max |diff| = {float((got - want).abs().max()):.3g}"


def test_crop_offset_regression_is_visible(tiny_spec, tiny_cfg):
    # The case the floor-vs-round crop fix is about: cropping one pixel off would differ clearly, not by rounding.
    from torchvision.transforms.v2 import functional as F

    data = CASES["crop-offset-70x64"][0]()
    ours, _ = pair(tiny_cfg, tiny_spec.config)
    resized = F.resize(decode_image(data), [32], interpolation=ours.interp, antialias=True)
    assert tuple(resized.shape[-2:]) == (32, 35)  # 35 - 32 = 3: floor(1.5) = 1, round(1.5) = 2
    rounded = (F.center_crop(resized, [32, 32]).float() - ours.mean) / ours.std
    assert (ours(data).data - rounded).abs().max() > 0.05


def test_transparency_is_composited_onto_white_like_transformers(tiny_spec, tiny_cfg):
    # The colour-key band must come out white (as in the reference), not green; a plain RGB copy stays green.
    data = CASES["rgb-colour-key"][0]()
    ours, _ = pair(tiny_cfg, tiny_spec.config)
    pixels = decode_image(data)
    assert pixels[:, 10:20].eq(255).all()
    assert pixels[:, :10].ne(255).any()
    plain = decode_image(encode(rgb_colour_key()))
    assert torch.equal(plain[:, 10:20, 0], torch.tensor([0, 255, 0]).view(3, 1).expand(3, 10))


def test_16bit_needs_our_decode_not_pillows_clip(tiny_spec, tiny_cfg):
    # Why the 16-bit case feeds the reference our decoded image: the reference on the raw I;16 image clips, so almost
    # every pixel is white; ours scales 16 -> 8 bits and keeps the picture.
    data = CASES["gray-16bit"][0]()
    ours, ref = pair(tiny_cfg, tiny_spec.config)
    clipped = reference(ref, opened(data))
    assert clipped.std() < 0.2 * ours(data).data.std()


# ---- audio ----------------------------------------------------------------------------------------------------


def speechlike(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """[T, C] float32: a gliding voiced tone with harmonics, a syllable envelope and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * 3 * t)) * np.minimum(1, t * 20)
    chans = [0.2 * envelope * voiced * (1 - 0.3 * c) + 0.01 * rng.standard_normal(t.size) for c in range(channels)]
    return np.stack(chans, axis=1).astype(np.float32)


def wav(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


@pytest.fixture(scope="module")
def audio_cfg(tiny_spec) -> dict:
    return tiny_spec.preprocess["audio"]


@pytest.fixture(scope="module")
def extractor(audio_cfg):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(**audio_cfg)


@pytest.fixture(scope="module")
def audio_pre(audio_cfg) -> AudioPreprocessor:
    return AudioPreprocessor(audio_cfg, audio_output_length)


def reference_waveform(data: bytes, target_rate: int) -> np.ndarray:
    """The contract: soundfile decode -> mean over channels -> torchaudio resample to the extractor's rate."""
    import soundfile as sf
    import torchaudio.functional as AF

    wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    mono = torch.from_numpy(np.ascontiguousarray(wave.mean(axis=1)))
    if rate != target_rate:
        mono = AF.resample(mono, rate, target_rate)
    return mono.numpy()


AUDIO_TOL = 2e-4

AUDIO_CASES = {
    "16k-mono": (1.3, 16000, 1),
    "16k-mono-float": (0.7, 16000, 1),
    "8k-mono": (1.1, 8000, 1),
    "44.1k-stereo": (1.6, 44100, 2),
    "16k-longer-than-window": (2.6, 16000, 1),
    # Decoding stops past the window (+ a margin): resampled, the kept samples must still be bitwise the reference's.
    "44.1k-stereo-far-longer-than-window": (9.0, 44100, 2),
    "8k-far-longer-than-window": (12.0, 8000, 1),
}


@pytest.mark.parametrize("case", list(AUDIO_CASES))
def test_audio_matches_whisper_feature_extractor(audio_pre, extractor, audio_cfg, case):
    seconds, rate, channels = AUDIO_CASES[case]
    data = wav(speechlike(seconds, rate, channels, seed=len(case)), rate, "FLOAT" if "float" in case else "PCM_16")
    out = audio_pre(data)
    want = extractor(reference_waveform(data, audio_cfg["sampling_rate"]), sampling_rate=audio_cfg["sampling_rate"],
                     return_tensors="pt", return_attention_mask=True)
    assert out.data.shape == want["input_features"][0].shape
    torch.testing.assert_close(out.data, want["input_features"][0], atol=AUDIO_TOL, rtol=0)
    assert out.num_tokens == audio_output_length(int(want["attention_mask"].sum()))


def test_16k_mono_is_fed_to_the_extractor_untouched(audio_pre, extractor, audio_cfg):
    # At the extractor's own rate nothing happens before it: the samples soundfile decodes go straight in.
    import soundfile as sf

    data = wav(speechlike(1.0, 16000, seed=3), 16000)
    wave, _ = sf.read(io.BytesIO(data), dtype="float32")
    want = extractor(wave, sampling_rate=16000, return_tensors="pt")["input_features"][0]
    torch.testing.assert_close(audio_pre(data).data, want, atol=AUDIO_TOL, rtol=0)


@pytest.mark.parametrize("rate", [8000, 44100])
def test_extractor_refuses_other_rates_so_resampling_first_is_the_contract(extractor, audio_pre, rate):
    wave = speechlike(1.0, rate)[:, 0]
    with pytest.raises(ValueError, match="sampling rate"):
        extractor(wave, sampling_rate=rate, return_tensors="pt")
    # Feeding the raw samples as if they were 16 kHz would be wrong content, not a rounding difference.
    native = audio_pre(wav(speechlike(1.0, rate), rate)).data
    mislabeled = extractor(wave, sampling_rate=16000, return_tensors="pt")["input_features"][0]
    assert (native - mislabeled).abs().mean() > 0.05


def test_mel_features_match_the_independent_numpy_path(audio_pre, extractor, audio_cfg):
    # transformers has two log-mel implementations: torch.stft (what runs when torch is installed, hence ours) and
    # a numpy one (its own STFT + mel filters). Agreement between them checks the features, not just the plumbing.
    # Measured max difference 3e-6 .. 9e-6 on (log10 mel + 4) / 4 values of order 1 (float32 STFT in torch vs
    # float64 in numpy); 1e-4 leaves room across FFT / BLAS builds and is far below any real feature difference.
    data = wav(speechlike(1.5, 16000, seed=4), 16000)
    wave = reference_waveform(data, 16000)
    n_samples = audio_cfg["chunk_length"] * audio_cfg["sampling_rate"]
    padded = np.pad(wave, (0, n_samples - wave.size))[None].astype(np.float32)
    numpy_feats = torch.from_numpy(extractor._np_extract_fbank_features(padded, "cpu")[0]).float()
    ours = audio_pre(data).data
    assert ours.shape == numpy_feats.shape
    torch.testing.assert_close(ours, numpy_feats, atol=1e-4, rtol=0)

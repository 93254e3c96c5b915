"""encoders/preprocess.py with the tiny checkpoint's processor config: shapes, token counts, refusals."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from encoders.loader import load_preprocessor
from encoders.preprocess import AudioPreprocessor, MediaError
from models import media
from models.trimodal import audio_output_length, image_output_length
from tests.media import jpeg_bytes, png_bytes, wav_bytes


@pytest.fixture(scope="module")
def size(tiny_spec) -> int:
    return tiny_spec.preprocess["image"]["crop_size"]["height"]


def pil_bytes(fmt: str, mode="RGB", width=40, height=30, seed=0, **save) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = (rng.random((height, width, 3)) * 255).astype("uint8")
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def solid_png(color, width=50, height=20) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


# ---- images ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    png_bytes(), png_bytes(mode="RGBA"), png_bytes(mode="L"), jpeg_bytes(), png_bytes(width=200, height=20),
    png_bytes(width=7, height=300), png_bytes(width=1, height=1),
    pil_bytes("GIF", "P"), pil_bytes("BMP"), pil_bytes("WEBP"), pil_bytes("PNG", "P"), pil_bytes("PNG", "LA"),
    pil_bytes("PNG", "I;16"), pil_bytes("JPEG", "L"), pil_bytes("JPEG", "CMYK"),
], ids=["png", "rgba", "gray", "jpeg", "wide", "tall", "1x1", "gif", "bmp", "webp", "palette", "gray-alpha",
        "16bit", "jpeg-gray", "cmyk"])
def test_images_give_3_by_s_by_s(image_pre, tiny_spec, size, data):
    out = image_pre(data)
    assert out.data.shape == (3, size, size)
    assert out.data.dtype == torch.float32
    assert torch.isfinite(out.data).all()
    assert out.num_tokens == image_output_length(tiny_spec.config) == (size // 8) ** 2


def test_normalization_uses_the_checkpoint_mean_and_std(image_pre, tiny_spec):
    cfg = tiny_spec.preprocess["image"]
    mean, std = torch.tensor(cfg["image_mean"]), torch.tensor(cfg["image_std"])
    white = image_pre(solid_png((255, 255, 255))).data
    black = image_pre(solid_png((0, 0, 0))).data
    torch.testing.assert_close(white, ((1 - mean) / std)[:, None, None].expand_as(white))
    torch.testing.assert_close(black, (-mean / std)[:, None, None].expand_as(black))


def test_channels_stay_in_rgb_order(image_pre):
    red = image_pre(solid_png((255, 0, 0))).data
    assert red[0].mean() > 1.5 and red[1].mean() < -1.5 and red[2].mean() < -1.0


def test_grayscale_and_rgb_of_the_same_picture_agree(image_pre):
    from PIL import Image

    rng = np.random.default_rng(3)
    gray = Image.fromarray((rng.random((30, 30)) * 255).astype("uint8"), "L")
    a, b = io.BytesIO(), io.BytesIO()
    gray.save(a, "PNG")
    gray.convert("RGB").save(b, "PNG")
    torch.testing.assert_close(image_pre(a.getvalue()).data, image_pre(b.getvalue()).data)


def test_shortest_edge_resize_then_centre_crop(image_pre, size):
    from PIL import Image

    # A wide image: left third red, middle third green, right third blue; the crop keeps only the middle.
    arr = np.zeros((size, 3 * size, 3), dtype="uint8")
    arr[:, :size, 0] = arr[:, size : 2 * size, 1] = arr[:, 2 * size :, 2] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    out = image_pre(buf.getvalue()).data
    assert out[1].min() > 1.0  # green everywhere
    assert out[0].max() < 0 and out[2].max() < 0


def test_exif_orientation_is_applied(image_pre):
    from PIL import Image

    rng = np.random.default_rng(5)
    arr = (rng.random((20, 60, 3)) * 255).astype("uint8")
    upright = Image.fromarray(arr).transpose(Image.Transpose.ROTATE_270)  # what a viewer shows for orientation 6
    tagged, plain = io.BytesIO(), io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tagged, "PNG", exif=exif)
    upright.save(plain, "PNG")
    torch.testing.assert_close(image_pre(tagged.getvalue()).data, image_pre(plain.getvalue()).data)
    no_tag = io.BytesIO()
    Image.fromarray(arr).save(no_tag, "PNG")
    assert not torch.allclose(image_pre(no_tag.getvalue()).data, image_pre(plain.getvalue()).data)


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, bytes(range(256)) * 4,
                                  wav_bytes(0.1)])
def test_garbage_image_refused(image_pre, data):
    with pytest.raises(MediaError):
        image_pre(data)


def test_truncated_image_refused(image_pre):
    data = png_bytes(width=64, height=64)
    with pytest.raises(MediaError):
        image_pre(data[: len(data) // 2])


@pytest.mark.parametrize("fmt,name", [("TIFF", "TIFF"), ("PPM", "PPM"), ("ICO", "ICO"), ("TGA", "TGA"),
                                      ("PCX", "PCX")])
def test_formats_not_allowed_refused(image_pre, fmt, name):
    with pytest.raises(MediaError, match=name):
        image_pre(pil_bytes(fmt))


def test_pixel_cap(image_pre, monkeypatch):
    data = png_bytes(width=40, height=30)
    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 40 * 30)
    assert image_pre(data).data.shape[0] == 3  # exactly at the cap
    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 40 * 30 - 1)
    with pytest.raises(MediaError, match="pixels"):
        image_pre(data)


def test_loader_builds_the_same_preprocessors(tiny_spec, image_pre):
    pre = load_preprocessor(tiny_spec, "image")
    data = jpeg_bytes(seed=4)
    assert torch.equal(pre(data).data, image_pre(data).data)
    assert isinstance(load_preprocessor(tiny_spec, "audio"), AudioPreprocessor)
    with pytest.raises(ValueError):
        load_preprocessor(tiny_spec, "video")


# ---- audio ----------------------------------------------------------------------------------------------------


def window_frames(tiny_spec) -> int:
    cfg = tiny_spec.preprocess["audio"]
    return cfg["chunk_length"] * cfg["sampling_rate"] // cfg["hop_length"]


def sine_wav(seconds, rate, freq=440.0, channels=1, fmt="WAV") -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * freq * t)).astype("float32")
    buf = io.BytesIO()
    sf.write(buf, np.stack([wave] * channels, axis=1), rate, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("data", [
    wav_bytes(1.0, 16000), wav_bytes(1.0, 8000), wav_bytes(1.0, 44100, channels=2), wav_bytes(1.0, 22050),
    sine_wav(1.0, 48000, fmt="FLAC"), sine_wav(1.0, 16000, fmt="OGG"),
], ids=["16k-mono", "8k", "44k-stereo", "22k", "48k-flac", "16k-ogg"])
def test_one_second_clips_give_the_same_shape_and_tokens(audio_pre, tiny_spec, data):
    out = audio_pre(data)
    cfg = tiny_spec.preprocess["audio"]
    assert out.data.shape == (cfg["feature_size"], window_frames(tiny_spec))  # [80, 200]
    assert out.data.dtype == torch.float32
    assert torch.isfinite(out.data).all()
    assert out.num_tokens == audio_output_length(100) == 25  # 1 s = 100 mel frames


def test_num_tokens_grows_with_length_and_is_capped(audio_pre, tiny_spec):
    frames = window_frames(tiny_spec)
    n = {s: audio_pre(wav_bytes(s)).num_tokens for s in (0.1, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0)}
    assert n[0.1] < n[0.5] < n[1.0] < n[1.5] < n[2.0]
    assert n[0.5] == audio_output_length(50)
    assert n[2.0] == n[3.0] == n[5.0] == audio_output_length(frames)  # the window caps it
    assert audio_pre(wav_bytes(3.0)).data.shape[-1] == frames


def test_token_count_fits_the_audio_encoder_output(audio_pre, tiny_spec):
    # The encoder keeps max_source_positions / 2 rows; a full window must not claim more.
    assert audio_pre(wav_bytes(4.0)).num_tokens == tiny_spec.config["audio_config"]["max_source_positions"] // 2


def test_stereo_is_averaged_to_mono(audio_pre):
    stereo = audio_pre(sine_wav(1.0, 16000, channels=2)).data
    mono = audio_pre(sine_wav(1.0, 16000, channels=1)).data
    torch.testing.assert_close(stereo, mono)


def test_resampling_keeps_the_content(audio_pre):
    native = audio_pre(sine_wav(1.0, 16000, freq=440)).data
    resampled = audio_pre(sine_wav(1.0, 8000, freq=440)).data
    other = audio_pre(sine_wav(1.0, 16000, freq=2000)).data
    assert (native - resampled).abs().mean() < 0.5 * (native - other).abs().mean()


def test_frames_past_the_clip_are_padding(audio_pre):
    # A 0.5 s clip fills 50 of the window's 200 frames; the rest is padding, one constant value (the log-mel floor).
    a = audio_pre(wav_bytes(0.5, seed=1)).data
    tail = a[:, 60:]
    assert torch.allclose(tail, tail.flatten()[0].expand_as(tail))
    assert a[:, :45].std() > 10 * tail.std() + 1e-3


@pytest.mark.parametrize("data", [b"", b"garbage", b"RIFF\x00\x00\x00\x00WAVEfmt ", png_bytes(), bytes(range(256))])
def test_garbage_audio_refused(audio_pre, data):
    with pytest.raises(MediaError):
        audio_pre(data)


def test_empty_clip_refused(audio_pre):
    with pytest.raises(MediaError, match="empty"):
        audio_pre(wav_bytes(0.0))


def test_header_only_wav_refused(audio_pre):
    data = wav_bytes(1.0)
    header_only = data[:44]
    with pytest.raises(MediaError):
        audio_pre(header_only)

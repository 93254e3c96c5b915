"""models/media.py: header probes refuse what the encoders would, and count placeholder tokens exactly as the encoders
do, so the gateway can check limits and the context before anything is encoded."""

from __future__ import annotations

import io

import numpy as np
import pytest

from encoders.loader import load_preprocessor
from models.media import MediaHeaderError, MediaInfo, placeholder_count, probe_audio, probe_image
from models.spec import ModelSpec
from tests.media import jpeg_bytes, png_bytes


def clip(seconds: float, rate: int, fmt: str = "WAV", subtype: str | None = None, channels: int = 1) -> bytes:
    import soundfile as sf

    rng = np.random.default_rng(int(seconds * 1000) + rate)
    samples = (rng.standard_normal((max(int(seconds * rate), 1), channels)) * 0.1).astype("float32")
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def test_image_header_gives_its_size_without_decoding():
    assert probe_image(png_bytes(61, 47)) == MediaInfo(width=61, height=47)
    assert probe_image(jpeg_bytes(20, 30)) == MediaInfo(width=20, height=30)


@pytest.mark.parametrize("data,match", [
    (b"definitely not an image", "not a readable image"),
    (b"\x89PNG\r\n\x1a\n garbage", "not a readable image"),
    (b"", "not a readable image"),
])
def test_what_is_not_an_image_is_refused_from_its_header(data, match):
    with pytest.raises(MediaHeaderError, match=match):
        probe_image(data)


def test_an_image_format_outside_the_allow_list_is_refused():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "TIFF")
    with pytest.raises(MediaHeaderError, match="TIFF is not accepted"):
        probe_image(buf.getvalue())


def test_too_many_pixels_are_refused_from_the_header(monkeypatch):
    from models import media

    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 40 * 30 - 1)
    with pytest.raises(MediaHeaderError, match="exceeds"):
        probe_image(png_bytes(40, 30))


def test_audio_header_gives_its_length():
    info = probe_audio(clip(1.5, 8000))
    assert (info.frames, info.rate) == (12000, 8000) and info.seconds == 1.5


def test_audio_longer_than_the_cap_is_refused_from_the_header():
    data = clip(3.0, 8000)
    assert probe_audio(data, max_seconds=3.0).seconds == 3.0
    with pytest.raises(MediaHeaderError, match="longer than 2.5 s"):
        probe_audio(data, max_seconds=2.5)


def silent_flac(seconds: float, rate: int, channels: int) -> bytes:
    """Silence compresses to almost nothing in FLAC: a few KB that decode to ``seconds x rate x channels`` floats."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros((int(seconds * rate), channels), dtype="int16"), rate, format="FLAC")
    return buf.getvalue()


@pytest.mark.parametrize("width,height,ok", [(1, 200, True), (200, 1, True), (1, 201, False), (16000, 1, False),
                                             (3, 600, True), (3, 601, False)])
def test_images_longer_than_200_times_their_width_are_refused_from_the_header(width, height, ok):
    """A processor resizes the shortest side to the tower's: a 1 x 16000 PNG of a few hundred bytes would become
    gigabytes of pixels."""
    data = png_bytes(width, height, mode="L")
    if ok:
        assert probe_image(data).width == width
    else:
        with pytest.raises(MediaHeaderError, match="more than 200 times longer"):
            probe_image(data)


def test_audio_whose_decoded_samples_would_be_a_bomb_is_refused_from_the_header():
    bomb = silent_flac(20.0, 96_000, 8)  # 15.4M samples x 8 bytes... from a few hundred KB
    assert len(bomb) < 2_000_000
    forty = silent_flac(40.0, 96_000, 8)  # 30.7M samples
    with pytest.raises(MediaHeaderError, match="more than 28800000"):
        probe_audio(forty)
    assert probe_audio(forty, max_seconds=600).seconds == 40.0  # a longer --max-audio-seconds raises the budget
    assert probe_audio(bomb).seconds == 20.0  # 15.4M samples: within 300 s of 48 kHz stereo
    with pytest.raises(MediaHeaderError, match="at most 192000 Hz"):
        probe_audio(silent_flac(0.5, 384_000, 1))


def test_the_encoder_refuses_the_same_audio_bombs_while_decoding(tiny_spec):
    """A job may come from any gateway: the encoder's decoder stops at the same limits instead of decoding on."""
    from encoders.preprocess import MediaError

    pre = load_preprocessor(tiny_spec, "audio", max_audio_seconds=300)
    with pytest.raises(MediaError, match="more than 28800000 samples"):
        pre(silent_flac(40.0, 96_000, 8))
    with pytest.raises(MediaError, match="at most 192000 Hz"):
        pre(silent_flac(0.5, 384_000, 1))
    assert pre(silent_flac(1.0, 48_000, 2)).data.ndim == 2


@pytest.mark.parametrize("data", [b"RIFF....WAVEnope", b"not audio at all", b""])
def test_what_is_not_audio_is_refused_from_its_header(data):
    with pytest.raises(MediaHeaderError, match="not a readable audio clip"):
        probe_audio(data)


CLIPS = [(s, r, f, st) for s in (0.01, 0.3, 1.0, 1.37, 1.999, 2.0, 2.4, 3.3, 7.0) for r, f, st in
         ((16000, "WAV", None), (8000, "WAV", "FLOAT"), (22050, "FLAC", None), (44100, "OGG", None))]


@pytest.mark.parametrize("seconds,rate,fmt,subtype", CLIPS)
def test_audio_count_from_the_header_equals_the_encoders(tiny_spec, seconds, rate, fmt, subtype):
    data = clip(seconds, rate, fmt, subtype)
    pre = load_preprocessor(tiny_spec, "audio")
    assert placeholder_count(tiny_spec, "audio", probe_audio(data)) == pre(data).num_tokens


@pytest.mark.parametrize("seconds,rate", [(0.2, 16000), (1.1, 44100), (2.9, 8000), (3.0, 16000), (5.5, 22050)])
def test_qwen2_audio_count_from_the_header_equals_the_encoders(hf_checkpoint, seconds, rate):
    spec = ModelSpec.from_dir(hf_checkpoint("qwen2-audio-a"))
    data = clip(seconds, rate)
    assert placeholder_count(spec, "audio", probe_audio(data)) == load_preprocessor(spec, "audio")(data).num_tokens


def test_image_count_is_the_models(tiny_spec):
    data = png_bytes(50, 20)
    assert placeholder_count(tiny_spec, "image", probe_image(data)) == \
        load_preprocessor(tiny_spec, "image")(data).num_tokens == 16


@pytest.mark.parametrize("rate", [11_111, 44_101, 191_999, 160_775, 16_664])
def test_a_rate_whose_resampling_filter_would_be_huge_is_refused_at_the_header_and_by_the_encoder(tiny_spec, rate):
    """A 250-byte WAV at 191,999 Hz took an encoder to the OOM killer (a 3.1e9-tap resampling filter, ~25 GB), and
    one at 11,111 Hz held the audio tier for 20-37 s (an outside tester's fuzzer); 160,775 Hz, within the filter's
    bound, took 6,553 taps per output sample (17 s for a 30 s window: a retest). The gateway's header probe and the
    encoder refuse such rates at once; the usual rates still resample (and count) as before."""
    import time

    from encoders.preprocess import MediaError
    from models.audio import Resampler

    data = clip(0.01, rate)
    to = int(tiny_spec.preprocess["audio"]["sampling_rate"])
    assert probe_audio(data).rate == rate  # without the model's rate: no opinion
    with pytest.raises(MediaHeaderError, match=f"{rate} Hz cannot be resampled to the model's {to} Hz"):
        probe_audio(data, to_rate=to)
    t = time.monotonic()
    with pytest.raises(MediaError, match="cannot be resampled"):
        load_preprocessor(tiny_spec, "audio")(data)
    with pytest.raises(ValueError, match="taps"):
        Resampler(rate, to)
    assert time.monotonic() - t < 1.0


@pytest.mark.parametrize("rate", [8000, 11_025, 22_050, 24_000, 32_000, 44_100, 48_000, 88_200, 96_000, 192_000])
def test_the_usual_rates_resample(tiny_spec, rate):
    to = int(tiny_spec.preprocess["audio"]["sampling_rate"])
    assert probe_audio(clip(0.2, rate), to_rate=to).rate == rate
    assert load_preprocessor(tiny_spec, "audio")(clip(0.2, rate)).num_tokens >= 1


@pytest.mark.parametrize("fmt", ["AIFF", "AU", "CAF", "NIST", "VOC", "IRCAM"])
def test_audio_containers_outside_the_documented_four_are_refused(tiny_spec, fmt):
    """An audio_url data URL carrying AIFF, AU, CAF ... was taken (only input_audio's named format was checked against
    the data): more of libsndfile's parsers within a client's reach than the docs say (an outside tester's
    fuzzer). The header probe and the encoder refuse them, whichever way they came."""
    from encoders.preprocess import MediaError

    data = clip(0.2, 16000, fmt, "PCM_16")
    with pytest.raises(MediaHeaderError, match=f"audio format {fmt} is not accepted"):
        probe_audio(data)
    with pytest.raises(MediaError, match="is not accepted"):
        load_preprocessor(tiny_spec, "audio")(data)


def test_a_clip_holding_nan_makes_features_without_warnings(tiny_spec):
    """Such a clip is refused by the worker's finiteness check; the arithmetic on it logged numpy RuntimeWarnings at
    WARNING level for each one (an outside tester's fuzzer)."""
    import warnings

    import soundfile as sf

    x = np.zeros(8000, np.float32)
    x[100], x[200] = np.nan, np.inf
    buf = io.BytesIO()
    sf.write(buf, x, 44100, format="WAV", subtype="FLOAT")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = load_preprocessor(tiny_spec, "audio")(buf.getvalue())
    assert not np.isfinite(out.data.numpy()).all()


# An outside tester's media round (2026-12-06): a header that made Pillow raise an exception no probe caught (a
# 500), a valid phone JPEG refused, a JPEG that took 43 s to decode, and a FLAC stream of unknown length refused.
DDS = bytes.fromhex("444453207c00000007100000040000000400000000000000000000000000000000000000") + bytes(40) + \
    bytes.fromhex("2000000088000000") + bytes(84)  # a DDS header whose pixel format Pillow does not implement


def test_any_exception_a_decoder_raises_on_a_header_is_a_refusal_not_a_server_error(tiny_spec):
    from encoders.preprocess import MediaError, decode_image

    with pytest.raises(MediaHeaderError, match="not a readable image"):
        probe_image(DDS)
    with pytest.raises(MediaError):
        decode_image(DDS)


def mpo_bytes() -> bytes:
    from PIL import Image

    first, second = (Image.fromarray(np.full((24, 32, 3), v, np.uint8)) for v in (40, 200))
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[second])
    return buf.getvalue()


def test_a_multi_picture_jpeg_is_taken_as_its_first_picture(tiny_spec):
    from PIL import Image

    from encoders.preprocess import decode_image

    data = mpo_bytes()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert probe_image(data) == MediaInfo(width=32, height=24)
    decoded = decode_image(data)
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)
    assert decoded.shape == (3, 24, 32) and np.array_equal(decoded.numpy(), want)


def test_a_jpeg_of_too_many_scans_is_refused_from_its_bytes_before_any_decode(tiny_spec):
    from PIL import Image

    from encoders.preprocess import MediaError, decode_image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, "JPEG", progressive=True, quality=50)
    data = buf.getvalue()
    assert 1 < data.count(b"\xff\xda") <= 100
    probe_image(data)  # a progressive JPEG as encoders write it
    last = data.rindex(b"\xff\xda")
    hostile = data[:last] + data[last:-2] * 200 + data[-2:]  # its last scan again and again before the EOI
    with pytest.raises(MediaHeaderError, match="scans"):
        probe_image(hostile)
    with pytest.raises(MediaError, match="scans"):
        decode_image(hostile)



def test_only_the_first_pictures_scans_count_and_scans_times_pixels_are_bounded(tiny_spec, monkeypatch):
    """Counting FF DA across the file refused a motion photo (a progressive JPEG with a video after its end) and an
    MPO of many progressive pictures; only the decoded picture's scans count. And 100 scans of 6000x6000 took 4-5 s
    each to decode (an outside tester): scans x pixels is bounded too."""
    from PIL import Image

    import models.media as media

    rng = np.random.default_rng(3)
    pictures = [Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)) for _ in range(13)]
    buf = io.BytesIO()
    pictures[0].save(buf, "JPEG", progressive=True, quality=90)
    photo = buf.getvalue()
    assert media.jpeg_scans(photo) == photo.count(b"\xff\xda") > 1
    motion = photo + rng.bytes(8 << 20)  # its video after the end of the picture: FF DA bytes by the hundred
    assert motion.count(b"\xff\xda") > media.MAX_JPEG_SCANS and media.jpeg_scans(motion) == media.jpeg_scans(photo)
    probe_image(motion)
    buf = io.BytesIO()
    pictures[0].save(buf, "MPO", save_all=True, append_images=pictures[1:], progressive=True)
    mpo = buf.getvalue()
    assert mpo.count(b"\xff\xda") > media.jpeg_scans(mpo) == media.jpeg_scans(photo)  # its first picture's
    probe_image(mpo)
    last = photo.rindex(b"\xff\xda")
    scan = photo[last:-2]  # 150 copies hidden in what stuffed FF 00s after a comment segment would announce as
    chunk = 60_000 // len(scan)  # their payloads (libjpeg skips an FF 00 there as junk, and decodes them)
    hidden = photo[:-2] + b"\xff\xfe\x00\x02" + b"".join(b"\xff\x00" + (len(scan) * k).to_bytes(2, "big") + scan * k
                                   for k in [chunk] * (150 // chunk) + [150 % chunk] if k) + b"\xff\xd9"
    assert media.jpeg_scans(hidden) == media.jpeg_scans(photo) + 150  # (an outside tester's 100,000: 20 s a decode)
    with pytest.raises(MediaHeaderError, match="scans"):
        probe_image(hidden)
    spam = photo[:2] + b"\xff\xfe\x00\x02" * (1 << 20) + photo[2:]  # a million empty comments: the walk is bounded
    with pytest.raises(MediaHeaderError, match="segments"):
        media.jpeg_scans(spam)
    for cut in (photo[: photo.index(b"\xff\xda") + 5], photo[:2] + b"\xff\xe0\x00\x00" + photo[2:]):
        media.jpeg_scans(cut)  # a truncated scan, a length under 2: each ends
    monkeypatch.setattr(media, "MAX_JPEG_SCAN_PIXELS", 48 * 64 * (media.jpeg_scans(photo) - 1))
    with pytest.raises(MediaHeaderError, match="pixels over all its scans"):
        probe_image(photo)


def test_a_flac_stream_that_does_not_say_its_length_is_refused_saying_so(tiny_spec):
    """libsndfile reports such a stream's length as its largest count (it was "audio of 5.76461e+14 s is longer
    than 300 s"), and cannot read it to its end (a seek fails there, losing the last read): a 400 that says why."""
    from encoders.preprocess import MediaError

    data = bytearray(clip(1.0, 16_000, "FLAC"))
    assert data[:4] == b"fLaC"
    info = 8  # STREAMINFO's body: its total samples are the low 4 bits of byte 13 and bytes 14-17 (0: unknown)
    data[info + 13] &= 0xF0
    data[info + 14 : info + 18] = bytes(4)
    with pytest.raises(MediaHeaderError, match="does not give the clip's length"):
        probe_audio(bytes(data))
    with pytest.raises(MediaError, match="does not give the clip's length"):
        load_preprocessor(tiny_spec, "audio")(bytes(data))


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header says ``width``x``height`` (no pixels follow): what a decompression bomb looks like."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height", [(20000, 20000), (15000, 7000)])
def test_a_header_past_pillows_bounds_is_refused_as_too_many_pixels_without_a_warning(width, height):
    """Past twice Pillow's bound its error read as unreadable bytes ("truncated or corrupt", an outside tester's
    20000x20000 PNG); past its bound alone it logged a DecompressionBombWarning for an image refused anyway."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(MediaHeaderError, match="exceeds 40000000 pixels") as raised:
            probe_image(_png_header(width, height))
    assert raised.value.__cause__ is None  # a limit in the client's terms, not unreadable bytes
    assert not caught, [str(w.message) for w in caught]

"""What every tier knows about a media part before decoding it: the accepted formats and size limits, header probes
that read a part's format and size without decoding pixels or samples, and how many placeholder tokens it becomes.

The gateway probes each part while it validates a request, so a part that is not an image or an audio clip, is too
large, too long, or would overflow the context gets its 400 before anything is queued or encoded; the encoder
workers apply the same limits again while decoding (a job may come from any gateway). PIL and soundfile are
imported when first used.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass

# MPO: a JPEG with more pictures after it (MP-Extensions: multi-camera phones); its first picture is the image
IMAGE_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP"}
IMAGE_NAMED = IMAGE_FORMATS - {"MPO"}  # the formats messages name (an MPO is a JPEG to whoever sends one)
_COMMON_FIRST = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
IMAGE_NAMES = [f for f in _COMMON_FIRST if f in IMAGE_NAMED] + sorted(IMAGE_NAMED.difference(_COMMON_FIRST))  # in
# the order messages name them: the most common first, any other after them
# The audio containers taken: soundfile's (libsndfile's) names -> the input_audio.format that declares each
AUDIO_FORMATS = {"WAV": "wav", "WAVEX": "wav", "RF64": "wav", "W64": "wav", "MP3": "mp3", "MPEG": "mp3",
                 "FLAC": "flac", "OGG": "ogg"}
MAX_IMAGE_PIXELS = 40_000_000
# Longest side over shortest (Qwen2-VL's bound too). Processors resize the shortest side to the tower's size, so a
# 1 x 16000 image (a few hundred bytes) would become 224 x 3.6M pixels: gigabytes and seconds of resizing.
MAX_ASPECT_RATIO = 200
# Scans of a progressive JPEG, at most: each is one more pass over the whole image's coefficients, so a few hundred KB
# of 4000x4000 JPEG with its last scan repeated 3,000 times took 43 s to decode (an outside tester); cameras and
# encoders write about ten. And scans x pixels, at most: 100 scans of 6000x6000 took 4-5 s each, and five such images
# a request held the image worker's threads past their limit (an outside tester); 16 scans of the largest image taken,
# about a second.
MAX_JPEG_SCANS = 100
MAX_JPEG_SCAN_PIXELS = 16 * 40_000_000
# Segments of a JPEG's first picture walked, at most (a photo has a few dozen): the walk is a Python loop, and 16 MB
# of 4-byte segments would be four million turns of it.
MAX_JPEG_SEGMENTS = 4096
MAX_AUDIO_S = 300.0  # longer clips are refused (the features keep only the extractor's window anyway)
MAX_AUDIO_RATE = 192_000  # Hz
# libsndfile's frame count for a stream whose header gives no length (SF_COUNT_MAX); a real count never comes near
UNKNOWN_FRAMES = 2**62
# Samples (frames x channels) decoded per clip, at most: 300 s of 48 kHz stereo, or --max-audio-seconds of it when
# that is longer (``audio_sample_budget``). Decoding costs per sample, not per second: a few hundred KB of FLAC
# silence at 655 kHz x 8 channels is gigabytes of float32.
MAX_AUDIO_SAMPLES = 48_000 * 2 * 300


def audio_sample_budget(max_seconds: float = MAX_AUDIO_S) -> int:
    """The samples (frames x channels) one clip may decode to: ``max_seconds`` of 48 kHz stereo, at least 300 s'."""
    return max(MAX_AUDIO_SAMPLES, math.ceil(48_000 * 2 * max_seconds))


class MediaHeaderError(ValueError):
    """The part's header says it is not usable: not a known format, too many pixels, too long."""


@dataclass(frozen=True)
class MediaInfo:
    """What a header says: an image's pixels, or an audio clip's length in frames at its own rate."""

    width: int = 0
    height: int = 0
    frames: int = 0
    rate: int = 0
    format: str = ""  # an audio clip's container as libsndfile names it (WAV, WAVEX, MP3, FLAC, OGG, ...)

    @property
    def seconds(self) -> float:
        return self.frames / self.rate if self.rate else 0.0


def probe_image(data: bytes) -> MediaInfo:
    from PIL import Image

    try:
        with warnings.catch_warnings():  # past Pillow's warning bound (over ours): refused below, not a log line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                fmt, width, height = img.format, img.width, img.height
    except Image.DecompressionBombError:  # Pillow's own bound, over ours: the header says too many pixels
        # A limit, in the client's terms (raised from Pillow's error, it read as unreadable bytes: an outside
        # tester's 20000x20000 PNG was "truncated or corrupt").
        raise MediaHeaderError(f"image exceeds {MAX_IMAGE_PIXELS} pixels") from None
    except Exception as exc:  # any of Pillow's plugins on hostile bytes (a DDS header raised NotImplementedError)
        raise MediaHeaderError("not a readable image (accepted: " + ", ".join(sorted(IMAGE_NAMED)) + ")") from exc
    check_image(fmt, width, height, data)
    return MediaInfo(width=width, height=height)


def check_image(fmt: str | None, width: int, height: int, data: bytes = b"") -> None:
    """The limits on an image's header; ``data``: its bytes, for the JPEG scan count."""
    if fmt not in IMAGE_FORMATS:
        raise MediaHeaderError(f"image format {fmt} is not accepted (accepted: {', '.join(sorted(IMAGE_NAMED))})")
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaHeaderError(f"image of {width}x{height} pixels exceeds {MAX_IMAGE_PIXELS} pixels")
    if max(width, height) > MAX_ASPECT_RATIO * max(min(width, height), 1):
        raise MediaHeaderError(f"image of {width}x{height} pixels is more than {MAX_ASPECT_RATIO} times longer than "
                               "it is wide")
    if fmt in ("JPEG", "MPO") and data:
        scans = jpeg_scans(data)
        if scans > MAX_JPEG_SCANS or scans * width * height > MAX_JPEG_SCAN_PIXELS:
            raise MediaHeaderError(f"JPEG of {scans} scans of {width}x{height} pixels: at most {MAX_JPEG_SCANS} "
                                   f"scans, and {MAX_JPEG_SCAN_PIXELS // 1_000_000}M pixels over all its scans, are "
                                   "accepted (re-encode it with fewer progressive scans, or as a baseline JPEG)")


_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker: not a stuffed 0xFF, a restart or a fill byte


def jpeg_scans(data: bytes) -> int:
    """The scans (SOS segments) of a JPEG's first picture, found as libjpeg finds them: from SOI, the next marker
    (bytes that are not one, a stuffed ``FF 00`` included, skipped: libjpeg skips them as junk), then its segment's
    length skipped, to the picture's EOI; a scan's entropy-coded data is skipped to the next marker. Segments'
    payloads (an EXIF thumbnail, another picture's data) and whatever follows the EOI (an MPO's other pictures, a
    motion photo's video) are not counted: counting FF DA across the file refused such photos (an outside tester).
    A ``FF 00`` read as a segment had let thousands of scans hide in its "payload", which libjpeg decoded."""
    i, scans, segments = 2, 0, 0
    while (found := _JPEG_MARKER.search(data, i)) is not None:
        i = found.start()
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise MediaHeaderError(f"JPEG of more than {MAX_JPEG_SEGMENTS} segments")
        marker = data[i + 1]
        if marker == 0xD9:  # EOI: the first picture ends
            break
        if marker in (0x01, 0xD8):  # no length (TEM; an SOI out of place, which libjpeg refuses)
            i += 2
            continue
        if i + 4 > len(data):
            break
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        scans += marker == 0xDA  # a scan: its entropy-coded data is skipped by the next search
    return scans


def probe_audio(data: bytes, max_seconds: float = MAX_AUDIO_S, to_rate: int | None = None) -> MediaInfo:
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except Exception as exc:  # LibsndfileError, RuntimeError, TypeError: it is not audio libsndfile reads
        raise MediaHeaderError("not a readable audio clip (wav, mp3, flac or ogg)") from exc
    out = MediaInfo(frames=max(int(info.frames), 0), rate=int(info.samplerate), format=str(info.format))
    check_audio(out.format, out.rate, int(info.channels), out.frames, max_seconds, to_rate)
    return out


def check_audio(fmt: str, rate: int, channels: int, frames: int | None, max_seconds: float = MAX_AUDIO_S,
                to_rate: int | None = None) -> None:
    """The limits on an audio clip's header (``frames``: None where the header does not say; ``to_rate``: the rate
    the model's feature extractor resamples to, where known). Of the twenty-odd containers libsndfile reads, the
    documented ones are taken (fewer parsers within a client's reach), whichever way the clip came (``input_audio``
    names its format, a data URL's MIME type proves nothing)."""
    from models.audio import resampling_refused

    if fmt not in AUDIO_FORMATS:
        raise MediaHeaderError(f"audio format {fmt} is not accepted (accepted: wav, mp3, flac, ogg)")
    if rate <= 0:
        raise MediaHeaderError("audio header has no sample rate")
    if rate > MAX_AUDIO_RATE:
        raise MediaHeaderError(f"audio sampled at {rate} Hz; at most {MAX_AUDIO_RATE} Hz is accepted")
    if to_rate and resampling_refused(rate, to_rate):
        raise MediaHeaderError(f"audio sampled at {rate} Hz cannot be resampled to the model's {to_rate} Hz (the "
                               "rate shares too few factors with it); resample it to a usual rate (8, 11.025, 16, "
                               "22.05, 24, 32, 44.1, 48 or 96 kHz)")
    if channels < 1:
        raise MediaHeaderError("audio header has no channels")
    if frames is None:
        return
    if frames >= UNKNOWN_FRAMES:  # libsndfile cannot read such a stream to its end (it fails seeking at the end)
        raise MediaHeaderError(f"the {fmt} header does not give the clip's length (a stream's total samples of 0); "
                               "encode it again as a file")
    seconds = frames / rate
    if frames > math.ceil(max_seconds * rate):
        raise MediaHeaderError(f"audio of {seconds:.9g} s is longer than {max_seconds:g} s")
    if frames * channels > (budget := audio_sample_budget(max_seconds)):
        raise MediaHeaderError(f"audio of {channels} channels x {seconds:.6g} s at {rate} Hz is {frames * channels} "
                               f"samples, more than {budget} ({budget // 96_000} s of 48 kHz stereo)")


def placeholder_count(spec, modality: str, info: MediaInfo) -> int:
    """How many placeholder tokens the part will expand to, as the encoder will count them: an image's count is
    fixed by the model; an audio clip's follows its length, resampled to the extractor's rate and capped by its
    window (WhisperFeatureExtractor: one mel frame per ``hop_length`` samples)."""
    impl = spec.family.impl
    if modality == "image":
        return int(impl.image_tokens(spec.config))
    cfg = spec.preprocess["audio"]
    rate, hop = int(cfg["sampling_rate"]), int(cfg["hop_length"])
    samples = math.ceil(info.frames * rate / info.rate) if info.rate else 0  # torchaudio's resampled length
    mel_frames = math.ceil(min(samples, int(cfg["chunk_length"]) * rate) / hop)
    return int(impl.audio_tokens(spec.config)(max(mel_frames, 1)))

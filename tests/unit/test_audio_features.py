"""models.audio: audio features streamed piece by piece equal, bitwise, the features of the whole clip.

This is what lets the Realtime WebSocket compute features while the client appends audio and still give the answer
the REST endpoint gives to the same clip. The whole-clip features are also held to torchaudio and transformers here
(closely; tests/unit/test_processor_parity.py holds the encoder's preprocessing to them on real-looking clips).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.audio import (
    BLOCK,
    AudioConfig,
    Features,
    Resampler,
    StreamingFeatures,
    mel_filters,
    pcm16_samples,
    sinc_kernel,
)

WHISPER = AudioConfig(rate=16000, n_mels=80, n_fft=400, hop=160, window_s=30)
SHORT = AudioConfig(rate=16000, n_mels=16, n_fft=400, hop=160, window_s=2)  # the tiny demo's window


def clip(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """Speech-like: a few harmonics under a moving envelope, plus noise, within [-1, 1)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) / (i + 1) for i, f in enumerate((180, 360, 720, 1500)))
    x = x * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) * 0.2 + rng.standard_normal(t.size) * 0.01
    return np.clip(x, -1, 1 - 2**-15).astype(np.float32)


def whole(cfg: AudioConfig, x: np.ndarray, rate: int) -> Features:
    s = StreamingFeatures(cfg, rate)
    s.feed(x)
    return s.finish()


def streamed(cfg: AudioConfig, x: np.ndarray, rate: int, sizes) -> Features:
    s, i = StreamingFeatures(cfg, rate), 0
    for n in sizes:
        s.feed(x[i : i + n])
        i += n
        if i >= x.size:
            break
    s.feed(x[i:])
    return s.finish()


def random_sizes(seed: int, hi: int):
    rng = np.random.default_rng(seed)
    while True:
        yield int(rng.integers(0, hi))


def same(a: Features, b: Features) -> None:
    assert a.length == b.length and a.window == b.window
    assert np.array_equal(a.full(), b.full())  # bitwise
    assert a.data.shape == b.data.shape


CASES = [  # (config, seconds, input rate)
    (WHISPER, 2.0, 24000), (WHISPER, 10.37, 24000), (WHISPER, 31.0, 24000),  # the Realtime rate; past the window
    (WHISPER, 0.013, 24000),  # shorter than one FFT window
    (WHISPER, 3.3, 16000), (WHISPER, 1.7, 44100), (WHISPER, 1.1, 8000),
    (SHORT, 1.5, 24000), (SHORT, 2.6, 24000), (SHORT, 2.0, 24000),
]


@pytest.mark.parametrize("cfg,seconds,rate", CASES)
def test_streamed_features_equal_the_whole_clip_bitwise(cfg, seconds, rate):
    x = clip(seconds, rate, seed=int(seconds * 100))
    want = whole(cfg, x, rate)
    for seed, hi in ((0, 7), (1, 480), (2, 2400), (3, 24000)):  # 20 ms of appends at 24 kHz, 100 ms, 1 s
        same(streamed(cfg, x, rate, random_sizes(seed, hi)), want)
    same(streamed(cfg, x, rate, [1] * 1000 + [x.size]), want)  # sample by sample, then the rest


def test_pcm16_appends_equal_the_wav_the_encoder_decodes():
    # The Realtime path decodes PCM16 itself; the encoder decodes the same PCM as a 24 kHz WAV with soundfile.
    import io

    import soundfile as sf

    from gateway.realtime import pcm16_to_wav

    pcm = (clip(2.5, 24000, seed=5) * 32768).astype("<i2").tobytes()
    decoded, rate = sf.read(io.BytesIO(pcm16_to_wav(pcm)), dtype="float32", always_2d=True)
    assert rate == 24000
    assert np.array_equal(pcm16_samples(pcm), decoded.mean(axis=1).astype(np.float32))


@pytest.mark.parametrize("orig,new", [(24000, 16000), (44100, 16000), (8000, 16000), (48000, 16000)])
def test_the_resampler_is_torchaudios(orig, new):
    import torchaudio.functional as AF
    from torchaudio.functional.functional import _get_sinc_resample_kernel

    g = math.gcd(orig, new)
    kernel, width = sinc_kernel(orig // g, new // g)
    ta_kernel, ta_width = _get_sinc_resample_kernel(orig, new, g, 6, 0.99, "sinc_interp_hann", None, "cpu",
                                                    torch.float32)
    assert width == ta_width
    # torchaudio computes the kernel in float32, this in float64: they differ in the last bits.
    np.testing.assert_allclose(kernel, ta_kernel[:, 0].numpy(), atol=1e-5, rtol=0)
    x = clip(1.3, orig, seed=orig)
    r = Resampler(orig, new)
    ours = np.concatenate([r.feed(x), r.finish()])
    want = AF.resample(torch.from_numpy(x), orig, new).numpy()
    assert ours.shape == want.shape and r.total == want.size
    np.testing.assert_allclose(ours, want, atol=5e-6, rtol=0)


def test_a_limited_resampler_computes_only_the_window():
    x = clip(3.0, 24000)
    r = Resampler(24000, 16000, limit=16000)
    out = np.concatenate([r.feed(x[:40000]), r.feed(x[40000:]), r.finish()])
    full = Resampler(24000, 16000)
    assert np.array_equal(out, np.concatenate([full.feed(x), full.finish()])[:16000])
    assert r.total == 48000  # the clip's length still counts (the attention mask caps it at the window)


def test_mel_filters_are_whispers():
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400, chunk_length=30)
    np.testing.assert_array_equal(mel_filters(400, 128, 16000), fe.mel_filters)


@pytest.mark.parametrize("seconds,rate", [(2.0, 24000), (4.2, 16000), (31.0, 24000)])
def test_features_match_whisper_feature_extractor(seconds, rate):
    import torchaudio.functional as AF
    from transformers import WhisperFeatureExtractor

    x = clip(seconds, rate, seed=7)
    fe = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, n_fft=400, chunk_length=30)
    wave = AF.resample(torch.from_numpy(x), rate, 16000).numpy() if rate != 16000 else x
    want = fe(wave, sampling_rate=16000, return_tensors="np", return_attention_mask=True)
    got = whole(WHISPER, x, rate)
    assert got.length == int(want["attention_mask"].sum())
    np.testing.assert_allclose(got.full(), want["input_features"][0], atol=2e-4, rtol=0)


def test_only_the_columns_before_the_padding_travel():
    f = whole(WHISPER, clip(2.0, 24000), 24000)
    # 2 s = 200 frames; a frame reads 200 samples either side, so frame 201 is the first of pure padding.
    assert f.data.shape == (80, 202) and f.window == 3000 and f.length == 200
    assert np.all(f.full()[:, 202:] == f.fill)
    back = Features.from_bytes(f.to_bytes(), WHISPER)
    assert np.array_equal(back.full(), f.full()) and back.length == f.length


@pytest.mark.parametrize("blob,match", [
    (b"not safetensors", "not a features blob"),
    (Features(np.zeros((16, 5), np.float32), np.float32(0), 3000, 5).to_bytes(), "do not fit"),  # 16 mels
    (Features(np.zeros((80, 5), np.float32), np.float32(0), 200, 5).to_bytes(), "do not fit"),  # another window
    (Features(np.zeros((80, 5), np.float32), np.float32(0), 3000, 0).to_bytes(), "do not fit"),  # no frames
])
def test_features_for_another_config_are_refused(blob, match):
    with pytest.raises(ValueError, match=match):
        Features.from_bytes(blob, WHISPER)


def test_blocks_are_computed_as_the_samples_arrive():
    # A frame is computed once every sample it reads is in. 1 s at 24 kHz resamples to 15,992 samples so far (the
    # filter waits for 10 samples past its last output); block 3 (frames 60-79) reads up to sample
    # 79 * 160 + 200 = 12,840, block 4 (frames 80-99) up to 16,040: not yet.
    s = StreamingFeatures(WHISPER, 24000)
    s.feed(clip(1.0, 24000))
    assert s.mel.known == 15992 and len(s.mel.blocks) == 4 and BLOCK == 20
    s.feed(clip(0.01, 24000))
    assert len(s.mel.blocks) == 5

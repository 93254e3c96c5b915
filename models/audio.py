"""Audio features (a ``WhisperFeatureExtractor`` config's log-mel spectrogram) computed as the samples arrive.

One implementation serves both ways audio reaches an encoder: the encoder worker feeds a decoded clip in one piece
(REST), and the Realtime WebSocket feeds PCM as the client appends it, so that at ``commit`` only the last frames and
the normalization are left (and the encoder's forward pass). The two give **bitwise** the same features because
every operation is computed on pieces whose boundaries and shapes do not depend on how the samples were split:

- resampling (``Resampler``) is torchaudio's ``sinc_interp_hann`` polyphase filter (lowpass width 6, rolloff 0.99),
  each output summed over its taps in a fixed order with elementwise multiply and add (no BLAS, no convolution
  algorithm chosen by length); within 1e-6 of ``torchaudio.functional.resample``;
- STFT frames and their mel projection (``LogMel``) are computed in blocks of ``BLOCK`` frames at fixed positions
  (frame 0, ``BLOCK``, ...), each block with the same shapes, once every sample it reads is known;
- the clip-wide steps (log, the max - 8 floor, scaling) run once, at the end, on the whole window.

The features are those of ``WhisperFeatureExtractor(...)(samples, return_attention_mask=True)`` (Whisper's slaney
mel filters, a periodic Hann window, a centred STFT with reflect padding over the clip zero-padded to the window, the
last frame dropped) without its ``do_normalize`` and ``dither`` options, which the extractors of the supported
checkpoints leave off; they match transformers' torch path to float rounding (numpy's FFT here, torch's there).
Only numpy is needed, so a gateway can compute them without importing torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

BLOCK = 20  # STFT frames per block (200 ms at a 10 ms hop): the granularity of the streamed computation
LOWPASS_WIDTH, ROLLOFF = 6, 0.99  # torchaudio.functional.resample's defaults
# The most taps a resampling filter may have. Its size is new x (2 width + orig) for the rates divided by their gcd:
# small for the usual rates (44.1 kHz -> 16 kHz: 160 x 475), but a rate sharing few factors with the target makes it
# huge (11,111 Hz -> 16 kHz: 16,000 x 11,125; 191,999 Hz: 3.1e9 taps, ~25 GB, which took an encoder to the OOM
# killer from a 250-byte WAV: an outside tester's fuzzer). Such rates are refused (models.media.check_audio).
MAX_RESAMPLE_TAPS = 1 << 22
# ... and the most taps one output sample takes (2 width + orig): the work per second of audio. The usual rates take at
# most ~600 (176.4 kHz: 575); 160,775 Hz took 6,553, 17 s of CPU for a 30 s window (an outside retest).
MAX_PHASE_TAPS = 1024


def resample_taps(orig_rate: int, new_rate: int) -> tuple[int, int]:
    """The taps of the filter resampling ``orig_rate`` to ``new_rate``: in all, and per output sample (0, 0: no
    resampling)."""
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    if orig == new:
        return 0, 0
    phase = 2 * _width(orig, new) + orig
    return new * phase, phase


def _width(orig: int, new: int) -> int:
    """The filter's half width in input samples, for rates divided by their gcd (torchaudio's formula)."""
    return math.ceil(LOWPASS_WIDTH * orig / (min(orig, new) * ROLLOFF))


def resampling_refused(orig_rate: int, new_rate: int) -> str | None:
    """Why resampling ``orig_rate`` to ``new_rate`` is refused (a filter too large, or too slow), or None."""
    taps, phase = resample_taps(orig_rate, new_rate)
    if taps > MAX_RESAMPLE_TAPS or phase > MAX_PHASE_TAPS:
        return (f"resampling {orig_rate} Hz to {new_rate} Hz needs a filter of {taps} taps, {phase} per output "
                f"sample (at most {MAX_RESAMPLE_TAPS} and {MAX_PHASE_TAPS})")
    return None


def sinc_kernel(orig: int, new: int) -> tuple[np.ndarray, int]:
    """The polyphase filter ``[new, 2 * width + orig]`` (float32) for rates already divided by their gcd, and
    ``width``: the formula of torchaudio's ``_get_sinc_resample_kernel`` (``sinc_interp_hann``), computed in
    float64."""
    base = min(orig, new) * ROLLOFF
    width = _width(orig, new)
    idx = np.arange(-width, width + orig, dtype=np.float64)[None, :] / orig
    t = (np.arange(0, -new, -1, dtype=np.float64)[:, None] / new + idx) * base
    t = np.clip(t, -LOWPASS_WIDTH, LOWPASS_WIDTH)
    window = np.cos(t * math.pi / LOWPASS_WIDTH / 2) ** 2
    t = t * math.pi
    with np.errstate(divide="ignore", invalid="ignore"):
        sinc = np.where(t == 0, 1.0, np.sin(t) / t)
    return (sinc * window * (base / orig)).astype(np.float32), width


class Resampler:
    """Streamed resampling from ``orig_rate`` to ``new_rate``: ``feed`` returns the output samples the input so far
    determines, ``finish`` the rest (the input's end zero-padded, the output cut to ``ceil(n * new / orig)`` samples,
    as torchaudio does). ``limit`` stops computing past that many output samples (a window that long is all an
    encoder reads); ``total`` still counts every output sample the input stands for."""

    def __init__(self, orig_rate: int, new_rate: int, limit: int | None = None):
        if why := resampling_refused(orig_rate, new_rate):
            raise ValueError(why)
        g = math.gcd(orig_rate, new_rate)
        self.orig, self.new = orig_rate // g, new_rate // g
        self.identity = self.orig == self.new
        self.kernel, self.width = sinc_kernel(self.orig, self.new)
        self.taps = self.kernel.shape[1]
        self.buf = np.zeros(self.width, np.float32)  # the unconsumed input, left zero padding first
        self.base = 0  # the padded input index of buf[0]
        self.pos = 0  # filter positions done (each makes ``new`` outputs)
        self.fed = 0  # input samples so far
        self.made = 0  # output samples returned so far
        self.limit = limit

    @property
    def total(self) -> int:
        """Output samples the input so far stands for (torchaudio's resampled length)."""
        return self.fed if self.identity else -(-self.fed * self.new // self.orig)

    def feed(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.fed += x.size
        if self.identity:
            return self._cap(x)
        self.buf = np.concatenate([self.buf, x])
        return self._run(False)

    def finish(self) -> np.ndarray:
        if self.identity:
            return np.zeros(0, np.float32)
        self.buf = np.concatenate([self.buf, np.zeros(self.width + self.orig, np.float32)])
        return self._run(True)

    def _cap(self, y: np.ndarray) -> np.ndarray:
        if self.limit is not None:
            y = y[: max(self.limit - self.made, 0)]
        self.made += y.size
        return y

    def _run(self, last: bool) -> np.ndarray:
        # Position i reads padded input [i * orig, i * orig + taps); those fully in hand are computed now.
        end = (self.base + self.buf.size - self.taps) // self.orig + 1
        if last:
            end = min(end, -(-self.total // self.new))
        if self.limit is not None:
            end = min(end, -(-self.limit // self.new))
        n = end - self.pos
        if n <= 0:
            return np.zeros(0, np.float32)
        start = self.pos * self.orig - self.base
        span = (n - 1) * self.orig + 1
        acc = None
        for k in range(self.taps):  # a fixed order of rounded products and sums: the same for any split
            term = self.buf[start + k : start + k + span : self.orig, None] * self.kernel[None, :, k]  # [n, new]
            acc = term if acc is None else np.add(acc, term, out=acc)
        self.pos = end
        drop = self.pos * self.orig - self.base
        self.buf, self.base = self.buf[drop:], self.base + drop
        y = acc.reshape(-1)
        if last:
            y = y[: max(self.total - self.made, 0)]
        return self._cap(y)


def hz_to_mel(f: np.ndarray) -> np.ndarray:
    """The slaney mel scale (linear below 1 kHz, logarithmic above), as transformers' ``hertz_to_mel``."""
    mels = 3.0 * f / 200.0
    log = f >= 1000.0
    mels[log] = 15.0 + np.log(f[log] / 1000.0) * (27.0 / np.log(6.4))
    return mels


def mel_to_hz(mels: np.ndarray) -> np.ndarray:
    f = 200.0 * mels / 3.0
    log = mels >= 15.0
    f[log] = 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels[log] - 15.0))
    return f


def mel_filters(n_fft: int, n_mels: int, rate: int) -> np.ndarray:
    """Whisper's filter bank ``[1 + n_fft // 2, n_mels]`` (float64): slaney scale and area normalization over
    0-8 kHz, as ``WhisperFeatureExtractor`` builds it with transformers' ``mel_filter_bank``."""
    mel = np.linspace(hz_to_mel(np.array([0.0]))[0], hz_to_mel(np.array([8000.0]))[0], n_mels + 2)
    edges = mel_to_hz(mel)
    fft_freqs = np.linspace(0, rate // 2, 1 + n_fft // 2)
    diff = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]
    down, up = -slopes[:, :-2] / diff[:-1], slopes[:, 2:] / diff[1:]
    bank = np.maximum(np.zeros(1), np.minimum(down, up))
    return bank * (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[None, :]


@dataclass(frozen=True)
class AudioConfig:
    """The parts of a ``WhisperFeatureExtractor`` config the features depend on."""

    rate: int  # sampling_rate
    n_mels: int  # feature_size
    n_fft: int
    hop: int  # hop_length
    window_s: int  # chunk_length: the encoder's window, in seconds

    @classmethod
    def of(cls, cfg: dict) -> AudioConfig:
        for key in ("do_normalize", "dither"):
            if cfg.get(key):
                raise ValueError(f"feature extractor option {key}={cfg[key]!r} is not supported")
        return cls(int(cfg["sampling_rate"]), int(cfg["feature_size"]), int(cfg.get("n_fft", 400)),
                   int(cfg["hop_length"]), int(cfg["chunk_length"]))

    @property
    def samples(self) -> int:
        """Samples in the window (the clip is zero-padded or cut to this)."""
        return self.window_s * self.rate

    @property
    def frames(self) -> int:
        """Mel frames in the window."""
        return self.samples // self.hop


@dataclass(frozen=True)
class Features:
    """A clip's log-mel features ``[n_mels, frames of the window]``, kept as the leading ``data`` columns and the
    ``fill`` every later column holds (they are frames of the zero padding), and ``length``: real frames (the
    extractor's attention mask)."""

    data: np.ndarray  # [n_mels, k] float32
    fill: np.float32
    window: int  # frames in the window
    length: int

    def full(self) -> np.ndarray:
        out = np.full((self.data.shape[0], self.window), self.fill, np.float32)
        out[:, : self.data.shape[1]] = self.data
        return out

    def to_bytes(self) -> bytes:
        """safetensors (never pickle): the leading columns, the fill and the lengths."""
        from safetensors.numpy import save

        return save({"data": self.data, "fill": np.array([self.fill], np.float32)},
                    metadata={"window": str(self.window), "length": str(self.length)})

    @classmethod
    def from_bytes(cls, blob: bytes, cfg: AudioConfig) -> Features:
        """Checked against the encoder's own config: ValueError for anything else."""
        from safetensors.numpy import load

        try:
            tensors, meta = load(blob), _metadata(blob)
            data, fill = tensors["data"], tensors["fill"]
            window, length = int(meta["window"]), int(meta["length"])
        except Exception as exc:
            raise ValueError(f"not a features blob ({type(exc).__name__}: {exc})") from None
        if (data.dtype != np.float32 or data.ndim != 2 or data.shape[0] != cfg.n_mels or window != cfg.frames
                or not 0 <= data.shape[1] <= window or fill.shape != (1,) or not 0 < length <= window):
            raise ValueError(f"features of shape {data.shape} / window {window} / length {length} do not fit "
                             f"this encoder ({cfg.n_mels} mels, {cfg.frames} frames)")
        return cls(data, fill.astype(np.float32)[0], window, length)


def _metadata(blob: bytes) -> dict:
    """A safetensors blob's ``__metadata__`` (its JSON header)."""
    size = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + size]).get("__metadata__") or {}


class LogMel:
    """Streamed log-mel features of samples at the config's rate: ``feed`` computes every block of frames the
    samples so far determine; ``finish(length)`` the rest, then the clip-wide normalization."""

    def __init__(self, cfg: AudioConfig):
        self.cfg = cfg
        self.half = cfg.n_fft // 2
        self.window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(cfg.n_fft) / cfg.n_fft)).astype(np.float32)
        self.filters = mel_filters(cfg.n_fft, cfg.n_mels, cfg.rate).T.astype(np.float32).copy()  # [mels, bins]
        self.signal = np.zeros(cfg.samples, np.float32)  # the clip, zero-padded to the window
        self.known = 0  # samples of ``signal`` received
        self.blocks: list[np.ndarray] = []  # [n_mels, BLOCK] mel power per block, in order

    def feed(self, x: np.ndarray) -> None:
        take = min(x.size, self.cfg.samples - self.known)
        self.signal[self.known : self.known + take] = x[:take]
        self.known += take
        self._blocks(self._ready())

    def _ready(self) -> int:
        """Blocks whose every frame reads only known samples: frame t reads [t * hop - n_fft/2, t * hop + n_fft/2)
        (reflected at both ends of the window)."""
        n, most = len(self.blocks), -(-self.cfg.frames // BLOCK)
        while n < most and self.known > self.half:
            last = (n + 1) * BLOCK - 1
            if min(last * self.cfg.hop + self.half, self.cfg.samples) > self.known:
                break
            n += 1
        return n

    def _blocks(self, upto: int) -> None:
        cfg, s = self.cfg, self.signal
        for b in range(len(self.blocks), upto):
            # padded index p of frame t's sample j is t * hop + j; signal index p - n_fft/2, reflected at both ends
            p = (b * BLOCK + np.arange(BLOCK))[:, None] * cfg.hop + np.arange(cfg.n_fft)[None, :] - self.half
            p = np.abs(p)
            p = np.where(p >= cfg.samples, 2 * (cfg.samples - 1) - p, p)
            frames = np.where((p >= 0) & (p < cfg.samples), s[np.clip(p, 0, cfg.samples - 1)], 0.0)
            spec = np.fft.rfft(frames.astype(np.float32) * self.window, axis=-1)  # [BLOCK, bins] complex64
            power = (np.abs(spec) ** 2).astype(np.float32)
            self.blocks.append(self.filters @ np.ascontiguousarray(power.T))  # [mels, BLOCK]

    def finish(self, length: int) -> Features:
        """``length``: real samples of the clip (may exceed the window; only the window counts)."""
        cfg = self.cfg
        real = min(length, cfg.samples)
        # Frames past these read only zeros (their mel power is exactly 0); the window's frames up to here are
        # computed, in whole blocks.
        touched = cfg.frames if real >= cfg.samples else min(cfg.frames, -(-(real + self.half) // cfg.hop))
        self._blocks(-(-touched // BLOCK))
        mel = np.zeros((cfg.n_mels, cfg.frames), np.float32)
        if self.blocks:
            computed = np.concatenate(self.blocks, axis=1)[:, : cfg.frames]
            mel[:, : computed.shape[1]] = computed
        log = np.log10(np.maximum(mel, np.float32(1e-10)))
        log = np.maximum(log, log.max() - np.float32(8.0))
        log = (log + np.float32(4.0)) / np.float32(4.0)
        fill = log[0, -1] if touched < cfg.frames else np.float32(0)
        keep = cfg.frames
        if touched < cfg.frames:  # every column past ``touched`` equals ``fill``: send only the ones before
            differs = np.nonzero((log != fill).any(axis=0))[0]
            keep = int(differs[-1]) + 1 if differs.size else 0
        frames = min(cfg.frames, -(-real // cfg.hop))
        return Features(np.ascontiguousarray(log[:, :keep]), np.float32(fill), cfg.frames, max(frames, 1))


class StreamingFeatures:
    """Samples at ``in_rate`` (float32 in [-1, 1], mono) to ``Features``: resampled and turned into mel frames as
    they are fed; ``finish`` completes the clip. Bitwise equal however the samples were split across ``feed``."""

    def __init__(self, cfg: AudioConfig, in_rate: int):
        self.cfg = cfg
        self.resampler = Resampler(in_rate, cfg.rate, limit=cfg.samples)
        self.mel = LogMel(cfg)

    def feed(self, x: np.ndarray) -> None:
        self.mel.feed(self.resampler.feed(x))

    def finish(self) -> Features:
        self.mel.feed(self.resampler.finish())
        return self.mel.finish(self.resampler.total)


def pcm16_samples(pcm: bytes) -> np.ndarray:
    """Little-endian PCM16 -> float32 in [-1, 1): the values soundfile decodes a 16-bit WAV to."""
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / np.float32(32768.0)

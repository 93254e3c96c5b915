"""Sampling, batched on the logits' device: greedy at temperature 0 (and below ``GREEDY_BELOW``), else temperature +
nucleus (top_p), for every row of a step at once: a fixed sequence of tensor ops over [B, V], no per-row Python and
no host sync but the one copy of the chosen tokens.

Randomness is counter-based: the noise of vocabulary entry ``v`` at draw ``k`` of a request seeded ``s`` is a hash of
(s, k, v) (splitmix64 in int64 tensor arithmetic), turned into an exponential variate; the token is
``argmax(probs / noise)``, which is distributed as ``probs`` (the exponential race, as vLLM and FlashInfer sample).
Nothing is carried between draws but the counter ``k`` (the request's position in its output), so

* the same seed gives the same tokens whatever else shares the batch (every row's noise is its own);
* a request migrated to another replica after ``k`` tokens (gateway/tiers.py) resumes at draw ``k`` and draws what an
  undisturbed run would have;
* the pipeline's last shard needs only (seed, draw) per row, which the step table carries.

A seed is any 64-bit value, signed or not (the OpenAI API's is int64): :func:`seed64` folds it into int64, the form
every shard carries it in, so ``s`` and ``s + 2**64`` draw the same tokens.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

import torch

from backbone.staging import to_device
from router.messages import SamplingParams

log = logging.getLogger(__name__)

# Dividing logits by a temperature this small overflows float32 (softmax of inf is NaN): treat it as greedy, as vLLM
# does with its 1e-5 epsilon.
GREEDY_BELOW = 1e-5
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # accepted seeds: int64 or uint64


def seed64(seed: int) -> int:
    """A 64-bit seed (signed or unsigned) as int64; ValueError outside 64 bits."""
    if not SEED_MIN <= seed <= SEED_MAX:
        raise ValueError(f"seed {seed} does not fit in 64 bits")
    return seed - 2**64 if seed >= 2**63 else seed


def _i64(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return x - 2**64 if x >= 2**63 else x


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_VOCAB_STRIDE = _i64(0xD1B54A32D192ED03)
_M1, _M2 = _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (``>>`` on int64 is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors (multiplication wraps modulo 2**64, as in C)."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def exponential_noise(seeds: torch.Tensor, draws: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, V] float32 Exp(1) variates, a pure function of (seed, draw, vocabulary index) per element."""
    # The seed hashed before its draw counter is added: seed + (draw + 1) * GOLDEN alone made seed s + GOLDEN's
    # stream seed s's shifted by one draw (an outside auditor's), two requests' tokens alike a token apart.
    row = _mix(_mix(seeds) + (draws + 1) * _GOLDEN)  # [B]
    idx = torch.arange(1, vocab + 1, device=seeds.device, dtype=torch.int64)  # [V]
    bits = _mix(row[:, None] + idx[None, :] * _VOCAB_STRIDE)  # [B, V]
    uniform = (_shr(bits, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # (0, 1), 24 random bits
    return -torch.log(uniform)


def sample_batch(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor,
                 draws: torch.Tensor, random: bool = True, nucleus: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``logits`` [B, V] (float32), every input a [B] tensor on the logits' device.

    ``random`` / ``nucleus`` False (known on the host from the requests' parameters, no sync): no row samples / no
    row truncates, and the noise / the sort over the vocabulary are skipped. On CUDA a step with no truncating row
    runs as one fused kernel (:func:`race_triton`) once it has passed its self-check there.

    The race is run in log space: ``argmax(probs / noise)`` is ``argmax(logits / T - log(noise))`` (softmax's
    normalizer is the same for every entry of a row), which needs no softmax and no second pass over the row.

    Returns (tokens [B] int64, status [B] int8): 0 sampled; 1 the row's logits hold NaN or +inf; 2 its
    probabilities are not finite (every token masked, or the temperature overflows a logit: no mass left). A row
    with a non-zero status has a meaningless token.
    """
    if random and not nucleus and logits.is_cuda and fused_race_ok(logits.device):
        return race_triton(logits, temperature, seeds, draws)
    tokens = torch.argmax(logits, dim=-1)
    # -inf is a masked token (allowed); NaN or +inf is a broken row.
    sound = (logits < float("inf")).all(dim=-1)  # False for NaN too
    if not random:  # every row greedy: divided by 1, a row has no mass left only if every token is masked
        status = torch.where(sound, torch.where(logits.amax(dim=-1) > float("-inf"), 0, 2), 1)
        return tokens, status.to(torch.int8)
    greedy = ~(temperature >= GREEDY_BELOW)  # NaN is greedy too
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    score = scaled - torch.log(exponential_noise(seeds, draws, logits.shape[-1]))
    # Nucleus: keep the smallest prefix (by probability) reaching top_p, and always the likeliest token (a top_p
    # below float32's range compares as 0). Rows with top_p >= 1 keep everything.
    if nucleus:
        sorted_probs, order = torch.sort(torch.softmax(scaled, dim=-1), dim=-1, descending=True)
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p[:, None]
        drop[:, 0] = False
        drop &= (top_p < 1.0)[:, None]
        score = score.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), float("-inf"))
    tokens = torch.where(greedy, tokens, torch.argmax(score, dim=-1))
    no_mass = (scaled == float("inf")).any(dim=-1) | ~(scaled.amax(dim=-1) > float("-inf"))
    status = torch.where(sound, torch.where(no_mass, 2, 0), 1)
    return tokens, status.to(torch.int8)


_RACE_KERNEL = None
_RACE_OK: dict[str, bool] = {}  # device -> whether the fused kernel passed its self-check there
RACE_BLOCK = 4096


def _race_kernel():
    """The fused race's Triton kernel, compiled on first use."""
    global _RACE_KERNEL
    if _RACE_KERNEL is not None:
        return _RACE_KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def race(logits_ptr, stride, temp_ptr, seeds_ptr, draws_ptr, out_ptr, V, GOLDEN: tl.constexpr,
             VOCAB_STRIDE: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, GREEDY: tl.constexpr,
             BLOCK: tl.constexpr):
        # One program per row: one pass over its logits computing, per entry, the raw logit's argmax (greedy rows),
        # the race's score (its noise hashed on the spot, as exponential_noise draws it) and the status checks.
        row = tl.program_id(0)
        t = tl.load(temp_ptr + row)
        div = tl.where(t >= GREEDY, t, 1.0)
        # splitmix64's finalizer three times (as _mix; a logical shift is an arithmetic one masked, as _shr), written
        # out: the interpreter the CPU tests run cannot call a nested jit function.
        seed = tl.load(seeds_ptr + row)  # hashed first (exponential_noise says why)
        seed = (seed ^ ((seed >> 30) & ((1 << 34) - 1))) * M1
        seed = (seed ^ ((seed >> 27) & ((1 << 37) - 1))) * M2
        seed = seed ^ ((seed >> 31) & ((1 << 33) - 1))
        key = seed + (tl.load(draws_ptr + row) + 1) * GOLDEN
        key = (key ^ ((key >> 30) & ((1 << 34) - 1))) * M1
        key = (key ^ ((key >> 27) & ((1 << 37) - 1))) * M2
        key = key ^ ((key >> 31) & ((1 << 33) - 1))
        best_l = float("-inf")
        arg_l = 0
        best_s = float("-inf")
        arg_s = 0
        top = float("-inf")
        broken = 0
        overflow = 0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < V
            logit = tl.load(logits_ptr + row * stride + cols, mask=ok, other=float("-inf")).to(tl.float32)
            scaled = logit / div
            bits = key + (cols.to(tl.int64) + 1) * VOCAB_STRIDE
            bits = (bits ^ ((bits >> 30) & ((1 << 34) - 1))) * M1
            bits = (bits ^ ((bits >> 27) & ((1 << 37) - 1))) * M2
            bits = bits ^ ((bits >> 31) & ((1 << 33) - 1))
            uniform = (((bits >> 40) & ((1 << 24) - 1)).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            score = tl.where(ok, scaled - tl.log(-tl.log(uniform)), float("-inf"))
            m = tl.max(logit, 0)
            i = tl.argmax(logit, 0)
            if m > best_l:
                best_l = m
                arg_l = start + i
            m = tl.max(score, 0)
            i = tl.argmax(score, 0)
            if m > best_s:
                best_s = m
                arg_s = start + i
            top = tl.maximum(top, tl.max(scaled, 0))
            broken += tl.sum(((logit != logit) | (logit == float("inf"))).to(tl.int32), 0)
            overflow += tl.sum((scaled == float("inf")).to(tl.int32), 0)
        token = tl.where(t >= GREEDY, arg_s, arg_l).to(tl.int64)
        status = tl.where(broken > 0, 1, tl.where((overflow > 0) | (top == float("-inf")), 2, 0)).to(tl.int64)
        tl.store(out_ptr + row, token)
        tl.store(out_ptr + tl.num_programs(0) + row, status)

    _RACE_KERNEL = race
    return race


def race_triton(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, draws: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_batch` for a step with no truncating row, in one launch: each row's logits read once, its noise
    hashed where it is used (the torch version writes and reads ~35 [B, V] int64 temporaries: 3.5 GB of memory
    traffic per step at batch 64 over a 128k vocabulary). Same math: the same noise bits, the same division by the
    temperature, the same first-index argmax; ``log`` may differ from torch's in the last bit, so a near tie may
    fall the other way."""
    b, v = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    both = torch.empty((2, b), dtype=torch.int64, device=logits.device)
    if b:
        _race_kernel()[(b,)](logits, logits.stride(0), temperature.to(torch.float32), seeds, draws, both, v,
                             GOLDEN=_GOLDEN, VOCAB_STRIDE=_VOCAB_STRIDE, M1=_M1, M2=_M2, GREEDY=GREEDY_BELOW,
                             BLOCK=min(RACE_BLOCK, max(16, 1 << (v - 1).bit_length())), num_warps=8)
    return both[0], both[1].to(torch.int8)


def race_check(device: torch.device) -> int:
    """The fused race against the torch one on made-up logits on ``device``: how many of 96 rows differ in token or
    status (raises if the kernel cannot run). Rows: greedy, sampled at several temperatures, ties, a NaN, a +inf,
    every token masked, a temperature that overflows."""
    g = torch.Generator().manual_seed(0)
    b, v = 96, 5003  # a vocabulary that is no multiple of the block
    logits = torch.randn(b, v, generator=g) * 4
    logits[1, 10] = logits[1, 11] = 50.0  # a greedy tie: the first index
    logits[2, 7] = float("nan")
    logits[4, 3] = float("inf")
    logits[6] = float("-inf")
    logits[8, 100:] = float("-inf")
    logits[9] *= 1e30
    temperature = torch.tensor([0.0 if i % 3 == 1 else (0.3, 0.8, 1.7)[i % 3] for i in range(b)])
    temperature[9] = 1e-4
    seeds = torch.randint(-2**62, 2**62, (b,), generator=g)
    draws = torch.arange(b, dtype=torch.int64)
    want = sample_batch(logits, temperature, torch.ones(b), seeds, draws, True, False)  # on the host: torch's
    got = race_triton(*(x.to(device) for x in (logits, temperature, seeds, draws)))
    ok = want[1] == got[1].cpu()
    ok &= (want[0] == got[0].cpu()) | (want[1] != 0)  # a broken row's token is meaningless
    return int((~ok).sum())


def fused_race_ok(device: torch.device) -> bool:
    """Whether steps on ``device`` use the fused race: it ran its self-check there once, with at most one row of 96
    differing (a near tie's last bit), else the torch race, with an error in the log."""
    key = str(device)
    if key not in _RACE_OK:
        try:
            bad = race_check(device)
            why = f"{bad} of 96 rows differ from the torch race"
        except Exception as exc:  # a Triton or driver that cannot build it
            bad, why = 96, f"{type(exc).__name__}: {exc}"
        _RACE_OK[key] = bad <= 1
        if bad > 1:
            log.error("the fused sampling kernel failed its self-check; sampling with torch ops",
                      extra={"device": key, "error": why})
    return _RACE_OK[key]


class Sampler:
    """One request's sampling parameters and its draw counter (its only state)."""

    def __init__(self, params: SamplingParams, offset: int = 0):
        """``offset``: draws already made (a migrated request resumes its random stream where it left off)."""
        self.greedy = not params.temperature >= GREEDY_BELOW
        self.temperature, self.top_p = params.temperature, params.top_p
        self.seed = seed64(params.seed if params.seed is not None else secrets.randbits(63))
        self.draws = offset

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] (float32, finite) -> one token id (RuntimeError if the row cannot be sampled)."""
        result = sample_rows([self], logits[None])[0]
        if isinstance(result, str):
            raise RuntimeError(result)
        return result


def sample_rows(samplers: list[Sampler], logits: torch.Tensor) -> list[int | str]:
    """One token per row of logits [B, V] (float32), all rows in one batched pass on the logits' device; a row that
    cannot be sampled gives the reason (a str) instead, so one request's bad numbers fail that request alone. Each
    sampler's counter advances by one."""
    return results(draw_rows(samplers, logits).tolist())


def draw_rows(samplers: list[Sampler], logits: torch.Tensor) -> torch.Tensor:
    """:func:`sample_rows` without waiting for the device: [2, B] int64 (tokens, statuses) on the logits' device, for
    :func:`results` once on the host. Each sampler's counter advances by one."""
    both = draw_params([(s.temperature, s.top_p, s.seed, s.draws) for s in samplers], logits)
    for sampler in samplers:
        sampler.draws += 1
    return both


def sample_params(rows: list[tuple[float, float, int, int]], logits: torch.Tensor) -> list[int | str]:
    """:func:`sample_rows` from each row's (temperature, top_p, seed as int64, draw) alone: what a pipeline's last
    shard, which keeps no per-request state, samples with."""
    return results(draw_params(rows, logits).tolist())  # the step's one host copy


def draw_params(rows: list[tuple[float, float, int, int]], logits: torch.Tensor) -> torch.Tensor:
    """:func:`sample_params` without waiting for the device: [2, B] int64 (tokens, statuses)."""
    dev, n = logits.device, len(rows)
    floats = to_device([r[0] for r in rows] + [r[1] for r in rows], torch.float32, dev)
    ints = to_device([r[2] for r in rows] + [r[3] for r in rows], torch.int64, dev)
    temperature, top_p, seeds, draws = floats[:n], floats[n:], ints[:n], ints[n:]
    random = any(t >= GREEDY_BELOW for t, *_ in rows)
    nucleus = any(t >= GREEDY_BELOW and p < 1.0 for t, p, *_ in rows)
    tokens, status = sample_batch(logits.float(), temperature, top_p, seeds, draws, random, nucleus)
    return torch.stack([tokens, status.to(torch.int64)])


@dataclass
class Drawn:
    """A step's sampled rows still on the device: ``both`` [2, B] int64, tokens then statuses (:func:`results`)."""

    both: torch.Tensor


def results(both: list[list[int]]) -> list[int | str]:
    """Per row its token, or why it could not be sampled, from [tokens, statuses] on the host."""
    return [token if code == 0 else _FAILED[code] for token, code in zip(*both)]


_FAILED = {1: "the model produced non-finite logits (NaN or infinity) for this request",
           2: "sampling failed: no probability mass left after temperature and top_p"}

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

import secrets
from dataclasses import dataclass

import torch

from backbone.staging import to_device
from router.messages import SamplingParams

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
    row = _mix(seeds + (draws + 1) * _GOLDEN)  # [B]
    idx = torch.arange(1, vocab + 1, device=seeds.device, dtype=torch.int64)  # [V]
    bits = _mix(row[:, None] + idx[None, :] * _VOCAB_STRIDE)  # [B, V]
    uniform = (_shr(bits, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # (0, 1), 24 random bits
    return -torch.log(uniform)


def sample_batch(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor,
                 draws: torch.Tensor, random: bool = True, nucleus: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``logits`` [B, V] (float32), every input a [B] tensor on the logits' device.

    ``random`` / ``nucleus`` False (known on the host from the requests' parameters, no sync): no row samples / no
    row truncates, and the noise / the sort over the vocabulary are skipped.

    Returns (tokens [B] int64, status [B] int8): 0 sampled; 1 the row's logits hold NaN or +inf; 2 its
    probabilities are not finite (every token masked: no mass left). A row with a non-zero status has a meaningless
    token.
    """
    tokens = torch.argmax(logits, dim=-1)
    # -inf is a masked token (allowed); NaN or +inf is a broken row.
    sound = (logits < float("inf")).all(dim=-1)  # False for NaN too
    if not random:  # every row greedy: no probabilities needed; a row with every token masked has no mass left
        status = torch.where(sound, torch.where(logits.amax(dim=-1) > float("-inf"), 0, 2), 1)
        return tokens, status.to(torch.int8)
    greedy = ~(temperature >= GREEDY_BELOW)  # NaN is greedy too
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    probs = torch.softmax(scaled, dim=-1)  # [B, V]
    # Nucleus: keep the smallest prefix (by probability) reaching top_p, and always the likeliest token (a top_p
    # below float32's range compares as 0). Rows with top_p >= 1 keep everything.
    if nucleus:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p[:, None]
        drop[:, 0] = False
        drop &= (top_p < 1.0)[:, None]
        kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    else:
        kept = probs
    race = kept / exponential_noise(seeds, draws, logits.shape[-1])
    tokens = torch.where(greedy, tokens, torch.argmax(race, dim=-1))
    status = torch.where(sound, torch.where(torch.isfinite(probs).all(dim=-1), 0, 2), 1)
    return tokens, status.to(torch.int8)


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

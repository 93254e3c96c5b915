"""Per-request sampling: greedy at temperature 0 (and below ``GREEDY_BELOW``), else temperature + nucleus (top_p)
with a per-request generator, so the same seed gives the same tokens whatever else the batch holds.

A seed is any 64-bit value, signed or not (the OpenAI API's is int64): :func:`seed64` folds it into int64, the form
every shard carries it in, and torch's generator treats ``s`` and ``s + 2**64`` alike, so both spellings draw the
same tokens.

The sampler's state is a counter: draw ``k`` of a request seeds its generator with ``draw_seed(seed, k)``. A request
migrated to another replica after ``k`` tokens (gateway/tiers.py) thus resumes at draw ``k`` with nothing else carried,
and its tokens are those an undisturbed run would have drawn.
"""

from __future__ import annotations

import secrets

import torch

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


_MASK64 = (1 << 64) - 1


def draw_seed(seed: int, draw: int) -> int:
    """The generator seed of draw ``draw`` of a request seeded ``seed`` (splitmix64 of the pair), as int64."""
    z = (seed + (draw + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return seed64(z ^ (z >> 31))


class Sampler:
    def __init__(self, params: SamplingParams, offset: int = 0):
        """``offset``: draws already made (a migrated request resumes its random stream where it left off)."""
        self.greedy = not params.temperature >= GREEDY_BELOW  # NaN is greedy too
        self.temperature, self.top_p = params.temperature, params.top_p
        self.seed = seed64(params.seed if params.seed is not None else secrets.randbits(63))
        self.draws = offset
        self.generator = torch.Generator()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] (float32, finite) -> one token id."""
        draw, self.draws = self.draws, self.draws + 1
        if self.greedy:
            return int(torch.argmax(logits))
        self.generator.manual_seed(draw_seed(self.seed, draw))
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_probs, dim=-1)
            drop = (cum - sorted_probs) >= self.top_p  # keep the smallest prefix reaching top_p
            drop[0] = False  # and always the likeliest token: a top_p below float32's range compares as 0
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def sample_rows(samplers: list[Sampler], logits: torch.Tensor) -> list[int | str]:
    """One token per row of logits [B, V] (float32); a row that cannot be sampled gives the reason (a str) instead,
    so one request's bad numbers fail that request alone. Finiteness is checked for the whole batch at once."""
    finite = torch.isfinite(logits).all(dim=-1).tolist()  # [B]
    out: list[int | str] = []
    for sampler, row, ok in zip(samplers, logits, finite):
        if not ok:
            out.append("the model produced non-finite logits for this request")
            continue
        try:
            out.append(sampler(row))
        except RuntimeError as exc:  # e.g. top_p and temperature leaving no probability mass
            out.append(f"sampling failed: {exc}")
    return out

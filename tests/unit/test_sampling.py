"""backbone/sampling.py: greedy at temperature 0, seeded reproducibility, nucleus truncation."""

from __future__ import annotations

import math

import pytest
import torch

from backbone.sampling import Sampler
from router.messages import SamplingParams


def params(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=10, **kw)


def random_logits(seed: int, vocab: int = 64) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 2


def draws(sampler: Sampler, logits: torch.Tensor, n: int) -> list[int]:
    return [sampler(logits) for _ in range(n)]


@pytest.mark.parametrize("seed", range(10))
def test_temperature_zero_is_argmax(seed):
    logits = random_logits(seed)
    s = Sampler(params(temperature=0.0, seed=seed))
    assert draws(s, logits, 5) == [int(torch.argmax(logits))] * 5


def test_temperature_zero_ignores_top_p_and_seed():
    logits = random_logits(3)
    a = Sampler(params(temperature=0.0, top_p=0.3, seed=1))
    b = Sampler(params(temperature=0.0))
    assert a(logits) == b(logits) == int(torch.argmax(logits))


def test_same_seed_same_draws():
    logits = torch.zeros(50)  # uniform: every draw depends on the generator
    a = draws(Sampler(params(temperature=1.0, seed=1234)), logits, 200)
    b = draws(Sampler(params(temperature=1.0, seed=1234)), logits, 200)
    assert a == b
    assert len(set(a)) > 20  # and they really are random draws


def test_same_seed_same_draws_with_top_p():
    logits = random_logits(7)
    a = draws(Sampler(params(temperature=0.8, top_p=0.9, seed=99)), logits, 100)
    b = draws(Sampler(params(temperature=0.8, top_p=0.9, seed=99)), logits, 100)
    assert a == b


def test_different_seeds_differ():
    logits = torch.zeros(50)
    a = draws(Sampler(params(temperature=1.0, seed=1)), logits, 100)
    b = draws(Sampler(params(temperature=1.0, seed=2)), logits, 100)
    assert a != b
    assert sum(x != y for x, y in zip(a, b)) > 50


def test_no_seed_is_random():
    logits = torch.zeros(50)
    a = draws(Sampler(params(temperature=1.0)), logits, 100)
    b = draws(Sampler(params(temperature=1.0)), logits, 100)
    assert a != b


def test_draws_do_not_depend_on_other_samplers():
    # A per-request generator: interleaving another request's draws changes nothing.
    logits = torch.zeros(50)
    alone = draws(Sampler(params(temperature=1.0, seed=5)), logits, 50)
    s, other = Sampler(params(temperature=1.0, seed=5)), Sampler(params(temperature=1.0, seed=6))
    mixed = []
    for _ in range(50):
        other(logits)
        torch.rand(3)  # the global generator too
        mixed.append(s(logits))
    assert mixed == alone


@pytest.mark.parametrize("seed", range(10))
def test_tiny_top_p_is_argmax(seed):
    logits = random_logits(seed)
    s = Sampler(params(temperature=2.0, top_p=1e-6, seed=seed))
    assert set(draws(s, logits, 30)) == {int(torch.argmax(logits))}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log()
    s = Sampler(params(temperature=1.0, top_p=0.6, seed=0))
    got = draws(s, logits, 400)
    assert set(got) == {0, 1}  # 0.4 < 0.6, 0.4 + 0.3 >= 0.6
    s = Sampler(params(temperature=1.0, top_p=0.75, seed=0))
    assert set(draws(s, logits, 400)) == {0, 1, 2}


def test_frequencies_follow_the_softmax():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    s = Sampler(params(temperature=1.0, seed=42))
    n = 4000
    got = draws(s, probs.log(), n)
    for k, p in enumerate(probs.tolist()):
        assert abs(got.count(k) / n - p) < 0.03


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([2.0, 1.0, 0.0])
    n = 2000
    cold = draws(Sampler(params(temperature=0.25, seed=3)), logits, n).count(0) / n
    warm = draws(Sampler(params(temperature=1.0, seed=3)), logits, n).count(0) / n
    hot = draws(Sampler(params(temperature=2.0, seed=3)), logits, n).count(0) / n
    expected_warm = math.exp(2) / (math.exp(2) + math.exp(1) + 1)
    assert abs(warm - expected_warm) < 0.04
    assert cold > warm + 0.2 > hot + 0.2


def test_masked_tokens_are_never_drawn():
    logits = torch.full((20,), float("-inf"))
    logits[[3, 11]] = 0.0
    s = Sampler(params(temperature=1.0, seed=0))
    assert set(draws(s, logits, 100)) == {3, 11}

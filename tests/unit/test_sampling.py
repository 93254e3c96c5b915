"""backbone/sampling.py: greedy at temperature 0, seeded reproducibility, nucleus truncation."""

from __future__ import annotations

import math

import pytest
import torch

from backbone.sampling import GREEDY_BELOW, Sampler, sample_rows, seed64
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


@pytest.mark.parametrize("top_p", [1e-6, 1e-300])  # 1e-300 is 0 in float32
@pytest.mark.parametrize("seed", range(10))
def test_tiny_top_p_is_argmax(seed, top_p):
    logits = random_logits(seed)
    s = Sampler(params(temperature=2.0, top_p=top_p, seed=seed))
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


@pytest.mark.parametrize("temperature", [1e-6, 1e-12, 1e-30, 1e-45, 5e-324])
def test_temperatures_near_zero_are_greedy(temperature):
    # logits / 1e-45 overflows float32: softmax(inf - inf) is NaN and multinomial would raise.
    logits = random_logits(4) * 50
    s = Sampler(params(temperature=temperature, seed=1))
    assert draws(s, logits, 5) == [int(torch.argmax(logits))] * 5


def test_the_greedy_threshold_is_where_sampling_still_works():
    logits = random_logits(5) * 1000  # large logits: the hardest case for a small temperature
    assert GREEDY_BELOW <= 1e-5
    s = Sampler(params(temperature=GREEDY_BELOW, seed=1))
    assert not s.greedy
    assert draws(s, logits, 3) == [int(torch.argmax(logits))] * 3  # sampled, and finite


@pytest.mark.parametrize("seed", [0, 1, 2**63 - 1, 2**63, 2**64 - 1, -1, -(2**63)])
def test_every_64_bit_seed_works_and_both_spellings_agree(seed):
    signed = seed64(seed)
    assert -(2**63) <= signed < 2**63
    assert (signed - seed) % 2**64 == 0
    logits = torch.zeros(50)
    a = draws(Sampler(params(temperature=1.0, seed=seed)), logits, 30)
    b = draws(Sampler(params(temperature=1.0, seed=signed)), logits, 30)
    assert a == b


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_seeds_outside_64_bits_are_refused(seed):
    with pytest.raises(ValueError, match="64 bits"):
        seed64(seed)


def test_a_row_that_cannot_be_sampled_fails_alone():
    logits = torch.stack([random_logits(1), random_logits(2), random_logits(3), random_logits(4)])  # [4, V]
    logits[1, 7] = float("nan")
    logits[2, :] = float("-inf")  # no probability mass left at all
    samplers = [Sampler(params(temperature=t, seed=9)) for t in (0.0, 0.0, 1.0, 1.0)]
    out = sample_rows(samplers, logits)
    assert out[0] == int(torch.argmax(logits[0]))
    assert isinstance(out[1], str) and "non-finite" in out[1]
    assert isinstance(out[2], str)
    assert isinstance(out[3], int) and 0 <= out[3] < logits.shape[1]


@pytest.mark.parametrize("offset", [0, 1, 7, 50])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_sampler_resumed_at_draw_k_draws_what_the_original_drew_from_k(offset, top_p):
    """Request migration: a continuation's sampler starts at the number of tokens already streamed, and its draws
    are the undisturbed run's, whatever logits the original saw before."""
    logits = [random_logits(100 + i) for i in range(60)]
    original = Sampler(params(temperature=0.9, top_p=top_p, seed=31337))
    full = [original(row) for row in logits]
    resumed = Sampler(params(temperature=0.9, top_p=top_p, seed=31337), offset)
    assert [resumed(row) for row in logits[offset:]] == full[offset:]
    # The counter matters: a sampler that restarts at draw 0 on the same logits draws something else.
    restarted = Sampler(params(temperature=0.9, top_p=top_p, seed=31337))
    if offset:
        assert [restarted(row) for row in logits[offset:]] != full[offset:]


def test_no_two_seeds_draw_one_stream_shifted():
    """seed + (draw + 1) * GOLDEN made seed s + GOLDEN draw at k what seed s draws at k + 1 (an outside auditor's)."""
    from backbone.sampling import _GOLDEN, exponential_noise

    s = 12345
    shifted = torch.tensor([s + _GOLDEN]), torch.tensor([s])
    for k in range(4):
        a = exponential_noise(shifted[0], torch.tensor([k]), 64)
        b = exponential_noise(shifted[1], torch.tensor([k + 1]), 64)
        assert not torch.equal(a, b), k


def test_noise_is_a_pure_function_of_seed_draw_and_index_and_looks_exponential():
    from backbone.sampling import exponential_noise

    seeds = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63)], dtype=torch.int64)
    draws = torch.tensor([0, 0, 5, 7, 1_000_000], dtype=torch.int64)
    a = exponential_noise(seeds, draws, 4096)  # [5, 4096]
    assert torch.equal(a, exponential_noise(seeds, draws, 4096))
    assert torch.equal(a[2:3], exponential_noise(seeds[2:3], draws[2:3], 4096))  # a row's noise is its own
    assert not torch.equal(a[0], exponential_noise(seeds[:1], draws[:1] + 1, 4096)[0])  # the next draw differs
    assert bool(torch.isfinite(a).all()) and float(a.min()) > 0
    assert abs(float(a.mean()) - 1.0) < 0.02 and abs(float(a.var()) - 1.0) < 0.05  # Exp(1): mean 1, variance 1


def test_a_row_draws_the_same_alone_and_in_a_batch_of_eight():
    """Seeded sampling is batch-invariant: the token of a row depends on its own logits, seed and draw only."""
    from backbone.sampling import sample_batch

    logits = torch.stack([random_logits(200 + i, vocab=512) for i in range(8)])
    temperature = torch.tensor([0.7, 1.0, 0.0, 1.3, 0.9, 1.0, 0.5, 2.0])
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.8, 1.0, 0.5, 0.95, 1.0])
    seeds = torch.arange(8, dtype=torch.int64) * 7919 - 3
    for draw in range(20):
        draws = torch.full((8,), draw, dtype=torch.int64)
        together, status = sample_batch(logits, temperature, top_p, seeds, draws)
        assert status.eq(0).all()
        for i in range(8):
            alone, _ = sample_batch(logits[i : i + 1], temperature[i : i + 1], top_p[i : i + 1], seeds[i : i + 1],
                                    draws[i : i + 1])
            assert int(alone) == int(together[i])


def test_skipping_the_noise_or_the_sort_changes_no_token():
    """The host-side shortcuts (no sampled row: no noise; no truncating row: no sort) give what the full pass gives."""
    from backbone.sampling import sample_batch

    logits = torch.stack([random_logits(300 + i, vocab=256) for i in range(4)])
    seeds, draws = torch.arange(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)
    greedy_t, sampled_t = torch.zeros(4), torch.ones(4)
    full = sample_batch(logits, greedy_t, torch.full((4,), 0.5), seeds, draws)[0]
    assert torch.equal(sample_batch(logits, greedy_t, torch.full((4,), 0.5), seeds, draws, random=False)[0], full)
    full = sample_batch(logits, sampled_t, torch.ones(4), seeds, draws)[0]
    assert torch.equal(sample_batch(logits, sampled_t, torch.ones(4), seeds, draws, nucleus=False)[0], full)


def test_the_greedy_shortcut_tells_broken_and_fully_masked_rows_as_the_full_pass_does():
    """Greedy-only steps skip the softmax; a row's status still says NaN / +inf (1) and no mass left (2)."""
    from backbone.sampling import sample_batch

    logits = torch.stack([random_logits(400 + i, vocab=64) for i in range(5)])
    logits[1, 3] = float("nan")
    logits[2, 7] = float("inf")
    logits[3] = float("-inf")
    logits[4, :60] = float("-inf")  # masked but for four tokens: fine
    seeds, draws, zeros = torch.arange(5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64), torch.zeros(5)
    full = sample_batch(logits, zeros, torch.ones(5), seeds, draws)
    short = sample_batch(logits, zeros, torch.ones(5), seeds, draws, random=False, nucleus=False)
    assert full[1].tolist() == short[1].tolist() == [0, 1, 1, 2, 0]
    assert full[0][[0, 4]].tolist() == short[0][[0, 4]].tolist()


RACE_INTERPRETED = """
import torch
from backbone.sampling import race_check
print("differing rows", race_check(torch.device("cpu")))
"""


def test_the_fused_race_kernel_samples_what_the_torch_race_does_under_the_interpreter():
    """backbone/sampling.race_triton (CUDA's sampler for steps with no truncating row) on the CPU under Triton's
    interpreter, through the self-check a GPU runs at start-up: every row's token and status equal the torch race's
    (greedy and sampled rows, a greedy tie, NaN, +inf, every token masked, a temperature that overflows; a vocabulary
    over one block)."""
    import os
    import subprocess
    import sys

    from tests.unit.test_attention import INTERPRETER_PATCH, ROOT

    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_PATCH + RACE_INTERPRETED], cwd=ROOT, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("differing rows 0"), proc.stdout + proc.stderr[-3000:]

"""backbone/budget.py: the step budget learned from step times (``--max-step-ms``)."""

from __future__ import annotations

import pytest

from backbone.budget import StepBudget


def feed(budget: StepBudget, a_ms: float, b_ms: float, sizes) -> None:
    for n in sizes:
        budget.observe(n, (a_ms + b_ms * n) / 1e3)


def test_without_a_target_the_cap_is_the_budget():
    budget = StepBudget(256)
    feed(budget, 5, 1.0, [4, 200, 4, 100])
    assert budget.tokens(4) == 256 and budget.tokens(0) == 256


def test_a_step_without_decodes_takes_the_whole_cap():
    budget = StepBudget(256, target_ms=50)
    feed(budget, 5, 1.0, [4, 200, 4, 100])
    assert budget.tokens(0) == 256


def test_the_budget_fits_the_target_on_a_linear_cost():
    budget = StepBudget(2048, target_ms=50)
    feed(budget, 5, 0.5, [4, 4, 64, 4, 128, 4, 32] * 3)
    a, b = budget.cost()
    assert a == pytest.approx(5, abs=1e-6) and b == pytest.approx(0.5, abs=1e-9)
    assert budget.tokens(4) == 90  # (50 - 5) / 0.5
    assert budget.tokens(4) <= budget.max_tokens


def test_before_any_spread_the_cost_is_taken_as_proportional_which_errs_small():
    budget = StepBudget(2048, target_ms=50)
    assert budget.tokens(4) == 2048  # nothing seen yet: nothing to go on but the cap
    feed(budget, 5, 0.5, [4, 4, 4])  # decode-only steps: 7 ms for 4 positions
    assert budget.cost() == pytest.approx((0.0, 7 / 4))
    assert budget.tokens(4) == int(50 / (7 / 4))  # 28 < the 90 the true cost allows
    feed(budget, 5, 0.5, [28, 4, 28, 4])
    assert budget.tokens(4) == 90


def test_it_follows_a_change_of_cost():
    budget = StepBudget(2048, target_ms=50)
    feed(budget, 5, 0.5, [4, 64] * 20)
    assert budget.tokens(4) == 90
    feed(budget, 10, 1.0, [4, 64] * 60)  # e.g. the autoscaler took a thread away
    assert budget.tokens(4) == 40


def test_prefill_always_advances_and_the_cap_holds():
    budget = StepBudget(256, target_ms=5, min_chunk=16)
    feed(budget, 20, 1.0, [4, 64] * 10)  # a decode step alone already misses the target
    assert budget.tokens(8) == 8 + 16
    small = StepBudget(20, target_ms=5, min_chunk=16)
    feed(small, 20, 1.0, [4, 16] * 10)
    assert small.tokens(8) == 20  # never past the cap (it sizes the activations)
    fast = StepBudget(256, target_ms=1000)
    feed(fast, 1, 0.01, [4, 64] * 10)
    assert fast.tokens(4) == 256


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_a_bad_target_is_refused(bad):
    with pytest.raises(ValueError):
        StepBudget(256, target_ms=bad)

"""gateway/tiers.py ``Generation.take``: tokens are taken by position, so events repeated after a Redis hiccup or
overlapping across a migration give each token once, and a gap (lost events) is noticed."""

from __future__ import annotations

import asyncio

from gateway.tiers import Generation
from router import messages as m


def ev(tokens: list[int], total: int, **kw) -> m.TokenEvent:
    return m.TokenEvent(request_id="r", token_ids=tokens, prompt_tokens=3, completion_tokens=total, **kw)


def gen() -> Generation:
    plan = m.PromptPlan(request_id="r", reply_to="s", token_ids=[1, 2, 3], deadline=0.0,
                        sampling=m.SamplingParams(max_tokens=10))
    return Generation(plan, asyncio.Queue())


def test_new_tokens_in_order():
    g = gen()
    assert g.take(ev([5], 1)) == [5]
    assert g.take(ev([6, 7], 3)) == [6, 7]
    assert g.tokens == [5, 6, 7]


def test_a_repeated_event_gives_nothing_and_an_overlapping_one_only_the_rest():
    g = gen()
    g.take(ev([5, 6], 2))
    assert g.take(ev([5, 6], 2)) == []  # sent again after a round trip that timed out but had landed
    assert g.take(ev([5, 6, 7, 8], 4)) == [7, 8]  # the retry carried the tokens made since
    assert g.tokens == [5, 6, 7, 8]


def test_a_gap_is_reported_and_takes_nothing():
    g = gen()
    g.take(ev([5], 1))
    assert g.take(ev([9], 3)) is None  # token 2 of 3 never arrived
    assert g.tokens == [5]


def test_an_error_event_without_tokens_takes_nothing():
    g = gen()
    g.take(ev([5, 6], 2))
    assert g.take(ev([], 2, finish=m.FinishReason.ERROR, code=m.ErrorCode.WORKER_LOST)) == []

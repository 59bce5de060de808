"""Lossless rows planned to their end, the batch's longest answer, and optimistic acceptance estimates
(looser where the slot profile extrapolates).

``lossless_finish_values`` is checked against the plain recursion it vectorises and against the cases whose
answer is known (perfect masks finish any answer in two forwards, useless ones never pay); the choice it
drives through ``Lookahead``; ``LengthStats.remaining_max`` against its definition; ``SlotStats.rates``
against the bounds it promises. Decoding on a real checkpoint stays greedy AR's (``test_decoding*.py``
property-test that for every lookahead choice; here once more with the finish plan in force).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from card.checkpoint import load_checkpoint
from card.eval.decoding import decode, decode_ar
from card.eval.decoding.planner import (
    EXTRAPOLATED_STRENGTH,
    LENGTH_PRIOR,
    PRIOR_STRENGTH,
    LengthStats,
    Lookahead,
    SlotStats,
    accepted_curve,
    lossless_finish_cost,
    lossless_finish_values,
    prior_and_strengths,
    survival,
)

pytestmark = pytest.mark.usefixtures("one_thread", "private_cost_cache")


def recursion(surv, cost, k):
    """V(r, d) straight from its definition (memoised), the reference for the vectorised tables."""
    @functools.lru_cache(None)
    def v(r, d):
        if r <= 0:
            return 0.0
        d = min(d, r - 1)
        best = float("inf")
        for m in range(k + 1):
            total = cost[1 + d + m] + sum((surv[x] - surv[x + 1]) * v(r - 1 - x, 0) for x in range(d))
            best = min(best, total + surv[d] * v(r - 1 - d, m))
        return best

    return v


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 14), st.data())
def test_lossless_finish_values_equal_the_recursion(k, horizon, data):
    rates = data.draw(st.lists(st.floats(0.0, 1.0), min_size=k, max_size=k))
    steps = data.draw(st.lists(st.floats(0.0, 1.0), min_size=2 * k + 2, max_size=2 * k + 2))
    cost = list(np.cumsum([1.0] + steps[1:]))  # c(B, q) grows with q
    surv = survival(accepted_curve(rates), k)
    values, base = lossless_finish_values(surv, cost, horizon)
    v = recursion(surv, cost, k)
    for r in range(horizon + 1):
        for d in range(k + 1):
            assert values[r, d] == pytest.approx(v(r, d), rel=1e-9, abs=1e-12)
    # the choice's cost function reproduces the table at every state within the horizon
    for r in range(1, horizon + 1):
        for d in range(min(k, r - 1) + 1):
            now = np.array([cost[1 + d + m] for m in range(k + 1)])
            q = lossless_finish_cost(values, base, surv, now, d, [(r, 1.0)])
            assert min(q) == pytest.approx(values[r, d], rel=1e-9, abs=1e-12)
            # one length takes a Python path; it must agree to the bit with the vector one (the choice's
            # ties break the same way): a second length of weight 0 adds exact zeros there
            for w in (1.0, 0.3):
                one = lossless_finish_cost(values, base, surv, now, d, [(r, w)])
                two = lossless_finish_cost(values, base, surv, now, d, [(r, w), (horizon, 0.0)])
                assert list(one) == two.tolist()


def test_perfect_masks_finish_any_answer_in_two_forwards_and_useless_ones_never_pay():
    k, horizon = 16, 34
    cost = [1.0 + 0.03 * q for q in range(2 * k + 2)]
    values, _ = lossless_finish_values([1.0] * (k + 1), cost, horizon)
    for r in range(2, k + 3):  # forward 1: the AR token and r - 2 masks; forward 2: verify them, + AR token
        assert values[r, 0] == pytest.approx(cost[1 + r - 2] + cost[1 + r - 2])
    values, _ = lossless_finish_values([1.0] + [0.0] * k, cost, horizon)
    assert values[:, 0] == pytest.approx([r * cost[1] for r in range(horizon + 1)])  # plain AR


def test_lookahead_plans_lossless_rows_to_their_end():
    cost = lambda batch, q: 1.0 + 0.03 * q  # noqa: E731
    good = Lookahead("lossless", 16, True, cost, SlotStats([1.0] * 16))
    # a 12-token answer from the prompt: 10 masks now, so the next forward verifies 10 drafts and ends it
    assert good.masks(1, 10, [(12, 1.0)], 0) == 10
    # holding 10 drafts with 11 tokens left: verifying them ends the answer, masks would be wasted
    assert good.masks(1, 11, [(11, 1.0)], 10) == 0
    useless = Lookahead("lossless", 16, True, cost, SlotStats([0.0] * 16, strength=1e6))
    assert all(useless.masks(1, 1, [(r, 1.0)], 0) == 0 for r in range(1, 30))


def test_the_slowest_of_a_batch_is_the_longest_answer():
    lengths = LengthStats()
    for n in (5, 6, 7, 8, 9, 10, 11, 12):
        lengths.observe(n)
    assert lengths.remaining_max([(0, 16)]) == lengths.remaining(0, 16)
    one = dict(lengths.remaining(0, 16, prior=0.0))
    batch = dict(lengths.remaining_max([(0, 16)] * 32))
    assert sum(batch.values()) == pytest.approx(1.0)
    # the prior's "runs to its budget" enters once for the batch, not once per row
    share = LENGTH_PRIOR / (LENGTH_PRIOR + sum(lengths.weights.values()))
    assert batch[16] == pytest.approx(share)
    cdf = lambda d, v: sum(p for r, p in d.items() if r <= v)  # noqa: E731
    for v in range(5, 13):  # max of 32 independent rows, the prior aside
        assert cdf(batch, v) == pytest.approx((1 - share) * cdf(one, v) ** 32, abs=1e-6)
    # rows further along have fewer tokens left
    mixed = dict(lengths.remaining_max([(0, 16), (4, 12)]))
    assert sum(mixed.values()) == pytest.approx(1.0) and max(mixed) == 16


@given(st.lists(st.integers(1, 20), min_size=1, max_size=12), st.integers(1, 8), st.integers(0, 5))
def test_the_longest_answer_is_never_shorter_than_one(answers, rows, done):
    lengths = LengthStats()
    for n in answers:
        lengths.observe(n)
    one = lengths.remaining(done, 20)
    batch = lengths.remaining_max([(done, 20)] * rows)
    assert sum(p for _, p in batch) == pytest.approx(1.0)
    for v in range(1, 21):  # P(max > v) >= P(one row > v)
        assert sum(p for r, p in batch if r > v) >= sum(p for r, p in one if r > v) - 1e-9


def test_estimates_are_read_optimistically_until_tried():
    stats = SlotStats([0.84] * 4)
    assert all(a > 0.84 for a in stats.rates())  # untried: the upper end of what the prior allows
    assert all(a <= 1.0 for a in stats.rates())
    for _ in range(200):
        stats.observe(4, 1)  # slot 1 always passes, slot 2 always fails, slots 3-4 never reached
        stats.forget()
    rates, means = stats.rates(), stats.means()
    assert means[1] < 0.1 and rates[1] - means[1] < 0.05  # tried often: the bound is tight
    assert means[0] <= rates[0] and rates[0] > 0.98 and rates[2] > 0.84  # never reached: still optimistic
    assert rates[1] - means[1] < (rates[2] - means[2]) / 10  # the bonus fades as 1 / tries


def test_table_is_kept_while_the_estimates_stay_put():
    stats = SlotStats([0.9] * 4)
    made = []
    make = lambda: made.append(1) or len(made)  # noqa: E731
    for _ in range(40):
        stats.memo("t", make)
        stats.observe(4, 4)  # every slot passes, as the rates (already at their bound of 1) say
        stats.forget()
    first = len(made)
    for _ in range(40):
        stats.memo("t", make)
        stats.observe(4, 0)  # now slot 1 fails every time: the estimates move, the table is made again
        stats.forget()
    assert first <= 3 and len(made) > first


@pytest.fixture(scope="module")
def stories(stories_card):
    return load_checkpoint(stories_card, dtype="float32", require_card=True)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_lossless_with_finish_plans_is_greedy_ar(stories, batch_size):
    prompts = ["Once upon a time", "Lily and Tom went to the park. They", "The cat sat on"]
    ar = decode_ar(stories.model, stories.tokenizer, prompts, max_new_tokens=24, stop_strings=["."])
    out = decode("lossless", stories.model, stories.tokenizer, prompts, max_new_tokens=24, stop_strings=["."],
                 batch_size=batch_size)
    assert [r.token_ids for r in out] == [r.token_ids for r in ar]


def test_extrapolated_slots_carry_a_weaker_prior():
    profile = {"bucket_edges": [0], "slots": 5, "accuracy": [[0.9], [0.6], [0.4], [0.5], [0.4]],
               "count": [[200], [150], [100], [3], [1]]}  # slots 4 and 5 measured too rarely to believe
    card = {"slot_profile": profile, "adaptation": [{}]}
    prior, source, strengths = prior_and_strengths(card, 4)
    assert source == "profile" and strengths.count(PRIOR_STRENGTH) == 2  # two slots measured
    assert strengths == [PRIOR_STRENGTH, PRIOR_STRENGTH, EXTRAPOLATED_STRENGTH, EXTRAPOLATED_STRENGTH]
    loose, firm = SlotStats(prior, strength=strengths).rates(), SlotStats(prior).rates()
    assert loose[:2] == pytest.approx(firm[:2]) and all(a > b for a, b in zip(loose[2:], firm[2:]))
    # defaults that are not measurements keep the usual weight
    assert prior_and_strengths({"adaptation": [{}]}, 3)[2] == [PRIOR_STRENGTH] * 3
    assert prior_and_strengths({}, 3)[2] == [PRIOR_STRENGTH] * 3

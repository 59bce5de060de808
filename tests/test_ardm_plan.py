"""The ARDM dynamic program (card.ardm.plan): optimal against brute force, exact step counts, monotone
boundaries, and ARDM-style smoothing."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from card.ardm.plan import (band_costs, dp_tables, fill_missing, min_steps, plan_boundaries, plan_groups, policy_cost,
                            smooth_losses, steps_for_budget)
from card.errors import CardError


def compositions(T, parts, most):
    """Every way to write T as an ordered sum of ``parts`` integers in 1..most."""
    for cut in itertools.combinations(range(1, T), parts - 1):
        b = (0, *cut, T)
        if all(1 <= y - x <= most for x, y in zip(b, b[1:])):
            yield list(b)


@st.composite
def band(draw):
    T = draw(st.integers(1, 9))
    slots = draw(st.integers(1, 4))
    L = np.array(draw(st.lists(st.lists(st.integers(0, 50), min_size=T + 2, max_size=T + 2),
                               min_size=slots, max_size=slots)), dtype=np.int64)
    steps = draw(st.integers(min_steps(T, slots), T))
    return band_costs(L, T, start=1), steps


@settings(max_examples=300, deadline=None)
@given(band())
def test_dp_is_optimal_against_brute_force(case):
    C, steps = case
    T, slots = C.shape[0], C.shape[1] - 1
    b = plan_boundaries(C, steps)
    best = min(policy_cost(C, p) for p in compositions(T, steps, slots))
    assert policy_cost(C, b) == best
    cost, _ = dp_tables(C, steps)
    assert cost[steps, T] == best


@settings(max_examples=200, deadline=None)
@given(band())
def test_boundaries_are_increasing_with_exact_steps(case):
    C, steps = case
    T, slots = C.shape[0], C.shape[1] - 1
    b = plan_boundaries(C, steps)
    assert b[0] == 0 and b[-1] == T and len(b) == steps + 1
    assert all(1 <= y - x <= slots for x, y in zip(b, b[1:]))


def test_infeasible_steps_are_one_line_errors():
    C = band_costs(np.ones((2, 8), np.int64), 6)
    with pytest.raises(CardError, match="between 3 and 6 forwards"):
        plan_boundaries(C, 2)
    with pytest.raises(CardError, match="budget must be in"):
        steps_for_budget(6, 0, 2)


@given(st.integers(0, 300), st.floats(0.01, 1.0), st.integers(1, 9))
def test_steps_for_budget_in_range(T, F, slots):
    n = steps_for_budget(T, F, slots)
    assert min_steps(T, slots) <= n <= T
    assert n == T or n == min_steps(T, slots) or n == int(np.ceil(F * T - 1e-9))


losses = st.lists(st.lists(st.one_of(st.none(), st.floats(0, 20)), min_size=4, max_size=4), min_size=1, max_size=5)


@given(losses.filter(lambda rows: any(v is not None for v in rows[0])))
def test_smoothing_is_sorted_both_ways(rows):
    x = smooth_losses(rows)
    assert x.shape == (len(rows), 4)
    assert np.all(np.diff(x, axis=1) <= 1e-12) and np.all(np.diff(x, axis=0) >= -1e-12)


def test_fill_missing_takes_the_nearest_bucket():
    assert fill_missing([[None, 2.0, None, None, 5.0]]).tolist() == [[2.0, 2.0, 2.0, 5.0, 5.0]]


def _profile(slot_bits, edges=(0, 4)):
    return {"format": 1, "measured_by": "test", "tokens": 0, "bucket_edges": list(edges), "slots": len(slot_bits),
            "loss_bits": [[b] * len(edges) for b in slot_bits], "accuracy": [[0.0] * len(edges) for _ in slot_bits],
            "count": [[1] * len(edges) for _ in slot_bits]}


@given(st.integers(1, 60), st.sampled_from([1.0, 0.5, 0.33, 0.25, 0.1]))
def test_plan_groups_commit_every_token_within_budget(T, F):
    p = _profile([1.0, 3.0, 4.0, 4.5])
    g = plan_groups(p, T, F)
    assert sum(g) == T and all(1 <= x <= 4 for x in g)
    assert len(g) == steps_for_budget(T, F, 4)


def test_plan_prefers_parallel_steps_where_they_are_cheap():
    # slot 2 is nearly free at long prefixes (bucket 1), costly at short ones (bucket 0)
    p = _profile([1.0, 9.0], edges=(0, 8))
    p["loss_bits"][1] = [9.0, 1.5]
    g = plan_groups(p, 16, 0.75, window=1)
    assert sum(g) == 16 and len(g) == 12
    assert g[:7] == [1] * 7 and g.count(2) == 4  # pairs only once the prefix (BOS + committed) reaches 8

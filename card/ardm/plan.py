"""ARDM's dynamic program (Hoogeboom et al. 2022, arXiv 2110.02037), in the band form a CARD model needs.

A CARD forward at prefix length s commits k tokens at once: slot 1 (exact AR) plus slots 2..k from masks
1..k-1. With l_j(s) the mean loss in bits of slot j at prefix s (the checkpoint's ``slot_profile``), the
expected cost of that forward is

    C_s(k) = sum_{j=1..k} l_j(s),            1 <= k <= K+1.

Coding T tokens after a start prefix p (p = 1: just the BOS) with exactly n forwards is ARDM's DP over the
committed count t = 0..T with the band ``nelbo[s, t] = C_{p+s}(t - s)`` for ``1 <= t - s <= K+1``:

    cost[0, 0] = 0,   cost[0, t > 0] = inf
    cost[k, t] = min_{s: 1 <= t-s <= K+1} cost[k-1, s] + nelbo[s, t]

and the policy is the argmin walked back from t = T for n steps: boundaries 0 = t_0 < t_1 < ... < t_n = T,
group i of size t_i - t_{i-1}. Costs are integers (micro-bits) so the plan is the same on every machine;
ties go to the smallest s, so the plan is a pure function of (profile, T, n, p).

The loss estimates are smoothed before planning, as ARDM's code does with its per-step estimates: a
moving average (here along the prefix-bucket axis) and a sort, so that the DP cannot exploit noise: more
context never costs more (non-increasing in s) and a slot further ahead never costs less than a nearer one
(non-decreasing in j).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from card.errors import CardError

MICRO = 1_000_000  # costs in micro-bits: exact integer DP


# ------------------------------------------------------------------------------------------- smoothing
def fill_missing(values: Sequence[Sequence[float | None]]) -> np.ndarray:
    """(slots, buckets) with each empty bucket (None) taken from the nearest measured bucket of the same slot
    (ties: the shorter prefix); a slot with no measurement at all takes the slot before it."""
    rows = []
    for j, row in enumerate(values):
        known = [i for i, v in enumerate(row) if v is not None]
        if not known:
            if not rows:
                raise CardError("slot_profile has no measurement for slot 1")
            rows.append(rows[-1].copy())
            continue
        rows.append(np.array([row[min(known, key=lambda k: (abs(k - i), k))] for i in range(len(row))], float))
    return np.stack(rows)


def moving_average(x: np.ndarray, window: int = 3) -> np.ndarray:
    """Centred moving average along the last axis, edges padded with the edge value:
    y[i] = mean(x[i - h .. i + h]), h = window // 2."""
    h = window // 2
    if h == 0 or x.shape[-1] == 1:
        return x.astype(float)
    padded = np.concatenate([np.repeat(x[..., :1], h, -1), x, np.repeat(x[..., -1:], h, -1)], axis=-1)
    kernel = np.ones(2 * h + 1) / (2 * h + 1)
    return np.stack([np.convolve(r, kernel, mode="valid") for r in padded.reshape(-1, padded.shape[-1])]).reshape(x.shape)


def smooth_losses(loss_bits: Sequence[Sequence[float | None]], window: int = 3) -> np.ndarray:
    """ARDM-style smoothing of l[j, b]: fill empty buckets, moving average over buckets, then sort each slot's
    curve non-increasing over buckets and each bucket's column non-decreasing over slots."""
    x = moving_average(fill_missing(loss_bits), window)
    x = -np.sort(-x, axis=1)  # more context: never more bits
    return np.sort(x, axis=0)  # further ahead: never fewer bits


def slot_loss_table(profile: dict[str, Any], max_prefix: int, window: int = 3) -> np.ndarray:
    """L[j, s] = smoothed l_{j+1}(s) in integer micro-bits for s = 0..max_prefix (shape (slots, max_prefix+1))."""
    from card.profile import bucket_index, check_profile

    check_profile(profile)
    smooth = smooth_losses(profile["loss_bits"], window)
    buckets = bucket_index(np.arange(max_prefix + 1), profile["bucket_edges"])
    return np.rint(smooth[:, buckets] * MICRO).astype(np.int64)


# ------------------------------------------------------------------------------------------------ the DP
def band_costs(L: np.ndarray, T: int, start: int = 1) -> np.ndarray:
    """C[s, k] = sum_{j<k} L[j, start+s] for s = 0..T-1, k = 0..K+1 (C[:, 0] = 0): the cost of committing
    k tokens at once when s tokens are already committed after a ``start``-token prefix."""
    cols = L[:, start:start + T]  # (slots, T)
    return np.concatenate([np.zeros((T, 1), np.int64), np.cumsum(cols.T, axis=1)], axis=1)


def min_steps(T: int, slots: int) -> int:
    return -(-T // slots) if T else 0


def dp_tables(C: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """ARDM's cost and argmin tables for k = 0..steps over t = 0..T:
    ``cost[k, t] = min_{1 <= g <= K+1, g <= t} cost[k-1, t-g] + C[t-g, g]``, ``arg[k, t]`` = the best t-g."""
    T, slots = C.shape[0], C.shape[1] - 1
    INF = np.iinfo(np.int64).max // 4
    cost = np.full((steps + 1, T + 1), INF, np.int64)
    arg = np.full((steps + 1, T + 1), -1, np.int64)
    cost[0, 0] = 0
    t = np.arange(T + 1)
    for k in range(1, steps + 1):
        best = np.full(T + 1, INF, np.int64)
        best_s = np.full(T + 1, -1, np.int64)
        # iterate g from large to small so that, on equal cost, the smaller s = t - g wins
        for g in range(min(slots, T), 0, -1):
            s = t[g:] - g
            cand = np.minimum(cost[k - 1, s] + C[s, g], INF)
            better = cand <= best[g:]
            best[g:] = np.where(better, cand, best[g:])
            best_s[g:] = np.where(better, s, best_s[g:])
        cost[k], arg[k] = best, best_s
    return cost, arg


def plan_boundaries(C: np.ndarray, steps: int) -> list[int]:
    """The optimal boundaries 0 = t_0 < ... < t_steps = T for exactly ``steps`` forwards (ARDM's walk-back)."""
    T, slots = C.shape[0], C.shape[1] - 1
    if T == 0:
        if steps:
            raise CardError("zero tokens need zero forwards")
        return [0]
    if not min_steps(T, slots) <= steps <= T:
        raise CardError(f"{T} tokens need between {min_steps(T, slots)} and {T} forwards with {slots} slots, not {steps}")
    _, arg = dp_tables(C, steps)
    path, t = [T], T
    for k in range(steps, 0, -1):
        t = int(arg[k, t])
        path.append(t)
    return path[::-1]


def policy_cost(C: np.ndarray, boundaries: Sequence[int]) -> int:
    """The cost of a fixed policy: sum_i C[t_{i-1}, t_i - t_{i-1}] (ARDM's ``compute_cost_with_policy``)."""
    return int(sum(C[a, b - a] for a, b in zip(boundaries, boundaries[1:])))


def steps_for_budget(T: int, budget: float, slots: int) -> int:
    """Forwards for T tokens at ``budget`` forwards per token: ceil(budget * T), within [ceil(T/slots), T]."""
    if not 0 < budget <= 1:
        raise CardError(f"budget must be in (0, 1] forwards per token, got {budget}")
    want = math.ceil(round(budget * T, 9))
    return min(T, max(min_steps(T, slots), want))


def plan_groups(profile: dict[str, Any], T: int, budget: float, start: int = 1, window: int = 3) -> list[int]:
    """Group sizes (tokens per forward, each 1..slots, summing to T) for T tokens after a ``start``-token prefix
    at ``budget`` forwards per token, optimal under the smoothed profile. ``budget`` 1 is exact AR."""
    slots = int(profile["slots"])
    steps = steps_for_budget(T, budget, slots)
    if steps == T:
        return [1] * T
    C = band_costs(slot_loss_table(profile, start + T, window), T, start)
    b = plan_boundaries(C, steps)
    return [y - x for x, y in zip(b, b[1:])]

"""Cost-aware lookahead: how many masks (and drafts) each forward carries, from acceptance estimates and c(B, q).

Notation: a_j is the probability that lookahead slot j (mask j, or draft j) is accepted given that slots
1..j-1 were, and A(m) = sum_{j=1..m} prod_{i<=j} a_i is the expected number of accepted slots out of m.
Every forward commits slot 1 (the exact AR token) plus the accepted slots.

* parallel: a forward over the pending tokens (about 1 + A(m): what the previous forward committed) plus m
  masks commits 1 + A(m) tokens, so the rate is  r(m) = (1 + A(m)) / c(B, 1 + A(m) + m).
* lossless with mask drafts: a row either holds m drafts from the previous forward's masks (state D) or none
  (state N, after a rejection). From D it verifies them (width 1 + 2m) and stays in D with probability
  s = prod_{i<=m} a_i; from N (width 1 + m) it always moves to D. The stationary shares are
  pi_D = 1 / (2 - s), pi_N = 1 - pi_D, a row commits pi_D (1 + A(m)) + pi_N tokens per forward, and a batch
  of B rows is wide (1 + 2m) unless all rows are in N:  r(m) = B [pi_D (1 + A(m)) + pi_N] /
  [(1 - pi_N^B) c(B, 1 + 2m) + pi_N^B c(B, 1 + m)].

Near the end of an answer a parallel row is planned to its end instead (``forwards_to_finish``,
``finish_costs``): with 9 tokens left, 8 good masks finish in one forward and 7 need two, which the
stationary rate barely tells apart. A lossless row is planned to its end too, by a dynamic programme over
(tokens left, mask drafts held) (``lossless_finish_values``): a copy answer of 12 tokens takes two forwards
(the first writes 10 mask guesses, the second verifies them) where the stationary choice of 6 masks takes
three. The remaining length comes from the answers that already ended (``LengthStats``).

m = 0 is plain AR, r(0) = 1 / c(B, 1), so the chosen m = argmax r(m) is never predicted slower than AR; a
lookahead must promise ``MARGIN`` (10%) more than AR, since c(B, q) times the model only and a lookahead
forward costs the loop some Python time besides (drafts, verification, cache bookkeeping).

Estimates start from a prior the checkpoint carries (``prior_and_strengths``) and follow the observed acceptances
(``SlotStats``: Beta-style pseudo-counts, exponentially forgotten so that they track the text). A slot that
is never tried cannot be learnt, so ``Lookahead`` spends at most ``EXPLORE`` of the measured forward time
on trying the whole block where the estimates ask for fewer: a good model whose prior said "untrained" is
discovered, and so are deep slots whose prior is too low.
That share shrinks as the explored slot keeps failing (``explore_weight``), so a model whose masks are
confirmed useless pays almost nothing for the search.
"""

from __future__ import annotations

import math
import sys
import weakref
from typing import Callable, Sequence

import numpy as np

PRIOR_STRENGTH = 4.0  # pseudo-observations behind the prior
EXTRAPOLATED_STRENGTH = 1.0  # ... behind a slot the profile did not measure (``prior_and_strengths``)
OPTIMISM = 1.0  # plans read an untried a_j this many prior standard deviations high (``SlotStats.rates``)
DECAY = 0.98  # per observation: about the last 50 observations count
EXPLORE = 0.02  # at most this share of the forward time is spent exploring a deeper slot
EXPLORE_PATIENCE = 8.0  # failures of the explored slot that halve the exploration share
ADAPTED_PRIOR = 0.6  # an adapted checkpoint without a measured slot profile
UNTRAINED_PRIOR = 0.02  # a converted, never adapted checkpoint: its masks predict almost nothing
# Prompt lookup's prior a_j (a draft slot accepted given the ones before) for 1-, 2- and 3-gram matches, and
# for a lookup on a prompt's first forward, whose n-gram is the prompt's end: a template boundary ("Answer:",
# "assistant\n") whose earlier matches are followed by another part of the template. The medians over five
# texts and three models of fixed 8-token lookups (``benchmarks.lookup_prior``: 0.44, 0.69, 0.86; none of
# 16 prompt-end lookups was accepted, and 0.1 leaves that estimate room to learn).
LOOKUP_PRIOR = (0.45, 0.7, 0.85)
PROMPT_END_PRIOR = 0.1
LOOKUP_PRIOR_STRENGTH = 2.0
PROFILE_MIN_COUNT = 20  # slot measurements below which the profile's accuracy is too noisy to start from
MARGIN = 1.1  # lookahead must promise 10% over AR: c(B, q) leaves out the loop's own Python cost per forward
LENGTH_PRIOR = 1.0  # pseudo-answers that run to their budget (``LengthStats``)
UNBOUNDED = 1 << 30  # the length recorded for an answer its budget cut: longer than any budget
HORIZON = 2  # a row within HORIZON full blocks of its end is planned to its end (``finish_costs``)
# Re-plan after this many observations (``Lookahead.best``) or forwards with observations (``SlotStats.memo``):
# the estimates move slowly and planning costs Python time.
REPLAN = 4
REPLAN_DRIFT = 0.01  # ... and only once some a_j moved by more than this since the tables were made
PRICED_MAX = 4096  # cost vectors kept per cost model (keyed by batch and prompt width: a long run sees many)
SHARED_MAX = 256  # plans to the end kept for fresh estimates of the same prior (``shared``)


# ------------------------------------------------------------------------------------------ math
def accepted_curve(rates: Sequence[float]) -> list[float]:
    """A(m) for m = 0..len(rates): A(m) = sum_{j=1..m} prod_{i<=j} a_i (expected accepted slots of m)."""
    out, run, total = [0.0], 1.0, 0.0
    for a in rates:
        run *= a
        total += run
        out.append(total)
    return out


def parallel_rate(curve: Sequence[float], m: int, cost: Callable[[float], float]) -> float:
    """Committed tokens per second with m masks: r(m) = (1 + A(m)) / c(1 + A(m) + m), c = c(B, .)."""
    tokens = 1.0 + curve[m]
    return tokens / cost(tokens + m)


def lossless_rate(rates: Sequence[float], m: int, batch: int, cost: Callable[[float], float]) -> float:
    """Tokens per second of a batch of ``batch`` rows drafting from m masks (the stationary two-state model)."""
    if m == 0:
        return batch / cost(1)
    s = 1.0
    for a in rates[:m]:
        s *= a
    curve = accepted_curve(rates[:m])
    pi_d = 1.0 / (2.0 - s)
    pi_n = 1.0 - pi_d
    narrow = pi_n ** batch
    tokens = batch * (pi_d * (1.0 + curve[m]) + pi_n)
    return tokens / ((1.0 - narrow) * cost(1 + 2 * m) + narrow * cost(1 + m))


def survival(curve: Sequence[float], length: int) -> list[float]:
    """S(j) = P(at least j of ``length`` offered slots accepted) = prod_{i<=j} a_i = A(j) - A(j-1), S(0) = 1."""
    out = [1.0]
    for j in range(1, length + 1):
        out.append(max(0.0, curve[j] - curve[j - 1]) if j < len(curve) else 0.0)
    return out


def critical_gain(remaining: Sequence[int], survivals: Sequence[Sequence[float]]) -> float:
    """Expected drop of the batch's largest remaining budget in one forward: R_max - E[max_r Y_r].

    A static batch runs until its slowest row is done, so what a forward buys is progress on the row(s)
    with the most tokens left. Row r commits 1 + X_r tokens (the AR token and X_r accepted drafts, with
    P(X_r >= j) = S_r(j), the row's ``survivals``), leaving Y_r = max(0, R_r - 1 - X_r). With rows
    independent, P(max_r Y_r <= v) = prod_r S_r(R_r - 1 - v) (S_r(j) = 1 for j <= 0, 0 past its drafts), and
    E[max] = sum_{v >= 0} P(max > v). Without drafts the gain is exactly 1; for one row it is 1 + A(d).
    """
    top = max(remaining)
    lo = max(0, top - 1 - max(len(s) - 1 for s in survivals))  # below lo some row is surely still above

    def s_at(s: Sequence[float], j: int) -> float:
        return 1.0 if j <= 0 else (s[j] if j < len(s) else 0.0)

    expected_max = float(lo)
    for v in range(lo, top):
        below = 1.0
        for r, s in zip(remaining, survivals):
            below *= s_at(s, r - 1 - v)
        expected_max += 1.0 - below
    return top - expected_max


def commit_distribution(curve: Sequence[float], m: int) -> list[float]:
    """P(a parallel forward with m masks commits x tokens), x = 1..m+1: p(x) = S(x-1) - S(x), p(m+1) = S(m)."""
    s = survival(curve, m)
    return [s[x - 1] - s[x] for x in range(1, m + 1)] + [s[m]]


def forwards_to_finish(probs: Sequence[float], horizon: int) -> list[float]:
    """N(r), r = 0..horizon: expected forwards to commit r more tokens, each forward committing x w.p. probs[x-1].

    N(r) = 1 + sum_x p(x) N(max(0, r - x)),  N(0) = 0.  One token per forward (AR) gives N(r) = r; always
    committing k gives ceil(r / k). A row that is about to end is where this differs from r / E[x]: 9 tokens
    left are one forward with 8 good masks and two with 7.
    """
    n = [0.0] * (horizon + 1)
    for r in range(1, horizon + 1):
        n[r] = 1.0 + sum(p * n[max(0, r - x)] for x, p in enumerate(probs, 1))
    return n


def finish_tables(curve: Sequence[float], k_max: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """``forwards_to_finish(commit_distribution(curve, m), horizon)`` for every m = 0..k_max at once, and 1 + A(m).

    Row m of the first array is N_m(r), r = 0..horizon. The recurrence runs over r with all m side by side
    (P[m, x-1] = p_m(x) from ``commit_distribution``, zero past x = m + 1), so the planner rebuilds its
    tables in a fraction of a millisecond; N(max(0, r - x)) = 0 for x >= r, so only x < r contributes.
    """
    probs = np.zeros((k_max + 1, k_max + 1))
    for m in range(k_max + 1):
        probs[m, :m + 1] = commit_distribution(curve, m)
    n = np.zeros((k_max + 1, horizon + 1))
    for r in range(1, horizon + 1):
        k = min(r - 1, k_max + 1)
        n[:, r] = 1.0 + (probs[:, :k] * n[:, r - k:r][:, ::-1]).sum(1) if k else 1.0
    return n, 1.0 + np.asarray(curve[:k_max + 1], dtype=float)


def finish_costs(forwards: np.ndarray, tokens: np.ndarray, remaining: Sequence[tuple[int, float]],
                 first: np.ndarray, later: np.ndarray) -> Sequence[float]:
    """Expected seconds to finish a row, for every mask count m at once:

        T(m) = sum_R P(R) [first(m) + (N_m(R) - 1) later(m)] = first(m) + (E_R[N_m(R)] - 1) later(m).

    Row m of ``forwards`` is N_m(r) up to a horizon H, extended past it as N_m(H) + (r - H) / ``tokens[m]``
    (the stationary rate, ``tokens[m]`` = 1 + A(m)); ``first[m]``: this forward's cost (it re-feeds what is
    pending, a whole prompt at the start); ``later[m]``: a steady-state forward's.
    """
    h = forwards.shape[1] - 1
    if len(remaining) == 1:  # one length (none ended yet): the same sums in Python, a few us and not ~90 cold
        (n, pr), = remaining
        past = float(max(n - h, 0) * pr)
        return [a + (f * pr + past / t - 1.0) * b for a, f, t, b in
                zip(first.tolist(), forwards[:, min(n, h)].tolist(), tokens.tolist(), later.tolist())]
    r = np.array([n for n, _ in remaining])
    w = np.array([p for _, p in remaining])
    expected = forwards[:, np.minimum(r, h)] @ w + float(np.maximum(r - h, 0) @ w) / tokens
    return first + (expected - 1.0) * later


def lossless_finish_values(surv: Sequence[float], cost: Sequence[float], horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """V(r, d): expected seconds for a lossless row to commit r more tokens when it holds d mask drafts.

        V(r, d) = min_m [ c(1 + d + m) + sum_{x<d} p(x) V(r-1-x, 0) + S(d) V(r-1-d, m) ],   V(0, .) = 0,

    with S(j) = ``surv[j]`` the chance that the first j drafts pass and p(x) = S(x) - S(x+1) that exactly x
    do: the forward commits them and the AR token after them, and only when all d pass do its m masks'
    guesses become the next drafts. Drafts past r - 1 are never needed (the engine cuts them), so
    V(r, d) = V(r, r - 1) for d >= r. ``cost[q]`` = c(B, q) for q = 0..1 + 2K. Also returns
    base(r, d) = sum_{x<d} p(x) V(r-1-x, 0), the part of the sum that does not depend on m.
    One numpy step per r computes every (d, m) at once.
    """
    S = np.asarray(surv, dtype=float)
    k = len(S) - 1
    p = S[:-1] - S[1:]
    j = np.arange(k + 1)
    c = np.asarray(cost, dtype=float)[1 + j[:, None] + j[None, :]]  # c[d, m] = c(1 + d + m)
    v = np.zeros((horizon + 1, k + 1))
    base = np.zeros((horizon + 1, k + 1))
    for r in range(1, horizon + 1):
        top = min(k, r - 1)
        back = v[r - 1::-1][:top + 1]  # back[x] = V(r-1-x, .)
        base[r, 1:top + 1] = np.cumsum(p[:top] * back[:top, 0])
        q = c[:top + 1] + base[r, :top + 1, None] + S[:top + 1, None] * back
        v[r, :top + 1] = q.min(1)
        v[r, top + 1:] = v[r, top]
        base[r, top + 1:] = base[r, top]
    return v, base


def lossless_finish_cost(values: np.ndarray, base: np.ndarray, surv: Sequence[float], now: np.ndarray,
                         drafts: int, remaining: Sequence[tuple[int, float]]) -> Sequence[float]:
    """Expected seconds to finish a lossless row for each mask count m of this forward:

        Q(m) = now[m] + sum_R P(R) [ base(R, d_R) + S(d_R) V(R - 1 - d_R, m) ],   d_R = min(d, R - 1),

    ``now[m]``: this forward's cost with m masks, ``drafts``: d, ``remaining``: [(R, P(R))]. Lengths past the
    tables' horizon H are read at H: what lies beyond adds about the same time whatever m is now.
    """
    h = values.shape[0] - 1
    if len(remaining) == 1:  # one length (none ended yet): the same sums in Python, a few us and not ~90 cold
        (n, pr), = remaining
        r = min(n, h)
        d = min(drafts, r - 1)
        fixed, scale = pr * float(base[r, d]), pr * float(surv[d])
        return [a + fixed + scale * v for a, v in zip(now.tolist(), values[r - 1 - d].tolist())]
    r = np.minimum(np.array([n for n, _ in remaining]), h)
    w = np.array([pr for _, pr in remaining])
    d = np.minimum(drafts, r - 1)
    s = np.asarray(surv)[d]
    return now + float(w @ base[r, d]) + (w * s) @ values[r - 1 - d]


def explore_weight(tries: float, successes: float, patience: float = EXPLORE_PATIENCE) -> float:
    """Share of the exploration budget a slot still earns: w = 1 / (1 + max(0, tries - successes) / patience).

    The counts are the forgotten ones of ``SlotStats``, so the failures of a while ago fade and exploration
    resumes; a slot that is accepted keeps w near 1 (and is soon chosen rather than explored).
    """
    return 1.0 / (1.0 + max(0.0, tries - successes) / patience)


def best_lookahead(rate: Callable[[int], float], k_max: int, margin: float = MARGIN) -> int:
    """argmax_{0 <= m <= k_max} rate(m), where m > 0 must beat AR's rate(0) by ``margin``; fewest masks on ties."""
    base = rate(0)
    best, best_rate = 0, base * margin
    for m in range(1, k_max + 1):
        r = rate(m)
        if r > best_rate * (1 + 1e-9):
            best, best_rate = m, r
    return best


# ------------------------------------------------------------------------------------------ estimates
class SlotStats:
    """Running estimates of a_1..a_K: (successes + n0 * prior) / (tries + n0), forgotten by ``DECAY``; plans
    read them optimistically (``rates``)."""

    def __init__(self, prior: Sequence[float], strength: float | Sequence[float] = PRIOR_STRENGTH,
                 decay: float = DECAY) -> None:
        self.prior = [min(max(float(p), 0.0), 1.0) for p in prior]
        # pseudo-observations behind each slot's prior (fewer where the prior is a guess)
        self.strength = [float(strength)] * len(self.prior) if isinstance(strength, (int, float)) else [
            float(x) for x in strength]
        self.decay = decay
        self.succ = [0.0] * len(self.prior)
        self.tries = [0.0] * len(self.prior)
        self.version = 0  # bumped on every observation (callers cache derived curves on it)
        self.pending_decay = 0
        self.rounds = 0  # forwards that brought observations (``forget`` calls)
        self._memo: dict = {}

    def memo(self, key, make: Callable[[], object]):
        """``make()``, made again once ``REPLAN`` forwards brought observations and some a_j moved by more than
        ``REPLAN_DRIFT`` since; shared by every batch using these stats. Counted in forwards, not
        observations: a batch of 32 rows observes 32 times a forward."""
        hit = self._memo.get(key)
        if hit is not None and self.rounds - hit[0] >= REPLAN:
            rates = self.rates()
            if max((abs(a - b) for a, b in zip(rates, hit[2])), default=0.0) > REPLAN_DRIFT:
                hit = None
            else:  # still close: look again after REPLAN more forwards
                hit = self._memo[key] = (self.rounds, hit[1], hit[2])
        if hit is None:
            hit = self._memo[key] = (self.rounds, make(), self.rates())
        return hit[1]

    def means(self) -> list[float]:
        """The estimates: (successes + n0 * prior) / (tries + n0)."""
        return [(s + n0 * p) / (t + n0) for s, t, p, n0 in zip(self.succ, self.tries, self.prior, self.strength)]

    def rates(self) -> list[float]:
        """What plans read: a = mean + ``OPTIMISM`` * sd0 * n0 / (tries + n0), at most 1, where
        sd0 = sqrt(mean (1 - mean) / n0) is the spread the prior's n0 pseudo-observations allow.

        mean: ``means``. A slot the plans never reach is never tried, so a prior that undersells it would
        stand for ever (the demo's profile, over three tasks, says mask 7 passes 84% of the time; on copying
        it passes 98%): planning on the upper end of what the prior allows tries such slots. The bonus fades
        as 1 / tries rather than as a confidence bound's 1 / sqrt(tries), so a slot that keeps failing (mask
        1 of an adapted stories260K at threshold 0.9) stops being paid for within a few dozen forwards.
        """
        z = OPTIMISM
        return [min(1.0, a + z * math.sqrt(max(0.0, a * (1.0 - a)) / n0) * n0 / (t + n0))
                for a, t, n0 in zip(self.means(), self.tries, self.strength)]

    def observe(self, proposed: int, accepted: int) -> None:
        """One verification: slots 1..proposed were offered, the first ``accepted`` of them were accepted."""
        if proposed <= 0:
            return
        for j in range(min(accepted + 1, proposed, len(self.tries))):
            self.tries[j] += 1.0
            if j < accepted:
                self.succ[j] += 1.0
        self.pending_decay += 1
        self.version += 1

    def forget(self) -> None:
        """Apply the forgetting of the observations since the last call (once per forward: cheaper)."""
        if self.pending_decay:
            self.rounds += 1
            f = self.decay ** self.pending_decay
            self.succ = [x * f for x in self.succ]
            self.tries = [x * f for x in self.tries]
            self.pending_decay = 0


class LengthStats:
    """Lengths of finished answers, forgotten by ``DECAY``: what is left of an answer still being written.

    Only answers that ended by themselves (EOS, stop string) teach a length; one that ran into its budget
    says only "at least that long". ``LENGTH_PRIOR`` pseudo-weight sits on "runs to its budget", so before
    any answer ended a row is planned as if it used its whole budget.

    Answers are kept with the length of their prompt. Where answer lengths track prompt lengths (copying,
    reversing, translating: the offsets L - p vary less than the lengths L, i.e. the least-squares slope of L
    on p exceeds one half), a row with a p-token prompt expects p plus an observed offset; otherwise the
    observed lengths themselves (``lengths_for``). lm-eval sorts prompts by length, so without this a batch
    of short copies would be planned for the long ones seen before it.
    """

    def __init__(self, decay: float = DECAY) -> None:
        self.decay = decay
        self.weights: dict[tuple[int, int], float] = {}  # (prompt length, answer length) -> forgotten count
        self.version = 0
        self._views: dict[int, dict[int, float]] = {}
        self._tracks: bool | None = None

    def observe(self, length: int, prompt: int = 0) -> None:
        f = self.decay
        self.weights = {k: w * f for k, w in self.weights.items() if w * f > 1e-3}
        self.weights[prompt, length] = self.weights.get((prompt, length), 0.0) + 1.0
        self.version += 1
        self._views, self._tracks = {}, None

    def tracks_prompt(self) -> bool:
        """Do answer lengths follow prompt lengths: Var_w(L - p) < Var_w(L) over the answers that ended?"""
        if self._tracks is None:
            ended = [(p, n, w) for (p, n), w in self.weights.items() if n < UNBOUNDED]
            self._tracks = len({p for p, _, _ in ended}) > 1 and _variance(
                [(n - p, w) for p, n, w in ended]) < _variance([(n, w) for _, n, w in ended]) - 1e-9
        return self._tracks

    def lengths_for(self, prompt: int = 0) -> dict[int, float]:
        """{answer length: weight} expected of a row whose prompt has ``prompt`` tokens (see the class)."""
        view = self._views.get(prompt)
        if view is None:
            shift = self.tracks_prompt()
            view = {}
            for (p, n), w in self.weights.items():
                length = n if not shift or n >= UNBOUNDED else max(1, n - p + prompt)
                view[length] = view.get(length, 0.0) + w
            self._views[prompt] = view
        return view

    def remaining(self, done: int, budget: int, prior: float = LENGTH_PRIOR, prompt: int = 0) -> list[tuple[int, float]]:
        """[(R, P(R))] for a row with ``done`` tokens and at most ``budget`` more: R = min(L - done, budget).

        ``prior``: the pseudo-weight on "runs to its budget"; with 0 and no answer longer than ``done``,
        the row is planned to its budget all the same. ``prompt``: the row's prompt length.
        """
        at_budget, short = prior, {}
        for n, w in self.lengths_for(prompt).items():
            r = n - done
            if r >= budget:
                at_budget += w
            elif r > 0:
                short[r] = short.get(r, 0.0) + w
        total = at_budget + sum(short.values())
        if total <= 0:
            return [(budget, 1.0)]
        return [(r, w / total) for r, w in sorted(short.items())] + [(budget, at_budget / total)]

    def remaining_max(self, rows: Sequence[tuple[int, ...]]) -> list[tuple[int, float]]:
        """[(R, P(R))] for the most tokens any of ``rows`` (done, budget[, prompt length]) still has to write:
        a static batch runs until its slowest row ends.

        The rows' lengths are drawn independently from the observed answers, P(max <= v) = prod_b
        P(R_b <= v) (rows with the same (done, budget, prompt) share one distribution, raised to their
        count), and the prior's "runs to its budget" enters once for the batch, with the weight it has for
        one row: were it drawn per row, 32 rows would almost surely have one running to its budget, and a
        batch would always be planned as if it did.
        """
        if not self.weights:  # nothing ended yet: every row may run to its budget
            return [(max(r[1] for r in rows), 1.0)]
        rows = [(done, budget, prompt[0] if prompt else 0) for done, budget, *prompt in rows]
        if len(rows) == 1:
            done, budget, prompt = rows[0]
            return self.remaining(done, budget, prompt=prompt)
        shift = self.tracks_prompt()  # else every prompt length reads the same lengths: one group
        groups: dict[tuple[int, int, int], int] = {}
        for done, budget, prompt in rows:
            key = (done, budget, prompt if shift else 0)
            groups[key] = groups.get(key, 0) + 1
        dists = [(self.remaining(done, budget, prior=0.0, prompt=p), n) for (done, budget, p), n in groups.items()]
        support = sorted({r for d, _ in dists for r, _ in d})
        cdfs = []
        for d, n in dists:
            run, cdf, i = 0.0, [], 0
            for v in support:
                while i < len(d) and d[i][0] <= v:
                    run += d[i][1]
                    i += 1
                cdf.append(min(1.0, run) ** n)
            cdfs.append(cdf)
        done, _, prompt = min(groups)
        longer = sum(w for n, w in self.lengths_for(prompt).items() if n > done)
        share = LENGTH_PRIOR / (LENGTH_PRIOR + longer)
        top = max(b for _, b, _ in groups)
        out, before = {}, 0.0
        for j, v in enumerate(support):
            now = 1.0
            for cdf in cdfs:
                now *= cdf[j]
            if now - before > 1e-6:  # lengths the batch's longest answer almost surely exceeds are left out
                out[v] = (1.0 - share) * (now - before)
                before = now
        out[top] = out.get(top, 0.0) + share
        return sorted(out.items())


def _variance(values: Sequence[tuple[float, float]]) -> float:
    """Weighted variance of [(x, weight)]: sum w (x - mean)^2 / sum w."""
    total = sum(w for _, w in values)
    if total <= 0:
        return 0.0
    mean = sum(x * w for x, w in values) / total
    return sum(w * (x - mean) ** 2 for x, w in values) / total


def run_key(profile, mode: str, threshold: float | None = None) -> str | None:
    """The ``slot_profile["runs"]`` table that measures what ``mode`` accepts: ``"greedy"`` for lossless, for
    parallel the recorded confidence level nearest ``threshold``; None where the profile records no runs
    (profiles made before runs were measured: the accuracies stand in)."""
    runs = profile.get("runs") if isinstance(profile, dict) else None
    if not isinstance(runs, dict):
        return None
    if mode == "lossless":
        return "greedy" if "greedy" in runs else None
    levels = {}
    for key in runs:
        try:
            levels[key] = float(key.removeprefix("conf>="))
        except (AttributeError, ValueError):
            continue
    if mode != "parallel" or threshold is None or not levels:
        return None
    return min(levels, key=lambda key: (abs(levels[key] - threshold), -levels[key]))


def _profile_means(profile: dict, prefix: int | None, run: str | None = None) -> list[float] | None:
    """Mean accuracy (or, with ``run``, the mean of that runs table) of slots 1, 2, ... as far as they are
    measured (see ``profile_prior``); None if malformed."""
    try:
        acc = profile["runs"][run] if run is not None else profile["accuracy"]
        counts = profile.get("count")
        rows = [list(row) if isinstance(row, (list, tuple)) else [row] for row in acc]
        weights = [list(counts[s]) if counts is not None and len(counts) > s else [1.0] * len(row)
                   for s, row in enumerate(rows)]
        bucket = _bucket(profile.get("bucket_edges"), prefix)
        if bucket is not None:
            only = [[c if b == bucket else 0 for b, c in enumerate(w)] for w in weights]
            if sum(1 for row, w in zip(rows, only) if any(a is not None and c for a, c in zip(row, w))) >= 2:
                weights = only
        means = []
        for row, w in zip(rows, weights):
            pairs = [(float(a), float(c)) for a, c in zip(row, w) if a is not None and c]
            if not pairs or (counts is not None and sum(c for _, c in pairs) < PROFILE_MIN_COUNT):
                break  # slots past the last one measured (often enough) in the bucket: extrapolated
            means.append(sum(a * c for a, c in pairs) / sum(c for _, c in pairs))
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return means


def _measured(means: list[float] | None, k: int) -> int:
    return 0 if means is None or len(means) < 2 else min(k, len(means) - 1)


def profile_prior(profile: dict, k: int, prefix: int | None = None, run: str | None = None) -> list[float] | None:
    """a_1..a_k from a ``slot_profile``: a_j = run(slot j+1) / run(slot j), the acceptance of mask j given the
    masks before it, from the runs table ``run`` (``run_key``); without one, a_j ~ accuracy(slot j+1) /
    accuracy(slot j), which overrates deep masks (right as often after a miss as after a hit).

    The table's values are those of the prefix-length bucket holding ``prefix`` (the prompts' length) where it
    has at least two slots measured: masks right after a long prompt do much better than after a short one.
    Otherwise they are count-weighted over the buckets. Slot 1 is the AR token, slot j+1 mask j. A slot
    measured fewer than ``PROFILE_MIN_COUNT`` times counts as unmeasured: one miss out of one said "this mask
    never works" and kept the planner from ever trying it. Missing or malformed fields give None (the caller
    falls back).
    """
    return _rates(_profile_means(profile, prefix, run), k)


def _rates(means: list[float] | None, k: int) -> list[float] | None:
    if means is None or len(means) < 2:
        return None
    rates = [min(1.0, means[j + 1] / means[j]) if means[j] > 0 else 0.0 for j in range(len(means) - 1)]
    rates += [rates[-1] * 0.9 ** (i + 1) for i in range(max(0, k - len(rates)))]  # deeper than profiled
    return rates[:k]


def _bucket(edges, prefix: int | None) -> int | None:
    """Index of the bucket [edges[b], edges[b+1]) holding ``prefix`` (the last one is open), None if unknown."""
    if prefix is None or not isinstance(edges, (list, tuple)) or not edges:
        return None
    try:
        return max(b for b, e in enumerate(edges) if prefix >= float(e))
    except (ValueError, TypeError):
        return None


def prior_and_strengths(card_config: dict | None, k: int, prefix: int | None = None, run: str | None = None
                        ) -> tuple[list[float], str, list[float]]:
    """The prior a_1..a_k for mask slots, where it came from (``profile``, ``adapted`` or ``untrained``) and
    the pseudo-observations behind each a_j.

    ``prefix``: the typical prompt length, which picks the slot profile's prefix-length bucket; ``run``: the
    profile's runs table to read (``run_key``; None: its accuracies). The strengths are ``PRIOR_STRENGTH``
    where the profile measured the slot and ``EXTRAPOLATED_STRENGTH`` where its a_j is extrapolated: a guess
    the plans should read loosely (with optimism, high), or a block larger than the bucket's measurements is
    never tried.
    """
    raw = card_config if isinstance(card_config, dict) else {}
    profile = raw.get("slot_profile")
    means = _profile_means(profile, prefix, run) if isinstance(profile, dict) else None
    rates = _rates(means, k)
    if rates is not None:
        measured = _measured(means, k)
        return rates, "profile", [PRIOR_STRENGTH] * measured + [EXTRAPOLATED_STRENGTH] * (k - measured)
    if raw.get("adaptation"):
        return [ADAPTED_PRIOR] * k, "adapted", [PRIOR_STRENGTH] * k
    return [UNTRAINED_PRIOR] * k, "untrained", [PRIOR_STRENGTH] * k


def card_config(model) -> dict:
    """The raw ``card`` block of a model's config (read tolerantly: unknown keys are fine)."""
    raw = getattr(model.config, "card", None)
    return raw if isinstance(raw, dict) else {}


_WARNED: set = set()


def warn_untrained(model, mode: str) -> None:
    """One stderr line, once per checkpoint: parallel decoding on masks that were never trained."""
    raw = card_config(model)
    if mode != "parallel" or not raw or raw.get("adaptation"):
        return
    key = (raw.get("source", {}) or {}).get("sha256") or id(model)
    if key in _WARNED:
        return
    _WARNED.add(key)
    print("warning: this checkpoint was converted but never adapted (no adaptation record): its masks are "
          "untrained, so parallel decoding may leave the AR text; lossless stays exact", file=sys.stderr)


# ------------------------------------------------------------------------------------------ the choice
_PRICED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def priced(cost) -> dict:
    """Cost vectors already read from ``cost`` (kept as long as it lives, at most ``PRICED_MAX``): c(B, q) is
    fixed once measured, and a batch of one row makes a new ``Lookahead`` for every answer, a forward or two."""
    table = _PRICED.get(cost)
    if table is None or len(table) >= PRICED_MAX:
        table = _PRICED[cost] = {}
    return table


_SHARED: dict = {}


def shared(key, make: Callable[[], object]):
    """``make()``, kept for later callers with the same ``key`` (at most ``SHARED_MAX`` kept; read-only).

    Every decode call starts its estimates afresh from the same prior, and the plans to the end built from
    them (0.2 ms on the demo model) were made again at every call: a caller decoding one prompt at a time
    paid them per prompt.
    """
    hit = _SHARED.get(key)
    if hit is None:
        if len(_SHARED) >= SHARED_MAX:
            _SHARED.clear()
        hit = _SHARED[key] = make()
    return hit


class Lookahead:
    """Masks per forward for one batch: fixed K, or argmax of the rate with bounded exploration."""

    def __init__(self, mode: str, k_max: int, auto: bool, cost, stats: SlotStats | None,
                 explore: float = EXPLORE) -> None:
        self.mode, self.k_max, self.auto, self.cost, self.stats = mode, k_max, auto, cost, stats
        self.explore = explore
        self.budget = 0.0
        self._cached: tuple | None = None
        self._futile: tuple = (None, False)  # (batch, pending, stats' version and rounds), verdict
        self.horizon = HORIZON * (k_max + 1)
        self.exploring = False

    def best(self, batch: int) -> int:
        """argmax_m r(m) for the current estimates (cached until they or the batch change)."""
        c = self._cached
        if c is not None and c[0] == batch and self.stats.version - c[1] < REPLAN:
            return c[2]
        rates = self.stats.rates()
        cost = lambda q: self.cost(batch, q)  # noqa: E731
        if self.mode == "parallel":
            curve = accepted_curve(rates)
            m = best_lookahead(lambda m: parallel_rate(curve, m, cost), self.k_max)
        else:
            m = best_lookahead(lambda m: lossless_rate(rates, m, batch, cost), self.k_max)
        self._cached = (batch, self.stats.version, m)
        return m

    def best_to_finish(self, batch: int, pending: int, remaining: list[tuple[int, float]]) -> int:
        """Parallel, near a row's end: argmin_m of the expected seconds to finish it (``finish_costs``).

        ``remaining``: [(R, P(R))] for the batch's slowest row, ``pending``: the longest pending segment.
        """
        n, tokens, later = self._finish_tables(batch)
        seconds = finish_costs(n, tokens, remaining, self._first(batch, pending, 1.0), later)
        return best_lookahead(lambda m: 1.0 / seconds[m], self.k_max)

    def _first(self, batch: int, pending: int, margin: float) -> np.ndarray:
        """c(B, pending + m) for m = 0..K, masks priced at ``margin`` times (``priced``: a cost is fixed)."""
        table, key = priced(self.cost), ("first", batch, pending, margin, self.k_max)
        now = table.get(key)
        if now is None:
            now = table[key] = np.array(
                [self.cost(batch, pending + m) * (margin if m else 1.0) for m in range(self.k_max + 1)])
        return now

    def lossless_to_finish(self, batch: int, pending: int, drafts: int, remaining: list[tuple[int, float]]) -> int:
        """Lossless, near a row's end: argmin_m of the expected seconds to finish it (``lossless_finish_cost``).

        ``drafts``: the mask drafts the slowest row holds, ``pending``: the longest pending segment plus the
        longest draft list (the width before masks). Like the stationary choice, lookahead must promise
        ``MARGIN`` over AR: a forward carrying masks or drafts is priced at MARGIN times c(B, q).
        """
        def make():
            cost = [self.cost(batch, q) * (MARGIN if q > 1 else 1.0) for q in range(2 * self.k_max + 2)]
            surv = survival(accepted_curve(self.stats.rates()), self.k_max)
            return shared(("lossless-finish", tuple(surv), tuple(cost), self.horizon),
                          lambda: (*lossless_finish_values(np.array(surv), cost, self.horizon), np.array(surv)))

        values, base, surv = self.stats.memo(("lossless-finish", batch, self.k_max, self.horizon), make)
        now = self._first(batch, pending, MARGIN)
        seconds = lossless_finish_cost(values, base, surv, now, drafts, remaining)
        return min(range(len(seconds)), key=seconds.__getitem__)  # the first minimum, as np.argmin

    def _finish_tables(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``finish_tables`` (N_m(r) up to the horizon, 1 + A(m)) for the current estimates, and the cost of a
        steady-state forward with m masks, c(B, 1 + A(m) + m), made together so that they always agree."""
        def make():
            curve = accepted_curve(self.stats.rates())
            return shared(("finish", tuple(curve), self.k_max, self.horizon),
                          lambda: finish_tables(curve, self.k_max, self.horizon))

        n, tokens = self.stats.memo(("finish", self.k_max, self.horizon), make)
        table, key = priced(self.cost), ("later", batch, self.k_max)
        made = table.get(key)
        if made is None or made[0] is not tokens:  # priced again whenever the tables were made again
            made = table[key] = (tokens, np.array([self.cost(batch, float(t) + m) for m, t in enumerate(tokens)]))
        return n, tokens, made[1]

    def futile(self, batch: int, pending: int = 1) -> bool:
        """True when no number of masks can beat AR now: (1 + A(K)) c(B, p) <= c(B, p + 1), p = ``pending``.

        A forward carrying masks commits at most 1 + A(K) tokens on average and costs at least
        c(B, p + 1), where AR's commits one for c(B, p); by Wald's identity no plan made of such forwards
        finishes sooner than AR's, so the planner (which asks ``MARGIN`` more) would choose 0 anyway. An
        unadapted checkpoint's masks (A(K) about 0.02) and a prior that keeps failing are settled here
        without planning, at the cost of one multiplication per forward.
        """
        if not self.auto or self.k_max == 0:
            return False
        key = (batch, pending, self.stats.version, self.stats.rounds)  # a proposer asks, then ``masks`` again
        if self._futile[0] != key:
            reach = self.stats.memo("reach", lambda: accepted_curve(self.stats.rates())[-1])
            self._futile = (key, (1.0 + reach) * self.cost(batch, pending) <= self.cost(batch, pending + 1))
        return self._futile[1]

    def masks(self, batch: int, pending: int = 1, remaining: list[tuple[int, float]] | None = None,
              drafts: int = 0) -> int:
        """The masks of the next forward (at most ``k_max``).

        ``remaining``: [(R, P(R))] for the slowest row; within ``horizon`` tokens of its end the row is
        planned to its end, elsewhere by the stationary rate. ``drafts`` (lossless): the mask drafts that
        row holds; ``pending`` then counts the batch's widest pending segment plus its longest draft list.
        """
        self.exploring = False
        if not self.auto or self.k_max == 0:
            return self.k_max
        near = bool(remaining) and remaining[0][0] <= self.horizon
        if self.futile(batch, pending):
            m = 0
        elif near and self.mode == "parallel":
            m = self.best_to_finish(batch, pending, remaining)
        elif near:
            m = self.lossless_to_finish(batch, pending, drafts, remaining)
        else:
            m = self.best(batch)
        width = 1 + (2 * m if self.mode == "lossless" else m)
        if m < self.k_max:
            weight = explore_weight(self.stats.tries[m], self.stats.succ[m])
            self.budget += self.explore * weight * self.cost(batch, width)
            # An exploring forward carries the whole block: it observes every slot up to the first miss, so
            # deep slots whose prior is too low (never tried at the chosen m) are learnt in one go.
            e = self.k_max
            # Exploring pays twice: the masks now, and next forward the drafts' verification (lossless) or the
            # re-fed accepted tokens (parallel).
            extra = 2 * (self.cost(batch, 1 + 2 * e) - self.cost(batch, width)) if self.mode == "lossless" else 2 * (
                self.cost(batch, 1 + e) - self.cost(batch, 1 + m))
            # Priced at least a quarter forward, so a nearly free extra token is not explored at every step.
            extra = max(extra, 0.25 * self.cost(batch, 1))
            if self.budget >= extra:
                self.budget -= extra
                self.exploring = True
                return e
        return m

"""Planning to the end of an answer, the answer-length estimates, the bucketed slot prior and lookup backoff;
settling on AR without planning where no lookahead can pay (``Lookahead.futile``).

The math (``forwards_to_finish``, ``commit_distribution``, ``finish_costs``) is checked against exact cases
and by simulation; the choice it drives against the cases where the answer is known; the backoff on
converted stories260K, where prompt-lookup drafts rarely pay at batch 8, against greedy AR.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from card.checkpoint import load_checkpoint
from card.eval.decoding import DecodingSpec, decode, decode_ar
from card.eval.decoding import proposers as proposers_mod
from card.eval.decoding.planner import (
    LENGTH_PRIOR,
    UNBOUNDED,
    LengthStats,
    Lookahead,
    SlotStats,
    accepted_curve,
    commit_distribution,
    finish_costs,
    finish_tables,
    forwards_to_finish,
    prior_and_strengths,
    profile_prior,
    run_key,
)
from card.eval.decoding.proposers import Estimates, MaskProposer, Outcome, observed_slots

pytestmark = pytest.mark.usefixtures("one_thread", "private_cost_cache")

rates_st = st.lists(st.floats(0.0, 1.0), min_size=0, max_size=8)


@given(rates_st)
def test_commit_distribution_sums_to_one_and_its_mean_is_one_plus_accepted(rates):
    curve = accepted_curve(rates)
    for m in range(len(rates) + 1):
        p = commit_distribution(curve, m)
        assert len(p) == m + 1 and all(x >= -1e-12 for x in p)
        assert sum(p) == pytest.approx(1.0)
        assert sum(x * q for x, q in enumerate(p, 1)) == pytest.approx(1.0 + curve[m])


@given(k=st.integers(1, 9), horizon=st.integers(0, 40))
def test_forwards_to_finish_exact_cases(k, horizon):
    assert forwards_to_finish([1.0], horizon) == [float(r) for r in range(horizon + 1)]  # AR: one per token
    always = [0.0] * (k - 1) + [1.0]  # every forward commits k
    assert forwards_to_finish(always, horizon) == pytest.approx([math.ceil(r / k) for r in range(horizon + 1)])


@given(rates=rates_st, horizon=st.integers(0, 40))
@settings(max_examples=50, deadline=None)
def test_finish_tables_equal_the_recurrence_for_every_m(rates, horizon):
    curve = accepted_curve(rates)
    n, tokens = finish_tables(curve, len(rates), horizon)
    for m in range(len(rates) + 1):
        assert list(n[m]) == pytest.approx(forwards_to_finish(commit_distribution(curve, m), horizon), abs=1e-9)
        assert tokens[m] == pytest.approx(1.0 + curve[m])


@given(rates=rates_st, seed=st.integers(0, 10**6))
@settings(max_examples=25, deadline=None)
def test_forwards_to_finish_matches_simulation(rates, seed):
    """N(r) = E[forwards until r tokens are committed], forwards committing x ~ p independently."""
    p = commit_distribution(accepted_curve(rates), len(rates))
    n = forwards_to_finish(p, 12)
    rng = random.Random(seed)
    runs = 3000
    for r in (1, 5, 12):
        total = 0
        for _ in range(runs):
            left, f = r, 0
            while left > 0:
                left -= rng.choices(range(1, len(p) + 1), weights=p)[0]
                f += 1
            total += f
        assert total / runs == pytest.approx(n[r], abs=0.15 * n[r] + 0.05)
    assert all(a <= b + 1e-12 for a, b in zip(n, n[1:]))  # more to write never takes fewer forwards


def test_finish_cost_far_from_the_end_is_the_stationary_rate():
    p = commit_distribution(accepted_curve([0.8] * 4), 4)
    tokens = sum(x * q for x, q in enumerate(p, 1))
    n = forwards_to_finish(p, 10)

    def finish_cost(remaining, first, later):  # one mask count: a single row of the tables
        return finish_costs(np.array([n]), np.array([tokens]), remaining, np.array([first]), np.array([later]))[0]

    far = finish_cost([(1000, 1.0)], 1.0, 1.0)
    assert far == pytest.approx(1000 / tokens, rel=0.02)
    assert finish_cost([(3, 0.5), (7, 0.5)], 2.0, 1.0) == pytest.approx(2.0 + 0.5 * (n[3] - 1) + 0.5 * (n[7] - 1))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8), st.integers(1, 20),
       st.lists(st.tuples(st.integers(1, 40), st.floats(0.01, 1.0)), min_size=1, max_size=6))
def test_finish_costs_equal_their_definition_for_every_m(rates, horizon, lengths):
    k = len(rates)
    total = sum(w for _, w in lengths)
    remaining = [(r, w / total) for r, w in lengths]
    n, tokens = finish_tables(accepted_curve(rates), k, horizon)
    first, later = np.arange(1.0, k + 2), np.linspace(1.0, 2.0, k + 1)
    got = finish_costs(n, tokens, remaining, first, later)
    for m in range(k + 1):  # sum_R P(R) [first + (N(R) - 1) later], N extended past the horizon at 1 / tokens
        nr = [n[m][r] if r <= horizon else n[m][horizon] + (r - horizon) / tokens[m] for r, _ in remaining]
        want = sum(w * (first[m] + (x - 1.0) * later[m]) for (_, w), x in zip(remaining, nr))
        assert got[m] == pytest.approx(want, rel=1e-9)
    # one length takes a Python path; it must agree to the bit with the vector one (the choice's ties break
    # the same way): a second length of weight 0 adds exact zeros there
    one = finish_costs(n, tokens, remaining[:1], first, later)
    assert list(one) == finish_costs(n, tokens, [remaining[0], (horizon + 3, 0.0)], first, later).tolist()


def test_a_row_near_its_end_gets_the_masks_that_finish_it():
    """9 tokens left, masks that are nearly always right and cheap: 8 masks finish in one forward, 7 need two.

    The stationary rate barely separates them (7.6 vs 6.8 tokens for 16 vs 15 query tokens); planning to
    the end does. Useless masks still give AR.
    """
    cost = lambda b, q: 1.0 + 0.1 * (q - 1)  # noqa: E731
    look = Lookahead("parallel", 8, True, cost, SlotStats([0.97] * 8))
    assert look.best_to_finish(1, 1, [(9, 1.0)]) == 8
    assert look.best_to_finish(1, 1, [(3, 1.0)]) == 2  # more masks than the answer has tokens buy nothing
    useless = Lookahead("parallel", 8, True, cost, SlotStats([0.02] * 8))
    assert useless.best_to_finish(1, 1, [(9, 1.0)]) == 0
    assert useless.masks(1, 1, [(9, 1.0)]) in (0, 1)  # at most an exploring mask


def test_length_stats_learn_where_answers_end():
    lengths = LengthStats()
    assert lengths.remaining(0, 16) == [(16, 1.0)]  # nothing seen: the whole budget
    for _ in range(9):
        lengths.observe(8)
    rem = dict(lengths.remaining(3, 13))
    assert sum(rem.values()) == pytest.approx(1.0)
    assert rem[5] > 0.85 and rem[13] == pytest.approx(LENGTH_PRIOR / (LENGTH_PRIOR + sum(lengths.weights.values())))
    lengths.observe(UNBOUNDED)  # cut by its budget: says nothing short
    assert set(dict(lengths.remaining(3, 13))) == {5, 13}
    assert lengths.remaining(9, 7) == [(7, 1.0)]  # past every length seen: the budget again


def test_cost_vectors_are_shared_across_batches_and_bounded():
    from card.eval.decoding import planner

    cost = lambda b, q: 1.0 + 0.1 * (q - 1)  # noqa: E731
    first = Lookahead("parallel", 8, True, cost, SlotStats([0.9] * 8))._first(4, 20, 1.0)
    again = Lookahead("parallel", 8, True, cost, SlotStats([0.9] * 8))._first(4, 20, 1.0)
    assert again is first and first.tolist() == [cost(4, 20 + m) for m in range(9)]  # one batch per answer: shared
    look = Lookahead("parallel", 8, True, cost, SlotStats([0.9] * 8))
    for pending in range(planner.PRICED_MAX + 10):  # every prompt width of a long run
        look._first(4, pending, 1.0)
    assert len(planner.priced(cost)) <= planner.PRICED_MAX


def test_answer_lengths_that_follow_the_prompt_are_read_from_it():
    """Copying: the answer is the prompt less 6 tokens. A 12-token prompt expects 6 tokens, wherever the
    answers seen so far ended, and a batch of such rows is planned for 6 masks' worth, not for the long
    answers seen before (lm-eval sorts prompts longest first)."""
    lengths = LengthStats()
    for p in (18, 18, 17, 17, 16, 16, 15, 15):
        lengths.observe(p - 6, p)
    assert lengths.tracks_prompt()
    rem = dict(lengths.remaining(0, 16, prompt=12))
    assert set(rem) == {6, 16} and rem[6] > 0.85  # 16: the budget, the prior's pseudo-answer
    assert set(dict(lengths.remaining_max([(0, 16, 12)] * 32))) == {6, 16}

    cost = lambda b, q: 1.0 + 0.05 * (q - 1)  # noqa: E731
    proposer = MaskProposer(Lookahead("parallel", 15, True, cost, SlotStats([0.99] * 15)), None, lengths)
    row = lambda p: SimpleNamespace(tokens=[], max_new_tokens=16, prompt_ids=[1] * p, pending=[1] * p)  # noqa: E731
    # sure, cheap masks: enough to write the whole answer in one forward (the AR token and 5 masks for 6
    # tokens), the shorter prompt fewer (both hedge a little for the prior's answer that runs to its budget)
    short, long = (proposer.propose([row(p)] * 32).masks for p in (12, 18))
    assert 5 <= short < 11 <= long

    lengths.observe(UNBOUNDED, 14)  # an answer cut by its budget stays "at the budget", not shifted
    assert set(dict(lengths.remaining(0, 16, prompt=12))) == {6, 16}


def test_answer_lengths_that_ignore_the_prompt_are_not_shifted():
    lengths = LengthStats()
    for p, n in [(40, 9), (12, 8), (30, 10), (20, 9), (50, 8), (25, 10)]:
        lengths.observe(n, p)
    assert not lengths.tracks_prompt()
    assert lengths.remaining(0, 16, prompt=100) == lengths.remaining(0, 16, prompt=5) == lengths.remaining(0, 16)


@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 20)), min_size=1, max_size=20))
def test_lengths_follow_the_prompt_when_the_least_squares_slope_exceeds_one_half(answers):
    """Var(L - p) < Var(L) is Var(p) < 2 Cov(L, p): the slope of L on p above 1/2 (no decay here)."""
    lengths = LengthStats(decay=1.0)
    for p, n in answers:
        lengths.observe(n, p)
    p, n = np.array(answers, dtype=float).T
    if p.var() == 0:  # one prompt length: nothing to read from it
        assert not lengths.tracks_prompt()
        return
    slope = ((p - p.mean()) * (n - n.mean())).mean() / p.var()
    assume(abs(slope - 0.5) > 1e-6)
    assert lengths.tracks_prompt() == (slope > 0.5)


def test_parallel_decoding_learns_answer_lengths_and_stays_consistent(stories):
    """Answers cut at a stop string teach the lengths; the output of every forward is still a committed prefix."""
    prompts = ["Once upon a time", "Tom had a red ball", "One day, a little girl named Lily", "The sun was hot"]
    est = Estimates.start([0.6] * 4, "adapted")
    out = decode(DecodingSpec.parse("parallel@0.9", block_size=4).with_(lookahead="auto"), stories.model,
                 stories.tokenizer, prompts, max_new_tokens=40, stop_strings=["."], batch_size=2, estimates=est)
    stopped = [r for r in out if r.finish_reason == "stop"]
    assert stopped and est.lengths.version >= len(stopped)
    assert all(sum(map(len, r.steps)) == r.new_tokens for r in out)


def test_slot_prior_uses_the_prompt_length_bucket():
    profile = {"bucket_edges": [0, 16, 64], "slots": 4,
               "accuracy": [[0.4, 0.9, None], [0.2, 0.88, None], [0.1, 0.86, None], [0.05, None, None]],
               "count": [[100, 50, 0], [100, 40, 0], [100, 30, 0], [100, 0, 0]]}
    long_prompt = profile_prior(profile, 3, prefix=20)
    assert long_prompt[:2] == pytest.approx([0.88 / 0.9, 0.86 / 0.88])
    assert long_prompt[2] < long_prompt[1]  # not measured in that bucket: extrapolated downwards
    assert profile_prior(profile, 3, prefix=3) == pytest.approx([0.5, 0.5, 0.5])
    assert profile_prior(profile, 3, prefix=500) == profile_prior(profile, 3)  # empty bucket: all buckets


def test_a_slot_measured_a_few_times_is_extrapolated_not_believed():
    """One miss out of one measurement must not make a mask look useless: the planner would never try it."""
    profile = {"bucket_edges": [0], "slots": 4, "accuracy": [[0.9], [0.85], [0.8], [0.0]],
               "count": [[200], [150], [100], [1]]}
    rates = profile_prior(profile, 3)
    assert rates[:2] == pytest.approx([0.85 / 0.9, 0.8 / 0.85])
    assert rates[2] == pytest.approx(0.9 * 0.8 / 0.85) and rates[2] > 0.5


@pytest.fixture(scope="module")
def stories(stories_card):
    return load_checkpoint(stories_card, dtype="float32", require_card=True)


def test_lookups_back_off_where_they_do_not_pay_and_output_stays_ar(stories, monkeypatch):
    """Converted stories260K at batch 8: prompt-lookup drafts rarely shorten the slowest row, so the lookups
    (and the choice they feed) wait between tries instead of running at every forward."""
    calls = []
    lookup = proposers_mod.NgramIndex.lookup
    monkeypatch.setattr(proposers_mod.NgramIndex, "lookup", lambda self, n: calls.append(n) or lookup(self, n))
    prompts = ["Once upon a time", "Tom had a red ball", "One day, a little girl named Lily", "The sun was hot",
               "Sam and his dog", "There was a big tree", "Mia liked to sing", "A bird flew"]
    ar = decode_ar(stories.model, stories.tokenizer, prompts, max_new_tokens=64)
    ll = decode(DecodingSpec("lossless"), stories.model, stories.tokenizer, prompts, max_new_tokens=64, batch_size=8)
    assert [x.token_ids for x in ll] == [x.token_ids for x in ar]
    forwards = max(x.forwards for x in ll)
    assert len(calls) < 0.5 * forwards * len(prompts)



@pytest.fixture(scope="module")
def tokenizers(stories, tiny_ckpt):
    from transformers import AutoTokenizer

    return [stories.tokenizer] + [AutoTokenizer.from_pretrained(tiny_ckpt(a)) for a in ("gpt2", "qwen2", "llama")]


@given(which=st.integers(0, 3), ids=st.lists(st.integers(0, 299), max_size=30), cleanup=st.booleans())
@settings(max_examples=60, deadline=None)
def test_stop_check_decoder_is_the_tokenizers_decode(tokenizers, which, ids, cleanup):
    """The stop-string check decodes without transformers' wrapper only where the wrapper changes nothing."""
    from card.eval.decoding.engine import text_decoder

    tok = tokenizers[which]
    ids = [i % len(tok) for i in ids]
    before = tok.clean_up_tokenization_spaces
    tok.clean_up_tokenization_spaces = cleanup
    try:
        assert text_decoder(tok)(ids) == tok.decode(ids, skip_special_tokens=True)
    finally:
        tok.clean_up_tokenization_spaces = before


def test_slots_past_the_end_of_an_answer_are_censored_not_rejected():
    from types import SimpleNamespace

    going, ended = SimpleNamespace(finish_reason=None), SimpleNamespace(finish_reason="stop")
    # parallel: committed[0] is the AR token, mask j wrote committed[j]
    assert observed_slots(going, Outcome([1, 2, 3], 0, 8, 2), [1, 2, 3], 1) == (8, 2)  # a live row: as observed
    assert observed_slots(ended, Outcome([1, 2, 3, 4, 5, 6], 0, 8, 5), [1, 2, 3, 4], 1) == (3, 3)  # ended at mask 3
    assert observed_slots(ended, Outcome([1, 2, 3, 4], 0, 8, 3), [1, 2, 3, 4], 1) == (3, 3)  # mask 4 was not needed
    # lossless: draft j guessed committed[j-1]; a row that ends on the AR token after a wrong draft keeps that miss
    assert observed_slots(ended, Outcome([7, 8, 9], 2, 5, 2), [7, 8, 9], 0) == (3, 2)
    assert observed_slots(ended, Outcome([7, 8, 9, 10, 11], 4, 5, 4), [7, 8], 0) == (2, 2)  # ended inside the drafts


def test_finished_answers_do_not_teach_that_deep_masks_fail():
    """Slot estimates after a batch whose answers all end inside one block: no slot the answers needed is
    counted as a failure, so the stats say nothing against masks that were never needed."""
    from types import SimpleNamespace

    stats = SlotStats([0.5] * 8)
    prop = proposers_mod.MaskProposer(None, stats)
    rows = [SimpleNamespace(finish_reason="stop", tokens=[0] * 4) for _ in range(3)]
    outcomes = [Outcome([1, 2, 3, 4], 0, 8, 3) for _ in rows]
    prop.observe(rows, proposers_mod.Proposal(8, [[] for _ in rows]), outcomes, [[1, 2, 3, 4]] * 3)
    rates = stats.means()
    seen = 3 * 0.98 ** 3  # three successes each, forgotten once per observation
    assert rates[:3] == pytest.approx([(seen + 4 * 0.5) / (seen + 4)] * 3)
    assert rates[3:] == pytest.approx([0.5] * 5)  # never needed: still the prior


def test_the_prior_reads_the_acceptance_runs_of_the_mode():
    """With a runs table a_j is the share of runs reaching mask j among those reaching mask j - 1. Read from the
    accuracies instead, deep masks right 5% of the time whatever came before looked accepted 95% of the time."""
    acc = [[0.6], [0.2], [0.1], [0.095]]
    profile = {"bucket_edges": [0], "slots": 4, "accuracy": acc, "count": [[900], [800], [700], [600]],
               "runs": {"greedy": [[1.0], [0.2], [0.04], [0.01]],
                        "conf>=0.7": [[1.0], [0.1], [0.02], [0.0]], "conf>=0.9": [[1.0], [0.02], [0.0], [0.0]]}}
    assert run_key(profile, "lossless") == "greedy"
    assert run_key(profile, "parallel", 0.9) == "conf>=0.9" and run_key(profile, "parallel", 0.75) == "conf>=0.7"
    assert run_key(profile, "parallel", 0.8) == "conf>=0.9"  # equally near: the stricter level
    assert run_key({k: v for k, v in profile.items() if k != "runs"}, "lossless") is None
    assert profile_prior(profile, 3, run="greedy") == pytest.approx([0.2, 0.2, 0.25])
    assert profile_prior(profile, 3, run="conf>=0.9") == pytest.approx([0.02, 0.0, 0.0])
    assert profile_prior(profile, 3)[2] == pytest.approx(0.95)  # the accuracies' ratio
    assert prior_and_strengths({"slot_profile": profile}, 3, run="conf>=0.7")[:2] == (pytest.approx([0.1, 0.2, 0.0]), "profile")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6), st.floats(0.0, 0.6), st.floats(0.0, 0.2),
       st.integers(1, 40), st.integers(1, 8), st.sampled_from(["parallel", "lossless"]))
def test_futile_lookahead_is_never_chosen(rates, step, slope, remaining, pending, mode):
    """Where (1 + A(K)) c(B, p) <= c(B, p + 1), no choice of masks beats AR: the planner's own choices (the
    stationary one and the plans to the end of an answer) are all 0, so skipping them changes nothing."""
    cost = lambda b, q: 1.0 + step * (q > 1) + slope * (q - 1)  # noqa: E731
    look = Lookahead(mode, len(rates), True, cost, SlotStats(rates, strength=1e6))
    if not look.futile(1, pending):
        return
    assert look.best(1) == 0
    if mode == "parallel":
        assert look.best_to_finish(1, pending, [(remaining, 1.0)]) == 0
    else:
        assert look.lossless_to_finish(1, pending, 0, [(remaining, 1.0)]) == 0


def test_masks_that_cannot_pay_are_settled_without_planning(monkeypatch):
    """Masks accepted 2% of the time at a cost of 20% a mask: every forward past the prompt is AR, decided
    without computing the planner's choices or the batch's answer lengths; a wide first forward (the prompt,
    where masks cost almost nothing more) is still planned."""
    from card.eval.decoding import planner, proposers

    calls = []
    for name in ("best", "best_to_finish"):
        monkeypatch.setattr(planner.Lookahead, name, lambda *a, name=name, **k: calls.append(name) or 0)
    monkeypatch.setattr(proposers, "_batch_remaining", lambda *a: calls.append("lengths") or None)
    cost = lambda b, q: 1.0 + 0.2 * min(q - 1, 1) + 0.01 * (q - 1)  # noqa: E731
    look = Lookahead("parallel", 8, True, cost, SlotStats([0.02] * 8), explore=0.0)
    proposer = MaskProposer(look, look.stats, LengthStats())
    row = lambda p: SimpleNamespace(tokens=[], max_new_tokens=16, prompt_ids=[1] * 20, pending=[1] * p)  # noqa: E731
    assert [proposer.propose([row(1)] * 4).masks for _ in range(20)] == [0] * 20 and calls == []
    proposer.propose([row(20)] * 4)
    assert calls == ["lengths", "best"]


def test_prompt_lookup_is_planned_at_its_mean_acceptance():
    """A fresh 1-gram estimate (prior 0.45) does not pay for 8 drafts that double a one-token forward's cost,
    though read optimistically it did (SmolLM2 on this CPU kept paying for such lookups); the same drafts
    are taken where they cost little more than the forward itself. The optimistic reading is tried once the
    exploration budget saved up covers its extra cost."""
    from card.eval.decoding.proposers import DraftProposer

    def proposer(cost, budget=0.0):
        est = Estimates.start([0.02] * 8, "untrained")
        est.explore_budget = budget
        return DraftProposer(8, ("mask", "ngram"), Lookahead("lossless", 8, True, cost, est.masks), est, cost, True)

    text = list(range(5, 17)) * 2 + [9]  # the last token's only match is a 1-gram: 9 -> 10, 11, ...

    def row(pending, forwards=1):
        return SimpleNamespace(tokens=[], max_new_tokens=32, prompt_ids=text, pending=pending, forwards=forwards)

    costly = lambda b, q: 1.0 + 1.0 * (q > 1) + 0.01 * q  # noqa: E731  an extra token doubles the cost
    cheap = lambda b, q: 1.0 + 0.02 * (q - 1)  # noqa: E731
    for cost, drafted in ((costly, False), (cheap, True)):
        p = proposer(cost)
        r = row([text[-1]])
        p.start(r)
        prop = p.propose([r])
        assert bool(prop.drafts[0]) == drafted and prop.sources[0] == ("ngram1" if drafted else None)
    p = proposer(costly, budget=10.0)  # more than the exploring forward's extra cost: paid from it
    r = row([text[-1]])
    p.start(r)
    assert p.propose([r]).drafts[0] and p.estimates.explore_budget < 10.0


def test_lookups_at_a_prompts_end_are_learnt_on_their_own():
    """On a prompt's first forward the text's last tokens are the prompt's end, a template boundary whose
    earlier matches are followed by another part of the template (none of 16 such GSM8K lookups was
    accepted): they start from their own low prior, so a wide prefill does not carry them on the 1-gram
    prior's promise, and they are taken once that estimate has seen them accepted."""
    from card.eval.decoding.proposers import DraftProposer

    text = list(range(5, 17)) * 2 + [9]
    costly = lambda b, q: 1.0 + 1.0 * (q > 1) + 0.05 * q  # noqa: E731
    est = Estimates.start([0.02] * 8, "untrained")
    p = DraftProposer(8, ("mask", "ngram"), Lookahead("lossless", 8, True, costly, est.masks), est, costly, True)
    first = SimpleNamespace(tokens=[], max_new_tokens=32, prompt_ids=text, pending=list(text), forwards=0)
    p.start(first)
    assert p.propose([first]).drafts[0] == []  # 1-gram's prior would pay: 8 tokens add 12% to 3.25
    for _ in range(6):
        est.prompt_end.observe(8, 8)
        est.prompt_end.forget()
    prop = p.propose([first])
    assert prop.drafts[0] == list(range(10, 17)) + [9] and prop.sources == ["prompt-end"]


def test_draft_sources_are_counted_per_result(stories):
    """Each result records its drafts per source (offered, accepted, lookups ending in a rejection), and
    they add up to its draft totals."""
    prompts = [[1] + list(range(300, 312)) * 3, "Once upon a time, there was a little girl named Lily. Lily"]
    for r in decode(DecodingSpec("lossless", block_size=4, lookahead="fixed", drafts="ngram"), stories.model,
                    stories.tokenizer, prompts, max_new_tokens=32, batch_size=1):
        sources = r.lookahead["draft_sources"]
        assert set(sources) <= {"ngram1", "ngram2", "ngram3", "prompt-end"}
        assert sum(s["offered"] for s in sources.values()) == r.lookahead["drafts"]
        assert sum(s["accepted"] for s in sources.values()) == r.lookahead["drafts_accepted"]
        assert all(s["rejected"] <= s["forwards"] and s["accepted"] <= s["offered"] for s in sources.values())
    assert sources


def test_a_stalled_batch_drafts_nothing_without_looking_up_the_other_rows():
    """A row holding the batch's largest budget with no lookup commits one token whatever the others draft, so
    no draft can shorten the batch: the proposer drafts nothing and leaves the other rows' lookups undone;
    once that row has a lookup too, every row is looked up and the choice is made."""
    from card.eval.decoding.proposers import DraftProposer

    cheap = lambda b, q: 1.0 + 0.001 * (q - 1)  # noqa: E731  drafts nearly free: any good draft pays
    est = Estimates.start([0.02] * 8, "untrained")
    p = DraftProposer(8, ("mask", "ngram"), Lookahead("lossless", 8, True, cheap, est.masks), est, cheap, True)
    text = list(range(5, 17)) * 3

    def row(ids, left):
        return SimpleNamespace(tokens=[0] * (32 - left), max_new_tokens=32, prompt_ids=ids, pending=ids[-1:],
                               forwards=1, drafts=[])

    lead, other = row([1, 2, 3, 4], 20), row(text, 18)  # the lead row's last token never occurred before
    for r in (lead, other):
        p.start(r)
    prop = p.propose([lead, other])
    assert prop.drafts == [[], []] and prop.sources == [None, None] and other.ngram.indexed == 0
    lead2 = row(text, 20)
    p.start(lead2)
    p._skip = 0
    prop = p.propose([lead2, other])
    assert other.ngram.indexed == len(text) and prop.drafts[0] and prop.drafts[1]

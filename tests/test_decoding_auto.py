"""Decoding specs, the cost model c(B, q), the cost-aware lookahead and prompt-lookup drafts.

Lossless output is checked against greedy AR under every lookahead choice, draft source and batch size;
the planner's choices against brute force; the cost cache against real timed forwards of a real model.
"""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from card.checkpoint import load_checkpoint
from card.convert import convert
from card.errors import CardError
from card.eval.decoding import CostModel, DecodingSpec, decode, decode_ar, decode_lossless, decode_parallel, parse_modes
from card.eval.decoding import cost as cost_mod
from card.eval.decoding.planner import (
    Lookahead,
    SlotStats,
    accepted_curve,
    best_lookahead,
    critical_gain,
    lossless_rate,
    parallel_rate,
    prior_and_strengths,
    profile_prior,
    survival,
    warn_untrained,
)
from card.eval.decoding.proposers import NgramIndex

pytestmark = pytest.mark.usefixtures("one_thread", "private_cost_cache")


@pytest.fixture(scope="module")
def tiny(tiny_ckpt, tmp_path_factory):
    cache = {}

    def make(arch="llama", seed=0):
        if (arch, seed) not in cache:
            dst = tmp_path_factory.mktemp(f"auto-{arch}-{seed}") / "card"
            convert(str(tiny_ckpt(arch, seed)), dst)
            cache[arch, seed] = load_checkpoint(dst, dtype="float32", require_card=True)
        return cache[arch, seed]

    return make


@pytest.fixture(scope="module")
def stories(stories_card):
    return load_checkpoint(stories_card, dtype="float32", require_card=True)


# ------------------------------------------------------------------------------------------ spec
def test_spec_parses_modes_defaults_and_overrides():
    assert DecodingSpec.parse("parallel@0.7").threshold == 0.7
    s = DecodingSpec.parse("lossless", block_size="4")
    assert (s.block_size, s.lookahead, s.draft_sources) == (4, "fixed", ("mask",))
    s = DecodingSpec.parse("lossless", block_size="auto")
    assert (s.block_size, s.lookahead, s.draft_sources) == (None, "auto", ("mask", "ngram"))
    assert DecodingSpec.parse("lossless", drafts="ngram", block_size=3).draft_sources == ("ngram",)
    meta = type("M", (), {"decoding": type("D", (), {"threshold": 0.8, "block_size": 6})()})()
    r = DecodingSpec.parse("parallel").resolve(meta)
    assert (r.threshold, r.block_size, r.lookahead) == (0.8, 6, "auto")
    assert DecodingSpec.parse("parallel@0.5", block_size=2).resolve(meta).settings()["block_size"] == 2
    assert [s.text for s in parse_modes("ar, parallel@0.7,lossless")] == ["ar", "parallel@0.7", "lossless"]
    assert DecodingSpec.parse("parallel@0.7", block_size=3).label(True) == "parallel@0.7 K=3"


@pytest.mark.parametrize("text,kw,message", [
    ("beam", {}, "unknown mode 'beam'"),
    ("parallel@x", {}, "not a threshold"),
    ("parallel@0", {}, r"threshold must be in \(0, 1\]"),
    ("lossless", dict(threshold=0.5), "parallel decoding only"),
    ("lossless", dict(temperature=0.7), "greedy only"),
    ("parallel", dict(block_size=-1), "block size"),
    ("parallel", dict(block_size="fast"), "block size"),
    ("parallel", dict(drafts="mask"), "lossless decoding only"),
    ("lossless", dict(drafts="beam"), "drafts must be"),
    ("parallel", dict(rule="any"), "rule"),
    ("parallel", dict(top_p=0.0), "top-p"),
    ("parallel", dict(bogus=1), "no setting bogus"),
])
def test_bad_specs_are_one_line_errors(text, kw, message):
    with pytest.raises(CardError, match=message) as e:
        DecodingSpec.parse(text, **kw)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ lossless == AR
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    model=st.sampled_from([("llama", 0), ("gpt2", 0), ("qwen2", 0), ("llama", 1), ("stories", 0)]),
    base=st.lists(st.lists(st.integers(3, 299), min_size=1, max_size=6), min_size=1, max_size=4),
    repeat=st.integers(1, 3),
    block_size=st.sampled_from(["auto", 0, 1, 3, 6]),
    drafts=st.sampled_from([None, "mask", "ngram", "mask+ngram"]),
    batch_size=st.sampled_from([None, 1, 2, 3]),
    max_new_tokens=st.integers(1, 28),
)
def test_lossless_equals_greedy_ar_for_every_lookahead_draft_source_and_batch(
        model, base, repeat, block_size, drafts, batch_size, max_new_tokens, tiny, stories):
    ck = stories if model[0] == "stories" else tiny(*model)
    prompts = [[1] + p * repeat for p in base]  # repeated text: prompt lookup finds matches
    ar = decode_ar(ck.model, ck.tokenizer, prompts, max_new_tokens=max_new_tokens)
    ll = decode_lossless(ck.model, ck.tokenizer, prompts, max_new_tokens=max_new_tokens, block_size=block_size,
                         drafts=drafts, batch_size=batch_size)
    for a, b in zip(ar, ll, strict=True):
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
        assert b.forwards <= a.forwards and sum(map(len, b.steps)) == b.new_tokens


def test_prompt_lookup_drafts_are_accepted_on_repetitive_text(stories):
    """The greedy stories260K repeats itself: n-gram drafts get accepted, and output stays AR's."""
    prompts = ["Once upon a time", "Lily went to the park. She saw a big dog. The dog", "One day, a little dog"]
    ar = decode_ar(stories.model, stories.tokenizer, prompts, max_new_tokens=96)
    ll = decode_lossless(stories.model, stories.tokenizer, prompts, max_new_tokens=96, drafts="ngram", block_size=4)
    assert [x.token_ids for x in ll] == [x.token_ids for x in ar]
    assert sum(x.lookahead["drafts_accepted"] for x in ll) > 0
    assert sum(x.forwards for x in ll) < sum(x.forwards for x in ar)
    assert all(x.lookahead["masks"] == 0 for x in ll)  # prompt lookup alone needs no masks


def test_auto_lookahead_results_record_the_choice_and_break_even(stories):
    r = decode(DecodingSpec("lossless"), stories.model, stories.tokenizer, ["Once upon a time"], max_new_tokens=16)[0]
    look = r.lookahead
    assert look["policy"] == "auto" and look["max"] == 8 and look["prior"] == "untrained"
    assert look["break_even_1"] >= 1.0 and look["cost"]["break_even"] >= look["break_even_1"]
    assert r.settings["lookahead"] == "auto" and r.settings["drafts"] == "mask+ngram"
    json.dumps(r.to_dict())


def test_parallel_on_an_unadapted_checkpoint_warns_once(tiny, capsys, monkeypatch):
    from card.eval.decoding import planner

    monkeypatch.setattr(planner, "_WARNED", set())  # as in a fresh process
    ck = tiny("gpt2", 0)
    decode_lossless(ck.model, ck.tokenizer, ["hi"], max_new_tokens=2)
    assert "untrained" not in capsys.readouterr().err  # lossless stays exact: no warning
    for _ in range(2):
        decode_parallel(ck.model, ck.tokenizer, ["hi"], max_new_tokens=2)
    err = capsys.readouterr().err
    assert err.count("masks are untrained") == 1 and len(err.strip().splitlines()) == 1
    warn_untrained(ck.model, "parallel")
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------ cost model
def test_cost_model_is_measured_once_then_read_from_disk(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("CARD_CACHE_DIR", str(tmp_path))  # empty: whatever earlier tests measured is not there
    ck = tiny("llama", 0)
    calls = []
    handle = ck.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        monkeypatch.setattr(cost_mod, "_MEMORY", {})
        cm = CostModel.for_model(ck.model)
        t = cm.table(3)  # priced at the grid point 4
        assert set(t) == set(cost_mod.QUERY_GRID) and calls and 0 < cm.measured_seconds < 5
        assert all(t[a] <= t[b] for a, b in zip(sorted(t), sorted(t)[1:]))  # non-decreasing in q
        assert cm.path.exists() and cm.break_even(4, 8) >= 1.0
        n = len(calls)
        monkeypatch.setattr(cost_mod, "_MEMORY", {})  # a new process: only the file is left
        again = CostModel.for_model(ck.model)
        assert again.table(4) == t and len(calls) == n  # no forward: read from the cache file
        torch.set_num_threads(2)
        try:
            assert CostModel.for_model(ck.model).path != cm.path  # threads are part of the key
        finally:
            torch.set_num_threads(1)
    finally:
        handle.remove()


def test_the_weights_are_hashed_again_only_once_they_change(tiny, monkeypatch):
    ck = tiny("llama", 0)  # shared with other tests: the weights are put back exactly (x2, then x0.5)
    hashed = []
    real = cost_mod.fingerprint
    monkeypatch.setattr(cost_mod, "fingerprint", lambda m: hashed.append(1) or real(m))
    monkeypatch.setattr(cost_mod, "_WEIGHTS", weakref.WeakKeyDictionary())
    first = CostModel.for_model(ck.model).key["weights"]
    assert CostModel.for_model(ck.model).key["weights"] == first and len(hashed) == 1  # looked up, not hashed
    weight = next(ck.model.parameters())
    try:
        with torch.no_grad():
            weight.mul_(2.0)  # changed in place: another model, another cost table
        assert CostModel.for_model(ck.model).key["weights"] != first and len(hashed) == 2
        assert cost_mod.weights_fingerprint(ck.model) == real(ck.model)
    finally:
        with torch.no_grad():
            weight.mul_(0.5)
    assert CostModel.for_model(ck.model).key["weights"] == first


def test_a_replaced_weight_is_seen_and_every_tensor_is_watched(tiny, monkeypatch):
    """The fingerprint's state covers exactly the parameters and buffers (the tied embedding once per holder),
    and a parameter replaced by another object (not changed in place) gives another key."""
    ck = tiny("llama", 0)
    model = ck.model
    assert {id(t) for t in cost_mod._tensors(model)} == {id(t) for t in (*model.parameters(), *model.buffers())}
    monkeypatch.setattr(cost_mod, "_WEIGHTS", weakref.WeakKeyDictionary())
    first = cost_mod.weights_fingerprint(model)
    norm = model.model.norm
    old = norm.weight
    try:
        norm.weight = torch.nn.Parameter(old.detach() * 3.0)
        assert cost_mod.weights_fingerprint(model) != first
    finally:
        norm.weight = old
    assert cost_mod.weights_fingerprint(model) == first


def test_fresh_estimates_share_the_plans_made_from_the_same_prior():
    """A decode call starts its estimates afresh from the checkpoint's prior; the plans to the end made from
    them are kept (read-only) for the next call with the same prior instead of being made again."""
    from card.eval.decoding.planner import Lookahead, SlotStats

    cost = lambda b, q: 1.0 + 0.1 * (q - 1)  # noqa: E731
    tables = [Lookahead("parallel", 6, True, cost, SlotStats([0.8] * 6))._finish_tables(2) for _ in range(2)]
    assert tables[0][0] is tables[1][0] and tables[0][1] is tables[1][1]
    other = Lookahead("parallel", 6, True, cost, SlotStats([0.5] * 6))._finish_tables(2)
    assert other[0] is not tables[0][0]
    lossless = [Lookahead("lossless", 6, True, cost, SlotStats([0.8] * 6)) for _ in range(2)]
    assert lossless[0].lossless_to_finish(2, 1, 0, [(5, 1.0)]) == lossless[1].lossless_to_finish(2, 1, 0, [(5, 1.0)])


def test_prepare_measures_the_cost_model_before_a_timed_decode(tiny, monkeypatch, tmp_path):
    """The lm-eval model times whole decode calls: after ``prepare`` none of them measures anything."""
    from card.eval.decoding import prepare

    monkeypatch.setenv("CARD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cost_mod, "_MEMORY", {})
    ck = tiny("llama", 0)
    prepare(ck.model, "ar", [3])  # AR needs no cost model
    assert cost_mod.CostModel.for_model(ck.model).tables == {}
    prepare(ck.model, "lossless", [3, 1])
    # Every size a batch of 3 passes through as its rows finish: 4, 2 and 1.
    assert set(cost_mod.CostModel.for_model(ck.model).tables) == {4, 2, 1}

    def no_measuring(*a, **k):
        raise AssertionError("measured during a timed decode")

    monkeypatch.setattr(cost_mod, "measure_table", no_measuring)
    out = decode(DecodingSpec("lossless"), ck.model, ck.tokenizer, ["ab", "cd", "ef", "gh"], max_new_tokens=4,
                 batch_size=3)
    assert len(out) == 4


@given(table=st.dictionaries(st.sampled_from(cost_mod.QUERY_GRID), st.floats(1e-4, 1.0), min_size=2),
       q=st.floats(1, 40))
def test_cost_interpolation_is_monotone_and_exact_on_the_grid(table, q):
    t = cost_mod.monotone(table)
    for k, v in t.items():
        assert cost_mod.interpolate(t, k) == pytest.approx(v)
    assert cost_mod.interpolate(t, q) <= cost_mod.interpolate(t, q + 1) + 1e-12


@given(table=st.dictionaries(st.sampled_from(cost_mod.QUERY_GRID), st.floats(1e-4, 1.0), min_size=2),
       q=st.floats(1, 200))
def test_cost_model_never_falls_with_q_past_the_grid_either(table, q):
    cm = cost_mod.CostModel({}, None, {1: table})
    assert cm(1, q) <= cm(1, q + 1) + 1e-12 and cm(1, q) >= cm.table(1)[min(table)] - 1e-12


def test_a_prompts_forward_is_priced_by_the_measured_last_segment():
    """SmolLM2-135M on this CPU (2 threads, ms): 2 and 3 query tokens are slow paths, slower than 5-17. The
    non-decreasing table is flat from 3 to 17, and extrapolated from its own last segment a prompt's forward
    of 80 tokens cost what one of 17 did (its lookups looked free); the measured 9 -> 17 slope prices every
    extra token (1.9 ms; 1.6 ms measured directly between 33 and 97 tokens)."""
    measured = {1: 57.2, 2: 98.4, 3: 116.8, 5: 78.8, 9: 92.4, 17: 107.6}
    cm = cost_mod.CostModel({}, None, {1: measured})
    assert cm.table(1)[17] == cm.table(1)[3] == 116.8  # noise must not make a longer forward look cheaper
    slope = (107.6 - 92.4) / 8
    assert cm(1, 81) == pytest.approx(116.8 + slope * 64)
    assert cm(1, 89) - cm(1, 81) == pytest.approx(8 * slope)


# ------------------------------------------------------------------------------------------ planner
rates_st = st.lists(st.floats(0, 1), min_size=1, max_size=8)


@given(rates=rates_st, slope=st.floats(0, 2), batch=st.integers(1, 16))
def test_best_lookahead_is_the_argmax_and_zero_is_ar(rates, slope, batch):
    def cost(q):
        return 1.0 + slope * (q - 1)

    K = len(rates)
    curve = accepted_curve(rates)
    for rate in (lambda m: parallel_rate(curve, m, cost), lambda m: lossless_rate(rates, m, batch, cost)):
        m = best_lookahead(rate, K, margin=1.0)
        assert rate(m) >= max(rate(j) for j in range(K + 1)) * (1 - 1e-9)
    assert parallel_rate(curve, 0, cost) == 1.0 and lossless_rate(rates, 0, batch, cost) == batch


@given(slope=st.floats(0.01, 2), batch=st.integers(1, 16), k=st.integers(1, 8))
def test_useless_masks_and_growing_cost_choose_no_lookahead(slope, batch, k):
    def cost(q):
        return 1.0 + slope * (q - 1)

    zero = [0.0] * k
    assert best_lookahead(lambda m: parallel_rate(accepted_curve(zero), m, cost), k) == 0
    assert best_lookahead(lambda m: lossless_rate(zero, m, batch, cost), k) == 0
    perfect = [1.0] * k  # always accepted, nearly free: the whole block
    assert best_lookahead(lambda m: parallel_rate(accepted_curve(perfect), m, lambda q: 1 + 1e-3 * q), k) == k


def test_measured_cost_with_untrained_prior_plans_ar_and_explores_little(tiny):
    ck = tiny("llama", 0)
    cm = CostModel.for_model(ck.model)
    prior, source, _ = prior_and_strengths(ck.model.config.card, 8)
    assert source == "untrained"
    for mode in ("parallel", "lossless"):
        look = Lookahead(mode, 8, True, cm, SlotStats(prior))
        chosen = [look.masks(4) for _ in range(400)]
        assert look.best(4) == 0
        assert 0 < sum(m > 0 for m in chosen) < 0.25 * len(chosen)  # bounded exploration happens
        assert set(chosen) == {0, 8}  # an exploring forward carries the whole block


def test_exploration_fades_on_a_slot_that_keeps_failing():
    """Useless masks confirmed by observation cost a fraction of the exploration they cost at first."""
    cost = lambda b, q: 1.0 + 0.2 * (q - 1)  # noqa: E731
    fresh = Lookahead("parallel", 4, True, cost, SlotStats([0.02] * 4))
    unobserved = sum(fresh.masks(1) > 0 for _ in range(3000))  # nothing learnt: the full share
    stats = SlotStats([0.02] * 4)
    look = Lookahead("parallel", 4, True, cost, stats)
    late = 0
    for i in range(6000):
        m = look.masks(1)
        late += i >= 3000 and m > 0
        stats.observe(m, 0)  # never accepted
        stats.forget()
    assert 0 < late < 0.5 * unobserved


@given(st.floats(0, 60), st.floats(0, 60))
def test_explore_weight_is_one_without_failures_and_falls_with_them(tries, fails):
    from card.eval.decoding.planner import explore_weight

    assert explore_weight(tries, tries) == 1.0
    assert explore_weight(tries + fails, tries) <= explore_weight(tries + fails / 2, tries) <= 1.0


def test_estimates_carry_over_batches_and_calls_and_lossless_stays_ar(stories):
    """Short answers give a batch few forwards: what one batch learnt, the next (and the next call) starts from."""
    from card.eval.decoding import start_estimates

    spec = DecodingSpec("lossless")
    prompts = ["Once upon a time, there was a cat. The cat", "One day, a little girl named Lily", "Tom had a red ball"]
    est = start_estimates(stories.model, spec)

    def learnt() -> int:
        return est.masks.version + sum(s.version for s in est.ngram)

    ar = decode_ar(stories.model, stories.tokenizer, prompts, max_new_tokens=24, batch_size=1)
    first = decode(spec, stories.model, stories.tokenizer, prompts, max_new_tokens=24, batch_size=1, estimates=est)
    after_first = learnt()
    assert after_first > 0
    again = decode(spec, stories.model, stories.tokenizer, prompts, max_new_tokens=24, batch_size=1, estimates=est)
    assert learnt() > after_first
    for a, x, y in zip(ar, first, again):
        assert a.token_ids == x.token_ids == y.token_ids


def test_exploration_discovers_good_masks():
    stats = SlotStats([0.02] * 4)
    look = Lookahead("parallel", 4, True, lambda b, q: 1.0 + 0.05 * (q - 1), stats)
    for _ in range(300):
        m = look.masks(1)
        stats.observe(m, m)  # every mask is accepted
        stats.forget()
    assert look.best(1) == 4


def test_slot_profile_prior_is_read_tolerantly():
    profile = {"format": 1, "measured_by": "test", "tokens": 100, "bucket_edges": [0, 16],
               "slots": 3, "accuracy": [[0.5, 0.7], [0.3, 0.35], [0.1, None]], "count": [[10, 30], [10, 30], [5, 0]]}
    rates = profile_prior(profile, 4)
    assert len(rates) == 4 and rates[0] == pytest.approx((0.3 * 10 + 0.35 * 30) / 40 / ((0.5 * 10 + 0.7 * 30) / 40))
    assert rates[2] < rates[1] and all(0 <= r <= 1 for r in rates)
    assert prior_and_strengths({"slot_profile": profile, "adaptation": []}, 4)[:2] == (rates, "profile")
    assert prior_and_strengths({"slot_profile": {"accuracy": "junk"}, "adaptation": [{}]}, 2)[1] == "adapted"
    assert prior_and_strengths({}, 2)[:2] == ([0.02, 0.02], "untrained")


# ------------------------------------------------------------------------------------------ prompt lookup
@given(seq=st.lists(st.integers(0, 4), min_size=1, max_size=40), split=st.integers(0, 40), length=st.integers(1, 6))
def test_ngram_index_finds_the_latest_earlier_match(seq, split, length):
    idx = NgramIndex(seq[:split])
    idx.extend(seq[split:])
    got, n = idx.lookup(length)
    want, want_n = [], 0
    for size in (3, 2, 1):  # brute force: the longest suffix with an earlier occurrence, its latest one
        if len(seq) < size:
            continue
        suffix = seq[-size:]
        starts = [i for i in range(len(seq) - size) if seq[i:i + size] == suffix]
        if starts:
            j = max(starts) + size
            want, want_n = seq[j:j + length], size
            break
    assert (got, n) == (want, want_n)


@given(table=st.dictionaries(st.sampled_from(cost_mod.QUERY_GRID), st.floats(1e-4, 1.0), min_size=2))
def test_cost_never_exceeds_q_one_token_forwards(table):
    t = cost_mod.monotone(table)
    first = table[min(table)]
    assert all(t[q] <= q * first * (1 + 1e-12) for q in t)


# ------------------------------------------------------------------------------------------ batch progress
def _brute_critical_gain(remaining, rates_per_row):
    """E[R_max - max_r Y_r] by enumerating every row's accepted count X_r (P(X = j) from its slot rates)."""
    import itertools

    def dist(rates):
        out, run = [], 1.0
        for a in rates:
            out.append(run * (1 - a))
            run *= a
        return out + [run]  # P(X = j), j = 0..len(rates)

    top = max(remaining)
    expected = 0.0
    for xs in itertools.product(*[list(enumerate(dist(r))) for r in rates_per_row]):
        p = 1.0
        for _, q in xs:
            p *= q
        worst = max(max(0, rem - 1 - x) for rem, (x, _) in zip(remaining, xs))
        expected += p * (top - worst)
    return expected


rates_st = st.lists(st.floats(0.0, 1.0), min_size=0, max_size=4)


@given(st.lists(st.tuples(st.integers(1, 9), rates_st), min_size=1, max_size=3))
@settings(max_examples=200, deadline=None)
def test_critical_gain_equals_brute_force(rows):
    remaining = [r for r, _ in rows]
    rates = [a[:max(0, r - 1)] for r, a in rows]  # a row cannot draft past its remaining budget
    survivals = [survival(accepted_curve(a), len(a)) for a in rates]
    assert critical_gain(remaining, survivals) == pytest.approx(_brute_critical_gain(remaining, rates), abs=1e-9)


@given(rates_st)
@settings(max_examples=100, deadline=None)
def test_survival_is_the_probability_of_at_least_j_accepted(rates):
    curve = accepted_curve(rates)
    s = survival(curve, len(rates))
    run = 1.0
    for j, a in enumerate(rates, start=1):
        run *= a
        assert s[j] == pytest.approx(run, abs=1e-12)
    assert s[0] == 1.0


@given(st.lists(st.integers(1, 20), min_size=1, max_size=8), rates_st)
@settings(max_examples=100, deadline=None)
def test_critical_gain_without_drafts_is_one_step_and_one_row_gains_one_plus_accepted(remaining, rates):
    assert critical_gain(remaining, [[1.0]] * len(remaining)) == pytest.approx(1.0)
    r = len(rates) + 1 + 3  # enough budget that no draft is cut
    assert critical_gain([r], [survival(accepted_curve(rates), len(rates))]) == pytest.approx(
        1.0 + accepted_curve(rates)[-1])

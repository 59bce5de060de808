"""The CARD objective's math: property tests against the definitions in docs/method.md (Training)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from card.adapt.objective import (
    ObjectiveConfig,
    ar_loss,
    card_loss,
    context_weights,
    soft_tail_mask,
    weighted_ce,
)
from tests import factory

MASK = 99


@st.composite
def rows(draw):
    """A batch of rows with right padding, a noise level per row, a tail factor and a seed."""
    batch = draw(st.integers(1, 4))
    seq = draw(st.integers(1, 48))
    lengths = draw(st.lists(st.integers(0, seq), min_size=batch, max_size=batch))
    t = draw(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=batch, max_size=batch))
    lam = draw(st.one_of(st.just(1.0), st.floats(1.0, 4.0)))
    seed = draw(st.integers(0, 2**31 - 1))
    ids = torch.randint(0, MASK, (batch, seq), generator=torch.Generator().manual_seed(seed))
    valid = torch.arange(seq)[None] < torch.tensor(lengths)[:, None]
    return ids, valid, torch.tensor(t, dtype=torch.float64), lam, seed


@settings(max_examples=300, deadline=None)
@given(rows())
def test_soft_tail_mask_counts_window_and_padding(case):
    ids, valid, t, lam, seed = case
    corrupted, masked = soft_tail_mask(ids, t, lam, MASK, torch.Generator().manual_seed(seed), valid)
    for b in range(ids.shape[0]):
        length = int(valid[b].sum())
        positions = [j for j in range(ids.shape[1]) if masked[b, j]]
        if length == 0:
            assert positions == []
            continue
        n = max(1, math.floor(length * float(t[b])))
        w = min(length, math.floor(lam * n))
        assert len(positions) == n  # exactly N masks
        assert all(length - w <= j < length for j in positions)  # inside the last W valid positions
        assert not masked[b, length:].any()  # padding never masked
        if lam == 1.0:
            assert positions == list(range(length - n, length))  # strict tail: a contiguous suffix
    assert torch.equal(corrupted, torch.where(masked, torch.full_like(ids, MASK), ids))


def test_soft_tail_mask_is_uniform_inside_the_window():
    """Every window position is equally likely: N/W each (here 4/12), to within sampling error."""
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(20000, 16, dtype=torch.long)
    t = torch.full((20000,), 0.25, dtype=torch.float64)  # N = 4, W = floor(3 * 4) = 12
    _, masked = soft_tail_mask(ids, t, 3.0, MASK, g)
    freq = masked.double().mean(0)
    assert freq[:4].max() == 0
    assert torch.allclose(freq[4:], torch.full((12,), 4 / 12, dtype=torch.float64), atol=0.015)


def test_soft_tail_mask_respects_maskable_subset():
    ids = torch.arange(10)[None]
    maskable = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    _, masked = soft_tail_mask(ids, torch.tensor([1.0]), 1.0, MASK, torch.Generator().manual_seed(1), maskable)
    assert torch.equal(masked, maskable)


def _loop_weights(m: list[int], p: float, beta: float) -> list[float]:
    out, s, prev = [], 0.0, 0
    for mj in m:
        c = mj * (1 + prev)
        s = c + (1 - p) * s
        out.append(1.0 / (beta + s))
        prev = mj
    return out


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 1), min_size=1, max_size=80), min_size=1, max_size=3).filter(
        lambda r: len({len(x) for x in r}) == 1
    ),
    st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0)),
    st.floats(0.05, 5.0),
)
def test_context_weights_equal_the_recursion(masks, p, beta):
    m = torch.tensor(masks, dtype=torch.bool)
    got = context_weights(m, p, beta)
    want = torch.tensor([_loop_weights(row, p, beta) for row in masks], dtype=torch.float64)
    assert torch.allclose(got.double(), want, rtol=0, atol=1e-6)
    # No mask anywhere up to j: w_j = 1 / beta.
    for b, row in enumerate(masks):
        first = row.index(1) if 1 in row else len(row)
        assert torch.allclose(got[b, :first].double(), torch.full((first,), 1 / beta, dtype=torch.float64), atol=1e-7)


def test_context_weights_long_sequence_small_decay():
    """A slow decay needs a long kernel: still equal to the recursion over 2,000 positions."""
    g = torch.Generator().manual_seed(0)
    m = torch.rand(2, 2000, generator=g) < 0.3
    for p in (0.001, 0.05):
        want = torch.tensor([_loop_weights(r.int().tolist(), p, 1.0) for r in m], dtype=torch.float64)
        assert torch.allclose(context_weights(m, p, 1.0).double(), want, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_on_clean_input_equals_transformers_causal_lm_loss(arch):
    model, tok = factory.tiny_model(arch)
    ids = tok(["Once upon a time there was a dog. 12 + 35 = 47."] * 2, return_tensors="pt").input_ids
    with torch.no_grad():
        hf = model(input_ids=ids, labels=ids).loss
        logits = model(input_ids=ids[:, :-1]).logits
    w = context_weights(torch.zeros_like(ids, dtype=torch.bool), 0.5, 1.0)[:, :-1]
    ours, _ = weighted_ce(logits, ids[:, 1:], w, torch.ones_like(w, dtype=torch.bool))
    assert torch.allclose(ours, hf, atol=1e-6)
    assert abs(ar_loss(model, ids)[0] - hf.item()) < 1e-6


def test_loss_ignores_padding_like_transformers():
    model, tok = factory.tiny_model("llama")
    ids = tok(["Tom had a red ball. He threw it.", "The sun was bright."], return_tensors="pt", padding=True,
              padding_side="right")
    labels = ids.input_ids.masked_fill(ids.attention_mask == 0, -100)
    with torch.no_grad():
        hf = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, labels=labels).loss
    ours, n = ar_loss(model, ids.input_ids, ids.attention_mask.bool())
    assert abs(ours - hf.item()) < 1e-6 and n == int(ids.attention_mask[:, 1:].sum())


def test_card_loss_masks_tail_and_supervises_every_position():
    model, tok = factory.tiny_model("llama")
    ids = tok(["Once upon a time there was a little girl named Lily who loved to play."] * 4,
              return_tensors="pt").input_ids
    cfg = ObjectiveConfig(tail_factor=1.0, t_min=0.5, t_max=0.5)
    out = card_loss(model, ids, 299, cfg, torch.Generator().manual_seed(0))
    n = ids.shape[1]
    assert out.tokens == 4 * (n - 1)
    assert out.mask_ratio == pytest.approx(math.floor(n * 0.5) / n)
    out.loss.backward()
    assert model.get_input_embeddings().weight.grad[299].abs().sum() > 0  # the mask row is trained
    # Same seed, same loss: a step is a pure function of its generator.
    again = card_loss(model, ids, 299, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(out.loss.detach(), again.loss.detach())


def test_targets_restrict_supervision_to_completions():
    """loss_scope completion: only completion tokens are targets; the prompt is still attended to."""
    model, tok = factory.tiny_model("llama")
    ids = tok(["Tom had a red ball. It was red."], return_tensors="pt").input_ids
    targets = torch.zeros_like(ids, dtype=torch.bool)
    targets[:, -4:] = True  # the "completion"
    loss, n = ar_loss(model, ids, targets=targets)
    labels = ids.masked_fill(~targets, -100)
    with torch.no_grad():
        hf = model(input_ids=ids, labels=labels).loss
    assert n == 4 and abs(loss - hf.item()) < 1e-6
    out = card_loss(model, ids, 299, ObjectiveConfig(), torch.Generator().manual_seed(0), targets=targets)
    assert out.tokens == 4

"""The lm-eval model ``card`` on the real converted stories260K, offline, against independent references.

* likelihoods: per-request equality with lm-eval's own ``hf`` backend on the same checkpoint;
* rolling likelihoods: equality with the document log-probability computed directly with ``transformers``;
* generation: AR equals the ``hf`` backend's generations, parallel decoding with block size 0 equals AR,
  parallel decoding at a low threshold commits more than one token per forward.
"""

from __future__ import annotations

import math

import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from card.checkpoint import load_checkpoint
from card.errors import CardError
from card.eval.lm_model import CardLM, decode_totals
from card.eval.runner import BUNDLED_TASKS

pytestmark = pytest.mark.usefixtures("one_thread")

LIMIT = 8
SCORING_TASKS = ["card_piqa", "card_hellaswag", "card_tinystories_ppl"]
GEN_TASKS = ["card_gsm8k", "card_tinystories_cont"]








@pytest.fixture(scope="module")
def stories(stories_card):
    return load_checkpoint(stories_card, dtype="float32", require_card=True)


@pytest.fixture(scope="module")
def tm():
    return TaskManager(include_path=str(BUNDLED_TASKS), include_defaults=False)


def run(lm, tasks, tm, limit=LIMIT):
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, log_samples=True,
                                   bootstrap_iters=0)


def by_doc(results, task):
    return {s["doc_id"]: s for s in results["samples"][task]}


@pytest.fixture(scope="module")
def hf_scoring(stories_card, tm):
    """lm-eval's own hf backend, loading the checkpoint itself."""
    lm = HFLM(pretrained=str(stories_card), dtype="float32", device="cpu", batch_size=8)
    return lm, run(lm, SCORING_TASKS, tm)


@pytest.fixture(scope="module")
def card_scoring(stories_card, tm):
    """The card model built from the checkpoint path (as ``lm_eval --model card`` does)."""
    lm = CardLM(pretrained=str(stories_card), dtype="float32", device="cpu", batch_size=8)
    return lm, run(lm, SCORING_TASKS, tm)


# ------------------------------------------------------------------------------------------ likelihoods
@pytest.mark.parametrize("task", ["card_piqa", "card_hellaswag"])
def test_loglikelihoods_equal_the_hf_backend(hf_scoring, card_scoring, task):
    hf, card = by_doc(hf_scoring[1], task), by_doc(card_scoring[1], task)
    assert sorted(hf) == sorted(card) and len(card) == LIMIT
    n = 0
    for doc_id, sample in card.items():
        ref = hf[doc_id]["resps"]
        assert len(sample["resps"]) == len(ref) >= 2  # one loglikelihood request per choice
        for (ll, greedy), (ref_ll, ref_greedy) in ((r[0], q[0]) for r, q in zip(sample["resps"], ref, strict=True)):
            assert abs(float(ll) - float(ref_ll)) <= 1e-4
            assert bool(greedy) == bool(ref_greedy)
            n += 1
    assert n >= 2 * LIMIT
    for metric in ("acc,none", "acc_norm,none"):
        assert card_scoring[1]["results"][task][metric] == hf_scoring[1]["results"][task][metric]


def log_prob(model, ids: list[int]) -> float:
    """Total log-probability of ids[1:] given ids[0], straight from transformers."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits[0].double(), -1)
    return logp[:-1].gather(1, x[0, 1:, None]).sum().item()


def test_rolling_loglikelihood_equals_transformers(card_scoring, hf_scoring, stories):
    model, tok = stories.model, stories.tokenizer
    bos = tok.bos_token_id
    card, hf = by_doc(card_scoring[1], "card_tinystories_ppl"), by_doc(hf_scoring[1], "card_tinystories_ppl")
    assert len(card) == LIMIT
    for doc_id, sample in card.items():
        ids = [bos] + tok(sample["doc"]["text"], add_special_tokens=False)["input_ids"]
        assert len(ids) < model.config.max_position_embeddings  # one window: a direct computation is exact
        (value,) = sample["resps"][0]
        assert float(value) == pytest.approx(log_prob(model, ids), abs=1e-4, rel=1e-5)
        # lm-eval 0.4.13's hf backend scores the document after a second BOS (see card.eval.lm_model).
        assert float(hf[doc_id]["resps"][0][0]) == pytest.approx(log_prob(model, [bos] + ids), abs=1e-4, rel=1e-5)
    ppl = card_scoring[1]["results"]["card_tinystories_ppl"]["word_perplexity,none"]
    assert math.isfinite(ppl) and ppl > 1


def test_continuation_longer_than_the_window_is_scored_in_chunks(stories):
    """HFLM asserts when a continuation exceeds max_length; the card model scores it chunk by chunk, each chunk
    conditioned on the (left-truncated) window before it, and leaves continuations that fit as HFLM has them."""
    model, tok = stories.model, stories.tokenizer
    n = 10
    ctx, cont = "Once upon a time", " there was a little girl named Lily. She loved to play outside in the sun."
    short = " there was a little girl."
    reqs = [Instance("loglikelihood", {}, (ctx, c), i, ("t", i, 1)) for i, c in enumerate([cont, short])]
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=n)
    with pytest.raises(AssertionError):
        hf.loglikelihood(reqs[:1])
    card = CardLM(model, tokenizer=tok, batch_size=4, max_length=n)
    (long_ll, long_greedy), (short_ll, short_greedy) = card.loglikelihood(reqs)
    ref_ll, ref_greedy = hf.loglikelihood(reqs[1:])[0]
    assert short_ll == pytest.approx(ref_ll, abs=1e-4) and short_greedy == ref_greedy  # other batch: rounding

    ctx_ids, cont_ids = card._encode_pair(ctx, cont)  # HFLM's tokenisation; the chunking is what is tested
    assert 2 * n < len(cont_ids) < 3 * n  # three chunks, the last one partial
    full, expected, greedy = ctx_ids + cont_ids, 0.0, True
    for start in range(0, len(cont_ids), n):
        end = min(len(full), len(ctx_ids) + start + n)
        window = full[max(0, end - n - 1):end - 1]  # what HFLM feeds for context full[:end - k], k targets
        k = end - len(ctx_ids) - start
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([window])).logits[0, -k:].float(), -1)
        targets = torch.tensor(full[end - k:end])
        expected += logp.gather(1, targets[:, None]).sum().item()
        greedy &= bool((logp.argmax(-1) == targets).all())
    assert long_ll == pytest.approx(expected, abs=1e-4) and long_greedy == greedy


# ------------------------------------------------------------------------------------------ generation
@pytest.fixture(scope="module")
def card_ar(stories, tm):
    lm = CardLM(stories.model, tokenizer=stories.tokenizer, decoding="ar", batch_size=8)
    return lm, run(lm, GEN_TASKS, tm)


def test_ar_generations_equal_the_hf_backend(card_ar, stories, tm):
    hf = HFLM(pretrained=stories.model, tokenizer=stories.tokenizer, batch_size=8)
    ref = run(hf, GEN_TASKS, tm)
    for task in GEN_TASKS:
        ours, theirs = by_doc(card_ar[1], task), by_doc(ref, task)
        assert {d: s["resps"] for d, s in ours.items()} == {d: s["resps"] for d, s in theirs.items()}
    assert card_ar[1]["results"]["card_gsm8k"] == ref["results"]["card_gsm8k"]


def test_parallel_with_block_size_0_is_ar(card_ar, stories, tm):
    lm = CardLM(stories.model, tokenizer=stories.tokenizer, decoding="parallel", block_size=0, batch_size=8)
    res = run(lm, GEN_TASKS, tm)
    for task in GEN_TASKS:
        ours, ar = by_doc(res, task), by_doc(card_ar[1], task)
        assert {d: s["resps"] for d, s in ours.items()} == {d: s["resps"] for d, s in ar.items()}
        assert res["results"][task] == card_ar[1]["results"][task]
    totals = decode_totals(lm.decode_log)
    assert totals["tokens_per_forward"] == 1.0 and totals["requests"] == 2 * LIMIT


def test_decode_log_records_every_request(card_ar):
    lm = card_ar[0]
    log = list(lm.decode_log)
    assert len(log) == 2 * LIMIT
    assert {e["task"] for e in log} == set(GEN_TASKS)
    assert sorted(e["doc_id"] for e in log if e["task"] == "card_gsm8k") == list(range(LIMIT))
    assert all(e["forwards"] == e["new_tokens"] >= 1 and e["tokens_per_forward"] == 1.0 for e in log)
    assert all(e["finish_reason"] in ("eos", "stop", "length") for e in log)
    gsm = [e for e in log if e["task"] == "card_gsm8k"]
    assert all(e["new_tokens"] <= 64 for e in gsm)  # the task's max_gen_toks
    totals = decode_totals(log)
    assert totals["generated_tokens"] == sum(e["new_tokens"] for e in log)
    assert totals["seconds"] > 0 and totals["tokens_per_second"] > 0


def test_parallel_at_low_threshold_commits_more_than_one_token_per_forward(stories, tm):
    # A fixed block: with automatic lookahead the untrained masks of this conversion are tried only when the
    # exploration budget allows, which depends on timings.
    lm = CardLM(stories.model, tokenizer=stories.tokenizer, decoding="parallel", threshold=0.5, batch_size=8,
                block_size=8)
    assert lm.decoding_settings == {"decoding": "parallel", "threshold": 0.5, "block_size": 8, "lookahead": "fixed"}
    run(lm, ["card_tinystories_cont"], tm)
    log = lm.pop_decode_log()
    assert lm.decode_log == [] and len(log) == LIMIT
    totals = decode_totals(log)
    assert totals["tokens_per_forward"] > 1
    assert totals["forwards"] < totals["generated_tokens"]


def requests(prompts, gen_kwargs):
    return [Instance("generate_until", {}, (p, dict(gen_kwargs)), i, ("t", i, 1)) for i, p in enumerate(prompts)]


def test_sampling_is_seeded_and_lossless_refuses_it(stories):
    kwargs = {"until": ["\n"], "max_gen_toks": 12, "do_sample": True, "temperature": 1.0}
    prompts = ["Once upon a time", "Tom and Mia went to the park. They saw"]
    lm = CardLM(stories.model, tokenizer=stories.tokenizer, decoding="parallel", threshold=0.7, seed=3)
    first = lm.generate_until(requests(prompts, kwargs))
    assert first == lm.generate_until(requests(prompts, kwargs))
    greedy = lm.generate_until(requests(prompts, {**kwargs, "do_sample": False}))
    assert first != greedy
    lossless = CardLM(stories.model, tokenizer=stories.tokenizer, decoding="lossless")
    with pytest.raises(CardError, match="greedy only"):
        lossless.generate_until(requests(prompts, kwargs))


# ------------------------------------------------------------------------------------------ construction
def test_registered_with_lm_eval():
    assert get_model("card") is CardLM


def test_bad_arguments_fail_before_loading(data_dir, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(CardError, match="decoding mode"):
        CardLM(missing, decoding="fast")
    with pytest.raises(CardError, match=r"threshold must be in \(0, 1\]"):
        CardLM(missing, decoding="parallel", threshold=1.5)
    with pytest.raises(CardError, match="parallel decoding only"):
        CardLM(missing, decoding="ar", threshold=0.5)
    with pytest.raises(CardError, match="does not exist"):
        CardLM(missing)
    with pytest.raises(CardError, match="not a CARD checkpoint"):
        CardLM(str(data_dir / "stories260K_hf"), decoding="parallel")

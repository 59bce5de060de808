"""card.eval.decoding on real (tiny and stories260K) converted checkpoints: AR, parallel and lossless.

Every claim is checked against an independent computation: ``transformers.generate`` for AR, a no-cache
recomputation for parallel decoding, greedy AR for lossless, and one-by-one decoding for batches.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from card.checkpoint import load_checkpoint
from card.cli import app
from card.convert import convert
from card.errors import CardError
from card.eval import Request, decode, decode_ar, decode_lossless, decode_parallel, generate
from tests import factory

pytestmark = pytest.mark.usefixtures("one_thread", "private_cost_cache")

TINY_PROMPTS = ["Once upon a time", "Tom had a red ball. He threw", "12 + 35 =", "The sun"]
STORY_PROMPTS = ["Once upon a time", "Tom and Mia went to the park. They saw", "One day, a little dog", "Lily"]
TINY_THRESHOLD = 0.05  # on the unadapted tiny models this accepts 1 to 5 tokens per forward: every path runs





@pytest.fixture(scope="session")
def card_ckpt(tiny_ckpt, tmp_path_factory):
    """Factory: ``card_ckpt(arch, seed)`` -> path of the converted tiny checkpoint, converted once per session."""
    cache: dict = {}

    def make(arch: str = "llama", seed: int = 0):
        if (arch, seed) not in cache:
            dst = tmp_path_factory.mktemp(f"card-{arch}-{seed}") / "card"
            convert(str(tiny_ckpt(arch, seed)), dst)
            cache[arch, seed] = dst
        return cache[arch, seed]

    return make


@pytest.fixture(scope="session")
def loaded(card_ckpt):
    """Factory: ``loaded(arch, seed)`` -> a loaded converted tiny ``Checkpoint`` (shared: do not modify it)."""
    cache: dict = {}

    def make(arch: str = "llama", seed: int = 0):
        if (arch, seed) not in cache:
            cache[arch, seed] = load_checkpoint(card_ckpt(arch, seed), dtype="float32", require_card=True)
        return cache[arch, seed]

    return make




@pytest.fixture(scope="session")
def stories(stories_card):
    return load_checkpoint(stories_card, dtype="float32", require_card=True)


# ------------------------------------------------------------------------------------------ helpers
def hf_greedy(ck, prompt_ids, n, **kw):
    """``transformers.generate`` greedy continuation (its generation config suppresses the mask and pad rows)."""
    ids = torch.tensor([prompt_ids])
    out = ck.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                            past_key_values=tf.DynamicCache(config=ck.model.config), **kw)
    return out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def full_logits(ck, ids):
    """Logits of a plain forward over ``ids`` with no cache, suppressed ids at -inf (as every decoder does)."""
    logits = ck.model(input_ids=torch.tensor([ids])).logits[0].float()
    logits[:, ck.meta.suppressed_token_ids] = float("-inf")
    return logits


def reference_parallel(ck, prompt_ids, max_new_tokens, block_size, threshold, rule="prefix"):
    """Parallel decoding recomputed from scratch at every step (no KV cache): the tokens committed per step.

    Step: run prompt + committed + [M] * k; slot 1 = argmax at the last real token, slot j + 1 = argmax at
    mask j with confidence = its probability; accept slot 1 plus the contiguous run passing the rule.
    """
    mask, eos = ck.meta.mask_token_id, ck.model.generation_config.eos_token_id
    seq, steps, n = list(prompt_ids), [], 0
    while n < max_new_tokens:
        k = min(block_size, max_new_tokens - n - 1)
        probs = torch.softmax(full_logits(ck, seq + [mask] * k)[len(seq) - 1:], -1)
        conf, tok = probs.max(-1)
        accepted, running = 1, 1.0
        for j in range(1, k + 1):
            running = running * conf[j].item() if rule == "joint" else conf[j].item()
            if running < threshold:
                break
            accepted += 1
        new = tok[:accepted].tolist()
        if eos in new:  # EOS ends the sequence; what was accepted after it is dropped
            steps.append(new[:new.index(eos) + 1])
            break
        steps.append(new)
        seq += new
        n += len(new)
    return steps


def ids_of(ck, text):
    return ck.tokenizer(text)["input_ids"]


def same_per_prompt(a, b):
    for x, y in zip(a, b, strict=True):
        assert (x.token_ids, x.steps, x.forwards, x.finish_reason, x.text) == (
            y.token_ids, y.steps, y.forwards, y.finish_reason, y.text)


# ------------------------------------------------------------------------------------------ AR
@pytest.mark.parametrize("arch", factory.ARCHS)
def test_ar_greedy_equals_transformers_generate(arch, loaded):
    ck = loaded(arch)
    results = decode_ar(ck.model, ck.tokenizer, TINY_PROMPTS, max_new_tokens=24)
    for prompt, r in zip(TINY_PROMPTS, results):
        assert r.prompt_ids == ids_of(ck, prompt)
        assert r.token_ids == hf_greedy(ck, r.prompt_ids, 24)
        assert r.forwards == r.new_tokens == len(r.token_ids) == 24 and r.tokens_per_forward == 1.0
        assert r.steps == [[t] for t in r.token_ids]


def test_ar_greedy_equals_transformers_generate_on_stories260k(stories, data_dir):
    results = decode_ar(stories.model, stories.tokenizer, [[1]] + STORY_PROMPTS, max_new_tokens=200)
    for r in results:
        assert r.token_ids == hf_greedy(stories, r.prompt_ids, 200)
    # The converted model still reproduces llama2.c's published greedy output from BOS.
    expected = (data_dir / "stories260K" / "greedy_from_bos_200tok.txt").read_text()
    assert expected.strip().startswith(results[0].text.strip()[:300])


def test_ar_works_on_a_plain_unconverted_checkpoint(tiny_ckpt):
    ck = load_checkpoint(tiny_ckpt("llama"))
    assert not ck.is_card
    r = generate(ck, TINY_PROMPTS[:2], mode="ar", max_new_tokens=12)
    assert [x.token_ids for x in r] == [hf_greedy(ck, x.prompt_ids, 12) for x in r]
    with pytest.raises(CardError, match="needs a CARD checkpoint"):
        generate(ck, TINY_PROMPTS[:1], mode="parallel")
    with pytest.raises(CardError, match="CARD checkpoint"):
        decode_lossless(ck.model, ck.tokenizer, TINY_PROMPTS[:1])


def test_sampling_is_reproducible_and_tiny_top_p_is_greedy(loaded):
    ck = loaded("llama")
    kw = dict(max_new_tokens=20, temperature=1.0)
    a = decode_ar(ck.model, ck.tokenizer, TINY_PROMPTS, seed=1, **kw)
    b = decode_ar(ck.model, ck.tokenizer, TINY_PROMPTS, seed=1, **kw)
    c = decode_ar(ck.model, ck.tokenizer, TINY_PROMPTS, seed=2, **kw)
    greedy = decode_ar(ck.model, ck.tokenizer, TINY_PROMPTS, max_new_tokens=20)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    assert [x.token_ids for x in a] != [x.token_ids for x in greedy]
    # A nucleus of (almost) zero mass keeps only the most likely token: sampling becomes greedy.
    tiny_p = decode_ar(ck.model, ck.tokenizer, TINY_PROMPTS, seed=3, top_p=1e-6, **kw)
    assert [x.token_ids for x in tiny_p] == [x.token_ids for x in greedy]
    assert a[0].settings["temperature"] == 1.0 and a[0].settings["seed"] == 1


# ------------------------------------------------------------------------------------------ parallel
@pytest.mark.parametrize("arch", factory.ARCHS)
def test_parallel_with_block_size_zero_is_ar(arch, loaded):
    ck = loaded(arch)
    ar = decode_ar(ck.model, ck.tokenizer, TINY_PROMPTS, max_new_tokens=20)
    par = decode_parallel(ck.model, ck.tokenizer, TINY_PROMPTS, max_new_tokens=20, block_size=0, threshold=0.01)
    for a, p in zip(ar, par):
        assert p.token_ids == a.token_ids
        assert p.forwards == p.new_tokens == 20 and all(len(s) == 1 for s in p.steps)


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2", "stories"])
@pytest.mark.parametrize("threshold", [0.01, TINY_THRESHOLD, 0.5, 0.9])
def test_first_token_of_every_parallel_step_is_the_ar_greedy_token(arch, threshold, loaded, stories):
    ck = stories if arch == "stories" else loaded(arch)
    for r in decode_parallel(ck.model, ck.tokenizer, TINY_PROMPTS, max_new_tokens=24, block_size=4,
                             threshold=threshold):
        prefix = list(r.prompt_ids)
        for step in r.steps:
            assert step[0] == full_logits(ck, prefix)[-1].argmax().item()
            prefix += step


@pytest.mark.parametrize("arch", factory.ARCHS + ["stories"])
@pytest.mark.parametrize("rule", ["prefix", "joint"])
def test_parallel_equals_a_no_cache_reference(arch, rule, loaded, stories):
    """The KV-cache decoder (masks cropped after every forward) commits what a full recomputation commits."""
    ck = stories if arch == "stories" else loaded(arch)
    thresholds = [0.3, 0.7] if arch == "stories" else [TINY_THRESHOLD, 0.02]
    multi = 0
    for threshold in thresholds:
        for block_size in (1, 4):
            results = decode_parallel(ck.model, ck.tokenizer, TINY_PROMPTS, max_new_tokens=24, block_size=block_size,
                                      threshold=threshold, rule=rule, batch_size=1)
            for r in results:
                assert r.steps == reference_parallel(ck, r.prompt_ids, 24, block_size, threshold, rule)
                multi += sum(len(s) > 1 for s in r.steps)
                assert r.forwards == len(r.steps)
    assert multi > 10  # several tokens per forward really happened, so the cropping was exercised


def test_parallel_accepts_more_at_lower_thresholds(stories):
    tpf = []
    for threshold in (0.95, 0.5, 0.1):
        r = decode_parallel(stories.model, stories.tokenizer, STORY_PROMPTS, max_new_tokens=48, threshold=threshold,
                            block_size=8)
        tpf.append(sum(x.new_tokens for x in r) / sum(x.forwards for x in r))
        assert all(x.new_tokens == 48 and x.forwards <= 48 for x in r)
    assert 1.0 <= tpf[0] <= tpf[1] <= tpf[2] and tpf[2] > 2


def test_parallel_sampling_is_reproducible(stories):
    kw = dict(max_new_tokens=24, threshold=0.3, temperature=0.8, top_p=0.95, seed=5)
    a = decode_parallel(stories.model, stories.tokenizer, STORY_PROMPTS, **kw)
    b = decode_parallel(stories.model, stories.tokenizer, STORY_PROMPTS, **kw)
    assert [x.steps for x in a] == [x.steps for x in b]
    assert stories.meta.mask_token_id not in sum((x.token_ids for x in a), [])


# ------------------------------------------------------------------------------------------ lossless
LOSSLESS_MODELS = [(arch, 0) for arch in factory.ARCHS] + [("llama", 1), ("gpt2", 2), ("stories", 0)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    model=st.sampled_from(LOSSLESS_MODELS),
    prompts=st.lists(st.lists(st.integers(0, 299), min_size=1, max_size=12), min_size=1, max_size=3),
    block_size=st.integers(0, 6),
    max_new_tokens=st.integers(1, 24),
)
def test_lossless_equals_greedy_ar_on_random_prompts(model, prompts, block_size, max_new_tokens, loaded, stories):
    ck = stories if model[0] == "stories" else loaded(*model)
    ar = decode_ar(ck.model, ck.tokenizer, prompts, max_new_tokens=max_new_tokens)
    ll = decode_lossless(ck.model, ck.tokenizer, prompts, max_new_tokens=max_new_tokens, block_size=block_size)
    for a, b in zip(ar, ll, strict=True):
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
        assert b.forwards <= a.forwards and sum(map(len, b.steps)) == b.new_tokens


def test_lossless_equals_ar_on_stories260k_and_saves_forwards(stories, data_dir):
    text = (data_dir / "tinystories" / "tinystories_v1_validation_first_stories.txt").read_text()
    prompts = [p.split(". ")[0] + "." for p in text.split("\n\n")[:12]]
    ar = decode_ar(stories.model, stories.tokenizer, prompts, max_new_tokens=64)
    ll = decode_lossless(stories.model, stories.tokenizer, prompts, max_new_tokens=64, block_size=4)
    assert [x.token_ids for x in ll] == [x.token_ids for x in ar]
    assert all(b.forwards <= a.forwards for a, b in zip(ar, ll))
    assert sum(b.forwards for b in ll) < sum(a.forwards for a in ar)  # some drafts were right


def test_lossless_accepts_right_drafts(card_ckpt):
    """A model whose mask input acts like the token it keeps repeating drafts right: many tokens per forward."""
    ck = load_checkpoint(card_ckpt("gemma"), dtype="float32")
    ar = decode_ar(ck.model, ck.tokenizer, TINY_PROMPTS, max_new_tokens=30)
    loop = ar[0].token_ids[-1]
    assert ar[0].token_ids[-8:] == [loop] * 8  # the random gemma falls into a one-token loop
    with torch.no_grad():
        emb = ck.model.get_input_embeddings().weight
        emb[ck.meta.mask_token_id] = emb[loop]
    ar = decode_ar(ck.model, ck.tokenizer, TINY_PROMPTS, max_new_tokens=30)
    batched = decode_lossless(ck.model, ck.tokenizer, TINY_PROMPTS, max_new_tokens=30, block_size=4)
    single = [decode_lossless(ck.model, ck.tokenizer, p, max_new_tokens=30, block_size=4)[0] for p in TINY_PROMPTS]
    assert [x.token_ids for x in batched] == [x.token_ids for x in ar]
    same_per_prompt(batched, single)
    assert batched[0].tokens_per_forward > 2 and max(len(s) for s in batched[0].steps) == 5
    assert len({x.forwards for x in batched}) > 1  # rows accepted different numbers of drafts


# ------------------------------------------------------------------------------------------ batches
BATCH_MODES = [
    ("ar", {}),
    ("ar", dict(temperature=0.9, top_p=0.9, seed=3)),
    ("parallel", dict(threshold=TINY_THRESHOLD, block_size=4)),
    ("parallel", dict(threshold=0.02, block_size=3, rule="joint")),
    ("parallel", dict(threshold=0.1, block_size=4, temperature=0.7, seed=1)),
    ("lossless", dict(block_size=3)),
]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi", "stories"])
@pytest.mark.parametrize("mode,kw", BATCH_MODES)
def test_batch_equals_one_by_one(arch, mode, kw, loaded, stories):
    ck = stories if arch == "stories" else loaded(arch)
    # Different prompt lengths (left padding), different budgets (rows leave the batch at different times),
    # a batch size that splits the requests, and a stop string on one request.
    requests = [Request(TINY_PROMPTS[0], max_new_tokens=20), Request(TINY_PROMPTS[1], max_new_tokens=7),
                Request(TINY_PROMPTS[2]), Request(TINY_PROMPTS[3], max_new_tokens=13, stop_strings=["e"])]
    batched = decode(mode, ck.model, ck.tokenizer, requests, max_new_tokens=16, batch_size=3, **kw)
    single = [decode(mode, ck.model, ck.tokenizer, [r], max_new_tokens=16, **kw)[0] for r in requests]
    same_per_prompt(batched, single)
    assert [r.new_tokens <= n for r, n in zip(batched, [20, 7, 16, 13])] == [True] * 4
    assert len({r.forwards for r in batched}) > 1  # rows left the batch at different times
    assert batched[0].settings["batch_size"] == 3 and batched[3].settings["batch_size"] == 1


@pytest.mark.parametrize("mode,kw", [("parallel", dict(threshold=0.2, block_size=8)), ("lossless", dict(block_size=4))])
def test_batch_with_cache_compaction_at_every_step_equals_one_by_one(mode, kw, stories, monkeypatch):
    """Squeezing the masked slots out of the batched cache after every forward changes no output."""
    import card.eval.decoding.engine as decoding

    monkeypatch.setattr(decoding, "COMPACT_MIN_WASTE", 0)
    monkeypatch.setattr(decoding, "COMPACT_WASTE_RATIO", 0.0)
    single = [decode(mode, stories.model, stories.tokenizer, p, max_new_tokens=48, **kw)[0] for p in STORY_PROMPTS]
    batched = decode(mode, stories.model, stories.tokenizer, STORY_PROMPTS, max_new_tokens=48, **kw)
    same_per_prompt(batched, single)
    assert len({len(s) for r in batched for s in r.steps}) > 1  # rows did accept different numbers of tokens


def test_prompt_forms_are_equivalent(loaded):
    ck = loaded("qwen2")
    ids = ids_of(ck, TINY_PROMPTS[1])
    forms = [TINY_PROMPTS[1], [TINY_PROMPTS[1]], ids, [ids], Request(ids), [Request(TINY_PROMPTS[1])]]
    outs = [decode_ar(ck.model, ck.tokenizer, f, max_new_tokens=8) for f in forms]
    assert all(len(o) == 1 and o[0].token_ids == outs[0][0].token_ids for o in outs)


# ------------------------------------------------------------------------------------------ endings
MODES_KW = [("ar", {}), ("parallel", dict(threshold=0.01, block_size=6)), ("parallel", dict(threshold=0.9)),
            ("lossless", dict(block_size=4))]


@pytest.mark.parametrize("mode,kw", MODES_KW)
def test_eos_ends_generation(mode, kw, stories):
    full = decode(mode, stories.model, stories.tokenizer, STORY_PROMPTS[0], max_new_tokens=30, eos_token_ids=[],
                  **kw)[0]
    eos = full.token_ids[9]  # pretend this token is an EOS
    first = full.token_ids.index(eos)
    r = decode(mode, stories.model, stories.tokenizer, STORY_PROMPTS[0], max_new_tokens=30,
               eos_token_ids=[2, eos], **kw)[0]
    assert r.finish_reason == "eos" and r.token_ids == full.token_ids[:first + 1]  # EOS kept, nothing after it
    assert r.text == stories.tokenizer.decode(r.token_ids, skip_special_tokens=True)
    if mode != "parallel":
        assert r.token_ids == hf_greedy(stories, r.prompt_ids, 30, eos_token_id=[2, eos])
    assert sum(map(len, r.steps)) == r.new_tokens and r.forwards == len(r.steps)


@pytest.mark.parametrize("mode,kw", MODES_KW)
def test_stop_strings_end_generation(mode, kw, stories):
    full = decode(mode, stories.model, stories.tokenizer, STORY_PROMPTS[0], max_new_tokens=40, **kw)[0]
    word = full.text[len(full.text) // 2:][:3]  # any piece of the text from its middle
    r = decode(mode, stories.model, stories.tokenizer, STORY_PROMPTS[0], max_new_tokens=40,
               stop_strings=["@@never@@", word], **kw)[0]
    assert r.finish_reason == "stop" and r.text == full.text[:full.text.find(word)]
    assert r.token_ids == full.token_ids[:len(r.token_ids)]
    def decoded(ids):
        return stories.tokenizer.decode(ids, skip_special_tokens=True)

    assert word in decoded(r.token_ids) and word not in decoded(r.token_ids[:-1])  # ends at the completing token
    # The same through a per-request stop string.
    r2 = decode(mode, stories.model, stories.tokenizer, [Request(STORY_PROMPTS[0], stop_strings=[word])],
                max_new_tokens=40, **kw)[0]
    assert (r2.token_ids, r2.text) == (r.token_ids, r.text)


def test_mask_and_padding_rows_are_never_emitted(card_ckpt):
    """Phi's LM head has a bias: push every suppressed id to the top and check none comes out."""
    ck = load_checkpoint(card_ckpt("phi"), dtype="float32")
    suppressed = ck.meta.suppressed_token_ids
    assert ck.meta.mask_token_id in suppressed and len(suppressed) > 1
    with torch.no_grad():
        ck.model.get_output_embeddings().bias[suppressed] = 1e4
    m, tok = ck.model, ck.tokenizer
    outputs = [
        decode_ar(m, tok, TINY_PROMPTS, max_new_tokens=16),
        decode_ar(m, tok, TINY_PROMPTS, max_new_tokens=16, temperature=1.0),
        decode_parallel(m, tok, TINY_PROMPTS, max_new_tokens=16, threshold=0.01),
        decode_lossless(m, tok, TINY_PROMPTS, max_new_tokens=16),
    ]
    for results in outputs:
        for r in results:
            assert r.new_tokens == 16 and not set(r.token_ids) & set(suppressed)
    assert [r.token_ids for r in outputs[0]] == [hf_greedy(ck, r.prompt_ids, 16) for r in outputs[0]]
    # Control: without suppression the boosted ids would win.
    raw = decode_ar(m, tok, TINY_PROMPTS[:1], max_new_tokens=4, suppress_ids=[])[0]
    assert set(raw.token_ids) <= set(suppressed)


# ------------------------------------------------------------------------------------------ results, errors
def test_result_fields_count_only_generated_tokens(stories):
    for mode, kw in MODES_KW:
        r = decode(mode, stories.model, stories.tokenizer, STORY_PROMPTS[1], max_new_tokens=20, **kw)[0]
        assert r.new_tokens == len(r.token_ids) == sum(map(len, r.steps)) == 20
        assert r.forwards == len(r.steps) and r.tokens_per_forward == pytest.approx(20 / r.forwards)
        assert r.seconds > 0 and r.tokens_per_second == pytest.approx(20 / r.seconds)
        assert r.text == stories.tokenizer.decode(r.token_ids, skip_special_tokens=True)
        assert r.settings["mode"] == mode and r.settings["dtype"] == "float32" and r.settings["device"] == "cpu"
        d = r.to_dict()
        assert {"text", "token_ids", "new_tokens", "forwards", "tokens_per_forward", "seconds", "tokens_per_second",
                "settings", "steps", "finish_reason"} <= set(d)
        json.dumps(d)
    assert r.settings["block_size"] == 4
    r = generate(stories, STORY_PROMPTS[0], mode="parallel", max_new_tokens=8)[0]
    assert (r.settings["threshold"], r.settings["block_size"], r.settings["rule"]) == (0.9, 8, "prefix")


@pytest.mark.parametrize("kw,message", [
    (dict(mode="parallel", threshold=0.0), "threshold"),
    (dict(mode="parallel", threshold=1.5), "threshold"),
    (dict(mode="parallel", block_size=-1), "block size"),
    (dict(mode="lossless", block_size=2.5), "block size"),
    (dict(mode="parallel", rule="any"), "rule"),
    (dict(mode="ar", max_new_tokens=0), "max new tokens"),
    (dict(mode="ar", temperature=-1.0), "temperature"),
    (dict(mode="ar", top_p=0.0), "top-p"),
    (dict(mode="ar", batch_size=0), "batch size"),
    (dict(mode="beam"), "decoding mode"),
    (dict(mode="ar", max_new_tokens=1000), "positions"),
    (dict(mode="ar", stop_strings=[""]), "stop strings"),
    (dict(mode="lossless", temperature=0.5), "no setting temperature"),
])
def test_bad_settings_are_one_line_errors(kw, message, stories):
    mode = kw.pop("mode")
    with pytest.raises(CardError, match=message) as e:
        decode(mode, stories.model, stories.tokenizer, STORY_PROMPTS[0], **kw)
    assert "\n" not in str(e.value)


def test_bad_prompts_are_one_line_errors(stories):
    with pytest.raises(CardError, match="empty"):
        decode_ar(stories.model, stories.tokenizer, [[]])
    with pytest.raises(CardError, match="vocabulary"):
        decode_ar(stories.model, stories.tokenizer, [[1, 10**6]])


# ------------------------------------------------------------------------------------------ CLI
def test_cli_generate_streams_text_and_a_summary(stories_card, stories, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich emits colours as on a terminal
    monkeypatch.delenv("NO_COLOR", raising=False)
    expected = decode_parallel(stories.model, stories.tokenizer, STORY_PROMPTS[0], max_new_tokens=24,
                               threshold=0.3)[0]
    result = CliRunner().invoke(app, ["generate", str(stories_card), STORY_PROMPTS[0], "--decoding", "parallel",
                                      "--threshold", "0.3", "--max-new-tokens", "24"])
    assert result.exit_code == 0, result.output
    plain = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
    assert plain.startswith(STORY_PROMPTS[0]) and expected.text in plain
    assert "\x1b[1;36m" in result.stdout and "\x1b[1;35m" in result.stdout  # alternating colours per forward
    summary = plain.strip().splitlines()[-1]
    assert f"24 tokens in {expected.forwards} forwards" in summary and "tokens/forward" in summary
    assert "tokens/s" in summary


def test_cli_generate_json(stories_card, stories):
    expected = decode_lossless(stories.model, stories.tokenizer, STORY_PROMPTS[1], max_new_tokens=16,
                               block_size=3)[0]
    result = CliRunner().invoke(app, ["generate", str(stories_card), STORY_PROMPTS[1], "--decoding", "lossless",
                                      "--block-size", "3", "--max-new-tokens", "16", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert {"text", "token_ids", "new_tokens", "forwards", "tokens_per_forward", "seconds", "tokens_per_second",
            "settings"} <= set(d)
    assert d["token_ids"] == expected.token_ids and d["text"] == expected.text and d["new_tokens"] == 16
    assert d["forwards"] == expected.forwards and d["settings"]["mode"] == "lossless"
    assert d["settings"]["block_size"] == 3


@pytest.mark.parametrize("args,message", [
    (["--decoding", "parallel"], "not a CARD checkpoint"),
    (["--decoding", "beam"], "decoding mode"),
    (["--threshold", "2", "--decoding", "parallel"], "threshold"),
])
def test_cli_generate_errors(args, message, tiny_ckpt):
    result = CliRunner().invoke(app, ["generate", str(tiny_ckpt("llama")), "hi", *args])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output


def test_cli_generate_missing_checkpoint(tmp_path):
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "nope"), "hi"])
    assert result.exit_code == 2 and "does not exist" in result.output

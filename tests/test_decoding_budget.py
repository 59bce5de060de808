"""Budget decoding: the tokens per forward planned by ARDM's DP over the checkpoint's slot profile.

``budget@1`` must equal greedy AR token for token; at F < 1 every forward commits exactly its planned group,
so the forward count is the plan's number of groups (about F x tokens) when nothing stops the prompt early.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from card.ardm.plan import plan_groups
from card.checkpoint import load_checkpoint
from card.convert import convert
from card.errors import CardError
from card.eval.decoding import DecodingSpec, decode, decode_ar, decode_spec, generate, parse_modes
from card.profile import measure_slot_profile, text_rows, write_slot_profile
from tests.factory import CORPUS

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3  # profile slots K + 1 = 4: budget@0.5 is feasible (needs >= 1/4 forwards per token)
T = 24
PROMPTS = ["the cat sat on", "a dog ran"]


@pytest.fixture(scope="module")
def plain(tiny_ckpt, tmp_path_factory):
    dst = tmp_path_factory.mktemp("budget-plain") / "card"
    convert(str(tiny_ckpt("llama")), dst)
    return dst


@pytest.fixture(scope="module")
def profiled(plain, tmp_path_factory):
    dst = tmp_path_factory.mktemp("budget-prof") / "card"
    shutil.copytree(plain, dst)  # one conversion per module; the profile is written into the copy
    ck = load_checkpoint(dst, dtype="float32")
    rows = text_rows(ck.tokenizer, " ".join(CORPUS * 2), 24, 8)
    write_slot_profile(dst, measure_slot_profile(ck.model, rows, K, [0, 4, 12]))
    return load_checkpoint(dst, dtype="float32", require_card=True)


def _budget(ck, prompts, f, **kw):
    return generate(ck, prompts, f"budget@{f}", max_new_tokens=T, eos_token_ids=[], **kw)


# ------------------------------------------------------------------------------------------ spec
def test_spec_parses_budget_and_refuses_bad_ones():
    s = DecodingSpec.parse("budget@0.5")
    assert (s.mode, s.budget, s.text) == ("budget", 0.5, "budget@0.5")
    assert DecodingSpec.parse("budget", budget=0.25).budget == 0.25
    assert DecodingSpec.parse("budget@0.5", budget=0.5).budget == 0.5
    assert s.settings()["budget"] == 0.5 and s.lm_eval_settings() == {"decoding": "budget", "budget": 0.5}
    assert [m.text for m in parse_modes("ar,budget@0.5")] == ["ar", "budget@0.5"]
    for bad in ("budget", "budget@0", "budget@1.5", "budget@-1", "budget@x", "ar@0.5"):
        with pytest.raises(CardError) as e:
            DecodingSpec.parse(bad)
        assert "\n" not in str(e.value)
    for kw in ({"budget": 0.5},):
        with pytest.raises(CardError, match="budget decoding only"):
            DecodingSpec("parallel", **kw)
        with pytest.raises(CardError, match="budget decoding only"):
            DecodingSpec.parse("ar", **kw)
    with pytest.raises(CardError, match="two budgets"):
        DecodingSpec.parse("budget@0.5", budget=0.25)


def test_no_profile_is_refused_in_one_line(plain):
    ck = load_checkpoint(plain, dtype="float32", require_card=True)
    assert ck.meta.slot_profile is None
    with pytest.raises(CardError) as e:
        generate(ck, PROMPTS[0], "budget@0.5", max_new_tokens=4)
    msg = str(e.value)
    assert "\n" not in msg and "card profile CKPT --data FILE --write" in msg
    with pytest.raises(CardError, match="card profile CKPT"):
        decode_spec(ck.model, ck.tokenizer, PROMPTS[0], "budget@0.5", max_new_tokens=4)


# ------------------------------------------------------------------------------------------ decoding
def test_budget_one_is_greedy_ar(profiled):
    ar = decode_ar(profiled.model, profiled.tokenizer, PROMPTS, max_new_tokens=T, eos_token_ids=[], batch_size=1)
    for batch in (1, None):
        out = _budget(profiled, PROMPTS, 1, batch_size=batch)
        assert [o.token_ids for o in out] == [a.token_ids for a in ar]
        assert [o.forwards for o in out] == [a.forwards for a in ar] == [T, T]
    via_decode = decode("budget", profiled.model, profiled.tokenizer, PROMPTS, budget=1, max_new_tokens=T,
                        eos_token_ids=[], batch_size=1)
    assert [o.token_ids for o in via_decode] == [a.token_ids for a in ar]


@pytest.mark.parametrize("f", [0.5, 0.3])
def test_forwards_follow_the_plan(profiled, f):
    profile = profiled.meta.slot_profile
    for batch in (1, None):
        out = _budget(profiled, PROMPTS, f, batch_size=batch)
        for o in out:
            plan = plan_groups(profile, T, f, len(o.prompt_ids))
            assert o.new_tokens == T and o.finish_reason == "length"
            assert [len(s) for s in o.steps] == plan
            assert o.forwards == len(plan) == math.ceil(f * T)
            assert o.settings["mode"] == "budget" and o.lookahead["policy"] == "budget"


@torch.no_grad()
def test_each_forward_commits_slot_one_then_the_masks_choices(profiled):
    """Forward i on committed context c commits argmax of model(c + [M] * (g_i - 1)) at its last g_i positions."""
    model, meta = profiled.model, profiled.meta
    suppress = torch.tensor(meta.suppressed_token_ids)
    for o in _budget(profiled, PROMPTS, 0.5, batch_size=1):
        start = 0
        for step in o.steps:
            ctx = o.prompt_ids + o.token_ids[:start]
            ids = torch.tensor([ctx + [meta.mask_token_id] * (len(step) - 1)])
            logits = model(input_ids=ids).logits[0, -len(step):].float()
            logits[:, suppress] = float("-inf")
            assert logits.argmax(-1).tolist() == step
            start += len(step)


def test_batch_does_not_change_a_rows_tokens(profiled):
    alone = _budget(profiled, PROMPTS, 0.5, batch_size=1)
    together = _budget(profiled, PROMPTS, 0.5)
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


# ------------------------------------------------------------------------------------------ CLI
def test_cli_generate_budget(profiled, plain):
    import json

    from typer.testing import CliRunner

    from card.cli import app

    ckpt = str(profiled.path)
    runs = [CliRunner().invoke(app, ["generate", ckpt, PROMPTS[0], *how, "--max-new-tokens", "8", "--json"])
            for how in (["--decoding", "budget", "--budget", "0.5"], ["--decoding", "budget@0.5"])]
    for r in runs:
        assert r.exit_code == 0, r.output
    a, b = (json.loads(next(line for line in r.stdout.splitlines() if line.startswith("{"))) for r in runs)
    assert a["token_ids"] == b["token_ids"] and a["settings"]["budget"] == 0.5
    if a["finish_reason"] == "length":
        assert a["forwards"] == len(plan_groups(profiled.meta.slot_profile, 8, 0.5, len(a["prompt_ids"])))
    r = CliRunner().invoke(app, ["generate", str(plain), PROMPTS[0], "--decoding", "budget@0.5"])
    assert r.exit_code != 0 and "card profile CKPT --data FILE --write" in r.output
    assert len(r.output.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ eval
def test_eval_plans_budget_runs_and_refuses_without_profile(profiled, plain):
    from card.eval.lm_model import CardLM
    from card.eval.runner import plan_runs
    from card.metadata import read_metadata

    plans = plan_runs(parse_modes("budget@0.5"), profiled.meta, 4)
    assert [p.label for p in plans] == ["ar", "budget@0.5"] and plans[1].spec.budget == 0.5
    with pytest.raises(CardError, match="card profile CKPT --data FILE --write"):
        plan_runs(parse_modes("budget@0.5"), load_checkpoint(plain, dtype="float32").meta, None)
    lm = CardLM(profiled.model, tokenizer=profiled.tokenizer, decoding=plans[1].spec, batch_size=2)
    assert lm.spec.text == "budget@0.5" and read_metadata(profiled.model.config).slot_profile is not None
    assert lm.decoding_settings == {"decoding": "budget", "budget": 0.5}
    from lm_eval.api.instance import Instance

    reqs = [Instance("generate_until", {}, (p, {"until": ["zzz"], "max_gen_toks": 8}), i, ("t", i, 1))
            for i, p in enumerate(PROMPTS)]
    lm.generate_until(reqs)
    log = lm.pop_decode_log()
    assert len(log) == 2
    for e in log:
        if e["finish_reason"] == "length":  # the plan ran to its end
            assert e["forwards"] == len(plan_groups(profiled.meta.slot_profile, 8, 0.5, e["prompt_tokens"]))
        assert e["forwards"] <= e["new_tokens"]

"""Per-slot loss curves (card.profile): packed forwards equal separate ones, slot 1 is the AR loss, the
profile lands in the checkpoint's metadata, and `card profile` works on a fresh conversion."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from card.checkpoint import load_checkpoint
from card.cli import app
from card.convert import convert
from card.metadata import read_metadata
from card.profile import (bucket_index, check_profile, measure_slot_profile, packed_inputs, profile_final_checkpoint,
                          text_rows, write_slot_profile)
from tests.factory import CORPUS


@pytest.fixture(scope="module")
def card_ckpts(tiny_ckpt, tmp_path_factory, one_thread):
    out = {}
    for arch in ("llama", "gpt2"):  # rotary and absolute positions
        dst = tmp_path_factory.mktemp(f"profile-{arch}") / "card"
        convert(str(tiny_ckpt(arch)), dst)
        out[arch] = dst
    return out


def _rows(tok, n=3, length=40):
    return text_rows(tok, " ".join(CORPUS * 3), length, n)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_blocks_equal_separate_forwards(card_ckpts, arch):
    ck = load_checkpoint(card_ckpts[arch], dtype="float32")
    x = torch.tensor(_rows(ck.tokenizer)[0])
    K, prefixes, mid = 3, [1, 6, 13, 30], ck.meta.mask_token_id
    ids, pos, mask = packed_inputs(x, prefixes, K, mid, torch.float32)
    with torch.no_grad():
        packed = ck.model(input_ids=ids[None], position_ids=pos[None], attention_mask=mask[None, None]).logits[0]
        b = max(prefixes)
        for i, s in enumerate(prefixes):
            alone = ck.model(input_ids=torch.cat([x[:s], torch.full((K,), mid)])[None]).logits[0]
            got = torch.cat([packed[s - 1:s], packed[b + i * K:b + (i + 1) * K]])
            torch.testing.assert_close(got, alone[s - 1:s + K], atol=1e-4, rtol=1e-4)


def test_slot_one_is_the_ar_loss_and_counts_are_exact(card_ckpts):
    ck = load_checkpoint(card_ckpts["llama"], dtype="float32")
    rows = _rows(ck.tokenizer, n=2, length=40) + [[ck.tokenizer.bos_token_id, 5, 6, 7, 8]]  # two lengths
    edges, K = [0, 4, 16], 2
    p = check_profile(measure_slot_profile(ck.model, rows, K, edges, positions_per_forward=7))
    assert p["slots"] == K + 1 and p["bucket_edges"] == edges and p["tokens"] == sum(map(len, rows))
    # slot 1 from a plain clean forward, per bucket
    bits, hits, n = np.zeros(3), np.zeros(3), np.zeros(3)
    suppressed = ck.meta.suppressed_token_ids
    for r in rows:
        with torch.no_grad():
            logits = ck.model(input_ids=torch.tensor(r)[None]).logits[0].float()
        logits[:, suppressed] = float("-inf")
        logp = torch.log_softmax(logits, -1)
        for s in range(1, len(r)):
            b = bucket_index(s, edges)
            bits[b] += -logp[s - 1, r[s]].item() / np.log(2)
            hits[b] += float(logp[s - 1].argmax() == r[s])
            n[b] += 1
    assert p["count"][0] == n.astype(int).tolist()
    assert p["loss_bits"][0] == pytest.approx((bits / n).tolist(), abs=1e-4)
    assert p["accuracy"][0] == pytest.approx((hits / n).tolist(), abs=1e-4)
    # slot j counts the prefixes whose target x[s+j-1] is inside the row
    for j in range(K + 1):
        want = np.zeros(3, int)
        for r in rows:
            for s in range(1, len(r) - j):
                want[bucket_index(s, edges)] += 1
        assert p["count"][j] == want.tolist()


def test_first_prefix_measures_only_where_a_decoder_writes(card_ckpts):
    """Row i counts prefixes s >= first_prefix[i] only; slot 1 then equals the clean loss over those prefixes."""
    ck = load_checkpoint(card_ckpts["llama"], dtype="float32")
    rows = _rows(ck.tokenizer, n=2, length=40) + [[ck.tokenizer.bos_token_id, 5, 6, 7, 8]]
    firsts, edges, K = [10, 25, 3], [0, 4, 16], 2
    p = measure_slot_profile(ck.model, rows, K, edges, positions_per_forward=7, first_prefix=firsts)
    bits, n = np.zeros(3), np.zeros(3)
    for r, f in zip(rows, firsts):
        with torch.no_grad():
            logits = ck.model(input_ids=torch.tensor(r)[None]).logits[0].float()
        logits[:, ck.meta.suppressed_token_ids] = float("-inf")
        logp = torch.log_softmax(logits, -1)
        for s in range(f, len(r)):
            bits[bucket_index(s, edges)] += -logp[s - 1, r[s]].item() / np.log(2)
            n[bucket_index(s, edges)] += 1
    assert p["count"][0] == n.astype(int).tolist()
    assert [x for x in p["loss_bits"][0] if x is not None] == pytest.approx((bits[n > 0] / n[n > 0]).tolist(), abs=1e-4)
    for j in range(K + 1):
        want = np.zeros(3, int)
        for r, f in zip(rows, firsts):
            for s in range(f, len(r) - j):
                want[bucket_index(s, edges)] += 1
        assert p["count"][j] == want.tolist()


def test_validation_rows_start_at_the_completion():
    from card.adapt.data import Rows
    from card.profile import rows_from_validation

    ids = np.arange(24, dtype=np.int32).reshape(2, 12)
    valid = np.ones_like(ids, dtype=bool)
    valid[1, 9:] = False
    completion = np.zeros_like(valid)
    completion[0, 5:] = True
    completion[1, 7:] = True  # padding is never a completion token that counts
    tokens, firsts = rows_from_validation(Rows(ids, valid, completion))
    assert [len(t) for t in tokens] == [12, 9] and firsts == [5, 7]
    assert rows_from_validation(Rows(ids))[1] == [1, 1]  # packed text: every prefix


def test_written_profile_survives_loading(card_ckpts, tmp_path):
    import shutil

    dst = tmp_path / "ck"
    shutil.copytree(card_ckpts["llama"], dst)
    ck = load_checkpoint(dst, dtype="float32")
    p = measure_slot_profile(ck.model, _rows(ck.tokenizer), 2, [0, 8])
    write_slot_profile(dst, p)
    again = load_checkpoint(dst, dtype="float32")
    assert again.meta.slot_profile == json.loads(json.dumps(p))
    assert read_metadata(again.model.config).mask_token_id == ck.meta.mask_token_id


def test_adapt_finish_hook_profiles_validation_rows(card_ckpts, tmp_path):
    import shutil

    from card.adapt.data import Rows

    dst = tmp_path / "final"
    shutil.copytree(card_ckpts["llama"], dst)
    tok = load_checkpoint(dst).tokenizer
    ids = np.array(_rows(tok, n=2, length=24), dtype=np.int32)
    valid = np.ones_like(ids, dtype=bool)
    valid[1, 20:] = False  # padding is dropped
    p = profile_final_checkpoint(dst, Rows(ids, valid), K=2)
    assert p["measured_by"] == "card adapt validation" and p["tokens"] == 24 + 20
    assert load_checkpoint(dst).meta.slot_profile["count"] == p["count"]


def test_cli_profile_fresh_conversion(card_ckpts, tmp_path):
    import shutil

    dst = tmp_path / "ck"
    shutil.copytree(card_ckpts["llama"], dst)
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(CORPUS))
    r = CliRunner().invoke(app, ["profile", str(dst), "--data", str(text), "--write", "--block-size", "2",
                                 "--seq-len", "32", "--buckets", "0,8"])
    assert r.exit_code == 0, r.output
    assert "1 (AR)" in r.output and "wrote the profile" in r.output
    assert load_checkpoint(dst).meta.slot_profile["slots"] == 3
    before = (dst / "config.json").read_bytes()
    bad = CliRunner().invoke(app, ["profile", str(dst), "--data", str(tmp_path / "missing.txt"), "--write"])
    assert bad.exit_code == 2 and "cannot read --data" in bad.output and len(bad.output.strip().splitlines()) == 1
    assert (dst / "config.json").read_bytes() == before
    bad = CliRunner().invoke(app, ["profile", str(dst), "--data", str(text), "--buckets", "3,8"])
    assert bad.exit_code == 2 and "bucket edges" in bad.output


def test_runs_are_the_passing_mask_slots_of_separate_forwards(card_ckpts):
    """runs[key][j]: the share of prefixes whose mask slots 1..j-1 all pass, recomputed from one forward per
    prefix over x[0:s] + K masks; the greedy run of slot 2 is slot 2's accuracy, and runs only shrink."""
    ck = load_checkpoint(card_ckpts["llama"], dtype="float32")
    rows, K, edges, mid = _rows(ck.tokenizer, n=2, length=24), 3, [0, 8], ck.meta.mask_token_id
    measured = []  # (bucket, hits per slot, top probability per slot) of every prefix
    for r in rows:
        for s in range(1, len(r)):
            with torch.no_grad():
                logits = ck.model(input_ids=torch.tensor(r[:s] + [mid] * K)[None]).logits[0].float()
            logits[:, ck.meta.suppressed_token_ids] = float("-inf")
            probs = torch.softmax(logits[s - 1:s + K], -1)[: len(r) - s]  # slots whose target is in the row
            top, arg = probs.max(-1)
            hits = [int(arg[j]) == r[s + j] for j in range(len(top))]
            measured.append((bucket_index(s, edges), hits, top.tolist()))
    mask_tops = sorted(t for _, _, tops in measured for t in tops[1:])
    level = (mask_tops[len(mask_tops) // 2] + mask_tops[len(mask_tops) // 2 + 1]) / 2  # no prefix sits on it
    p = check_profile(measure_slot_profile(ck.model, rows, K, edges, positions_per_forward=5, thresholds=(0.0, level)))
    key = next(k for k in p["runs"] if k not in ("greedy", "conf>=0"))
    for name, passes in (("greedy", lambda h, t: h), ("conf>=0", lambda h, t: True), (key, lambda h, t: t >= level)):
        want = np.zeros((K + 1, 2))
        for b, hits, tops in measured:
            run = True
            for j in range(len(hits)):
                run = run and (j == 0 or passes(hits[j], tops[j]))
                want[j, b] += run
        got = np.array([[np.nan if v is None else v for v in row] for row in p["runs"][name]])
        assert got == pytest.approx(want / np.array(p["count"]), abs=1e-5), name  # stored to 5 places
        assert np.all(np.diff(got, axis=0) <= 1e-12)
    assert p["runs"]["conf>=0"][1] == [1.0, 1.0] and p["runs"]["greedy"][1] == p["accuracy"][1]

"""card.convert: real tiny checkpoints of many architectures, the real stories260K, and every refusal."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import numpy as np
import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

from card.cli import app, convert_app
from card.convert import convert
from card.convert.core import VERIFY_TEXT
from card.errors import CardError
from card.metadata import read_metadata
from tests import factory


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("arch", factory.ARCHS)
def test_architectures_convert_reload_and_keep_logits(arch, tiny_ckpt, tmp_path):
    src = tiny_ckpt(arch)
    dst = tmp_path / "card"
    report = convert(str(src), dst)
    assert report.verified and report.argmax_equal and report.max_abs_diff <= 1e-4

    source = tf.AutoModelForCausalLM.from_pretrained(src).eval()
    model = tf.AutoModelForCausalLM.from_pretrained(dst).eval()  # plain transformers, no remote code
    tok = tf.AutoTokenizer.from_pretrained(dst)
    meta = read_metadata(model.config)
    n = source.get_input_embeddings().weight.shape[0]

    # The mask is the newest token (a tokenizer may already be larger than the embedding: Qwen2's adds one).
    assert tok.mask_token == "<|mask|>" and tok.mask_token_id == meta.mask_token_id == len(tok) - 1 >= n
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows >= len(tok) and meta.vocab_size == rows and meta.original_vocab_size == n
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == (arch in factory.TIED)

    # New rows start at the mean of the old ones, in the embedding and in an untied head.
    emb = model.get_input_embeddings().weight
    assert torch.allclose(emb[n:], emb[:n].mean(0).expand(rows - n, -1), atol=1e-6)
    head = model.get_output_embeddings().weight
    assert torch.allclose(head[n:], head[:n].mean(0).expand(rows - n, -1), atol=1e-6)

    ids = tok(VERIFY_TEXT + " The end.", return_tensors="pt").input_ids
    a, b = _logits(source, ids), _logits(model, ids)[:, :n]
    assert (a - b).abs().max().item() <= 1e-4
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert meta.objective.tail_factor == 1.5 and meta.objective.decay_p == 0.5 and meta.objective.beta == 1.0
    assert meta.decoding.threshold == 0.9 and meta.decoding.block_size == 8
    assert meta.source["sha256"] == report.source_sha256 and len(report.source_sha256) == 64


def test_metadata_survives_a_load_save_cycle(tiny_ckpt, tmp_path):
    convert(str(tiny_ckpt("llama")), tmp_path / "a")
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    first = json.loads((tmp_path / "a" / "config.json").read_text())["card"]
    second = json.loads((tmp_path / "b" / "config.json").read_text())["card"]
    assert first == second and first["mask_token_id"] == 300


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_never_emits_the_mask_token(arch, tiny_ckpt, tmp_path):
    convert(str(tiny_ckpt(arch)), tmp_path / "c")
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    mask_id = read_metadata(model.config).mask_token_id
    ids = torch.tensor([[1, 40, 41, 42]])
    # Make the mask the most likely next token everywhere: point its output row along each hidden state.
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        model.get_output_embeddings().weight[mask_id] = 50 * h.mean(0) / h.mean(0).norm()
        assert (model(input_ids=ids).logits[0].argmax(-1) == mask_id).any()  # the control: it would win
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert mask_id not in out[0, ids.shape[1]:].tolist()
    sampled = model.generate(ids, max_new_tokens=20, do_sample=True, temperature=5.0)
    assert mask_id not in sampled[0, ids.shape[1]:].tolist()


def test_conversion_is_deterministic(tiny_ckpt, tmp_path):
    src = tiny_ckpt("phi")
    convert(str(src), tmp_path / "one")
    convert(str(src), tmp_path / "two")
    for name in ["model.safetensors", "tokenizer.json", "config.json", "generation_config.json"]:
        assert _sha(tmp_path / "one" / name) == _sha(tmp_path / "two" / name), name


def test_existing_mask_token_is_reused(tiny_ckpt, tmp_path):
    report = convert(str(tiny_ckpt("llama")), tmp_path / "c", mask_token="<pad>")
    tok = tf.AutoTokenizer.from_pretrained(tmp_path / "c")
    assert not report.mask_token_added and tok.mask_token == "<pad>" and tok.mask_token_id == 0
    assert len(tok) == 300 and report.vocab_after == 320 and report.verified


def test_tokenizer_mask_token_is_used(tmp_path):
    model, tok = factory.tiny_model("llama")
    tok.add_special_tokens({"mask_token": "[MASK]"})
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    report = convert(str(tmp_path / "src"), tmp_path / "c")
    assert report.mask_token == "[MASK]" and report.mask_token_id == 300 and not report.mask_token_added
    assert report.vocab_before == 301 and report.vocab_after == 320


def test_mask_token_in_an_unused_padding_row(tmp_path):
    """Qwen-style checkpoints have more embedding rows than tokens: the mask takes the first free row."""
    model, tok = factory.tiny_model("llama")
    model.resize_token_embeddings(320, mean_resizing=False)
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    report = convert(str(tmp_path / "src"), tmp_path / "c")
    assert report.mask_token_id == 300 and report.vocab_before == report.vocab_after == 320 and report.verified
    out = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    emb = out.get_input_embeddings().weight
    src_emb = model.get_input_embeddings().weight
    assert torch.allclose(emb[300], src_emb.mean(0), atol=1e-6)
    assert torch.equal(emb[:300], src_emb[:300]) and torch.equal(emb[301:], src_emb[301:])


def test_dtype_bfloat16(tiny_ckpt, tmp_path):
    report = convert(str(tiny_ckpt("qwen2")), tmp_path / "c", dtype="bfloat16")
    assert report.dtype == "bfloat16" and report.verified
    assert tf.AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype="auto").dtype == torch.bfloat16


# ----------------------------------------------------------------------------------- the real model
def _greedy_from_bos(path, n=200):
    model = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = tf.AutoTokenizer.from_pretrained(path)
    out = model.generate(torch.tensor([[tok.bos_token_id]]), max_new_tokens=n, do_sample=False)
    return tok.decode(out[0], skip_special_tokens=True)


def test_stories260k_from_hf_and_llama2c(data_dir, tmp_path):
    expected = (data_dir / "stories260K" / "greedy_from_bos_200tok.txt").read_text()
    hf = convert(str(data_dir / "stories260K_hf"), tmp_path / "hf")
    bin_ = convert(str(data_dir / "stories260K" / "stories260K.bin"), tmp_path / "bin",
                   tokenizer=str(data_dir / "stories260K" / "tok512.model"))
    for r in (hf, bin_):
        assert r.verified and r.max_abs_diff == 0.0 and r.mask_token_id == 512 and r.vocab_after == 576
        assert _greedy_from_bos(r.dst) == expected
    # Same weights whichever format they came from.
    assert hf.source_sha256 == bin_.source_sha256
    assert _sha(tmp_path / "hf" / "model.safetensors") == _sha(tmp_path / "bin" / "model.safetensors")
    assert read_metadata(tf.AutoConfig.from_pretrained(tmp_path / "bin")).doc_separator == "bos"


def _write_llama2c_v1(model: tf.LlamaForCausalLM, path):
    """llama2.c's version-1 export (export.py ``version1_export``), inverting the rotary permutation."""
    c = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    head = c.hidden_size // c.num_attention_heads

    def unpermute(w, n_heads):
        out, inp = w.shape
        return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)

    L = c.num_hidden_layers
    layers = lambda k: [sd[f"model.layers.{i}.{k}"] for i in range(L)]  # noqa: E731
    tensors = [sd["model.embed_tokens.weight"], *layers("input_layernorm.weight"),
               *layers("post_attention_layernorm.weight"), sd["model.norm.weight"],
               *[unpermute(w, c.num_attention_heads) for w in layers("self_attn.q_proj.weight")],
               *[unpermute(w, c.num_key_value_heads) for w in layers("self_attn.k_proj.weight")],
               *layers("self_attn.v_proj.weight"), *layers("self_attn.o_proj.weight"),
               *layers("mlp.gate_proj.weight"), *layers("mlp.down_proj.weight"), *layers("mlp.up_proj.weight")]
    header = struct.pack("<Ii", 0x616B3432, 1) + struct.pack(
        "<7i", c.hidden_size, c.intermediate_size, L, c.num_attention_heads, c.num_key_value_heads,
        c.vocab_size, c.max_position_embeddings) + struct.pack("<B", 1)
    assert head % 2 == 0
    with open(path, "wb") as f:
        f.write(header + b"\0" * (256 - len(header)))
        for t in tensors:
            f.write(t.numpy().astype("<f4").tobytes())


def test_llama2c_version1_export(data_dir, tmp_path):
    model = tf.AutoModelForCausalLM.from_pretrained(data_dir / "stories260K_hf")
    _write_llama2c_v1(model, tmp_path / "v1.bin")
    r = convert(str(tmp_path / "v1.bin"), tmp_path / "c", tokenizer=str(data_dir / "stories260K" / "tok512.model"))
    ref = convert(str(data_dir / "stories260K_hf"), tmp_path / "ref")
    assert r.verified and r.source_sha256 == ref.source_sha256


# ---------------------------------------------------------------------------------- bad inputs
def _refused(src, dst, match, **kw):
    with pytest.raises(CardError, match=match) as e:
        convert(str(src), dst, **kw)
    assert "\n" not in str(e.value)
    assert not dst.exists() and not _leftovers(dst.parent, dst.name)
    return e.value


def test_missing_source(tmp_path):
    _refused(tmp_path / "nope", tmp_path / "out", "does not exist")


def test_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _refused("someone/some-model", tmp_path / "out", "not a local path and the hub is disabled")


def test_encoder_only_refused(tmp_path):
    factory.save_tiny_checkpoint(tmp_path / "bert", factory.ENCODER_ONLY)
    _refused(tmp_path / "bert", tmp_path / "out", "bert checkpoint is a BertForMaskedLM, not a causal LM .*encoder-only")


def test_bidirectional_attention_refused(tmp_path):
    """Without a declared architecture the refusal comes from the causality probe on the real model."""
    factory.save_tiny_checkpoint(tmp_path / "bert", factory.ENCODER_ONLY)
    cfg = json.loads((tmp_path / "bert" / "config.json").read_text())
    cfg.pop("architectures", None)
    (tmp_path / "bert" / "config.json").write_text(json.dumps(cfg))
    _refused(tmp_path / "bert", tmp_path / "out", "bert attends to future tokens .*encoder-only")


def test_encoder_decoder_refused(tmp_path):
    factory.save_tiny_checkpoint(tmp_path / "bart", factory.ENCODER_DECODER)
    _refused(tmp_path / "bart", tmp_path / "out", "bart is an encoder-decoder model")


def test_source_without_tokenizer(tmp_path):
    factory.save_tiny_checkpoint(tmp_path / "src", "llama", tokenizer=False)
    _refused(tmp_path / "src", tmp_path / "out", "has no usable tokenizer")


def test_unknown_mask_token(tiny_ckpt, tmp_path):
    _refused(tiny_ckpt("llama"), tmp_path / "out", "--mask-token '<nope>' is not in the tokenizer's vocabulary",
             mask_token="<nope>")


def test_destination_exists(tiny_ckpt, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(CardError, match="already exists; pass --overwrite"):
        convert(str(tiny_ckpt("llama")), dst)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    convert(str(tiny_ckpt("llama")), dst, overwrite=True)
    assert (dst / "model.safetensors").exists() and not (dst / "keep.txt").exists()


def test_corrupt_weights(tiny_ckpt, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt("llama"), src)
    (src / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    _refused(src, tmp_path / "out", "cannot load the weights of")


def test_truncated_llama2c(data_dir, tmp_path):
    raw = (data_dir / "stories260K" / "stories260K.bin").read_bytes()
    (tmp_path / "m.bin").write_bytes(raw[:-100])
    _refused(tmp_path / "m.bin", tmp_path / "out", "corrupt or not a llama2.c export",
             tokenizer=str(data_dir / "stories260K" / "tok512.model"))


def test_already_converted(tiny_ckpt, tmp_path):
    convert(str(tiny_ckpt("llama")), tmp_path / "c")
    _refused(tmp_path / "c", tmp_path / "again", "already a CARD checkpoint")


@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_save_loses_nothing(existing, tiny_ckpt, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    if existing:
        convert(str(tiny_ckpt("gpt2")), dst)
        before = {p.name: _sha(p) for p in dst.iterdir()}

    def boom(self, *a, **k):
        raise OSError("disk full (injected)")

    # The model is written first, so this fails halfway through the checkpoint.
    monkeypatch.setattr(tf.PreTrainedTokenizerBase, "save_pretrained", boom)
    with pytest.raises(OSError, match="injected"):
        convert(str(tiny_ckpt("llama")), dst, overwrite=existing)
    assert not _leftovers(tmp_path, "out")
    if existing:
        assert {p.name: _sha(p) for p in dst.iterdir()} == before
    else:
        assert not dst.exists()


# ------------------------------------------------------------------------------------------- CLI
def test_cli_convert_prints_summary(tiny_ckpt, tmp_path):
    res = CliRunner().invoke(app, ["convert", str(tiny_ckpt("gpt_neox")), str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    for text in ["GPTNeoXForCausalLM", "mask token", "300 -> 320", "passed", "seconds"]:
        assert text in res.output
    res = CliRunner().invoke(convert_app, [str(tiny_ckpt("gpt_neox")), str(tmp_path / "c2"), "--no-verify"])
    assert res.exit_code == 0 and "skipped" in res.output


def test_cli_error_is_one_line(tmp_path):
    res = CliRunner().invoke(convert_app, [str(tmp_path / "missing"), str(tmp_path / "c")])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "does not exist" in lines[0]
    assert "Traceback" not in res.output


def test_state_dict_checksum_ignores_storage(data_dir):
    from card.convert.llama2c import load_llama2c_model
    from card.io import state_dict_sha256

    a, _ = load_llama2c_model(data_dir / "stories260K" / "stories260K.bin")
    b = tf.AutoModelForCausalLM.from_pretrained(data_dir / "stories260K_hf")
    assert state_dict_sha256(a.state_dict()) == state_dict_sha256(b.state_dict())
    sd = b.state_dict()
    sd["model.norm.weight"] = sd["model.norm.weight"] + np.float32(1e-3)
    assert state_dict_sha256(sd) != state_dict_sha256(b.state_dict())

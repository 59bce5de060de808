"""Read llama2.c checkpoints (Karpathy's ``model.bin`` exports) into a ``LlamaForCausalLM``.

Two fp32 layouts exist:

* legacy "v0": 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
  a negative vocab_size means an unshared classifier), then token embeddings, attention norms, wq, wk, wv,
  wo, ffn norms, w1, w2, w3, final norm, the RoPE tables freq_cis_real/imag (seq_len x head_size/2 each),
  and the classifier if unshared;
* "v1": magic 0x616b3432 ("ak42"), int32 version 1, the same 7 int32, a uint8 shared-classifier flag, zero
  padding to 256 bytes, then token embeddings, attention norms, ffn norms, final norm, wq, wk, wv, wo, w1,
  w2, w3, and the classifier if unshared.

Every matrix is stored as PyTorch ``nn.Linear`` weights (out_features x in_features). llama2.c rotates
interleaved pairs (0,1), (2,3), ... of each head while transformers rotates halves, so the rows of wq and
wk are permuted per head (the same permutation as transformers' own ``convert_llama_weights_to_hf``).
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers as tf

from card.errors import CardError

V1_MAGIC = 0x616B3432
V1_HEADER_BYTES = 256


@dataclass
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    version: int


def read_header(raw: bytes) -> Llama2cHeader:
    if len(raw) < 28:
        raise CardError("llama2.c checkpoint is truncated: shorter than its 28-byte header")
    (magic,) = struct.unpack_from("<I", raw, 0)
    if magic == V1_MAGIC:
        (version,) = struct.unpack_from("<i", raw, 4)
        if version != 1:
            raise CardError(f"llama2.c export version {version} is quantised or unknown; only v0 and v1 (fp32) are supported")
        dims = struct.unpack_from("<7i", raw, 8)
        shared = bool(raw[36])
        return Llama2cHeader(*dims[:5], dims[5], dims[6], shared, 1)
    dims = struct.unpack_from("<7i", raw, 0)
    vocab = dims[5]
    return Llama2cHeader(*dims[:5], abs(vocab), dims[6], vocab > 0, 0)


def _rotary_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-pair RoPE rows -> rotate-half RoPE rows, per head."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def load_llama2c_model(path: str | Path) -> tuple[tf.LlamaForCausalLM, Llama2cHeader]:
    path = Path(path)
    raw = path.read_bytes()
    h = read_header(raw)
    if min(h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len) <= 0 or h.dim % h.n_heads:
        raise CardError(f"{path} is not a llama2.c checkpoint (implausible header {h})")
    head = h.dim // h.n_heads
    kv_dim = h.n_kv_heads * head
    L, D, F, V = h.n_layers, h.dim, h.hidden_dim, h.vocab_size
    shapes = {
        "emb": (V, D), "att_norm": (L, D), "ffn_norm": (L, D), "norm": (D,),
        "wq": (L, D, D), "wk": (L, kv_dim, D), "wv": (L, kv_dim, D), "wo": (L, D, D),
        "w1": (L, F, D), "w2": (L, D, F), "w3": (L, F, D),
        "freq_re": (h.seq_len, head // 2), "freq_im": (h.seq_len, head // 2), "cls": (V, D),
    }
    if h.version == 0:
        order = ["emb", "att_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "norm", "freq_re", "freq_im"]
        offset = 28
    else:
        order = ["emb", "att_norm", "ffn_norm", "norm", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
        offset = V1_HEADER_BYTES
    if not h.shared_classifier:
        order.append("cls")
    n_floats = sum(int(np.prod(shapes[k])) for k in order)
    if len(raw) - offset != 4 * n_floats:
        raise CardError(
            f"{path}: llama2.c v{h.version} header says {4 * n_floats} bytes of fp32 weights, the file has "
            f"{len(raw) - offset}; the file is corrupt or not a llama2.c export"
        )
    flat = torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=offset, count=n_floats).copy())
    t, pos = {}, 0
    for k in order:
        n = int(np.prod(shapes[k]))
        t[k] = flat[pos : pos + n].view(shapes[k])
        pos += n

    config = tf.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=h.n_heads,
        num_key_value_heads=h.n_kv_heads, max_position_embeddings=h.seq_len, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=h.shared_classifier, bos_token_id=1, eos_token_id=2,
        hidden_act="silu", attention_bias=False, mlp_bias=False,
    )
    sd = {"model.embed_tokens.weight": t["emb"], "model.norm.weight": t["norm"]}
    for i in range(L):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t["att_norm"][i]
        sd[p + "post_attention_layernorm.weight"] = t["ffn_norm"][i]
        sd[p + "self_attn.q_proj.weight"] = _rotary_permute(t["wq"][i], h.n_heads)
        sd[p + "self_attn.k_proj.weight"] = _rotary_permute(t["wk"][i], h.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = t["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = t["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = t["w1"][i]
        sd[p + "mlp.down_proj.weight"] = t["w2"][i]
        sd[p + "mlp.up_proj.weight"] = t["w3"][i]
    sd["lm_head.weight"] = t["emb"] if h.shared_classifier else t["cls"]
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(config)
    model.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=True, assign=True)
    if h.shared_classifier:
        model.tie_weights()
    # Non-persistent buffers (rotary inv_freq) were created on the meta device; rebuild them for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval(), h


def load_llama2c_tokenizer(tokenizer: str | Path, seq_len: int) -> tf.PreTrainedTokenizerBase:
    """A llama2.c model's SentencePiece tokenizer (``tok*.model``) as a transformers Llama tokenizer.

    A directory is taken as an HF tokenizer folder. llama2.c's own ``tokenizer.bin`` export lacks the
    merges' scores-to-pieces mapping transformers needs, so it is refused with a pointer to the ``.model``.
    """
    tokenizer = Path(tokenizer)
    if not tokenizer.exists():
        raise CardError(f"tokenizer {tokenizer} does not exist")
    if tokenizer.is_dir():
        return tf.AutoTokenizer.from_pretrained(tokenizer)
    if tokenizer.suffix != ".model":
        raise CardError(f"tokenizer {tokenizer} is not a SentencePiece .model file (llama2.c's tokenizer.bin is not supported)")
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(tokenizer, Path(d) / "tokenizer.model")
        (Path(d) / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": seq_len,
        }))
        try:
            return tf.AutoTokenizer.from_pretrained(d)
        except Exception as e:  # sentencepiece raises assorted errors on a corrupt model file
            raise CardError(f"cannot read SentencePiece tokenizer {tokenizer}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

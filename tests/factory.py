"""Tiny, locally built checkpoints for tests: no hub access, a few seconds to build.

``save_tiny_checkpoint(path, arch)`` writes a plain HF causal-LM folder (model + tokenizer) for one of
``ARCHS``; ``ENCODER_ONLY`` / ``ENCODER_DECODER`` build models the converter must refuse.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "Once upon a time there was a little girl named Lily who loved to play in the park.",
    "Tom had a red ball. He threw the ball to his dog and the dog ran after it.",
    "The sun was bright and the sky was blue. The birds sang in the tall green trees.",
    "Mia and Ben built a big castle out of sand, and then the waves came and took it away.",
    "12 + 35 = 47. 100 - 1 = 99. copy: abc -> abc. reverse: abc -> cba. sort: 3142 -> 1234.",
]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok.to_str()


def tiny_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (about 300 tokens) with pad/bos/eos and a BOS post-processor."""
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=256,
    )


def _common(vocab_size: int, tok: tf.PreTrainedTokenizerBase) -> dict:
    return dict(
        vocab_size=vocab_size,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _config(arch: str, vocab_size: int, tok) -> tf.PretrainedConfig:
    c = _common(vocab_size, tok)
    decoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=256, initializer_range=0.2, **c)
    if arch == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **decoder)
    if arch == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **decoder)
    if arch == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None, **decoder)
    if arch == "gemma":
        return tf.GemmaConfig(num_key_value_heads=1, head_dim=8, tie_word_embeddings=True, **decoder)
    if arch == "phi":
        return tf.PhiConfig(partial_rotary_factor=0.5, tie_word_embeddings=False, **decoder)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(rotary_pct=0.25, tie_word_embeddings=False, **decoder)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2,
                             tie_word_embeddings=True, **c)
    if arch == "bert":
        return tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=256, vocab_size=vocab_size, pad_token_id=tok.pad_token_id)
    if arch == "bart":
        return tf.BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                             max_position_embeddings=256, decoder_start_token_id=tok.bos_token_id, **c)
    raise ValueError(f"unknown test architecture {arch!r}")


# Decoder-only causal LMs covering tied/untied heads, GQA, partial rotary, absolute positions,
# embedding scaling (Gemma) and an LM head with a bias (Phi).
ARCHS = ["llama", "qwen2", "mistral", "gemma", "phi", "gpt_neox", "gpt2"]
TIED = {"qwen2", "gemma", "gpt2"}
ENCODER_ONLY = "bert"
ENCODER_DECODER = "bart"


def tiny_model(arch: str = "llama", seed: int = 0) -> tuple[tf.PreTrainedModel, tf.PreTrainedTokenizerBase]:
    tok = tiny_tokenizer()
    config = _config(arch, len(tok), tok)
    torch.manual_seed(seed)
    if arch == ENCODER_ONLY:
        model = tf.BertForMaskedLM(config)
    elif arch == ENCODER_DECODER:
        model = tf.BartForConditionalGeneration(config)
    else:
        model = tf.AutoModelForCausalLM.from_config(config)
    return model.eval(), tok


def save_tiny_checkpoint(path: str | Path, arch: str = "llama", seed: int = 0, tokenizer: bool = True) -> Path:
    path = Path(path)
    model, tok = tiny_model(arch, seed)
    model.save_pretrained(path)
    if tokenizer:
        tok.save_pretrained(path)
    return path

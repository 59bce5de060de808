"""Load a checkpoint (CARD or plain AR) for training, decoding or evaluation, with one-line errors.

Also the causality checks every stage shares (conversion, ``objective.kind: ar`` training, decoding):
``check_decoder_only`` from the config alone, ``check_causal`` as a probe on a loaded model, and
``check_tokenizer`` for tokenizers that load but cannot encode text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from card.errors import CardError
from card.metadata import CardMetadata, read_metadata

# The one dtype table. Keys are the names the CLI and the library take (``--dtype``); ``"auto"`` keeps the
# checkpoint's own dtype. ``PRECISIONS`` maps the recipe's ``train.precision`` spelling (DeepSpeed's) onto it.
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# Config attributes that hold a model's maximum number of positions, by architecture family.
POSITION_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


@dataclass
class Checkpoint:
    model: tf.PreTrainedModel
    tokenizer: tf.PreTrainedTokenizerBase
    meta: CardMetadata | None  # None for a plain AR checkpoint
    path: str

    @property
    def is_card(self) -> bool:
        return self.meta is not None


def resolve_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """``"auto"`` or the torch dtype of a ``--dtype`` name (``float32``, ``bfloat16``, ``float16``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CardError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return DTYPES[dtype]


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a resolved ``train.precision`` (``fp32``, ``bf16``, ``fp16``)."""
    return DTYPES[PRECISIONS[precision]]


def max_positions(config) -> int | None:
    """A model's maximum number of positions from its config (None when the config names none)."""
    for name in POSITION_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_decoder_only(config: tf.PretrainedConfig) -> None:
    """Refuse architectures that are not decoder-only causal LMs, from the config alone."""
    mt = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise CardError(f"{mt} is an encoder-decoder model; CARD needs a decoder-only causal LM")
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CardError(f"{mt} has no causal-LM head in transformers (encoder-only?); CARD needs a decoder-only causal LM")
    declared = getattr(config, "architectures", None) or []
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if declared and not any(a in causal_classes or a.endswith(("ForCausalLM", "LMHeadModel")) for a in declared):
        raise CardError(
            f"{mt} checkpoint is a {declared[0]}, not a causal LM (an encoder-only model); CARD needs a decoder-only causal LM"
        )


def check_causal(model: tf.PreTrainedModel, ids: torch.Tensor) -> None:
    """Refuse models whose attention looks ahead (encoder-only models loaded through a causal-LM head).

    Architecture-independent: changing the last input token must not change any earlier logits. A short
    probe keeps a look-ahead's effect large; a causal model computes earlier rows identically.
    """
    ids = ids[:, :8]
    if ids.shape[1] < 2:
        raise CardError(f"the causality probe needs 2 or more tokens, the tokenizer gave {ids.shape[1]}; "
                        "is the tokenizer complete?")
    ids2 = ids.clone()
    ids2[0, -1] = (ids[0, -1] + 1) % model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():  # one batch of two: both rows go through the same kernels, so equal means equal
        logits = model(input_ids=torch.cat([ids, ids2])).logits[:, :-1].float()
    a, b = logits[0], logits[1]
    if (a - b).abs().max().item() > 1e-6 * max(1.0, a.abs().max().item()):
        raise CardError(
            f"{model.config.model_type} attends to future tokens (an encoder-only model); CARD needs a decoder-only causal LM"
        )


def check_tokenizer(tok, name: str) -> None:
    """Refuse a tokenizer that loaded but cannot encode text (transformers builds an empty one for a folder
    without tokenizer files, e.g. GPT-2's)."""
    if isinstance(tok, bool) or not hasattr(tok, "get_vocab"):
        raise CardError(f"{name} has no usable tokenizer; CARD needs one to add the mask token")
    if not tok("Once upon a time", add_special_tokens=False)["input_ids"]:
        raise CardError(f"{name} has no usable tokenizer (it encodes text to no tokens: tokenizer files missing?); "
                        "CARD needs one to add the mask token")


def check_checkpoint_path(path: str | os.PathLike, require_card: bool = False) -> CardMetadata | None:
    """Cheap checks from ``config.json`` alone, so commands fail before loading any weights."""
    p = Path(path)
    if not p.is_dir():
        raise CardError(f"checkpoint {path} does not exist" if not p.exists() else f"checkpoint {path} is not a directory")
    if not (p / "config.json").exists():
        raise CardError(f"checkpoint {path} has no config.json")
    try:
        config = tf.AutoConfig.from_pretrained(p)
    except (OSError, ValueError) as e:
        raise CardError(f"cannot read {path}/config.json: {str(e).splitlines()[0]}") from None
    meta = read_metadata(config)
    if require_card and meta is None:
        raise CardError(f"{path} is not a CARD checkpoint (no 'card' key in config.json); convert it with card-convert first")
    try:
        check_decoder_only(config)
    except CardError as e:
        raise CardError(f"{path}: {e}") from None
    return meta


def load_checkpoint(
    path: str | os.PathLike, dtype: str | torch.dtype = "auto", device: str = "cpu", require_card: bool = False
) -> Checkpoint:
    meta = check_checkpoint_path(path, require_card)
    try:
        tok = tf.AutoTokenizer.from_pretrained(path)
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype))
    except Exception as e:  # corrupt files raise assorted types
        raise CardError(f"cannot load checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return Checkpoint(model.to(device).eval(), tok, meta, str(path))

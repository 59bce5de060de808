"""Load a checkpoint (CARD or plain AR) for training, decoding or evaluation, with one-line errors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf

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


def check_checkpoint_path(path: str | os.PathLike, require_card: bool = False) -> CardMetadata | None:
    """Cheap checks from ``config.json`` alone, so commands fail before loading any weights."""
    p = Path(path)
    if not p.is_dir():
        raise CardError(f"checkpoint {path} does not exist" if not p.exists() else f"checkpoint {path} is not a directory")
    if not (p / "config.json").exists():
        raise CardError(f"checkpoint {path} has no config.json")
    try:
        meta = read_metadata(tf.AutoConfig.from_pretrained(p))
    except (OSError, ValueError) as e:
        raise CardError(f"cannot read {path}/config.json: {str(e).splitlines()[0]}") from None
    if require_card and meta is None:
        raise CardError(f"{path} is not a CARD checkpoint (no 'card' key in config.json); convert it with card-convert first")
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

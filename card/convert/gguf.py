"""Read a GGUF file (llama.cpp's format) into an ordinary, serialisable transformers model and its tokenizer.

transformers' GGUF loader dequantises every tensor (Q4_0, Q4_1, Q8_0, K-quants, ...) to the requested dtype
and builds the tokenizer (with its chat template) from the file's metadata. The model it returns carries a
``quantization_config`` (quant method ``gguf``) and refuses ``save_pretrained``; so the model is rebuilt
from its config without that entry, and the dequantised tensors are moved into it (no copy). The result is
the dequantised model itself, so it also serves as the conversion's verification reference.

The header is read first (memory-mapped, no tensor data): an architecture transformers cannot map from
GGUF, or one that is not a decoder-only causal LM, is refused in one line before any weight is read.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf

from card.errors import CardError

MAGIC = b"GGUF"


def is_gguf(path: str | os.PathLike) -> bool:
    """True when the file starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


@dataclass
class GGUFHeader:
    architecture: str
    name: str | None
    file_type: str | None  # e.g. "Q4_1" (llama.cpp's ``general.file_type``), None when absent
    tensor_types: dict[str, int]  # storage type -> number of tensors, e.g. {"Q4_1": 210, "F32": 61}

    @property
    def quantized(self) -> bool:
        return any(t not in ("F32", "F16", "BF16", "F64") for t in self.tensor_types)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_header(path: Path) -> GGUFHeader:
    """Architecture, name and quantisation of a GGUF file, from its metadata only."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import read_field

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # numpy / struct errors on a truncated or corrupt file
        raise CardError(f"cannot read GGUF file {path}: {_first_line(e)}") from None
    arch = read_field(reader, "general.architecture")
    if not arch:
        raise CardError(f"GGUF file {path} has no general.architecture; it is not a model file")
    name = read_field(reader, "general.name")
    ftype = read_field(reader, "general.file_type")
    file_type = None
    if ftype:
        try:
            file_type = gguf.LlamaFileType(int(ftype[0])).name.removeprefix("MOSTLY_")
        except ValueError:
            file_type = f"file_type {int(ftype[0])}"
    types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    return GGUFHeader(str(arch[0]), str(name[0]) if name else None, file_type, dict(sorted(types.items())))


def check_supported(header: GGUFHeader, path: Path) -> None:
    """Refuse architectures transformers cannot load from GGUF, and ones that are not decoder-only causal LMs."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = header.architecture
    readable = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # mapping sections, not models
    if arch not in readable and arch.replace("-", "_") not in readable:
        raise CardError(
            f"GGUF architecture {arch!r} of {path.name} cannot be read by transformers {tf.__version__} "
            f"(it reads {', '.join(readable)})"
        )
    if "t5" in arch:
        raise CardError(f"GGUF architecture {arch!r} is an encoder-decoder model; CARD needs a decoder-only causal LM")


def serialisable(model: tf.PreTrainedModel) -> tf.PreTrainedModel:
    """The same weights in a model built from the config without ``quantization_config`` (so it can be saved)."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config = type(model.config).from_dict(config)
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        plain = type(model)(config)
    state = model.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(plain, "all_tied_weights_keys", {}) or {}) if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise CardError(f"the dequantised {type(model).__name__} does not fit its own config "
                        f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if config.tie_word_embeddings:
        plain.tie_weights()
    # Non-persistent buffers (rotary inv_freq, ...) were created on the meta device: take the loaded model's.
    for name, buf in model.named_buffers():
        module, _, attr = name.rpartition(".")
        owner = plain.get_submodule(module) if module else plain
        owner._buffers[attr] = buf
    plain.generation_config = model.generation_config
    if any(p.is_meta for p in plain.parameters()) or any(b.is_meta for b in plain.buffers()):
        raise CardError(f"the dequantised {type(model).__name__} left tensors unset after rebuilding it")
    return plain.eval()


def load_gguf(path: Path, dtype: str | torch.dtype) -> tuple[tf.PreTrainedModel, tf.PreTrainedTokenizerBase, GGUFHeader]:
    """Dequantised model (``dtype``; "auto" means float32), tokenizer and header of the GGUF file at ``path``."""
    header = read_header(path)
    check_supported(header, path)
    torch_dtype = torch.float32 if dtype == "auto" else dtype
    folder, file = str(path.parent), path.name
    try:
        tok = tf.AutoTokenizer.from_pretrained(folder, gguf_file=file)
    except Exception as e:  # the GGUF tokenizer converters raise assorted errors on unknown tokenizer models
        raise CardError(f"cannot build a tokenizer from {path.name}: {_first_line(e)}") from None
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch_dtype)
    except Exception as e:
        raise CardError(f"cannot load the weights of {path.name}: {_first_line(e)}") from None
    return serialisable(model), tok, header

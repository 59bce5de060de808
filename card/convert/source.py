"""Resolve a conversion source (local HF folder, hub id, GGUF file or llama2.c file) into a model and tokenizer.

Every refusal is a one-line ``CardError`` raised before anything is written, and as early as possible:
the config is checked before the weights are read.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import transformers as tf

from card.checkpoint import check_causal, check_decoder_only, check_tokenizer, resolve_dtype  # noqa: F401 (re-exported)
from card.convert.gguf import is_gguf, load_gguf
from card.convert.llama2c import load_llama2c_model, load_llama2c_tokenizer
from card.errors import CardError
from card.metadata import read_metadata

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Source:
    model: tf.PreTrainedModel
    tokenizer: tf.PreTrainedTokenizerBase
    name: str
    format: str  # "hf", "gguf" or "llama2c"
    details: dict[str, Any] = field(default_factory=dict)  # extra source metadata (GGUF: quantisation, file sha256)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _looks_like_path(src: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a missing local path."""
    return src.startswith((".", "/", "~")) or not _HUB_ID.match(src)


def _hub_error(src: str, e: BaseException) -> CardError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    why = "the hub is disabled (HF_HUB_OFFLINE=1)" if offline else f"the hub could not provide it ({_first_line(e)})"
    return CardError(f"{src!r} is not a local path and {why}; pass a local checkpoint directory")


def load_source(src: str, dtype: str = "auto", tokenizer: str | None = None, gguf_file: str | None = None) -> Source:
    """The model and tokenizer at ``src``: an HF folder or hub id, a GGUF file, or a llama2.c ``.bin``.

    ``gguf_file`` names a GGUF file inside the folder or hub repository ``src``.
    """
    resolve_dtype(dtype)  # refuse a bad dtype before reading anything
    path = Path(os.path.expanduser(src))
    if path.is_symlink() and not path.exists():
        raise CardError(f"source {src} is a symbolic link to {os.readlink(path)}, which does not exist")
    if gguf_file is not None:
        return _load_gguf(_gguf_location(src, path, gguf_file), dtype)
    if path.is_file():
        if is_gguf(path):
            return _load_gguf(path, dtype)
        if path.suffix.lower() == ".gguf":
            raise CardError(f"{src} is named .gguf but does not start with the GGUF magic bytes; it is corrupt or not GGUF")
        return _load_llama2c(path, dtype, tokenizer)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" (it holds {', '.join(ggufs)}: pick one with --gguf-file)" if ggufs else ""
            raise CardError(f"{src} has no config.json; it is not a Hugging Face checkpoint directory{hint}")
        return _load_hf(str(path), src, dtype)
    if _looks_like_path(src):
        raise CardError(f"source {src} does not exist")
    return _load_hf(src, src, dtype)


def _gguf_location(src: str, path: Path, gguf_file: str) -> Path:
    """The local path of ``gguf_file`` in folder ``src``, or downloaded from hub repository ``src``."""
    if path.is_dir():
        file = path / gguf_file
        if not file.is_file():
            raise CardError(f"{src} has no GGUF file {gguf_file}")
        return file
    if path.is_file():
        raise CardError(f"--gguf-file names a file inside a folder or hub repository, but {src} is a file; "
                        f"pass the GGUF file itself as SRC")
    if _looks_like_path(src):
        raise CardError(f"source {src} does not exist")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(src, gguf_file))
    except Exception as e:  # offline, missing repo or file: huggingface_hub raises assorted types
        raise _hub_error(f"{src}/{gguf_file}", e) from None


def _load_gguf(path: Path, dtype: str) -> Source:
    from card.models import file_sha256

    with ThreadPoolExecutor(1) as pool:  # hashing releases the GIL: it overlaps the dequantisation
        sha = pool.submit(file_sha256, path)
        model, tok, header = load_gguf(path, resolve_dtype(dtype))
        details = {"quantization": header.file_type, "tensor_types": header.tensor_types, "file_sha256": sha.result(),
                   "gguf_architecture": header.architecture}
    check_decoder_only(model.config)
    return Source(model, tok, str(path), "gguf", details)


def _load_hf(location: str, name: str, dtype: str) -> Source:
    local = Path(location).is_dir()
    try:
        config = tf.AutoConfig.from_pretrained(location)
    except OSError as e:
        if local:
            raise CardError(f"cannot read {name}/config.json: {_first_line(e)}") from None
        raise _hub_error(name, e) from None
    except ValueError as e:
        raise CardError(f"cannot read the config of {name}: {_first_line(e)}") from None
    meta = read_metadata(config)
    if meta is not None:
        raise CardError(
            f"{name} is already a CARD checkpoint (format {meta.format_version}, mask token "
            f"{meta.mask_token!r} id {meta.mask_token_id}); use it as is"
        )
    check_decoder_only(config)
    try:
        tok = tf.AutoTokenizer.from_pretrained(location)
    except Exception as e:  # a folder without tokenizer files fails with assorted errors by model type
        raise CardError(f"{name} has no usable tokenizer ({_first_line(e)}); CARD needs one to add the mask token") from None
    check_tokenizer(tok, name)
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(location, dtype=resolve_dtype(dtype))
    except OSError as e:
        if local:
            raise CardError(f"cannot load the weights of {name}: {_first_line(e)}") from None
        raise _hub_error(name, e) from None
    except Exception as e:  # safetensors / torch raise many types on corrupt files
        raise CardError(f"cannot load the weights of {name}: {_first_line(e)}") from None
    return Source(model.eval(), tok, name, "hf")


def _load_llama2c(path: Path, dtype: str, tokenizer: str | None) -> Source:
    if tokenizer is None:
        raise CardError(f"{path} is a file, so it is read as a llama2.c checkpoint; pass its tokenizer with --tokenizer tok.model")
    model, header = load_llama2c_model(path)
    tok = load_llama2c_tokenizer(tokenizer, header.seq_len)
    if len(tok) != header.vocab_size:
        raise CardError(f"tokenizer {tokenizer} has {len(tok)} tokens but {path} has a vocabulary of {header.vocab_size}")
    if resolve_dtype(dtype) != "auto":
        model = model.to(resolve_dtype(dtype))
    return Source(model, tok, str(path), "llama2c")

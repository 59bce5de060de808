"""AR checkpoint -> CARD checkpoint (docs/method.md, "Conversion").

The architecture is unchanged. Conversion gives the tokenizer a mask token, grows the embeddings (and an
untied head) to a multiple of 64 rows initialised to the mean of the existing rows, records the ``card``
metadata in ``config.json``, stops ``generate`` from emitting the new ids, writes the result atomically and
verifies that the AR logits over the original vocabulary are unchanged.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers as tf
from transformers.initialization import no_init_weights

from card.checkpoint import max_positions
from card.convert.source import Source, check_causal, load_source
from card.errors import CardError
from card.io import atomic_directory, check_destination, state_dict_sha256
from card.metadata import DEFAULT_MASK_TOKEN, CardMetadata, write_metadata

PAD_MULTIPLE = 64
VERIFY_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. "
    "One day, she saw a big red ball in the park and ran to get it. 12 + 30 = 42."
)
VERIFY_TOKENS = 32


@dataclass
class ConvertReport:
    src: str
    dst: str
    source_format: str
    architecture: str
    model_type: str
    params: int
    dtype: str
    mask_token: str
    mask_token_id: int
    mask_token_added: bool
    vocab_before: int  # embedding rows
    vocab_after: int
    tokenizer_before: int
    tokenizer_after: int
    source_sha256: str
    verified: bool | None = None
    max_abs_diff: float | None = None
    argmax_equal: bool | None = None
    seconds: float = 0.0
    quantization: str | None = None  # a GGUF source's quantisation type (e.g. Q4_1)

    def to_dict(self) -> dict:
        return asdict(self)


def padded_vocab_size(rows: int, tokens: int, multiple: int = PAD_MULTIPLE) -> int:
    """Embedding rows after conversion: enough for every token, never fewer than before, padded up."""
    return multiple * math.ceil(max(rows, tokens) / multiple)


ROLE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "cls_token")


def special_token_roles(tok: tf.PreTrainedTokenizerBase, model: tf.PreTrainedModel | None = None) -> dict[int, str]:
    """Ids the model already gives a role, with the role: the tokenizer's BOS/EOS/UNK/SEP/CLS, the BOS/EOS and
    decoder-start ids of the model's config and generation config, and tokens its chat template writes.

    Padding is not a role here: a pad id (unless it is also EOS) is never generated nor attended to.
    """
    roles: dict[int, str] = {}
    for attr in ROLE_TOKENS:
        token = getattr(tok, attr, None)
        if isinstance(token, str) and token in tok.get_vocab():
            roles.setdefault(tok.convert_tokens_to_ids(token), f"the tokenizer's {attr.removesuffix('_token')} token")
    for cfg in ([] if model is None else [model.config, model.generation_config]):
        for name in ("bos_token_id", "eos_token_id", "decoder_start_token_id"):
            v = getattr(cfg, name, None)
            for i in v if isinstance(v, (list, tuple)) else [v]:
                if isinstance(i, int):
                    roles.setdefault(i, f"the model's {name.removesuffix('_token_id').replace('_', '-')} token")
    template = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else ""
    for i, t in tok.added_tokens_decoder.items():
        if t.content and t.content in template:
            roles.setdefault(i, "a token of the chat template")
    return roles


def check_mask_token(tok: tf.PreTrainedTokenizerBase, mask_token: str, roles: dict[int, str] | None = None) -> None:
    """A named mask token must exist and must not be one the model already uses (see ``choose_mask_token``)."""
    if mask_token not in tok.get_vocab():
        raise CardError(f"--mask-token {mask_token!r} is not in the tokenizer's vocabulary")
    role = (special_token_roles(tok) if roles is None else roles).get(tok.convert_tokens_to_ids(mask_token))
    if role is not None and mask_token != tok.mask_token:
        raise CardError(f"--mask-token {mask_token!r} is {role}, which the model already uses; choose an unused "
                        "token, or omit --mask-token to add <|mask|>")


def choose_mask_token(tok: tf.PreTrainedTokenizerBase, mask_token: str | None,
                      roles: dict[int, str] | None = None) -> tuple[str, bool]:
    """Give ``tok`` a mask token; return it and whether it is a new vocabulary entry.

    A named ``mask_token`` must already exist and must not be a token the model already uses for something
    else (``roles``, see ``special_token_roles``): its id goes into ``suppress_tokens``, so reusing EOS would
    stop ``generate`` from ever ending. Otherwise a tokenizer's own mask token is kept; otherwise ``<|mask|>``
    is added as a new special token.
    """
    if mask_token is not None:
        check_mask_token(tok, mask_token, roles)
        tok.add_special_tokens({"mask_token": mask_token})
        return mask_token, False
    if tok.mask_token is not None and tok.mask_token in tok.get_vocab():
        return tok.mask_token, False
    before = len(tok)
    tok.add_special_tokens({"mask_token": DEFAULT_MASK_TOKEN})
    return DEFAULT_MASK_TOKEN, len(tok) > before


@torch.no_grad()
def init_rows_to_mean(weight: torch.Tensor, rows: list[int], n_old: int) -> None:
    """Set ``weight[rows]`` to the mean of the first ``n_old`` rows (a deterministic, neutral start)."""
    if rows:
        weight[rows] = weight[:n_old].float().mean(0).to(weight.dtype)


def resize_for_mask(model: tf.PreTrainedModel, n_tokens: int, new_ids: list[int]) -> tuple[int, int]:
    """Grow the embeddings (and an untied head) to hold ``n_tokens``; initialise new rows and ``new_ids``.

    Returns (rows before, rows after).
    """
    emb = model.get_input_embeddings()
    before = emb.weight.shape[0]
    after = padded_vocab_size(before, n_tokens)
    if after != before:
        # Every new row is set below, so random init of the whole resized matrices (torch's, in the new modules'
        # constructors, then transformers' own `_init_weights`) is wasted time: a 32k-row Llama head pays 0.3 s.
        model._init_weights = lambda module: None
        try:
            with no_init_weights():
                model.resize_token_embeddings(after, mean_resizing=False)
        finally:
            del model._init_weights
    init = sorted(set(range(before, after)) | set(new_ids))
    init_rows_to_mean(model.get_input_embeddings().weight, init, before)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        init_rows_to_mean(head.weight, init, before)
        if getattr(head, "bias", None) is not None:
            with torch.no_grad():
                head.bias[init] = head.bias[:before].float().mean().to(head.bias.dtype)
    return before, after


def verify_ids(tok: tf.PreTrainedTokenizerBase, model: tf.PreTrainedModel) -> torch.Tensor:
    ids = tok(VERIFY_TEXT, return_tensors="pt").input_ids[:, :VERIFY_TOKENS]
    limit = max_positions(model.config)
    return ids[:, : min(ids.shape[1], limit)] if limit else ids


@torch.no_grad()
def _logits(model: tf.PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits[0].float()


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-2


def convert(
    src: str,
    dst: str | Path,
    *,
    mask_token: str | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    verify: bool = True,
    tokenizer: str | None = None,
    gguf_file: str | None = None,
) -> ConvertReport:
    """Convert the causal LM at ``src`` (HF folder, hub id, GGUF file or llama2.c ``.bin``) into a CARD checkpoint.

    ``tokenizer`` is the SentencePiece model of a llama2.c checkpoint; ``gguf_file`` names a GGUF file in the
    folder or hub repository ``src``. A GGUF source is dequantised (``dtype`` "auto": float32) and verified
    against the dequantised model. Raises ``CardError`` with a one-line
    message on bad input; ``dst`` is only ever created complete.
    """
    t0 = time.perf_counter()
    inputs = [src, tokenizer]
    dst = check_destination(dst, overwrite, inputs=inputs)
    source: Source = load_source(str(src), dtype, tokenizer, gguf_file)
    model, tok = source.model, source.tokenizer
    if mask_token is not None:  # refuse a bad --mask-token before anything is written
        check_mask_token(tok, mask_token, special_token_roles(tok, model))
    ids = verify_ids(tok, model)
    # hashlib releases the GIL: hashing the source weights (the state dict keeps the pre-resize tensors alive)
    # overlaps the forwards and the disk write; the hash joins config.json once the weights are written.
    with ThreadPoolExecutor(1) as pool, atomic_directory(dst, overwrite=overwrite, inputs=inputs) as tmp:
        sha = pool.submit(state_dict_sha256, model.state_dict())
        check_causal(model, ids)
        reference = _logits(model, ids)
        check_finite(model, reference, source.name)
        tok_before = len(tok)

        mask, added = choose_mask_token(tok, mask_token, special_token_roles(tok, model))
        mask_id = tok.convert_tokens_to_ids(mask)
        rows_before, rows_after = resize_for_mask(model, len(tok), [mask_id] if added else [])
        meta = CardMetadata(
            mask_token=mask,
            mask_token_id=mask_id,
            original_vocab_size=rows_before,
            vocab_size=rows_after,
            source={"name": source.name, "format": source.format, **source.details},
            doc_separator="bos" if source.format == "llama2c" else "eos",
        )
        gen = model.generation_config
        gen.suppress_tokens = sorted(set(gen.suppress_tokens or []) | set(meta.suppressed_token_ids))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        meta.source["sha256"] = sha.result()
        write_metadata(model.config, meta)
        model.config.save_pretrained(tmp)

        report = ConvertReport(
            src=str(src), dst=str(dst), source_format=source.format,
            architecture=type(model).__name__, model_type=model.config.model_type,
            params=sum(p.numel() for p in model.parameters()), dtype=str(model.dtype).removeprefix("torch."),
            mask_token=mask, mask_token_id=mask_id, mask_token_added=added,
            vocab_before=rows_before, vocab_after=rows_after, tokenizer_before=tok_before, tokenizer_after=len(tok),
            source_sha256=meta.source["sha256"], quantization=source.details.get("quantization"),
        )
        if verify:
            del model
            _verify(tmp, ids, reference, rows_before, mask_id if added else None, report, pool)
    report.seconds = time.perf_counter() - t0
    return report


def check_finite(model: tf.PreTrainedModel, reference: torch.Tensor, name: str) -> None:
    """Refuse a source whose logits are not finite, naming the first non-finite weight if there is one
    (otherwise verification would report a misleading "logits differ")."""
    if torch.isfinite(reference).all():
        return
    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    where = f"weight {bad} holds NaN or inf" if bad else "its logits are NaN or inf on the probe text"
    raise CardError(f"source {name} is not usable: {where}; nothing was written")


def _verify(path: Path, ids, reference, n_original: int, new_id: int | None, report: ConvertReport,
            pool: ThreadPoolExecutor) -> None:
    """Reload with plain transformers and compare AR logits over the original vocabulary."""
    tok = pool.submit(tf.AutoTokenizer.from_pretrained, path)  # mostly Python: it overlaps the forward
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
    got = _logits(model, ids)
    mask_id = tok.result().mask_token_id
    if mask_id != report.mask_token_id:
        raise CardError(f"verification failed: reloaded tokenizer has mask id {mask_id}, expected {report.mask_token_id}")
    keep = torch.ones(n_original, dtype=torch.bool)
    if new_id is not None and new_id < n_original:
        keep[new_id] = False  # a new token placed in an unused existing row: that row was re-initialised
    got = got[:, :n_original][:, keep]
    ref = reference[:, :n_original][:, keep]
    report.max_abs_diff = (got - ref).abs().max().item()
    report.argmax_equal = bool(torch.equal(got.argmax(-1), ref.argmax(-1)))
    report.verified = report.max_abs_diff <= _tolerance(model.dtype) and report.argmax_equal
    if not report.verified:
        raise CardError(
            f"verification failed: converted logits differ from the source (max abs diff {report.max_abs_diff:.3g}, "
            f"argmax equal: {report.argmax_equal}); nothing was written"
        )

"""Decoding for CARD checkpoints: AR, dynamic parallel (CARD) and lossless (card-method.md section 4).

Three entry points share one batched engine and one result type:

* ``decode_ar``: one token per forward, greedy or sampled (temperature, top-p, seed), KV cache.
* ``decode_parallel``: append K mask tokens after the committed prefix, read slot 1 from the last committed
  token's logits (always accepted: it is the exact AR prediction) and slot k+1 from mask k, accept by
  confidence, crop the KV cache so only real tokens stay cached, repeat.
* ``decode_lossless``: verify drafts (the previous step's mask predictions) with the exact AR logits in the
  same forward; the output is identical to greedy AR.

``decode(mode, ...)`` dispatches on a mode name and ``generate(checkpoint, ...)`` adds the checkpoint's
CARD defaults. Every call returns one ``DecodeResult`` per prompt.

Position alignment (the part that goes wrong). A forward over ``pending + drafts + [M] * K`` (``pending``:
committed tokens whose KV is not cached yet; the whole prompt at the first step) gives D + K + 1 useful
distributions: the logits at the last pending token predict the token after it (slot 1, exact AR), the
logits at draft j predict the token after draft j (exact AR, since the drafts are real tokens), and the
logits at mask k predict the token after mask k. A prediction is never read from the logits at its own
position.

Batching. Prompts are left-padded; at every step each row's segment (pending + drafts + masks) is
left-padded to the longest one, so the last D + K + 1 positions of every row line up and every row's cache
grows by the same number of slots. Pads (also the rejected drafts of rows that accepted more than the row
that accepted least, which stay in the middle of the cache) are excluded through the 2D attention mask,
so they are never attended; once they outnumber the real slots the cache is compacted. Rows carry their
own position ids, so absolute-position models (GPT-2) and left padding both work. A row that finishes
leaves the batch (its cache rows are dropped), so the rest stop paying for it. Per-prompt output is the
same as decoding the prompt alone.

Conventions (the same in every mode):

* ``token_ids`` are the generated tokens only, never the prompt. A generated EOS token is kept in
  ``token_ids`` (as ``transformers.generate`` does) and generation of that prompt stops; tokens accepted
  after an EOS in the same forward are discarded. ``text`` is the generated tokens decoded on their own
  without special tokens, as lm-eval's HF model decodes continuations (so a SentencePiece tokenizer drops
  the first token's leading space; ``card generate`` prints the difference of prompt + text instead).
* Stop strings are searched in the decoded generated text after every forward. On a hit, ``token_ids`` end
  at the first token whose text completes a stop string, and ``text`` is cut just before the earliest stop
  string (the stop string itself is not returned). ``finish_reason`` is ``"eos"``, ``"stop"`` or ``"length"``.
* Ids in ``suppress_ids`` (by default the model's ``generation_config.suppress_tokens`` plus the CARD
  metadata's mask and padding rows, the set the converter gives ``generate``) get logit -inf, so the mask
  token is never emitted and AR output equals ``transformers.generate``.
* ``forwards`` counts the model forwards while the prompt was active, the first (prefill) one included, so
  greedy AR makes exactly one forward per generated token. ``seconds`` is the wall time from the start of
  the prompt's batch until the prompt finished.
* Sampling draws from a per-prompt ``torch.Generator`` seeded with ``seed`` and consumes a fixed number of
  draws per forward, so a sampled output depends only on (prompt, settings, seed), not on the batch.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence, Union

import torch
import transformers as tf
from transformers.cache_utils import DynamicLayer

from card.errors import CardError
from card.metadata import read_metadata

MODES = ("ar", "parallel", "lossless")
RULES = ("prefix", "joint")
DEFAULT_MAX_NEW_TOKENS = 64
# A batched cache is compacted once its masked-out slots number at least this many and this many times the
# longest row's real tokens (see ``_compact``).
COMPACT_MIN_WASTE = 32
COMPACT_WASTE_RATIO = 1.0

Prompt = Union[str, Sequence[int]]
OnStep = Callable[[int, list[int]], None]  # (prompt index, tokens committed by this forward)


@dataclass
class Request:
    """One prompt with optional per-request overrides of the call's ``max_new_tokens`` / ``stop_strings``."""

    prompt: Prompt
    max_new_tokens: int | None = None
    stop_strings: Sequence[str] | None = None


@dataclass
class DecodeResult:
    """The outcome of decoding one prompt (generated tokens only; see the module docstring)."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    new_tokens: int
    forwards: int
    tokens_per_forward: float
    seconds: float
    tokens_per_second: float
    finish_reason: str  # "eos" | "stop" | "length"
    settings: dict[str, Any]
    steps: list[list[int]]  # the tokens committed by each forward, in order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ public API
def decode_ar(
    model: tf.PreTrainedModel,
    tokenizer: tf.PreTrainedTokenizerBase,
    prompts: Prompt | Request | Sequence[Prompt | Request],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_ids: int | Sequence[int] | None = None,
    stop_strings: Sequence[str] = (),
    batch_size: int | None = None,
    suppress_ids: Sequence[int] | None = None,
    on_step: OnStep | None = None,
) -> list[DecodeResult]:
    """Autoregressive decoding: one token per forward with the KV cache; greedy when ``temperature`` is 0.

    ``prompts``: a string, a list of token ids, a ``Request``, or a list of these. ``eos_token_ids``: None
    means the model's generation config (or the tokenizer's EOS); pass ``[]`` to disable EOS. ``batch_size``:
    prompts per forward (None: all at once). ``on_step(i, ids)`` is called after every forward with the
    tokens just committed for prompt ``i``.
    """
    _check_sampling(temperature, top_p)
    cfg = _Config("ar", 0, 1.0, "prefix", float(temperature), float(top_p), int(seed), None,
                  _eos_ids(model, tokenizer, eos_token_ids), _suppress(model, suppress_ids))
    return _decode(model, tokenizer, prompts, cfg, max_new_tokens, stop_strings, batch_size, on_step)


def decode_parallel(
    model: tf.PreTrainedModel,
    tokenizer: tf.PreTrainedTokenizerBase,
    prompts: Prompt | Request | Sequence[Prompt | Request],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    threshold: float = 0.9,
    block_size: int = 8,
    rule: str = "prefix",
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    mask_id: int | None = None,
    eos_token_ids: int | Sequence[int] | None = None,
    stop_strings: Sequence[str] = (),
    batch_size: int | None = None,
    suppress_ids: Sequence[int] | None = None,
    on_step: OnStep | None = None,
) -> list[DecodeResult]:
    """CARD dynamic parallel decoding (card-method.md 4.3).

    Each forward runs on ``pending + [M] * block_size``. Slot 1 (from the last pending token) is always
    accepted; slot k+1 (from mask k) carries a confidence, the probability of the chosen token. Rules:

    * ``"prefix"``: accept the longest run of slots 2, 3, ... whose confidence is each >= ``threshold``;
    * ``"joint"``: accept the longest run whose running product of confidences is >= ``threshold``
      (the estimated probability that the whole run is right).

    Every forward commits at least one token, so it never needs more forwards than AR. ``block_size`` 0
    is exactly AR. ``mask_id`` defaults to the CARD metadata in ``model.config``.
    """
    check_settings("parallel", temperature=temperature, top_p=top_p, threshold=threshold, block_size=block_size,
                   rule=rule)
    cfg = _Config("parallel", int(block_size), float(threshold), rule, float(temperature), float(top_p), int(seed),
                  _mask_id(model, mask_id), _eos_ids(model, tokenizer, eos_token_ids), _suppress(model, suppress_ids))
    return _decode(model, tokenizer, prompts, cfg, max_new_tokens, stop_strings, batch_size, on_step)


def decode_lossless(
    model: tf.PreTrainedModel,
    tokenizer: tf.PreTrainedTokenizerBase,
    prompts: Prompt | Request | Sequence[Prompt | Request],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    block_size: int = 8,
    mask_id: int | None = None,
    eos_token_ids: int | Sequence[int] | None = None,
    stop_strings: Sequence[str] = (),
    batch_size: int | None = None,
    suppress_ids: Sequence[int] | None = None,
    on_step: OnStep | None = None,
) -> list[DecodeResult]:
    """Lossless self-speculative decoding (card-method.md 4.4): output identical to greedy AR.

    Each forward runs on ``pending + drafts + [M] * block_size``, where the drafts are the previous
    forward's mask predictions. Draft j is accepted while it equals the AR argmax at the position before it.
    At the first mismatch the AR token is committed instead and the later drafts and the masks' predictions
    are discarded (they were conditioned on a wrong draft). When every draft is accepted, the AR token
    predicted at the last draft is committed too and the masks' predictions become the next drafts.
    """
    _check_block_size(block_size)
    cfg = _Config("lossless", int(block_size), 1.0, "prefix", 0.0, 1.0, 0, _mask_id(model, mask_id),
                  _eos_ids(model, tokenizer, eos_token_ids), _suppress(model, suppress_ids))
    return _decode(model, tokenizer, prompts, cfg, max_new_tokens, stop_strings, batch_size, on_step)


def decode(mode: str, model: tf.PreTrainedModel, tokenizer: tf.PreTrainedTokenizerBase, prompts,
           **settings) -> list[DecodeResult]:
    """Dispatch to ``decode_ar`` / ``decode_parallel`` / ``decode_lossless`` by ``mode``."""
    fn = {"ar": decode_ar, "parallel": decode_parallel, "lossless": decode_lossless}.get(mode)
    if fn is None:
        raise CardError(f"decoding mode must be one of {', '.join(MODES)}, not {mode!r}")
    known = inspect.signature(fn).parameters
    unknown = sorted(k for k in settings if k not in known)
    if unknown:
        raise CardError(f"{mode} decoding has no setting {', '.join(unknown)}; it takes "
                        f"{', '.join(k for k in known if k not in ('model', 'tokenizer', 'prompts'))}")
    return fn(model, tokenizer, prompts, **settings)


def generate(checkpoint, prompts, mode: str = "ar", *, threshold: float | None = None, block_size: int | None = None,
             **settings) -> list[DecodeResult]:
    """Decode with a loaded ``card.checkpoint.Checkpoint``; threshold / block size default to its CARD metadata.

    ``parallel`` and ``lossless`` need a CARD checkpoint; a plain AR checkpoint allows only ``ar``.
    """
    if mode not in MODES:
        raise CardError(f"decoding mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "ar":
        return decode_ar(checkpoint.model, checkpoint.tokenizer, prompts, **settings)
    meta = checkpoint.meta
    if meta is None:
        raise CardError(f"{mode} decoding needs a CARD checkpoint; {checkpoint.path} is a plain AR checkpoint "
                        "(convert it with card-convert, or use --decoding ar)")
    block_size = meta.decoding.block_size if block_size is None else block_size
    settings.update(block_size=block_size, mask_id=meta.mask_token_id)
    if mode == "parallel":
        settings["threshold"] = meta.decoding.threshold if threshold is None else threshold
    return decode(mode, checkpoint.model, checkpoint.tokenizer, prompts, **settings)


# ------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class _Config:
    mode: str
    block_size: int  # K masks appended per forward (0 in AR mode)
    threshold: float
    rule: str
    temperature: float
    top_p: float
    seed: int
    mask_id: int | None
    eos_ids: tuple[int, ...]
    suppress: tuple[int, ...]

    def settings(self, model, batch_size: int, max_new_tokens: int, stop_strings: tuple[str, ...]) -> dict[str, Any]:
        s: dict[str, Any] = {"mode": self.mode, "max_new_tokens": max_new_tokens}
        if self.mode == "parallel":
            s.update(threshold=self.threshold, block_size=self.block_size, rule=self.rule)
        if self.mode == "lossless":
            s.update(block_size=self.block_size)
        if self.mode != "lossless":
            s.update(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        s.update(stop_strings=list(stop_strings), eos_token_ids=list(self.eos_ids), batch_size=batch_size,
                 dtype=str(model.dtype).removeprefix("torch."), device=str(model.device))
        return s


def check_settings(mode: str, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
                   top_p: float = 1.0, threshold: float | None = None, block_size: int | None = None,
                   rule: str = "prefix") -> None:
    """Raise ``CardError`` for a bad knob before any model is loaded (the decoders check the same)."""
    if mode not in MODES:
        raise CardError(f"decoding mode must be one of {', '.join(MODES)}, not {mode!r}")
    _check_max_new_tokens(max_new_tokens)
    _check_sampling(temperature, top_p)
    if threshold is not None:
        _check_threshold(threshold)
    if block_size is not None:
        _check_block_size(block_size)
    if rule not in RULES:
        raise CardError(f"acceptance rule must be one of {', '.join(RULES)}, not {rule!r}")


def _check_sampling(temperature: float, top_p: float) -> None:
    if not temperature >= 0:
        raise CardError(f"temperature must be >= 0, not {temperature}")
    if not 0 < top_p <= 1:
        raise CardError(f"top-p must be in (0, 1], not {top_p}")


def _check_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise CardError(f"threshold must be in (0, 1], not {threshold}")


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 0:
        raise CardError(f"block size must be an integer >= 0, not {block_size!r}")


def _mask_id(model, mask_id: int | None) -> int:
    if mask_id is not None:
        return int(mask_id)
    meta = read_metadata(model.config)
    if meta is None:
        raise CardError("parallel and lossless decoding need a CARD checkpoint (no 'card' metadata in the model "
                        "config); convert it with card-convert first")
    return meta.mask_token_id


def _eos_ids(model, tokenizer, eos_token_ids) -> tuple[int, ...]:
    if eos_token_ids is None:
        eos_token_ids = getattr(model.generation_config, "eos_token_id", None)
        if eos_token_ids is None:
            eos_token_ids = tokenizer.eos_token_id
    if eos_token_ids is None:
        return ()
    if isinstance(eos_token_ids, int):
        return (eos_token_ids,)
    return tuple(int(i) for i in eos_token_ids)


def _suppress(model, suppress_ids) -> tuple[int, ...]:
    """The generation config's ``suppress_tokens`` plus the CARD mask and padding rows (what ``generate`` uses)."""
    if suppress_ids is not None:
        return tuple(sorted({int(i) for i in suppress_ids}))
    ids = set(getattr(model.generation_config, "suppress_tokens", None) or [])
    meta = read_metadata(model.config)
    if meta is not None:
        ids |= set(meta.suppressed_token_ids)
    return tuple(sorted(ids))


def _context_limit(model) -> int | None:
    c = model.config
    return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)


# ------------------------------------------------------------------------------------------ requests
@dataclass
class _Row:
    """Decoding state of one prompt."""

    index: int  # position in the caller's list
    prompt_ids: list[int]
    max_new_tokens: int
    stop_strings: tuple[str, ...]
    generator: torch.Generator | None
    pending: list[int]  # committed tokens (the prompt at first) whose KV is not cached yet
    position: int = 0  # position id of pending[0]
    drafts: list[int] = field(default_factory=list)  # lossless: guesses for the tokens after pending
    tokens: list[int] = field(default_factory=list)  # generated tokens
    steps: list[list[int]] = field(default_factory=list)
    forwards: int = 0
    finish_reason: str | None = None
    seconds: float = 0.0


def _normalise(prompts) -> list[Request]:
    if isinstance(prompts, (str, Request)):
        return [prompts if isinstance(prompts, Request) else Request(prompts)]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):  # a single tokenised prompt
        return [Request(prompts)]
    return [p if isinstance(p, Request) else Request(p) for p in prompts]


def _check_max_new_tokens(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CardError(f"max new tokens must be an integer >= 1, not {n!r}")
    return n


def _make_rows(model, tokenizer, requests: list[Request], cfg: _Config, max_new_tokens, stop_strings) -> list[_Row]:
    limit = _context_limit(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    rows = []
    for i, req in enumerate(requests):
        if isinstance(req.prompt, str):
            ids = list(tokenizer(req.prompt)["input_ids"])
        else:
            ids = [int(t) for t in req.prompt]
        if not ids:
            raise CardError(f"prompt {i} is empty after tokenisation; give at least one token (e.g. BOS)")
        if min(ids) < 0 or max(ids) >= vocab:
            raise CardError(f"prompt {i} has token ids outside the model's vocabulary [0, {vocab})")
        n = _check_max_new_tokens(max_new_tokens if req.max_new_tokens is None else req.max_new_tokens)
        if limit and len(ids) + n > limit:
            raise CardError(f"prompt {i} ({len(ids)} tokens) + max new tokens ({n}) exceeds the model's "
                            f"{limit} positions")
        stops = tuple(stop_strings if req.stop_strings is None else req.stop_strings)
        if isinstance(req.stop_strings, str) or isinstance(stop_strings, str) or any(not s for s in stops):
            raise CardError("stop strings must be a list of non-empty strings")
        gen = torch.Generator().manual_seed(cfg.seed) if cfg.temperature > 0 else None
        rows.append(_Row(i, ids, n, stops, gen, pending=list(ids)))
    return rows


def _decode(model, tokenizer, prompts, cfg: _Config, max_new_tokens, stop_strings, batch_size,
            on_step) -> list[DecodeResult]:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise CardError(f"batch size must be an integer >= 1, not {batch_size!r}")
    rows = _make_rows(model, tokenizer, _normalise(prompts), cfg, max_new_tokens, stop_strings)
    size = batch_size or max(1, len(rows))
    results = []
    for start in range(0, len(rows), size):
        batch = rows[start:start + size]
        _run_batch(model, tokenizer, batch, cfg, on_step)
        for r in batch:
            text = tokenizer.decode(r.tokens, skip_special_tokens=True)
            if r.finish_reason == "stop":
                text = text[:min(i for i in (text.find(s) for s in r.stop_strings) if i >= 0)]
            n = len(r.tokens)
            results.append(DecodeResult(
                prompt_ids=r.prompt_ids, token_ids=r.tokens, text=text, new_tokens=n, forwards=r.forwards,
                tokens_per_forward=n / r.forwards if r.forwards else 0.0, seconds=r.seconds,
                tokens_per_second=n / r.seconds if r.seconds > 0 else 0.0, finish_reason=r.finish_reason or "length",
                settings=cfg.settings(model, len(batch), r.max_new_tokens, r.stop_strings), steps=r.steps,
            ))
    return results


# ------------------------------------------------------------------------------------------ engine
def _choose(logits: torch.Tensor, cfg: _Config, rows: list[_Row], need_confidence: bool):
    """Pick a token per slot of ``logits`` (B, n, V); return (tokens, confidences or None).

    Greedy: argmax, confidence = its softmax probability. Sampled: draw from softmax(logits / T) restricted to
    the top-p nucleus; confidence = the drawn token's probability in that distribution.
    """
    if cfg.temperature == 0:
        if not need_confidence:
            return logits.argmax(-1), None
        conf, tok = torch.softmax(logits, -1).max(-1)
        return tok, conf
    probs = torch.softmax(logits / cfg.temperature, -1)
    if cfg.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p (the first one always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= cfg.top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    cdf = probs.cumsum(-1)
    # A fixed number of draws per row per forward (block size + 1), whatever this forward uses, so that a
    # row's random stream does not depend on the batch it is in.
    n = logits.shape[1]
    u = torch.stack([torch.rand(cfg.block_size + 1, generator=r.generator)[:n] for r in rows]).to(logits.device)
    target = (u * cdf[..., -1]).unsqueeze(-1)
    tok = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    conf = probs.gather(-1, tok.unsqueeze(-1)).squeeze(-1) / cdf[..., -1]
    return tok, conf


def _accept_count(conf: torch.Tensor, cfg: _Config) -> list[int]:
    """Slots accepted per row: slot 1 always, then the contiguous run of mask slots passing the rule."""
    if conf.shape[1] == 1:
        return [1] * conf.shape[0]
    c = conf[:, 1:]
    ok = (c.cumprod(-1) if cfg.rule == "joint" else c) >= cfg.threshold
    return (1 + ok.long().cumprod(-1).sum(-1)).tolist()


def _finish_step(row: _Row, new: list[int], cfg: _Config, tokenizer) -> list[int]:
    """Cut the tokens proposed by one forward at the budget, an EOS or a stop string; set finish_reason."""
    new = new[:row.max_new_tokens - len(row.tokens)]
    for j, t in enumerate(new):
        if t in cfg.eos_ids:
            row.finish_reason = "eos"
            return new[:j + 1]
    if row.stop_strings:
        def hit(k: int) -> bool:
            text = tokenizer.decode(row.tokens + new[:k], skip_special_tokens=True)
            return any(s in text for s in row.stop_strings)

        if hit(len(new)):
            row.finish_reason = "stop"
            return new[:next(k for k in range(1, len(new) + 1) if hit(k))]
    if len(row.tokens) + len(new) >= row.max_new_tokens:
        row.finish_reason = "length"
    return new


@torch.inference_mode()
def _run_batch(model, tokenizer, rows: list[_Row], cfg: _Config, on_step: OnStep | None) -> None:
    """Decode ``rows`` together until each one finishes; fills their tokens, steps, counts and times."""
    device = model.device
    cache = tf.DynamicCache(config=model.config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    suppress = torch.tensor(cfg.suppress, dtype=torch.long, device=device) if cfg.suppress else None
    active = list(rows)
    # slot_mask[b, s]: does cache slot s of row b hold a real token? Needed once rows are batched (pads)
    # or once a row has rejected drafts left in the middle of its cache; None while neither can happen.
    slot_mask = torch.ones(len(rows), 0, dtype=torch.bool, device=device) if len(rows) > 1 else None
    t0 = time.perf_counter()
    while active:
        D = max(len(r.drafts) for r in active)
        # Masks beyond a row's remaining budget can never be committed; masks only see the slots before
        # them, so dropping the trailing ones changes no prediction.
        K = max(0, min(cfg.block_size, max(r.max_new_tokens - len(r.tokens) - 1 - len(r.drafts) for r in active)))
        segments = [r.pending + r.drafts + [cfg.mask_id] * K for r in active]
        S = max(len(s) for s in segments)
        ids = [[pad_id] * (S - len(s)) + s for s in segments]
        pos = [[0] * (S - len(s)) + list(range(r.position, r.position + len(s))) for r, s in zip(active, segments)]
        input_ids = torch.tensor(ids, dtype=torch.long, device=device)
        position_ids = torch.tensor(pos, dtype=torch.long, device=device)
        attention_mask = None
        if slot_mask is not None:
            seg_mask = torch.tensor([[False] * (S - len(s)) + [True] * len(s) for s in segments], device=device)
            attention_mask = torch.cat([slot_mask, seg_mask], 1)
        out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                    past_key_values=cache, use_cache=True, logits_to_keep=D + K + 1)
        logits = out.logits.float()  # (B, D + K + 1, V): the last D + K + 1 positions of every row line up
        if suppress is not None:
            logits.index_fill_(-1, suppress, float("-inf"))

        drops = []  # per row: how many trailing slots of this forward must not stay cached
        if cfg.mode == "lossless":
            preds = logits.argmax(-1).tolist()
            for b, r in enumerate(active):
                d = len(r.drafts)
                ar, masks = preds[b][D - d:D + 1], preds[b][D + 1:]  # ar[j] predicts the token after draft j
                ok = 0
                while ok < d and r.drafts[ok] == ar[ok]:
                    ok += 1
                new = _finish_step(r, r.drafts[:ok] + [ar[ok]], cfg, tokenizer)
                r.position += len(r.pending) + ok  # pending and the accepted drafts are now cached
                drops.append(d - ok + K)
                r.pending = [ar[ok]]
                budget = r.max_new_tokens - len(r.tokens) - len(new)
                r.drafts = masks[:max(0, budget - 1)] if ok == d else []  # later mask guesses assumed the drafts
                _commit(r, new, on_step)
        else:
            tok, conf = _choose(logits, cfg, active, need_confidence=K > 0)
            counts = _accept_count(conf, cfg) if K > 0 else [1] * len(active)
            tok = tok.tolist()
            for b, r in enumerate(active):
                new = _finish_step(r, tok[b][:counts[b]], cfg, tokenizer)
                r.position += len(r.pending)
                drops.append(K)  # the masks' entries
                r.pending = new
                _commit(r, new, on_step)

        now = time.perf_counter()
        keep = [b for b, r in enumerate(active) if r.finish_reason is None]
        for b, r in enumerate(active):
            if r.finish_reason is not None:
                r.seconds = now - t0
        if not keep:
            break
        # Crop what no surviving row needs; other rows' extra rejected drafts stay as masked-out slots.
        n_drop = min(drops[b] for b in keep)
        if n_drop > 0:
            cache.crop(-n_drop)
        if attention_mask is not None:
            slot_mask = attention_mask[:, :attention_mask.shape[1] - n_drop].clone()
            for b in keep:
                if drops[b] > n_drop:
                    slot_mask[b, slot_mask.shape[1] - (drops[b] - n_drop):] = False
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            if slot_mask is not None:
                slot_mask = slot_mask[index]
            active = [active[b] for b in keep]
        if slot_mask is not None:
            slot_mask = _compact(cache, slot_mask)


def _compact(cache: tf.DynamicCache, slot_mask: torch.Tensor) -> torch.Tensor:
    """Squeeze the masked-out slots (pads, rejected drafts) out of a batched cache once they dominate it.

    Rows accepting different numbers of tokens leave masked slots behind at every step, so a long batched
    run could attend over several times more slots than real tokens. Each row's real slots keep their
    order and move to the right end (the cached keys already carry their positions, so moving a slot changes
    nothing it computes); rows with fewer real tokens get masked slots on the left. Only plain
    ``DynamicLayer`` caches are compacted (sliding-window layers keep their own bookkeeping).
    """
    slots, width = slot_mask.shape[1], int(slot_mask.sum(1).max())
    waste = slots - width
    if waste == 0 or waste < COMPACT_MIN_WASTE or waste < COMPACT_WASTE_RATIO * width:
        return slot_mask
    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        return slot_mask
    # A stable sort puts each row's masked slots first and its real ones last, both in their original order.
    index = torch.argsort(slot_mask.to(torch.uint8), dim=1, stable=True)[:, slots - width:]
    for layer in cache.layers:
        if layer.is_initialized and layer.keys.numel():
            layer.keys, layer.values = (_gather_slots(t, index) for t in (layer.keys, layer.values))
    return slot_mask.gather(1, index)


def _gather_slots(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[b, h, index[b, j], :]`` for a (batch, heads, slots, dim) cache tensor."""
    return t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))


def _commit(row: _Row, new: list[int], on_step: OnStep | None) -> None:
    row.tokens.extend(new)
    row.steps.append(new)
    row.forwards += 1
    if on_step is not None:
        on_step(row.index, new)

"""The batched decode loop shared by every mode: propose, one forward, accept, commit, crop the cache.

Each forward runs on ``pending + drafts + [M] * m`` per row (``pending``: committed tokens whose KV is not
cached yet, the whole prompt at the first step; drafts and m come from the mode's proposer). The acceptor
turns the logits into the tokens to commit; the KV cache is then cropped so only real, accepted tokens stay.

Batching. Prompts are left-padded; at every step each row's segment is left-padded to the longest one, so
the last D + m + 1 positions of every row line up and every row's cache grows by the same number of slots.
Pads (also the rejected drafts of rows that accepted more than the row that accepted least, which stay in
the middle of the cache) are excluded through the 2D attention mask, so they are never attended; once they
outnumber the real slots the cache is compacted. Rows carry their own position ids, so absolute-position
models (GPT-2) and left padding both work. A row that finishes leaves the batch (its cache rows are
dropped), so the rest stop paying for it.

Conventions (the same in every mode):

* ``token_ids`` are the generated tokens only, never the prompt. A generated EOS token is kept in
  ``token_ids`` (as ``transformers.generate`` does) and generation of that prompt stops; tokens accepted
  after an EOS in the same forward are discarded. ``text`` is the generated tokens decoded on their own
  without special tokens, as lm-eval's HF model decodes continuations.
* Stop strings are searched in the decoded generated text after every forward. On a hit, ``token_ids`` end
  at the first token whose text completes a stop string, and ``text`` is cut just before the earliest stop
  string. ``finish_reason`` is ``"eos"``, ``"stop"`` or ``"length"``.
* Ids in ``suppress`` get logit -inf, so the mask token is never emitted and AR output equals
  ``transformers.generate``.
* ``forwards`` counts the model forwards while the prompt was active, the prefill included. ``seconds`` is
  the wall time from the start of the prompt's batch until the prompt finished.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence, Union

import torch
import transformers as tf
from transformers.cache_utils import DynamicLayer, get_layer_types_and_kwargs

from card.checkpoint import max_positions
from card.errors import CardError

# A batched cache is compacted once its masked-out slots number at least this many and this many times the
# longest row's real tokens (see ``compact``).
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
    lookahead: dict[str, Any] = field(default_factory=dict)  # masks / drafts used, prior, break-even

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Row:
    """Decoding state of one prompt."""

    index: int  # position in the caller's list
    prompt_ids: list[int]
    max_new_tokens: int
    stop_strings: tuple[str, ...]
    generator: torch.Generator | None
    pending: list[int]  # committed tokens (the prompt at first) whose KV is not cached yet
    position: int = 0  # position id of pending[0]
    drafts: list[int] = field(default_factory=list)  # lossless: the masks' guesses for the next forward
    ngram: Any = None  # lossless: the row's prompt-lookup index
    tokens: list[int] = field(default_factory=list)  # generated tokens
    steps: list[list[int]] = field(default_factory=list)
    forwards: int = 0
    masks: int = 0  # masks appended over this row's forwards
    drafted: int = 0  # drafts offered
    drafts_accepted: int = 0
    # per draft source ("mask", "ngram1".."ngram3", "prompt-end"): forwards, offered, accepted, rejected
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    finish_reason: str | None = None
    seconds: float = 0.0


def normalise(prompts) -> list[Request]:
    if isinstance(prompts, (str, Request)):
        return [prompts if isinstance(prompts, Request) else Request(prompts)]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):  # a single tokenised prompt
        return [Request(prompts)]
    return [p if isinstance(p, Request) else Request(p) for p in prompts]


def check_max_new_tokens(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CardError(f"max new tokens must be an integer >= 1, not {n!r}")
    return n


def context_limit(model) -> int | None:
    return max_positions(model.config)


# id(config) -> (a weak reference to that config, every layer full attention?); the reference tells a
# config apart from a later one that happens to get the same id.
_FULL_ATTENTION: dict[int, tuple[weakref.ref, bool]] = {}


def new_cache(model) -> tf.DynamicCache:
    """An empty KV cache for ``model``: ``DynamicCache(config=...)``, whose layer dispatch costs about 70 us a
    batch (a tenth of a batch-1 answer's loop time on the demo model); where every layer is plain full
    attention, the lazily built cache holds exactly those layers, for under 1 us."""
    config = model.config
    ref, full = _FULL_ATTENTION.get(id(config), (None, False))
    if ref is None or ref() is not config:
        types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        full = all(t == "full_attention" for t in types)
        _FULL_ATTENTION[id(config)] = (weakref.ref(config), full)
    return tf.DynamicCache() if full else tf.DynamicCache(config=config)


def make_rows(model, tokenizer, requests: list[Request], seed: int | None, max_new_tokens, stop_strings) -> list[Row]:
    """Tokenise and check every request; ``seed`` None: greedy (no generator)."""
    limit = context_limit(model)
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
        n = check_max_new_tokens(max_new_tokens if req.max_new_tokens is None else req.max_new_tokens)
        if limit and len(ids) + n > limit:
            raise CardError(f"prompt {i} ({len(ids)} tokens) + max new tokens ({n}) exceeds the model's "
                            f"{limit} positions")
        stops = tuple(stop_strings if req.stop_strings is None else req.stop_strings)
        if isinstance(req.stop_strings, str) or isinstance(stop_strings, str) or any(not s for s in stops):
            raise CardError("stop strings must be a list of non-empty strings")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        rows.append(Row(i, ids, n, stops, gen, pending=list(ids)))
    return rows


def text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """``ids -> tokenizer.decode(ids, skip_special_tokens=True)``, without the Python wrapper where it adds nothing.

    The stop-string check decodes every row after every forward; transformers' wrapper costs about 8 us a
    call over the Rust decoder's 1-2, a tenth of a batch-32 decode step. Where the wrapper would change the
    text (``clean_up_tokenization_spaces``) or there is no Rust decoder, the wrapper is used.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode") and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def finish_step(row: Row, new: list[int], eos_ids: tuple[int, ...], decode_text: Callable[[list[int]], str]) -> list[int]:
    """Cut the tokens proposed by one forward at the budget, an EOS or a stop string; set finish_reason."""
    new = new[:row.max_new_tokens - len(row.tokens)]
    for j, t in enumerate(new):
        if t in eos_ids:
            row.finish_reason = "eos"
            return new[:j + 1]
    if row.stop_strings:
        def hit(k: int) -> bool:
            text = decode_text(row.tokens + new[:k])
            return any(s in text for s in row.stop_strings)

        if hit(len(new)):
            row.finish_reason = "stop"
            # Texts of longer prefixes extend shorter ones, so the first hit follows the last miss; searched
            # from the end, as the stop string is nearly always in the last token or two.
            k = len(new) - 1
            while k > 0 and hit(k):
                k -= 1
            return new[:k + 1]
    if len(row.tokens) + len(new) >= row.max_new_tokens:
        row.finish_reason = "length"
    return new


def result_text(tokenizer, row: Row) -> str:
    text = tokenizer.decode(row.tokens, skip_special_tokens=True)
    if row.finish_reason == "stop":
        text = text[:min(i for i in (text.find(s) for s in row.stop_strings) if i >= 0)]
    return text


@torch.inference_mode()
def run_batch(model, tokenizer, rows: list[Row], proposer, acceptor, mask_id: int | None, eos_ids: tuple[int, ...],
              suppress: tuple[int, ...], on_step: OnStep | None) -> None:
    """Decode ``rows`` together until each one finishes; fills their tokens, steps, counts and times."""
    device = model.device
    cache = new_cache(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    suppress_t = torch.tensor(suppress, dtype=torch.long, device=device) if suppress else None
    decode_text = text_decoder(tokenizer)
    for r in rows:
        proposer.start(r)
    active = list(rows)
    # slot_mask[b, s]: does cache slot s of row b hold a real token? Needed once rows are batched (pads)
    # or once a row has rejected drafts left in the middle of its cache; None while neither can happen.
    slot_mask = torch.ones(len(rows), 0, dtype=torch.bool, device=device) if len(rows) > 1 else None
    t0 = time.perf_counter()
    while active:
        proposal = proposer.propose(active)
        m = proposal.masks
        D = max(map(len, proposal.drafts))
        tail = [mask_id] * m
        segments = [r.pending + d + tail for r, d in zip(active, proposal.drafts)]
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
                    past_key_values=cache, use_cache=True, logits_to_keep=D + m + 1)
        logits = out.logits.float()  # (B, D + m + 1, V): the last D + m + 1 positions of every row line up
        if suppress_t is not None:
            logits.index_fill_(-1, suppress_t, float("-inf"))
        outcomes = acceptor.accept(logits, active, proposal)

        drops, committed = [], []  # per row: trailing slots of this forward that must not stay cached
        for r, d, o, src in zip(active, proposal.drafts, outcomes, proposal.sources or [None] * len(active)):
            new = finish_step(r, o.tokens, eos_ids, decode_text)
            r.position += len(r.pending) + o.cached  # pending and the accepted drafts are now cached
            drops.append(len(d) - o.cached + m)
            r.pending = new[o.cached:]
            r.masks += m
            r.drafted += len(d)
            r.drafts_accepted += o.cached
            if src is not None and d:
                tally = r.sources.setdefault(src, {"forwards": 0, "offered": 0, "accepted": 0, "rejected": 0})
                tally["forwards"] += 1
                tally["offered"] += len(d)
                tally["accepted"] += o.cached
                tally["rejected"] += o.cached < len(d) and r.finish_reason is None  # an ended answer censors
            r.tokens.extend(new)
            r.steps.append(new)
            r.forwards += 1
            committed.append(new)
            if on_step is not None:
                on_step(r.index, new)
        proposer.observe(active, proposal, outcomes, committed)

        now = time.perf_counter()
        keep = [b for b, r in enumerate(active) if r.finish_reason is None]
        for r in active:
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
            slot_mask = compact(cache, slot_mask)


def compact(cache: tf.DynamicCache, slot_mask: torch.Tensor) -> torch.Tensor:
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

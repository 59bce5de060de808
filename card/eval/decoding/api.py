"""The public decoders: ``decode_spec`` (a ``DecodingSpec``), the per-mode wrappers, ``decode`` and ``generate``."""

from __future__ import annotations

import inspect
import statistics
from types import SimpleNamespace
from typing import Sequence

import transformers as tf

from card.errors import CardError
from card.eval.decoding.acceptors import ConfidenceAcceptor, CountAcceptor, VerifyAcceptor
from card.eval.decoding.cost import CostModel
from card.eval.decoding.engine import (
    DecodeResult,
    OnStep,
    Prompt,
    Request,
    check_max_new_tokens,
    make_rows,
    normalise,
    result_text,
    run_batch,
)
from card.eval.decoding.planner import (
    Lookahead,
    card_config,
    prior_and_strengths,
    run_key,
    warn_untrained,
)
from card.eval.decoding.proposers import BudgetProposer, DraftProposer, Estimates, MaskProposer
from card.eval.decoding.spec import DEFAULT_MAX_NEW_TOKENS, MODES, DecodingSpec
from card.metadata import DecodingDefaults, read_metadata

Prompts = Prompt | Request | Sequence[Prompt | Request]


def decode_spec(
    model: tf.PreTrainedModel,
    tokenizer: tf.PreTrainedTokenizerBase,
    prompts: Prompts,
    spec: DecodingSpec | str = "ar",
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    mask_id: int | None = None,
    eos_token_ids: int | Sequence[int] | None = None,
    stop_strings: Sequence[str] = (),
    batch_size: int | None = None,
    suppress_ids: Sequence[int] | None = None,
    on_step: OnStep | None = None,
    estimates: Estimates | None = None,
) -> list[DecodeResult]:
    """Decode ``prompts`` as ``spec`` says (a ``DecodingSpec`` or its text); one ``DecodeResult`` per prompt.

    ``prompts``: a string, a list of token ids, a ``Request``, or a list of these. The spec's unset
    threshold / block size come from the model config's CARD metadata. ``eos_token_ids``: None means the
    model's generation config (or the tokenizer's EOS); pass ``[]`` to disable EOS. ``batch_size``: prompts
    per forward (None: all at once). ``on_step(i, ids)`` is called after every forward with the tokens just
    committed for prompt ``i``. ``estimates`` (from ``start_estimates``): the acceptance estimates automatic
    lookahead starts from and updates; pass the same object to later calls over the same kind of text.
    """
    spec = DecodingSpec.parse(spec) if isinstance(spec, str) else spec
    check_max_new_tokens(max_new_tokens)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise CardError(f"batch size must be an integer >= 1, not {batch_size!r}")
    meta = read_metadata(model.config)
    if mask_id is None and spec.mode != "ar":
        if meta is None:
            spec.resolve(None)  # raises the one-line "needs a CARD checkpoint" error
        mask_id = meta.mask_token_id
    spec = _resolve(spec, meta)
    warn_untrained(model, spec.mode)
    eos = _eos_ids(model, tokenizer, eos_token_ids)
    suppress = _suppress(model, suppress_ids, meta)
    seed = spec.seed if spec.temperature > 0 else None
    rows = make_rows(model, tokenizer, normalise(prompts), seed, max_new_tokens, stop_strings)
    size = batch_size or max(1, len(rows))
    auto = _is_auto(spec)
    cost = CostModel.for_model(model) if auto else None
    if estimates is None or len(estimates.masks.prior) != (spec.block_size or 0):
        estimates = start_estimates(model, spec, statistics.median_high(len(r.prompt_ids) for r in rows))
    results = []
    for start in range(0, len(rows), size):
        batch = rows[start:start + size]
        if cost is not None:
            cost.measure_up_to(len(batch))  # once per model and device, outside the timed decode
        proposer, acceptor = _mode(spec, cost, estimates, auto, meta)
        run_batch(model, tokenizer, batch, proposer, acceptor, mask_id, eos, suppress, on_step)
        look = _lookahead_record(spec, cost, len(batch), estimates.prior_source, auto)
        settings = {**spec.settings(), "batch_size": len(batch),
                    "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device)}
        for r in batch:
            n = len(r.tokens)
            results.append(DecodeResult(
                prompt_ids=r.prompt_ids, token_ids=r.tokens, text=result_text(tokenizer, r), new_tokens=n,
                forwards=r.forwards, tokens_per_forward=n / r.forwards if r.forwards else 0.0, seconds=r.seconds,
                tokens_per_second=n / r.seconds if r.seconds > 0 else 0.0, finish_reason=r.finish_reason or "length",
                settings={"max_new_tokens": r.max_new_tokens, **settings, "stop_strings": list(r.stop_strings),
                          "eos_token_ids": list(eos)},
                steps=r.steps,
                lookahead={**look, "masks": r.masks, "drafts": r.drafted, "drafts_accepted": r.drafts_accepted,
                           "draft_sources": r.sources,
                           "masks_per_forward": r.masks / r.forwards if r.forwards else 0.0},
            ))
    return results


def _is_auto(spec: DecodingSpec) -> bool:
    return spec.mode in ("parallel", "lossless") and spec.lookahead == "auto" and bool(spec.block_size)


def prepare(model: tf.PreTrainedModel, spec: DecodingSpec | str, batch_sizes: Sequence[int]) -> None:
    """Pay now what decoding ``spec`` at these batch sizes pays once per model: the cost model's c(B, q).

    ``decode_spec`` measures it outside its own timing, but a caller timing whole ``decode_spec`` calls
    (the lm-eval model) would otherwise charge a fraction of a second of measurement to the first mode
    that needs it.
    """
    spec = DecodingSpec.parse(spec) if isinstance(spec, str) else spec
    spec = _resolve(spec, read_metadata(model.config))
    if _is_auto(spec):
        cost = CostModel.for_model(model)
        cost.measure_up_to(max(batch_sizes, default=1))


def _resolve(spec: DecodingSpec, meta) -> DecodingSpec:
    """The spec with the checkpoint's defaults filled in (the toolkit's defaults for a model without metadata)."""
    if spec.mode == "ar":
        return spec
    # A model handed over with an explicit mask id but no CARD metadata gets the toolkit's defaults.
    return spec.resolve(meta if meta is not None else SimpleNamespace(decoding=DecodingDefaults()))


def start_estimates(model: tf.PreTrainedModel, spec: DecodingSpec | str, prompt_tokens: int | None = None) -> Estimates:
    """Fresh acceptance estimates for decoding ``spec`` with ``model``, from the prior its checkpoint carries.

    ``prompt_tokens``: the prompts' typical length (it selects the checkpoint's slot profile bucket).
    """
    spec = DecodingSpec.parse(spec) if isinstance(spec, str) else spec
    spec = _resolve(spec, read_metadata(model.config))
    raw, k = card_config(model), spec.block_size or 0
    run = run_key(raw.get("slot_profile"), spec.mode, spec.threshold)
    prior, source, strengths = prior_and_strengths(raw, k, prompt_tokens, run)
    return Estimates.start(prior, source, strengths)


def _mode(spec: DecodingSpec, cost, estimates: Estimates, auto: bool, meta=None):
    """The (proposer, acceptor) pair of a mode, fresh per batch; the estimates carry over between batches."""
    k = spec.block_size or 0
    if spec.mode == "ar":
        return MaskProposer(None, None), ConfidenceAcceptor(spec)
    if spec.mode == "budget":
        profile = meta.slot_profile  # present: ``resolve`` refused a checkpoint without one
        return BudgetProposer(profile, spec.budget), CountAcceptor(spec, int(profile["slots"]))
    stats = estimates.masks
    look = Lookahead(spec.mode, k, auto, cost, stats)
    if spec.mode == "parallel":
        return MaskProposer(look, stats, estimates.lengths if auto else None), ConfidenceAcceptor(spec)
    return DraftProposer(k, spec.draft_sources, look, estimates, cost, auto), VerifyAcceptor()


def _lookahead_record(spec: DecodingSpec, cost, batch: int, prior_source: str, auto: bool) -> dict:
    if spec.mode == "ar":
        return {"policy": "none"}
    if spec.mode == "budget":
        return {"policy": "budget", "budget": spec.budget}
    rec = {"policy": spec.lookahead, "max": spec.block_size, "prior": prior_source}
    if cost is not None and spec.block_size:
        rec["cost"] = cost.summary(batch, spec.block_size)
        rec["break_even_1"] = cost.break_even(batch, 1)
    return rec


# ------------------------------------------------------------------------------------------ per-mode wrappers
def decode_ar(model, tokenizer, prompts, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
              top_p: float = 1.0, seed: int = 0, eos_token_ids=None, stop_strings: Sequence[str] = (),
              batch_size: int | None = None, suppress_ids=None, on_step: OnStep | None = None) -> list[DecodeResult]:
    """Autoregressive decoding: one token per forward with the KV cache; greedy when ``temperature`` is 0."""
    spec = DecodingSpec("ar", temperature=temperature, top_p=top_p, seed=seed)
    return decode_spec(model, tokenizer, prompts, spec, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                       stop_strings=stop_strings, batch_size=batch_size, suppress_ids=suppress_ids, on_step=on_step)


def decode_parallel(model, tokenizer, prompts, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                    threshold: float | None = None, block_size: int | str | None = "auto", rule: str = "prefix",
                    temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, mask_id: int | None = None,
                    eos_token_ids=None, stop_strings: Sequence[str] = (), batch_size: int | None = None,
                    suppress_ids=None, on_step: OnStep | None = None) -> list[DecodeResult]:
    """CARD dynamic parallel decoding (docs/method.md, "Parallel").

    Each forward runs on ``pending + [M] * k``. Slot 1 (from the last pending token) is always accepted; slot
    j+1 (from mask j) carries a confidence, the probability of the chosen token. Rules: ``"prefix"`` accepts
    the longest run of slots 2, 3, ... each >= ``threshold``; ``"joint"`` the longest run whose running
    product of confidences is >= ``threshold``. ``block_size``: ``"auto"`` (k <= the checkpoint's K chosen
    per forward from the cost model) or a fixed K; 0 is exactly AR. ``threshold`` None: the checkpoint's.
    """
    spec = DecodingSpec("parallel", threshold=threshold, rule=rule, temperature=temperature, top_p=top_p,
                        seed=seed).with_(block_size=block_size)
    return decode_spec(model, tokenizer, prompts, spec, max_new_tokens=max_new_tokens, mask_id=mask_id,
                       eos_token_ids=eos_token_ids, stop_strings=stop_strings, batch_size=batch_size,
                       suppress_ids=suppress_ids, on_step=on_step)


def decode_lossless(model, tokenizer, prompts, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                    block_size: int | str | None = "auto", drafts: str | None = None, mask_id: int | None = None,
                    eos_token_ids=None, stop_strings: Sequence[str] = (), batch_size: int | None = None,
                    suppress_ids=None, on_step: OnStep | None = None) -> list[DecodeResult]:
    """Lossless self-speculative decoding (docs/method.md, "Lossless"): output identical to greedy AR.

    Each forward runs on ``pending + drafts + [M] * k``; drafts are the previous forward's mask predictions
    or prompt-lookup continuations (``drafts``), verified by the exact AR logits in the same forward.
    """
    spec = DecodingSpec("lossless", drafts=drafts).with_(block_size=block_size)
    return decode_spec(model, tokenizer, prompts, spec, max_new_tokens=max_new_tokens, mask_id=mask_id,
                       eos_token_ids=eos_token_ids, stop_strings=stop_strings, batch_size=batch_size,
                       suppress_ids=suppress_ids, on_step=on_step)


_BY_MODE = {"ar": decode_ar, "parallel": decode_parallel, "lossless": decode_lossless}


def decode(mode: str | DecodingSpec, model, tokenizer, prompts, **settings) -> list[DecodeResult]:
    """Dispatch by mode name (``decode_ar`` / ``decode_parallel`` / ``decode_lossless``) or run a spec.

    ``mode`` may be a ``DecodingSpec`` or spec text (``parallel@0.7``); then ``settings`` are only the call's
    (max_new_tokens, stop_strings, batch_size, ...).
    """
    if isinstance(mode, DecodingSpec):
        return decode_spec(model, tokenizer, prompts, mode, **settings)
    name = str(mode).partition("@")[0]
    if name == "budget":  # no per-mode wrapper: its settings are the spec's
        call_keys = set(inspect.signature(decode_spec).parameters) - {"model", "tokenizer", "prompts", "spec"}
        spec_kw = {k: v for k, v in settings.items() if k not in call_keys}
        call = {k: v for k, v in settings.items() if k in call_keys}
        return decode_spec(model, tokenizer, prompts, DecodingSpec.parse(mode, **spec_kw), **call)
    fn = _BY_MODE.get(name)
    if fn is None:
        raise CardError(f"decoding mode must be one of {', '.join(MODES)}, not {mode!r}")
    if "@" in str(mode):
        spec = DecodingSpec.parse(mode)
        settings.setdefault("threshold", spec.threshold)
    known = inspect.signature(fn).parameters
    unknown = sorted(k for k in settings if k not in known)
    if unknown:
        raise CardError(f"{name} decoding has no setting {', '.join(unknown)}; it takes "
                        f"{', '.join(k for k in known if k not in ('model', 'tokenizer', 'prompts'))}")
    return fn(model, tokenizer, prompts, **settings)


def generate(checkpoint, prompts, mode: str | DecodingSpec = "ar", *, spec: DecodingSpec | None = None,
             **settings) -> list[DecodeResult]:
    """Decode with a loaded ``card.checkpoint.Checkpoint``; unset settings come from its CARD metadata.

    ``mode`` is a mode name, spec text or ``DecodingSpec``; spec settings (threshold, block_size, ...) may be
    given as keyword arguments too. ``parallel`` and ``lossless`` need a CARD checkpoint.
    """
    call_keys = {"max_new_tokens", "mask_id", "eos_token_ids", "stop_strings", "batch_size", "suppress_ids",
                 "on_step"}
    call = {k: v for k, v in settings.items() if k in call_keys}
    spec_kw = {k: v for k, v in settings.items() if k not in call_keys}
    spec = DecodingSpec.parse(spec if spec is not None else mode, **spec_kw)
    if spec.mode != "ar" and checkpoint.meta is None:
        raise CardError(f"{spec.mode} decoding needs a CARD checkpoint; {checkpoint.path} is a plain AR checkpoint "
                        "(convert it with card-convert, or use --decoding ar)")
    return decode_spec(checkpoint.model, checkpoint.tokenizer, prompts, spec.resolve(checkpoint.meta), **call)


def check_settings(mode: str, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
                   top_p: float = 1.0, threshold: float | None = None, block_size=None, rule: str = "prefix") -> None:
    """Raise ``CardError`` for a bad knob before any model is loaded (``DecodingSpec`` checks the same)."""
    if mode not in MODES:
        raise CardError(f"decoding mode must be one of {', '.join(MODES)}, not {mode!r}")
    check_max_new_tokens(max_new_tokens)
    DecodingSpec("parallel", threshold=threshold, rule=rule, temperature=temperature, top_p=top_p).with_(
        block_size=block_size)


# ------------------------------------------------------------------------------------------ model facts
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


def _suppress(model, suppress_ids, meta) -> tuple[int, ...]:
    """The generation config's ``suppress_tokens`` plus the CARD mask and padding rows (what ``generate`` uses)."""
    if suppress_ids is not None:
        return tuple(sorted({int(i) for i in suppress_ids}))
    ids = set(getattr(model.generation_config, "suppress_tokens", None) or [])
    if meta is not None:
        ids |= set(meta.suppressed_token_ids)
    return tuple(sorted(ids))

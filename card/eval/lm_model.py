"""The lm-eval model ``card``: exact likelihoods from the clean-context AR path, generation through CARD decoders.

``CardLM`` subclasses lm-eval's ``HFLM`` (decoder-only backend):

* ``loglikelihood`` and ``loglikelihood_rolling`` are HFLM's own: batched forwards over a clean context, so
  ``loglikelihood`` is exactly what lm-eval's ``hf`` backend computes on the same checkpoint (no Monte Carlo).
  One extension: a continuation longer than the model's window, which HFLM refuses with an assertion (a
  long PIQA solution under a small model's 512 positions), is scored in chunks (see ``_loglikelihood_tokens``).
  One fix for ``loglikelihood_rolling``: lm-eval 0.4.13 encodes the document with the tokenizer's special
  tokens and then prefixes every first window with the BOS token again, so for tokenizers that add BOS
  (Llama, SentencePiece) it scores an extra log p(BOS | BOS). Here the document is encoded without special
  tokens, so the result is the document's log-probability after BOS, as ``transformers`` computes it.
* ``generate_until`` runs ``card.eval.decoding`` in the chosen mode (``ar``, ``parallel``, ``lossless``),
  batched. Prompts are encoded and left-truncated exactly as HFLM does, the stop strings are the task's
  ``until`` plus the EOS string, and the returned text is cut before the first stop string, so AR mode
  returns what the ``hf`` backend returns. Every request's decode statistics go to ``decode_log``.

Model arguments (``--model_args`` / constructor): ``pretrained`` (path, or a loaded ``PreTrainedModel`` with
``tokenizer``), ``decoding`` (``ar``, ``parallel``, ``parallel@T``, ``lossless``, or a ``DecodingSpec``),
``threshold`` (None: the checkpoint's), ``block_size`` (``auto``, the default: masks per forward chosen from
the measured cost, up to the checkpoint's K; or a fixed K), ``drafts`` (lossless draft sources), ``seed``
(sampling), plus HFLM's usual ``batch_size``, ``dtype``, ``device``, ``max_length``.
Parallel and lossless decoding need a CARD checkpoint; a plain checkpoint is allowed in ``ar`` mode.

lm-eval 0.4.13 has no plug-in hook (its model registry is filled by imports only), so ``lm_eval --model card``
works only in a process that imported this module: ``card lm-eval ...`` does that and then runs lm-eval's CLI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

import torch
import transformers as tf
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from card.checkpoint import check_checkpoint_path
from card.errors import CardError
from card.eval import lm_eval_compat
from card.eval.decoding import DecodingSpec, decode_spec, prepare, start_estimates
from card.quiet import progress_disabled
from card.metadata import read_metadata

logger = logging.getLogger(__name__)
lm_eval_compat.install()  # no "fatal: not a git repository" from lm-eval outside a git checkout


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Silence HFLM's warnings about being handed an already loaded model (the normal case here)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@register_model("card")
class CardLM(HFLM):
    """lm-eval model for CARD checkpoints (see the module docstring)."""

    def __init__(
        self,
        pretrained: str | tf.PreTrainedModel,
        tokenizer: str | tf.PreTrainedTokenizerBase | None = None,
        decoding: str | DecodingSpec = "ar",
        threshold: float | None = None,
        block_size: int | str | None = None,
        drafts: str | None = None,
        seed: int = 0,
        device: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        batch_size: int | str = 1,
        **kwargs: Any,
    ) -> None:
        spec = DecodingSpec.parse(decoding, threshold=threshold, drafts=drafts)
        if block_size is not None:
            if spec.mode == "ar":
                raise CardError("block_size applies to parallel and lossless decoding only, not 'ar'")
            spec = spec.with_(block_size=block_size)
        decoding = spec.mode
        if kwargs.pop("backend", "causal") != "causal":
            raise CardError("the card model is decoder-only (backend=causal)")
        if isinstance(pretrained, str):
            meta = check_checkpoint_path(pretrained, require_card=decoding != "ar")
        else:
            meta = read_metadata(pretrained.config)
            if meta is None and decoding != "ar":
                raise CardError(f"{decoding} decoding needs a CARD checkpoint; this model has no CARD metadata")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._rolling = False  # set while loglikelihood_rolling runs (see tok_encode)
        self._estimates: dict = {}  # (task, spec) -> acceptance estimates carried between its batches
        with _quiet("lm_eval.models.huggingface"):
            super().__init__(pretrained=pretrained, backend="causal", tokenizer=tokenizer, device=device, dtype=dtype,
                             batch_size=batch_size, **kwargs)
        self.decoding = decoding
        self.meta = meta
        self.seed = int(seed)
        self.spec = spec.resolve(meta)
        self.threshold = self.spec.threshold
        self.block_size = self.spec.block_size
        self.decode_log: list[dict[str, Any]] = []  # one entry per generate_until request, in completion order
        self._batches = 0

    # ------------------------------------------------------------------------------------ likelihoods
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        """HFLM's; its progress bar only on a terminal (``card.quiet``)."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or progress_disabled())

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """HFLM's, with the document encoded without special tokens (its windows already start with BOS)."""
        self._rolling = True
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or progress_disabled())
        finally:
            self._rolling = False

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """HFLM's, also for continuations longer than ``max_length`` tokens.

        Such a continuation is cut into chunks of ``max_length`` tokens, each scored as a request whose context
        is everything before it (left-truncated as HFLM truncates every context)::

            log p(cont | ctx) = sum_c log p(chunk_c | ctx + chunk_1 .. chunk_{c-1})

        and it is greedy when every chunk is. A continuation that fits is one chunk: HFLM's exact answer.
        """
        parts, owner = [], []
        for i, (key, ctx, cont) in enumerate(requests):
            if len(cont) <= self.max_length:
                parts.append((key, ctx, cont))
                owner.append(i)
                continue
            for start in range(0, len(cont), self.max_length):  # key None: HFLM must not cache a chunk as the whole
                parts.append((None, ctx + cont[:start], cont[start:start + self.max_length]))
                owner.append(i)
        scores = super()._loglikelihood_tokens(parts, disable_tqdm=disable_tqdm or progress_disabled(),
                                               override_bs=override_bs)
        totals = [(0.0, True)] * len(requests)
        for i, (logprob, greedy) in zip(owner, scores, strict=True):
            totals[i] = (totals[i][0] + logprob, totals[i][1] and greedy)
        for (key, _, cont), total in zip(requests, totals):
            if key is not None and len(cont) > self.max_length:
                self.cache_hook.add_partial("loglikelihood", key, total)
        return totals

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        if self._rolling and add_special_tokens is None:
            add_special_tokens = False
        return super().tok_encode(string, add_special_tokens=add_special_tokens, left_truncate_len=left_truncate_len,
                                  **kwargs)

    # ------------------------------------------------------------------------------------ settings
    @property
    def decoding_settings(self) -> dict[str, Any]:
        """Mode, threshold, block size and lookahead as used (defaults resolved from the checkpoint)."""
        return self.spec.lm_eval_settings()

    def pop_decode_log(self) -> list[dict[str, Any]]:
        """Return the decode statistics recorded so far and start a new log."""
        log, self.decode_log = self.decode_log, []
        return log

    def get_model_info(self) -> dict:
        """Like HFLM's, without its hub look-up (checkpoints here are local), plus the decoding settings."""
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.dtype), "model_revision": None, "model_sha": "",
                "card": self.decoding_settings}

    def _decode_spec(self, gen_kwargs: dict[str, Any], task: str) -> DecodingSpec:
        """The decoding spec for one group of requests (after ``normalize_gen_kwargs``): sampling from the task."""
        ignored = sorted(set(gen_kwargs) - {"do_sample", "temperature", "top_p"})
        if ignored:
            logger.warning("task %s: the card model ignores generation settings %s", task, ", ".join(ignored))
        sample = bool(gen_kwargs.get("do_sample")) and float(gen_kwargs.get("temperature") or 0.0) > 0
        if not sample:
            return self.spec
        if self.decoding == "lossless":
            raise CardError(f"lossless decoding is greedy only, but task {task} samples (do_sample, temperature)")
        return self.spec.with_(temperature=float(gen_kwargs["temperature"]),
                               top_p=float(gen_kwargs.get("top_p") or 1.0), seed=self.seed)

    @property
    def _decode_batch_size(self) -> int:
        return self.batch_size if isinstance(self.batch_size, int) else int(self.max_batch_size or 1)

    # ------------------------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode every request with the chosen decoder; batches hold requests of one task and one gen_kwargs."""
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, req in enumerate(requests):
            key = (req.task_name or "", json.dumps(req.args[1], sort_keys=True, default=str))
            groups.setdefault(key, []).append(i)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0 or progress_disabled(),
                   desc=f"Running generate_until requests ({self.decoding})")
        for (task, _), indices in groups.items():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=eos) if s]
            max_gen_toks = kwargs.pop("max_gen_toks")
            if self.max_length - max_gen_toks <= 0:
                raise CardError(f"task {task}: max_gen_toks {max_gen_toks} leaves no room for a prompt in the "
                                f"model's {self.max_length} positions")
            spec = self._decode_spec(kwargs, task)
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen_toks)
                       for i in indices}
            # Longest first (as HFLM does): batches hold prompts of similar length.
            order = sorted(indices, key=lambda i: (-len(prompts[i]), requests[i].args[0]))
            size = self._decode_batch_size
            prepare(self.model, spec, [min(size, len(order))])  # not timed
            # What one batch of a task learns about acceptance, the next batch of that task starts from.
            key = (task, repr(spec))
            if key not in self._estimates:
                self._estimates[key] = start_estimates(self.model, spec, len(prompts[order[len(order) // 2]]))
            estimates = self._estimates[key]
            for start in range(0, len(order), size):
                chunk = order[start:start + size]
                t0 = time.perf_counter()
                outs = decode_spec(self.model, self.tokenizer, [prompts[i] for i in chunk], spec,
                                   max_new_tokens=max_gen_toks, stop_strings=until, batch_size=len(chunk),
                                   mask_id=self.meta.mask_token_id if self.meta is not None else None,
                                   estimates=estimates)
                wall = time.perf_counter() - t0
                for i, out in zip(chunk, outs, strict=True):
                    text = postprocess_generated_text(out.text, until, None)
                    results[i] = text
                    self.decode_log.append({
                        "task": task, "doc_id": requests[i].doc_id, "prompt_tokens": len(out.prompt_ids),
                        "new_tokens": out.new_tokens, "forwards": out.forwards,
                        "tokens_per_forward": out.tokens_per_forward, "seconds": out.seconds,
                        "finish_reason": out.finish_reason, "batch": self._batches, "batch_seconds": wall,
                        "masks": out.lookahead.get("masks", 0), "drafts": out.lookahead.get("drafts", 0),
                        "break_even_1": out.lookahead.get("break_even_1"),
                    })
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                self._batches += 1
                bar.update(len(chunk))
        bar.close()
        return results


def decode_totals(log: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over decode-log entries: tokens, forwards, tokens per forward, wall seconds, tokens per second.

    Forwards are counted per request (a batched forward counts once for each request it advanced), so tokens
    per forward does not depend on the batch size. Seconds are wall time: each batch counted once.
    """
    tokens = sum(e["new_tokens"] for e in log)
    forwards = sum(e["forwards"] for e in log)
    seconds = sum({e["batch"]: e["batch_seconds"] for e in log}.values())
    return {"requests": len(log), "generated_tokens": tokens, "forwards": forwards,
            "tokens_per_forward": tokens / forwards if forwards else None, "seconds": seconds,
            "tokens_per_second": tokens / seconds if seconds > 0 else None}

"""Decoding for CARD checkpoints: AR, dynamic parallel (CARD) and lossless (docs/method.md, "Decoding").

One batched engine (``engine``) runs every mode as a proposer (what a forward appends after the committed
tokens: nothing, masks, drafts + masks; ``proposers``) and an acceptor (which proposed tokens to commit:
by confidence, or by exact verification; ``acceptors``). ``spec.DecodingSpec`` holds a mode and its settings;
``cost.CostModel`` is the measured forward cost c(B, q); ``planner`` chooses the lookahead per forward.

* ``decode_ar``: one token per forward, greedy or sampled (temperature, top-p, seed), KV cache.
* ``decode_parallel``: append k <= K masks, read slot 1 from the last committed token's logits (always
  accepted: it is the exact AR prediction) and slot j+1 from mask j, accept by confidence, crop the KV cache.
* ``decode_lossless``: verify drafts (the previous step's mask predictions, or prompt-lookup n-gram
  continuations) with the exact AR logits in the same forward; the output is identical to greedy AR.
* ``budget@F``: per forward, exactly the number of tokens planned by ARDM's DP over the checkpoint's slot
  profile for F forwards per token (``BudgetProposer`` + ``CountAcceptor``); ``budget@1`` is greedy AR.

``decode(mode, ...)`` dispatches on a mode name, ``decode_spec(..., spec)`` runs a ``DecodingSpec`` and
``generate(checkpoint, ...)`` adds the checkpoint's CARD defaults. Every call returns one ``DecodeResult``
per prompt. ``block_size="auto"`` (the default) chooses k per forward to maximise expected committed tokens
per second; a fixed K is the paper's decoder, and with it a prompt's output does not depend on its batch.
"""

from card.eval.decoding.api import (
    check_settings,
    decode,
    decode_ar,
    decode_lossless,
    decode_parallel,
    decode_spec,
    generate,
    prepare,
    start_estimates,
)
from card.eval.decoding.cost import CostModel
from card.eval.decoding.engine import DecodeResult, Request, check_max_new_tokens
from card.eval.decoding.spec import DEFAULT_MAX_NEW_TOKENS, DRAFTS, MODES, RULES, DecodingSpec, parse_block_size, parse_modes

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DRAFTS",
    "MODES",
    "RULES",
    "CostModel",
    "DecodeResult",
    "DecodingSpec",
    "Request",
    "check_max_new_tokens",
    "check_settings",
    "decode",
    "decode_ar",
    "decode_lossless",
    "decode_parallel",
    "decode_spec",
    "generate",
    "prepare",
    "start_estimates",
    "parse_block_size",
    "parse_modes",
]

"""Prompt-lookup priors: how often a lookup's draft tokens are accepted, by n-gram order and on a prompt's end.

    python -m benchmarks.lookup_prior [--case LABEL CKPT PROMPTS N TOKENS [STOP]] ... [--out benchmarks/results]

Lossless decoding plans prompt-lookup drafts from running acceptance estimates that start from a prior
(``card.eval.decoding.planner.LOOKUP_PRIOR`` for 1-, 2- and 3-gram matches, ``PROMPT_END_PRIOR`` for a lookup
on a prompt's first forward). This measures what those priors should be: every case decodes its prompts
losslessly at batch 1 with a fixed lookahead of ``--block-size`` prompt-lookup drafts wherever the text
has a match (no masks, no cost model: every lookup is taken, so none is selected by its own estimate), and
counts per draft source the lookups, the drafts offered, the drafts accepted and the lookups ending in a
rejection. With a constant chance a that a draft is accepted given the ones before, and drafts past an
answer's end censored, the maximum-likelihood a is accepted / (accepted + rejections).

PROMPTS is ``tinystories`` (the first sentence of N validation stories) or a JSONL file with a ``prompt``
field; STOP an optional stop string (``\\n`` for the demo's tasks). Without ``--case``: the converted
stories260K on TinyStories. Writes ``NAME.json`` and ``NAME.md`` into ``--out`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from benchmarks.common import (
    converted_stories260k,
    environment,
    markdown_table,
    stop_strings,
    story_prompts,
    write_results,
)
from benchmarks.decode import file_prompts
from card.checkpoint import load_checkpoint
from card.eval.decoding import DecodingSpec, decode_spec
from card.eval.decoding.planner import LOOKUP_PRIOR, PROMPT_END_PRIOR

SOURCES = ("ngram1", "ngram2", "ngram3", "prompt-end")
MIN_LOOKUPS = 5  # a case's source with fewer lookups is listed but left out of the medians


def acceptance(accepted: int, rejected: int) -> float | None:
    """The maximum-likelihood a of drafts accepted with chance a given the ones before: A / (A + R)."""
    return accepted / (accepted + rejected) if accepted + rejected else None


def measure(model_path: str, prompts: list[str], max_new_tokens: int, stop: tuple[str, ...],
            block_size: int) -> dict[str, dict[str, int]]:
    """Per draft source, summed over the prompts: forwards, offered, accepted, rejected."""
    ck = load_checkpoint(model_path, dtype="float32", require_card=True)
    spec = DecodingSpec("lossless", block_size=block_size, lookahead="fixed", drafts="ngram")
    results = decode_spec(ck.model, ck.tokenizer, prompts, spec, max_new_tokens=max_new_tokens, batch_size=1,
                          stop_strings=stop)
    totals: dict[str, dict[str, int]] = {}
    for res in results:
        for source, counts in res.lookahead["draft_sources"].items():
            into = totals.setdefault(source, dict.fromkeys(counts, 0))
            for key, value in counts.items():
                into[key] += value
    return totals


def run(cases: list[list[str]], block_size: int, threads: int | None) -> tuple[dict, str]:
    if threads:
        torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases or [["stories260K converted, TinyStories", "", "tinystories", "8", "96"]]:
            label, model, source, n, tokens, *stop = case
            prompts = story_prompts(int(n)) if source == "tinystories" else file_prompts(source, int(n))
            stop = stop_strings(stop)  # allow '\n'
            totals = measure(model or str(converted_stories260k(tmp)), prompts, int(tokens), stop, block_size)
            for name in SOURCES:
                c = totals.get(name)
                if c:
                    rows.append({"case": label, "source": name, **c,
                                 "accepted_per_lookup": c["accepted"] / c["forwards"],
                                 "a": acceptance(c["accepted"], c["rejected"])})
    priors = dict(zip(SOURCES, (*LOOKUP_PRIOR, PROMPT_END_PRIOR)))
    summary = []
    for name in SOURCES:
        rates = [r["a"] for r in rows if r["source"] == name and r["forwards"] >= MIN_LOOKUPS and r["a"] is not None]
        summary.append({"source": name, "cases": len(rates), "median_a": statistics.median(rates) if rates else None,
                        "low": min(rates, default=None), "high": max(rates, default=None), "prior": priors[name]})
    md = "\n\n".join([
        f"## Prompt-lookup acceptance, fixed {block_size}-token lookups, batch 1",
        markdown_table(rows, [("case", "case"), ("source", "source"), ("forwards", "lookups"), ("offered", "offered"),
                              ("accepted", "accepted"), ("rejected", "rejections"),
                              ("accepted_per_lookup", "accepted per lookup"), ("a", "a = A / (A + R)")]),
        f"Per source over the cases with at least {MIN_LOOKUPS} lookups, against the prior the planner starts from:",
        markdown_table(summary, [("source", "source"), ("cases", "cases"), ("median_a", "median a"),
                                 ("low", "lowest"), ("high", "highest"), ("prior", "prior in use")]),
    ])
    return {"settings": {"block_size": block_size, "cases": cases, **environment()}, "results": rows,
            "summary": summary}, md


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", nargs="+", action="append", default=[], metavar="ARG",
                   help="LABEL CKPT PROMPTS N TOKENS [STOP] (repeatable; PROMPTS: tinystories or a JSONL file)")
    p.add_argument("--block-size", type=int, default=8, help="draft tokens per lookup")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--name", default="lookup_prior", help="output file stem")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    bad = [c for c in args.case if len(c) not in (5, 6)]
    if bad:
        p.error(f"--case takes LABEL CKPT PROMPTS N TOKENS [STOP], not {' '.join(bad[0])!r}")
    data, md = run(args.case, args.block_size, args.threads)
    write_results(args.out, args.name, data, md)
    print(md)


if __name__ == "__main__":
    main()

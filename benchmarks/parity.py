"""Parity with AR: is each automatic mode at least as fast as AR? A paired, finely interleaved measurement.

    python -m benchmarks.parity [--model CKPT] [--rounds N] [--out benchmarks/results]

``benchmarks.decode`` runs every mode once per repeat and compares medians of runs made up to a minute
apart; on this shared 2-core VM the machine's speed moves by 10-20% over that time, more than the few
percent that decide "at least 0.95x AR". Here each run of a mode (one ``decode`` call over all the prompts,
as in ``benchmarks.decode``) sits between two AR runs of the same call, A M M A, so drift slower than
a few runs cancels, and (t_A1 + t_A2) / (t_M1 + t_M2) is one paired observation of the mode's speed
relative to AR. An A/A control (AR against AR, the same bracket) shows what the method resolves on this
machine. Per mode and batch size:

* the median of the paired ratios with a 95% bootstrap interval (resampling the observations);
* best-of: AR's fastest run over the mode's fastest (timeit's estimator: interference only ever adds time);
* tokens per forward and the share of tokens equal to AR's (1.0 for lossless by construction).

Each round rotates the modes, so no mode always runs first. Writes
``NAME.json`` and ``NAME.md`` into ``--out`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch

from benchmarks.common import (
    converted_stories260k,
    environment,
    gc_paused,
    markdown_table,
    stop_strings,
    story_prompts,
    write_results,
)
from benchmarks.decode import file_prompts, same_tokens
from card.checkpoint import load_checkpoint
from card.eval.decoding import DecodingSpec, decode

CONTROL = "ar (A/A control)"
BOOTSTRAP = 2000


def median_interval(values: list[float], seed: int = 0, resamples: int = BOOTSTRAP) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of ``values``."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]


def run(model_path: str | None, modes: list[str], batch_sizes: tuple[int, ...], rounds: int, max_new_tokens: int,
        n_prompts: int, prompt_file: str | None, stop: tuple[str, ...], threads: int | None) -> tuple[dict, str]:
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        ck = load_checkpoint(model_path or converted_stories260k(tmp), dtype="float32", require_card=True)
    model, tok = ck.model, ck.tokenizer
    prompts = file_prompts(prompt_file, n_prompts) if prompt_file else story_prompts(n_prompts)
    specs = {"ar": DecodingSpec("ar"), CONTROL: DecodingSpec("ar"),
             **{m: DecodingSpec.parse(m).with_(lookahead="auto") for m in modes}}

    def once(label, unit, bs):
        with gc_paused():
            t = time.perf_counter()
            out = decode(specs[label], model, tok, unit, max_new_tokens=max_new_tokens, batch_size=bs,
                         stop_strings=stop)
            return time.perf_counter() - t, out

    rows = []
    for bs in batch_sizes:
        for label in specs:  # warm-up: first-call allocations and the cost model at this batch size
            once(label, prompts[:bs], bs)
        compared = [label for label in specs if label != "ar"]
        ratios = {label: [] for label in compared}
        fastest = {label: float("inf") for label in specs}
        outputs: dict[str, list] = {}
        for r in range(rounds):
            for label in compared[r % len(compared):] + compared[:r % len(compared)]:
                (a1, outputs["ar"]), (m1, outputs[label]), (m2, _), (a2, _) = (
                    once(x, prompts, bs) for x in ("ar", label, label, "ar"))
                ratios[label].append((a1 + a2) / (m1 + m2))
                fastest["ar"], fastest[label] = min(fastest["ar"], a1, a2), min(fastest[label], m1, m2)
        ar_ids = [res.token_ids for res in outputs["ar"]]
        for label in compared:
            res = outputs[label]
            lo, hi = median_interval(ratios[label])
            tokens, forwards = sum(x.new_tokens for x in res), sum(x.forwards for x in res)
            rows.append({
                "mode": label, "batch": bs, "observations": len(ratios[label]),
                "speed_vs_ar": statistics.median(ratios[label]), "ci_low": lo, "ci_high": hi,
                "best_of_vs_ar": fastest["ar"] / fastest[label],
                "tokens_per_forward": tokens / forwards,
                "masks_per_forward": sum(x.lookahead.get("masks", 0) for x in res) / forwards,
                "drafts_per_forward": sum(x.lookahead.get("drafts", 0) for x in res) / forwards,
                "same_tokens_as_ar": same_tokens(ar_ids, [x.token_ids for x in res]),
            })
    settings = {"model": str(model_path or "stories260K (converted)"), "prompts": len(prompts),
                "prompt_source": prompt_file or "TinyStories", "stop_strings": list(stop),
                "max_new_tokens": max_new_tokens, "rounds": rounds, "modes": modes, **environment()}
    md = "\n\n".join([
        f"## Parity with AR: {settings['model']}, {len(prompts)} prompts ({settings['prompt_source']}), "
        f"{max_new_tokens} new tokens, {rounds} rounds of A M M A, {settings['threads']} thread(s)",
        markdown_table(rows, [("mode", "mode"), ("batch", "batch"), ("observations", "rounds"),
                              ("speed_vs_ar", "speed vs AR (median)"), ("ci_low", "95% CI low"),
                              ("ci_high", "95% CI high"), ("best_of_vs_ar", "best-of vs AR"),
                              ("tokens_per_forward", "tokens/forward"), ("masks_per_forward", "masks/forward"),
                              ("drafts_per_forward", "drafts/forward"), ("same_tokens_as_ar", "same tokens as AR")]),
        "Speed vs AR: median over rounds of (t_A1 + t_A2) / (t_M1 + t_M2), two runs of the mode (one decode call "
        "over all the prompts) between two AR runs of the same call; above 1 is faster than AR. The A/A "
        "control times AR against itself: its interval is what this machine resolves. Best-of: AR's fastest "
        "run over the mode's fastest.",
    ])
    return {"settings": settings, "results": rows}, md


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="CARD checkpoint (default: stories260K from the data folder, converted)")
    p.add_argument("--modes", default="parallel,lossless", help="comma-separated decoding specs, automatic lookahead")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--rounds", type=int, default=10, help="A M M A brackets per mode")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--prompts", type=int, default=8, help="number of prompts")
    p.add_argument("--prompt-file", help="JSONL with a 'prompt' field (default: TinyStories sentences)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable; the demo's is a newline)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--name", default="parity", help="output file stem")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    stop = stop_strings(args.stop)  # allow --stop '\n'
    data, md = run(args.model, [m for m in args.modes.split(",") if m], tuple(int(b) for b in args.batch_sizes.split(",")),
                   args.rounds, args.max_new_tokens, args.prompts, args.prompt_file, stop, args.threads)
    write_results(args.out, args.name, data, md)
    print(md)


if __name__ == "__main__":
    main()

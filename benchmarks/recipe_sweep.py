"""Which objective knobs let the real stories260K predict ahead? A small sweep before the real run.

    python -m benchmarks.recipe_sweep [--steps 800] [--nproc-per-node 2] [--out runs/sweep]

Every variant adapts the converted stories260K with ``recipes/stories260k-cpu.yaml`` plus its own ``--set``
overrides, on the same text and batches as the real run (``benchmarks.real_run``), then decodes the
held-out TinyStories prompts (the ``card_tinystories_cont`` task's) greedily in AR, parallel@0.9,
parallel@0.7 and lossless mode. Reported per variant: the validation AR loss (clean input) and CARD loss,
tokens per forward, and agreement with the variant's own AR output. Writes ``recipe_sweep.json`` / ``.md``.

The variants: the toolkit defaults (tail factor lambda 1.5, t ~ U(0, 1)); a strict tail (lambda = 1, the
contiguous masked suffix that decoding appends); low noise levels only (t ~ U(0, 0.1) or U(0, 0.05): at most
25 or 12 masks in 256 tokens, the regime of a decoder that appends 8); and softer tails (lambda 2 and 3).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import environment, markdown_table, write_results
from benchmarks.decode import same_tokens
from benchmarks.real_run import RECIPE, final_losses, heldout_prompts, prepare
from card.adapt import adapt
from card.checkpoint import load_checkpoint
from card.eval.decoding import decode

VARIANTS = {  # every knob explicit, so the table does not depend on what the recipe file says
    "toolkit defaults": ["objective.tail_factor=1.5", "objective.t_max=1.0"],
    "strict tail": ["objective.tail_factor=1.0", "objective.t_max=1.0"],
    "strict tail, t <= 0.1": ["objective.tail_factor=1.0", "objective.t_max=0.1"],
    "strict tail, t <= 0.05": ["objective.tail_factor=1.0", "objective.t_max=0.05"],
    "soft tail, t <= 0.05": ["objective.tail_factor=1.5", "objective.t_max=0.05"],
    "softer tail (lambda 2)": ["objective.tail_factor=2.0", "objective.t_max=1.0"],
    "softer tail (lambda 3)": ["objective.tail_factor=3.0", "objective.t_max=1.0"],
}
MODES = [("ar", "ar", {}), ("parallel@0.9", "parallel", {"threshold": 0.9}),
         ("parallel@0.7", "parallel", {"threshold": 0.7}), ("lossless", "lossless", {})]


def decode_stats(path: Path, prompts: list[str], max_new_tokens: int) -> dict:
    """Tokens per forward and agreement with AR of every mode in ``MODES`` on ``prompts`` (batch 16)."""
    ck = load_checkpoint(path, dtype="float32", require_card=True)
    outputs = {label: decode(mode, ck.model, ck.tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=16,
                             stop_strings=["\n"], **kw) for label, mode, kw in MODES}
    ar = [r.token_ids for r in outputs["ar"]]
    stats = {}
    for label, res in outputs.items():
        tokens, forwards = sum(r.new_tokens for r in res), sum(r.forwards for r in res)
        stats[label] = {"tokens_per_forward": tokens / forwards, "agreement": same_tokens(ar, [r.token_ids for r in res])}
    return stats


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--nproc-per-node", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=64, help="held-out prompts decoded per variant")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    card_init, text = prepare(out)
    prompts = heldout_prompts(args.prompts)
    common = [f"model={card_init}", f"data.path={text}", f"train.max_steps={args.steps}", "train.eval_every=0",
              "train.save_every=0"]
    rows = []
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        t0 = time.perf_counter()
        run = adapt(RECIPE, [*common, *overrides], output_dir=out / f"v{i}", nproc_per_node=args.nproc_per_node)
        losses = final_losses(out / f"v{i}")
        stats = decode_stats(run.final, prompts, args.max_new_tokens)
        rows.append({"variant": name, "overrides": " ".join(overrides),
                     "val_ar_loss": losses["val_ar_loss_end"], "val_card_loss": losses["val_loss_end"],
                     **{f"{m}_tpf": s["tokens_per_forward"] for m, s in stats.items() if m != "ar"},
                     **{f"{m}_agree": s["agreement"] for m, s in stats.items() if m != "ar"},
                     "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    source_ar = final_losses(out / "v0")["val_ar_loss_start"]
    cols = [("variant", "variant"), ("overrides", "overrides"), ("val_ar_loss", "val AR loss"),
            ("val_card_loss", "val CARD loss"), ("parallel@0.9_tpf", "parallel@0.9 tok/fwd"),
            ("parallel@0.9_agree", "parallel@0.9 = AR"), ("parallel@0.7_tpf", "parallel@0.7 tok/fwd"),
            ("parallel@0.7_agree", "parallel@0.7 = AR"), ("lossless_tpf", "lossless tok/fwd")]
    md = "\n\n".join([
        f"# Recipe sweep: stories260K, {args.steps} steps per variant, {args.nproc_per_node} DeepSpeed ranks",
        f"Source model's validation AR loss (step 0): {source_ar:.4f}. Decoding: {len(prompts)} held-out "
        f"TinyStories prompts, up to {args.max_new_tokens} new tokens, block size 8, stop at a newline; "
        "`= AR` is the fraction of AR's tokens reproduced. The CARD loss is under each variant's own noise "
        "levels, so it compares across steps, not across variants; the AR loss compares across both.",
        markdown_table(rows, cols),
    ])
    data = {"benchmark": "recipe_sweep", "environment": environment(), "steps": args.steps,
            "source_val_ar_loss": source_ar, "results": rows}
    write_results(args.results, "recipe_sweep", data, md)
    print(md)
    return data


if __name__ == "__main__":
    main()

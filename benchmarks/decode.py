"""Decoding benchmark: AR vs CARD parallel vs lossless (fixed and automatic lookahead) vs transformers peers.

    python -m benchmarks.decode [--model CKPT] [--max-new-tokens N] [--prompts N] [--out benchmarks/results]

Default model: the real stories260K from ``$CARD_DATA_DIR`` (default ``../shared/data``), converted into a
temporary folder. An unadapted model accepts few parallel tokens: that is the honest baseline.
Prompts: the first sentence of distinct TinyStories validation paragraphs (or ``--prompt-file``).

Runs, at batch 1 and 8, interleaved across repeats so that background load hits all of them alike (each
repeat starts one mode later, so that no mode always runs first or after the same one):
``ar``; ``parallel`` (the checkpoint's threshold) and ``parallel@0.7`` with automatic lookahead and with the
fixed block size; ``lossless`` automatic (mask + prompt-lookup drafts) and fixed (mask drafts); and two
``transformers`` peers: greedy ``generate`` (AR) and prompt-lookup decoding (``prompt_lookup_num_tokens``,
batch 1 only: transformers refuses larger batches for it). Per run: tokens, forwards, tokens per forward,
tokens per second (wall, median of ``--repeats``), the speedup over our AR in the same run (of the medians,
and of each run's fastest repeat), the same per CPU
second of this process, the fraction of tokens the same as AR, and for automatic lookahead the masks and drafts chosen per
forward and the break-even the cost model gave. A second table is the cost model's c(B, q) itself. Each
timed run starts after a garbage collection and runs with the collector off, as ``timeit`` does.
Writes ``NAME.json`` and ``NAME.md`` into ``--out`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers as tf

from benchmarks.common import (
    converted_stories260k,
    environment,
    gc_paused,
    markdown_table,
    stop_strings,
    story_prompts,
    write_results,
)
from card.checkpoint import load_checkpoint
from card.eval.decoding import CostModel, DecodingSpec, decode

BATCH_SIZES = (1, 8)
QUERY_LENGTHS = (1, 2, 3, 5, 9, 17)
PROMPT_LOOKUP_TOKENS = 10  # transformers' usual setting


def modes(threshold: float, block_size: int, fixed: bool = True) -> list[tuple[str, DecodingSpec]]:
    """(label, spec) of every CARD decoder measured; ``fixed=False`` leaves out the fixed-K runs."""
    par = DecodingSpec("parallel", threshold=threshold)
    runs = [
        ("ar", DecodingSpec("ar")),
        (f"parallel@{threshold:g} auto", par),
        (f"parallel@{threshold:g} K={block_size}", par.with_(block_size=block_size)),
        ("parallel@0.7 auto", DecodingSpec("parallel", threshold=0.7)),
        ("lossless auto", DecodingSpec("lossless")),
        (f"lossless K={block_size}", DecodingSpec("lossless").with_(block_size=block_size)),
    ]
    return [(label, spec) for label, spec in runs if fixed or spec.block_size is None]


def same_tokens(reference: list[list[int]], other: list[list[int]]) -> float:
    """Fraction of positions where ``other`` has the reference's token (over the longer of the two outputs)."""
    same = total = 0
    for a, b in zip(reference, other):
        same += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b))
    return same / total if total else 1.0


def hf_generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int,
                stop: tuple[str, ...] = (), **generate_kwargs) -> list[list[int]]:
    """Greedy ``model.generate`` on left-padded batches; returns the generated ids (without padding)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    outputs = []
    for start in range(0, len(prompts), batch_size):
        ids = [tokenizer(p)["input_ids"] for p in prompts[start:start + batch_size]]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.inference_mode():
            extra = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
            out = model.generate(input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, past_key_values=tf.DynamicCache(config=model.config), **extra,
                                 **generate_kwargs)
        eos = model.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or [])
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            if stop:  # a finished row is padded: cut it after the token that completed a stop string
                cut = next((i + 1 for i in range(cut) if any(s in tokenizer.decode(row[:i + 1]) for s in stop)), cut)
            outputs.append(row[:cut])
    return outputs


class ForwardCounter:
    """Counts the model's forwards (a forward hook): how many a ``transformers`` peer needed."""

    def __init__(self, model) -> None:
        self.n = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.n += 1


def file_prompts(path: str, n: int | None = None) -> list[str]:
    """The first ``n`` (None: all) prompts of a JSONL file with a ``prompt`` field (e.g. the demo's held-out problems)."""
    import json

    lines = [json.loads(x)["prompt"] for x in open(path, encoding="utf-8") if x.strip()]
    return lines[:n]


def run(model_path: str | None, max_new_tokens: int, n_prompts: int, repeats: int, block_size: int | None,
        threads: int | None, prompt_file: str | None = None, stop: tuple[str, ...] = (),
        fixed: bool = True, batch_sizes: tuple[int, ...] = BATCH_SIZES) -> tuple[dict, str]:
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = model_path or converted_stories260k(tmp)
        ck = load_checkpoint(path, dtype="float32", require_card=True)
    model, tok = ck.model, ck.tokenizer
    block_size = ck.meta.decoding.block_size if block_size is None else block_size
    threshold = ck.meta.decoding.threshold
    prompts = file_prompts(prompt_file, n_prompts) if prompt_file else story_prompts(n_prompts)
    counter = ForwardCounter(model)
    specs = modes(threshold, block_size, fixed)
    # Warm-up: first-call allocations, and the cost model's measurement at every batch size (cached after).
    t = time.perf_counter()
    for bs in batch_sizes:
        decode(DecodingSpec("lossless"), model, tok, prompts[:bs], max_new_tokens=4, batch_size=bs)
    cost = CostModel.for_model(model)
    for b in sorted({1, 2, 4, 8, *batch_sizes}):
        cost.table(b)
    warmup_s = time.perf_counter() - t

    runs: dict[tuple[str, int], list[float]] = {}  # wall seconds
    cpu: dict[tuple[str, int], list[float]] = {}  # CPU seconds of this process: less sensitive to other load
    outputs: dict[tuple[str, int], list] = {}
    hf_forwards: dict[tuple[str, int], int] = {}

    def timed(key, fn):
        n0 = counter.n
        with gc_paused():
            t, c = time.perf_counter(), time.process_time()
            outputs[key] = fn()
            runs.setdefault(key, []).append(time.perf_counter() - t)
            cpu.setdefault(key, []).append(time.process_time() - c)
        hf_forwards[key] = counter.n - n0

    peers = [("hf-generate", {}), ("hf-prompt-lookup", {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS})]
    calls = [(label, lambda bs, spec=spec: decode(spec, model, tok, prompts, max_new_tokens=max_new_tokens,
                                                  batch_size=bs, stop_strings=stop)) for label, spec in specs]
    calls += [(label, lambda bs, kw=kw: hf_generate(model, tok, prompts, bs, max_new_tokens, stop, **kw))
              for label, kw in peers]
    for r in range(repeats):  # interleave modes so that background load hits all of them alike
        for bs in batch_sizes:
            # Each repeat starts one mode later: no mode always runs first, or always after the same one.
            for label, call in calls[r % len(calls):] + calls[:r % len(calls)]:
                if label == "hf-prompt-lookup" and bs > 1:
                    continue  # transformers' prompt lookup is batch-1 only
                timed((label, bs), lambda: call(bs))

    rows = []
    for bs in batch_sizes:
        ar_ids = [r.token_ids for r in outputs["ar", bs]]
        ar_tps = sum(map(len, ar_ids)) / statistics.median(runs["ar", bs])
        ar_cpu_tps = sum(map(len, ar_ids)) / statistics.median(cpu["ar", bs])
        ar_best_tps = sum(map(len, ar_ids)) / min(runs["ar", bs])
        for label in [m[0] for m in specs] + [p[0] for p in peers]:
            if (label, bs) not in outputs:
                continue
            res = outputs[label, bs]
            hf = label.startswith("hf-")
            ids = res if hf else [r.token_ids for r in res]
            tokens = sum(map(len, ids))
            seconds, cpu_seconds = statistics.median(runs[label, bs]), statistics.median(cpu[label, bs])
            # HF forwards are batched forwards; ours are summed over prompts (one per active prompt).
            forwards = hf_forwards[label, bs] * bs if hf else sum(r.forwards for r in res)
            row = {
                "mode": label, "batch": bs, "tokens": tokens, "forwards": forwards,
                "tokens_per_forward": tokens / forwards if forwards else None,
                "seconds": seconds, "tokens_per_second": tokens / seconds,
                "speedup_vs_ar": tokens / seconds / ar_tps,
                "best_speedup_vs_ar": tokens / min(runs[label, bs]) / ar_best_tps,
                "cpu_seconds": cpu_seconds, "tokens_per_cpu_second": tokens / cpu_seconds,
                "cpu_speedup_vs_ar": tokens / cpu_seconds / ar_cpu_tps,
                "same_tokens_as_ar": same_tokens(ar_ids, ids),
            }
            if not hf and res[0].lookahead.get("policy") not in (None, "none"):
                fw = sum(r.forwards for r in res)
                row["masks_per_forward"] = sum(r.lookahead["masks"] for r in res) / fw
                row["drafts_per_forward"] = sum(r.lookahead["drafts"] for r in res) / fw
                row["draft_acceptance"] = (sum(r.lookahead["drafts_accepted"] for r in res) /
                                           max(1, sum(r.lookahead["drafts"] for r in res)))
                if "break_even_1" in res[0].lookahead:
                    row["break_even_1"] = res[0].lookahead["break_even_1"]
                    row["break_even_K"] = res[0].lookahead["cost"]["break_even"]
                row["prior"] = res[0].lookahead.get("prior")
            rows.append(row)
    costs = []
    for b in batch_sizes:
        for q in QUERY_LENGTHS:
            costs.append({"batch": b, "query_tokens": q, "ms": 1000 * cost(b, q), "cost_vs_1": cost(b, q) / cost(b, 1)})

    source = prompt_file or "TinyStories"
    settings = {"model": str(model_path or "stories260K (converted)"), "prompts": len(prompts), "prompt_source": source,
                "stop_strings": list(stop), "max_new_tokens": max_new_tokens, "block_size": block_size,
                "threshold": threshold, "repeats": repeats, "warmup_and_cost_measurement_s": warmup_s,
                "cost_measured_s": cost.measured_seconds, "cost_key": cost.key,
                "params": sum(p.numel() for p in model.parameters()), **environment()}
    md = "\n\n".join([
        f"## Decoding: {settings['model']}, {len(prompts)} prompts ({source}), {max_new_tokens} new tokens, "
        f"K = {block_size}, {settings['threads']} thread(s), median of {repeats} interleaved repeats",
        markdown_table(rows, [("mode", "mode"), ("batch", "batch"), ("tokens_per_forward", "tokens/forward"),
                              ("tokens_per_second", "tokens/s"), ("speedup_vs_ar", "speedup vs AR"),
                              ("best_speedup_vs_ar", "best-of speedup"),
                              ("cpu_speedup_vs_ar", "CPU speedup vs AR"), ("same_tokens_as_ar", "same tokens as AR"),
                              ("masks_per_forward", "masks/forward"), ("drafts_per_forward", "drafts/forward"),
                              ("draft_acceptance", "drafts accepted"), ("break_even_1", "break-even k=1"),
                              ("break_even_K", f"break-even k={block_size}")]),
        "Best-of speedup: the fastest repeat of each run against AR's fastest (on a shared machine the slower "
        "repeats are mostly other processes' interference, as timeit's documentation says). "
        "`forwards` is summed over prompts (a batched forward counts once per active prompt). `hf-generate` is "
        "`transformers` greedy `generate`, `hf-prompt-lookup` its prompt-lookup decoding "
        f"(`prompt_lookup_num_tokens={PROMPT_LOOKUP_TOKENS}`, batch 1 only). Break-even: tokens a forward "
        "with 1 (or K) extra query tokens must commit to match AR, c(B, 1 + k) / c(B, 1).",
        "## Cost model c(B, q) (ms per forward over a cached prefix, measured once and cached)",
        markdown_table(costs, [("batch", "batch"), ("query_tokens", "query tokens"), ("ms", "ms / forward"),
                               ("cost_vs_1", "cost vs 1 token")]),
    ])
    return {"settings": settings, "results": rows, "forward_cost": costs}, md


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="CARD checkpoint (default: stories260K from the data folder, converted)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=8, help="number of prompts")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median)")
    p.add_argument("--block-size", type=int, default=None, help="K for the fixed runs and the auto cap "
                   "(default: checkpoint's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--prompt-file", help="JSONL with a 'prompt' field (default: TinyStories sentences)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable; the demo's is a newline)")
    p.add_argument("--auto-only", action="store_true", help="leave out the fixed-K runs (the old default)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--name", default="decode", help="output file stem")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    stop = stop_strings(args.stop)  # allow --stop '\n'
    data, md = run(args.model, args.max_new_tokens, args.prompts, args.repeats, args.block_size, args.threads,
                   args.prompt_file, stop, fixed=not args.auto_only,
                   batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")))
    write_results(args.out, args.name, data, md)
    print(md)


if __name__ == "__main__":
    main()

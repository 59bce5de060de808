"""Decoding benchmark: AR vs CARD parallel decoding (several thresholds) vs lossless, at batch 1 and 8.

    python -m benchmarks.decode [--model CKPT] [--max-new-tokens N] [--out benchmarks/results]

Default model: the real stories260K from ``$CARD_DATA_DIR`` (default ``../shared/data``), converted into a
temporary folder. An unadapted model accepts few parallel tokens: that is the honest baseline.
Prompts: the first sentence of distinct TinyStories validation paragraphs.

Per mode and batch size it reports generated tokens, forwards (summed over prompts), tokens per forward,
tokens per second (wall, median of ``--repeats`` runs interleaved across modes), the speedup over AR
measured in the same run, the same two per CPU second of this process (steadier on a shared machine),
and the agreement with AR (the fraction of AR's positions holding the same
token). ``transformers`` ``generate`` (greedy) is timed at the same batch sizes for reference. A second
table gives the cost of one forward against its number of query tokens (1, 2, 5, 9) over a cached
prefix: a step with q query tokens must commit about cost(q) / cost(1) tokens to break even in wall time.
Writes ``decode.json`` and ``decode.md`` into ``--out`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers as tf

from benchmarks.common import converted_stories260k, environment, markdown_table, story_prompts, write_results
from card.checkpoint import load_checkpoint
from card.eval.decoding import decode

THRESHOLDS = (0.5, 0.7, 0.9, 0.95)
BATCH_SIZES = (1, 8)
QUERY_LENGTHS = (1, 2, 5, 9)


def modes(block_size: int) -> list[tuple[str, str, dict]]:
    """(label, mode, settings) of every decoder measured."""
    out = [("ar", "ar", {})]
    out += [(f"parallel@{t}", "parallel", dict(threshold=t, block_size=block_size)) for t in THRESHOLDS]
    out += [("lossless", "lossless", dict(block_size=block_size))]
    return out


def agreement(reference: list[list[int]], other: list[list[int]]) -> float:
    """Fraction of positions where ``other`` has the reference's token (over the longer of the two outputs)."""
    same = total = 0
    for a, b in zip(reference, other):
        same += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b))
    return same / total if total else 1.0


def hf_generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int,
                stop: tuple[str, ...] = ()) -> list[list[int]]:
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
                                 pad_token_id=pad, past_key_values=tf.DynamicCache(config=model.config), **extra)
        eos = model.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or [])
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            if stop:  # a finished row is padded: cut it after the token that completed a stop string
                cut = next((i + 1 for i in range(cut) if any(s in tokenizer.decode(row[:i + 1]) for s in stop)), cut)
            outputs.append(row[:cut])
    return outputs


@torch.inference_mode()
def forward_cost(model, prefix: int, batch: int, repeats: int) -> list[dict]:
    """Median seconds of one forward over q query tokens on top of a cached ``prefix`` (cache cropped back).

    The query lengths are timed round-robin so that background load affects them alike.
    """
    cache = tf.DynamicCache(config=model.config)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, min(300, vocab), (batch, prefix + max(QUERY_LENGTHS)))
    model(input_ids=ids[:, :prefix], past_key_values=cache, use_cache=True, logits_to_keep=1)
    wall: dict[int, list[float]] = {q: [] for q in QUERY_LENGTHS}
    cpu: dict[int, list[float]] = {q: [] for q in QUERY_LENGTHS}
    for _ in range(repeats):
        for q in QUERY_LENGTHS:
            pos = torch.arange(prefix, prefix + q).expand(batch, -1)
            t, c = time.perf_counter(), time.process_time()
            model(input_ids=ids[:, prefix:prefix + q], position_ids=pos, past_key_values=cache, use_cache=True,
                  logits_to_keep=q)
            wall[q].append(time.perf_counter() - t)
            cpu[q].append(time.process_time() - c)
            cache.crop(-q)
    ms = {q: 1000 * statistics.median(t) for q, t in wall.items()}
    cpu_ms = {q: 1000 * statistics.median(t) for q, t in cpu.items()}
    return [{"batch": batch, "prefix": prefix, "query_tokens": q, "ms": ms[q], "cpu_ms": cpu_ms[q],
             "cost_vs_1": ms[q] / ms[1], "cpu_cost_vs_1": cpu_ms[q] / cpu_ms[1]} for q in QUERY_LENGTHS]


def file_prompts(path: str, n: int) -> list[str]:
    """The first ``n`` prompts of a JSONL file with a ``prompt`` field (e.g. the demo's held-out problems)."""
    import json

    lines = [json.loads(x)["prompt"] for x in open(path, encoding="utf-8") if x.strip()]
    return lines[:n]


def run(model_path: str | None, max_new_tokens: int, n_prompts: int, repeats: int, block_size: int | None,
        threads: int | None, prompt_file: str | None = None, stop: tuple[str, ...] = ()) -> tuple[dict, str]:
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = model_path or converted_stories260k(tmp)
        ck = load_checkpoint(path, dtype="float32", require_card=True)
    model, tok = ck.model, ck.tokenizer
    block_size = ck.meta.decoding.block_size if block_size is None else block_size
    prompts = file_prompts(prompt_file, n_prompts) if prompt_file else story_prompts(n_prompts)
    decode("ar", model, tok, prompts[:1], max_new_tokens=8)  # warm-up (first-call allocations)

    runs: dict[tuple[str, int], list[float]] = {}  # wall seconds
    cpu: dict[tuple[str, int], list[float]] = {}  # CPU seconds of this process: less sensitive to other load
    outputs: dict[tuple[str, int], list] = {}

    def timed(key, fn):
        t, c = time.perf_counter(), time.process_time()
        outputs[key] = fn()
        runs.setdefault(key, []).append(time.perf_counter() - t)
        cpu.setdefault(key, []).append(time.process_time() - c)

    for _ in range(repeats):  # interleave modes so that background load hits all of them alike
        for bs in BATCH_SIZES:
            for label, mode, kw in modes(block_size):
                timed((label, bs), lambda: decode(mode, model, tok, prompts, max_new_tokens=max_new_tokens,
                                                  batch_size=bs, stop_strings=stop, **kw))
            timed(("hf-generate", bs), lambda: hf_generate(model, tok, prompts, bs, max_new_tokens, stop))

    rows = []
    for bs in BATCH_SIZES:
        ar_ids = [r.token_ids for r in outputs["ar", bs]]
        ar_tps = sum(map(len, ar_ids)) / statistics.median(runs["ar", bs])
        ar_cpu_tps = sum(map(len, ar_ids)) / statistics.median(cpu["ar", bs])
        for label in [m[0] for m in modes(block_size)] + ["hf-generate"]:
            res = outputs[label, bs]
            ids = res if label == "hf-generate" else [r.token_ids for r in res]
            tokens = sum(map(len, ids))
            seconds, cpu_seconds = statistics.median(runs[label, bs]), statistics.median(cpu[label, bs])
            forwards = None if label == "hf-generate" else sum(r.forwards for r in res)
            rows.append({
                "mode": label, "batch": bs, "tokens": tokens, "forwards": forwards,
                "tokens_per_forward": tokens / forwards if forwards else None,
                "seconds": seconds, "tokens_per_second": tokens / seconds,
                "speedup_vs_ar": tokens / seconds / ar_tps,
                "cpu_seconds": cpu_seconds, "tokens_per_cpu_second": tokens / cpu_seconds,
                "cpu_speedup_vs_ar": tokens / cpu_seconds / ar_cpu_tps,
                "agreement_with_ar": agreement(ar_ids, ids),
            })
    limit = getattr(model.config, "max_position_embeddings", 4096) - max(QUERY_LENGTHS)
    prefixes = [p for p in (64, 256) if p <= limit] or [limit // 2]
    costs = [row for bs in BATCH_SIZES for prefix in prefixes for row in forward_cost(model, prefix, bs, 200)]

    source = prompt_file or "TinyStories"
    settings = {"model": str(model_path or "stories260K (converted)"), "prompts": len(prompts), "prompt_source": source,
                "stop_strings": list(stop),
                "max_new_tokens": max_new_tokens, "block_size": block_size, "repeats": repeats,
                "params": sum(p.numel() for p in model.parameters()), **environment()}
    md = "\n\n".join([
        f"## Decoding: {settings['model']}, {len(prompts)} prompts ({source}), {max_new_tokens} new tokens, "
        f"block size {block_size}, {settings['threads']} thread(s), median of {repeats}",
        markdown_table(rows, [("mode", "mode"), ("batch", "batch"), ("tokens", "tokens"), ("forwards", "forwards"),
                              ("tokens_per_forward", "tokens/forward"), ("tokens_per_second", "tokens/s"),
                              ("speedup_vs_ar", "speedup vs AR"), ("tokens_per_cpu_second", "tokens/CPU-s"),
                              ("cpu_speedup_vs_ar", "CPU speedup vs AR"), ("agreement_with_ar", "agreement with AR")]),
        "`forwards` is summed over prompts (a batched forward counts once per active prompt); "
        "`hf-generate` is `transformers` greedy `generate` on the same prompts. tokens/s is wall time; "
        "tokens/CPU-s divides by this process's CPU time, which other jobs on a shared machine disturb less.",
        "## Cost of one forward vs query tokens (cached prefix; median of 200)",
        markdown_table(costs, [("batch", "batch"), ("prefix", "cached prefix"), ("query_tokens", "query tokens"),
                               ("ms", "ms / forward"), ("cost_vs_1", "cost vs 1 token"), ("cpu_ms", "CPU ms"),
                               ("cpu_cost_vs_1", "CPU cost vs 1 token")]),
        "A parallel step over q query tokens (1 pending + K masks, K = q - 1) wins in wall time only when it "
        "commits more than `cost vs 1 token` tokens on average.",
    ])
    return {"settings": settings, "results": rows, "forward_cost": costs}, md


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="CARD checkpoint (default: stories260K from the data folder, converted)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=8, help="number of prompts")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median)")
    p.add_argument("--block-size", type=int, default=None, help="masks per forward (default: checkpoint's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--prompt-file", help="JSONL with a 'prompt' field (default: TinyStories sentences)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable; the demo's is a newline)")
    p.add_argument("--name", default="decode", help="output file stem")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    stop = tuple(x.encode().decode("unicode_escape") for x in args.stop)  # allow --stop '\n'
    data, md = run(args.model, args.max_new_tokens, args.prompts, args.repeats, args.block_size, args.threads,
                   args.prompt_file, stop)
    write_results(args.out, args.name, data, md)
    print(md)


if __name__ == "__main__":
    main()

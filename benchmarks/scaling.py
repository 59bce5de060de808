"""Scaling: how train-step time grows with sequence length, and decoding with the block size.

    python -m benchmarks.scaling [--model CKPT --prompt-file JSONL --stop '\\n'] [--out benchmarks/results]

1. Train step (AR, CARD, BD3LM-style; ``benchmarks.train_step``) on the converted stories260K at batch 8
   and sequence lengths 64..512: CARD stays at AR's cost at every length, block diffusion pays for 2L.
2. Parallel decoding at threshold 0.9 with block sizes K = 0 (AR), 1, 2, 4, 8, 16 on a CARD model
   (default: the converted stories260K on TinyStories prompts; pass an adapted model and its prompts, e.g.
   the demo's): tokens per forward, tokens per second and the cost of one forward, per K.
Writes ``scaling.json``, ``scaling.md`` and ``scaling.png`` (both curves).
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path


from benchmarks.common import (
    converted_stories260k,
    environment,
    markdown_table,
    stop_strings,
    story_prompts,
    write_results,
)
from benchmarks.decode import file_prompts
from benchmarks.train_step import OBJECTIVES, measure_steps
from card.checkpoint import load_checkpoint
from card.eval.decoding import decode

SEQ_LENS = (64, 128, 256, 512)
BLOCK_SIZES = (0, 1, 2, 4, 8, 16)


def train_scaling(model_dir, steps: int) -> list[dict]:
    rows = []
    for seq_len in SEQ_LENS:
        t = measure_steps(model_dir, 8, seq_len, steps)
        rows.append({"seq_len": seq_len, **{f"{k}_s": t[k] for k in OBJECTIVES},
                     "card_over_ar": t["card"] / t["ar"], "bd3lm_over_card": t["bd3lm"] / t["card"]})
    return rows


def decode_scaling(model_dir, prompts: list[str], stop: tuple[str, ...], max_new_tokens: int, repeats: int) -> list[dict]:
    ck = load_checkpoint(model_dir, dtype="float32", require_card=True)
    decode("ar", ck.model, ck.tokenizer, prompts[:1], max_new_tokens=4)  # warm-up
    times: dict[int, list[float]] = {k: [] for k in BLOCK_SIZES}
    outs: dict[int, list] = {}
    for _ in range(repeats):  # interleaved, so background load hits every K alike
        for k in BLOCK_SIZES:
            mode = "ar" if k == 0 else "parallel"
            kw = {} if k == 0 else {"threshold": 0.9, "block_size": k}
            t0 = time.perf_counter()
            outs[k] = decode(mode, ck.model, ck.tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=1,
                             stop_strings=stop, **kw)
            times[k].append(time.perf_counter() - t0)
    rows = []
    base = None
    for k in BLOCK_SIZES:
        tokens = sum(r.new_tokens for r in outs[k])
        forwards = sum(r.forwards for r in outs[k])
        sec = statistics.median(times[k])
        base = base or tokens / sec
        rows.append({"block_size": k, "tokens": tokens, "forwards": forwards, "tokens_per_forward": tokens / forwards,
                     "ms_per_forward": 1000 * sec / forwards, "tokens_per_second": tokens / sec,
                     "speedup_vs_ar": tokens / sec / base})
    return rows


def plot(train: list[dict], dec: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for k, label in (("ar", "AR"), ("card", "CARD"), ("bd3lm", "BD3LM-style")):
        a.plot([r["seq_len"] for r in train], [r[f"{k}_s"] for r in train], "o-", label=label)
    a.set(xlabel="sequence length", ylabel="seconds per optimizer step", xscale="log", yscale="log",
          title="train step (batch 8)")
    a.legend()
    ks = [r["block_size"] for r in dec]
    b.plot(ks, [r["tokens_per_forward"] for r in dec], "o-", label="tokens / forward")
    b.plot(ks, [r["speedup_vs_ar"] for r in dec], "s-", label="tokens/s vs AR")
    b.set(xlabel="block size K (masks per forward)", title="parallel decoding @0.9")
    b.axhline(1, color="gray", lw=0.5)
    b.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="CARD checkpoint for the decoding sweep (default: stories260K, converted)")
    ap.add_argument("--prompt-file", help="JSONL with a 'prompt' field (default: TinyStories sentences)")
    ap.add_argument("--stop", action="append", default=[])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    stop = stop_strings(args.stop)
    with tempfile.TemporaryDirectory() as tmp:
        stories = converted_stories260k(tmp)
        train = train_scaling(stories, args.steps)
        prompts = file_prompts(args.prompt_file, args.prompts) if args.prompt_file else story_prompts(args.prompts)
        dec = decode_scaling(args.model or stories, prompts, stop, args.max_new_tokens, args.repeats)
    png = plot(train, dec)
    md = "\n\n".join([
        "# Scaling",
        f"## Train step vs sequence length (stories260K, batch 8, median of {args.steps} interleaved steps)",
        markdown_table(train, [("seq_len", "seq len"), ("ar_s", "AR s"), ("card_s", "CARD s"), ("bd3lm_s", "BD3LM s"),
                               ("card_over_ar", "CARD / AR"), ("bd3lm_over_card", "BD3LM / CARD")]),
        f"## Parallel decoding @0.9 vs block size ({args.model or 'stories260K converted'}, {len(prompts)} prompts "
        f"from {args.prompt_file or 'TinyStories'}, batch 1, median of {args.repeats})",
        markdown_table(dec, [("block_size", "K"), ("tokens_per_forward", "tokens/forward"),
                             ("ms_per_forward", "ms/forward"), ("tokens_per_second", "tokens/s"),
                             ("speedup_vs_ar", "speedup vs AR")]),
        "K = 0 is AR decoding. ![scaling](scaling.png)",
    ])
    data = {"benchmark": "scaling", "environment": environment(), "train_step": train, "decode": dec,
            "settings": {"model": args.model, "prompt_file": args.prompt_file, "stop": list(stop)}}
    write_results(args.out, "scaling", data, md)
    (Path(args.out) / "scaling.png").write_bytes(png)
    print(md)
    return data


if __name__ == "__main__":
    main()

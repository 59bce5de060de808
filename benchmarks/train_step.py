"""Training-step benchmark: CARD vs plain AR vs a block-diffusion (BD3LM-style) objective.

    python -m benchmarks.train_step [--steps 10] [--out benchmarks/results]

Same model, same batch, same engine (a DeepSpeed ZeRO-2 engine with torch AdamW, built by
``card.adapt.engine.build_engine`` from a resolved run, as ``card adapt`` builds it, one process): one
optimizer step of

* **AR**: next-token cross-entropy on clean input (``objective.causal_lm_loss``);
* **CARD**: soft-tailed masking, context-aware weights and the weighted loss over every position
  (``objective.card_loss``), one forward over L tokens with the usual causal attention;
* **BD3LM-style**: the block-diffusion training of the paper's comparison: the model reads the 2L
  concatenation [noisy x_t, clean x_0] under a block attention mask (a noisy block sees itself
  bidirectionally and the clean blocks before it; clean blocks are block-causal) and predicts the masked
  tokens of x_t (weighted 1/t).

Steps are interleaved round-robin (one of each in turn) so machine noise hits all three alike; the medians
give CARD/AR (target <= 1.05) and BD3LM/CARD (target >= 2). Models: the real stories260K (converted) and a
15M-parameter Llama of llama2.c's stories15M shape (6 layers, width 288, 32k vocab; random weights).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from benchmarks.common import build_llama, converted_stories260k, environment, markdown_table, write_results
from card.adapt.objective import ObjectiveConfig, card_loss, causal_lm_loss

OBJECTIVES = ("ar", "card", "bd3lm")


def block_diffusion_mask(length: int, block: int) -> torch.Tensor:
    """(2L, 2L) bool, True = attend, for the input [x_t (positions 0..L-1), x_0 (positions L..2L-1)].

    Noisy token i (block b_i) attends to noisy tokens of its own block and to clean tokens of blocks < b_i;
    clean token i attends to clean tokens of blocks <= b_i.
    """
    b = torch.arange(length) // block
    same = b[:, None] == b[None, :]
    before = b[None, :] < b[:, None]
    upto = b[None, :] <= b[:, None]
    zeros = torch.zeros(length, length, dtype=torch.bool)
    return torch.cat([torch.cat([same, before], 1), torch.cat([zeros, upto], 1)], 0)


def bd3lm_loss(model, ids: torch.Tensor, mask_id: int, generator: torch.Generator, block: int = 16) -> torch.Tensor:
    """Block-diffusion (BD3LM) training loss: mask each token of x_0 with probability t (per sequence),
    run [x_t, x_0] under ``block_diffusion_mask``, cross-entropy of x_0 at the masked noisy positions, x 1/t."""
    bsz, length = ids.shape
    t = torch.rand(bsz, 1, generator=generator).clamp_min(1e-3)
    masked = torch.rand(bsz, length, generator=generator) < t
    noisy = ids.masked_fill(masked, mask_id)
    attn = block_diffusion_mask(length, block)[None, None].expand(bsz, 1, -1, -1)
    pos = torch.arange(length).repeat(2)[None].expand(bsz, -1)
    logits = model(input_ids=torch.cat([noisy, ids], 1), attention_mask=attn, position_ids=pos).logits[:, :length]
    ce = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="none").view(bsz, length)
    return (ce * masked / t).sum() / masked.sum().clamp_min(1)


def engine_run(model_dir, batch: int, seq_len: int):
    """The run ``card adapt`` would resolve for this model: one process, ZeRO-2, torch AdamW at lr 1e-4,
    fp32, constant schedule, no weight decay, gradient clipping 1.0."""
    from card.adapt.recipe import Recipe, TrainConfig
    from card.adapt.resolve import resolve_run

    train = TrainConfig(seq_len=seq_len, micro_batch_size=batch, lr=1e-4, lr_schedule="constant", precision="fp32")
    return resolve_run(Recipe(model=str(model_dir), train=train), world_size=1)


def step_fn(kind: str, engine, ids: torch.Tensor, mask_id: int, seed: int):
    def step() -> None:
        g = torch.Generator().manual_seed(seed)
        if kind == "ar":
            loss = causal_lm_loss(engine, ids).loss
        elif kind == "card":
            loss = card_loss(engine, ids, mask_id, ObjectiveConfig(), g).loss
        else:
            loss = bd3lm_loss(engine, ids, mask_id, g)
        engine.backward(loss)
        engine.step()

    return step


def measure_steps(model_dir, batch: int, seq_len: int, steps: int, warmup: int = 2,
                  objectives=OBJECTIVES) -> dict[str, float]:
    """Median seconds per optimizer step of each objective on copies of the same model and batch, each on
    an engine built by ``card.adapt.engine.build_engine`` (as every rank of ``card adapt`` builds it)."""
    from card.adapt.distributed import init_distributed, single_process_env
    from card.adapt.engine import build_engine

    run = engine_run(model_dir, batch, seq_len)
    ids = torch.randint(0, run.mask_id, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    with single_process_env():
        init_distributed(run.cuda)
        fns = {kind: step_fn(kind, build_engine(run), ids, run.mask_id, seed=1) for kind in objectives}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for i in range(warmup + steps):
            for kind, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                if i >= warmup:
                    times[kind].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def llama_15m(path) -> str:
    """llama2.c's stories15M shape (6 layers, width 288, 32k vocab, tied; 15M parameters), random init, converted."""
    from card.convert import convert

    src = build_llama(os.path.join(path, "llama15m-src"), hidden=288, layers=6, heads=6, ffn=768, tied=True)
    dst = os.path.join(path, "llama15m-card")
    convert(str(src), dst)
    return dst


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in (("stories260K", converted_stories260k(tmp)), ("llama-15M", llama_15m(tmp))):
            t = measure_steps(path, args.batch, args.seq_len, args.steps)
            rows.append({"model": name, "batch": args.batch, "seq_len": args.seq_len,
                         **{f"{k}_s": v for k, v in t.items()},
                         "card_over_ar": t["card"] / t["ar"], "bd3lm_over_card": t["bd3lm"] / t["card"]})
    cols = [("model", "model"), ("batch", "batch"), ("seq_len", "seq len"), ("ar_s", "AR step s"),
            ("card_s", "CARD step s"), ("bd3lm_s", "BD3LM step s"), ("card_over_ar", "CARD / AR"),
            ("bd3lm_over_card", "BD3LM / CARD")]
    md = ("# Training step: CARD vs AR vs block diffusion (BD3LM-style)\n\n" + markdown_table(rows, cols)
          + f"\n\nMedian of {args.steps} interleaved optimizer steps (DeepSpeed ZeRO-2, torch AdamW, fp32, "
            f"1 process, {torch.get_num_threads()} threads). Targets: CARD / AR <= 1.05, BD3LM / CARD >= 2.")
    data = {"benchmark": "train_step", "environment": environment(), "steps": args.steps, "results": rows}
    write_results(args.out, "train_step", data, md)
    print(md)
    return data


if __name__ == "__main__":
    main()

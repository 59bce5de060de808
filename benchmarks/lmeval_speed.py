"""Decoding speed in the lm-eval path: ``card eval`` run several times, the median speedup of each mode over AR.

    python -m benchmarks.lmeval_speed CKPT --tasks T1,T2 [--include-path DIR] [--baseline SRC]
                                      [--modes ar,parallel@0.9,lossless] [--batch-size 32] [--repeats 3]
                                      [--threads N] [--limit N] [--out benchmarks/results] [--name lmeval_speed]

One ``card eval`` pass decodes every mode in turn, so background load can favour one mode over another; each
pass here is a full ``card.eval.runner.evaluate`` call and the table gives, per mode, the median over the
passes of its speedup over the CARD model's AR run in the same pass, the ratio of its fastest pass to AR's
fastest (tokens per second; less moved by a busy machine), and the passes themselves. For the
demo model: ``CKPT = runs/demo/card/final``, ``--tasks demo_add,demo_copy,demo_rev --include-path
runs/demo/tasks --baseline runs/demo/ar/final``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.common import environment, markdown_table, write_results


def run(ckpt: str, tasks: str, modes: str, include_path: str | None, baseline: str | None, batch_size: int,
        repeats: int, limit: int | None) -> dict:
    from card.eval.runner import evaluate

    passes = []
    for i in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            res = evaluate(ckpt, tasks, modes, include_path=include_path, baseline=baseline, limit=limit,
                           batch_size=batch_size, seed=0, out=Path(tmp) / "eval", bootstrap_iters=100)
        passes.append({r.label: {"speedup": r.decode.speedup_vs_ar, "tokens_per_forward": r.decode.tokens_per_forward,
                                 "tokens_per_second": r.decode.tokens_per_second} for r in res.runs})
        print(f"pass {i + 1}: " + ", ".join(f"{k} {v['speedup']:.2f}x" for k, v in passes[-1].items()
                                            if v["speedup"]), flush=True)
    rows = []
    ar_best = max(p["ar"]["tokens_per_second"] for p in passes) if "ar" in passes[0] else None
    for label in passes[0]:
        runs = [p[label] for p in passes if p[label]["speedup"] is not None]
        if not runs:
            continue
        rows.append({"run": label, "tokens_per_forward": statistics.median(r["tokens_per_forward"] for r in runs),
                     "speedup": statistics.median(r["speedup"] for r in runs),
                     "fastest": max(r["tokens_per_second"] for r in runs) / ar_best if ar_best else None,
                     "passes": ", ".join(f"{r['speedup']:.2f}" for r in runs)})
    return {"settings": {"ckpt": ckpt, "tasks": tasks, "modes": modes, "baseline": baseline, "batch_size": batch_size,
                         "repeats": repeats, "limit": limit, **environment()}, "passes": passes, "results": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--modes", default="ar,parallel@0.9,parallel@0.7,parallel@0.5,lossless")
    ap.add_argument("--include-path", default=None)
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="lmeval_speed")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = run(args.ckpt, args.tasks, args.modes, args.include_path, args.baseline, args.batch_size, args.repeats,
               args.limit)
    s = data["settings"]
    md = "\n\n".join([
        f"## Speed in the lm-eval path: {s['ckpt']}, tasks {s['tasks']}, batch {s['batch_size']}, "
        f"{s['threads']} thread(s), {s['repeats']} passes",
        markdown_table(data["results"], [("run", "run"), ("tokens_per_forward", "tokens/forward"),
                                         ("speedup", "speedup vs AR (median)"),
                                         ("fastest", "fastest pass vs AR's fastest"), ("passes", "each pass")]),
    ])
    write_results(args.out, args.name, data, md)
    print(md)


if __name__ == "__main__":
    main()

"""``make bench``: every benchmark in one go; results (json + markdown) land in ``benchmarks/results/``.

    python -m benchmarks.run_all [--demo runs/demo] [--real] [--sweep]

Runs convert, train_step, loglikelihood, decode, parity and lookup_prior (the unadapted stories260K) and
scaling. With a finished ``card demo`` run folder (default ``runs/demo``, made by ``make demo``) it also
benchmarks decoding on the demo's adapted model and uses it for the block-size sweep. ``--real`` adds the real run
(``benchmarks.real_run``: stories260K adapted and evaluated; about an hour on 2 CPU cores); ``--sweep`` the
recipe sweep before it (``benchmarks.recipe_sweep``: seven adaptations of stories260K; about 40 minutes).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks import (
    convert,
    decode,
    loglikelihood,
    lookup_prior,
    parity,
    real_run,
    recipe_sweep,
    scaling,
    train_step,
)


def demo_prompts(demo: Path, per_task: int, dst: Path) -> Path:
    """The first held-out problems of each demo task, in one JSONL file."""
    lines = []
    for f in sorted((demo / "data").glob("eval_*.jsonl")):
        lines += f.read_text().splitlines()[:per_task]
    dst.write_text("\n".join(lines) + "\n")
    return dst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default="runs/demo", help="a finished card demo folder (optional)")
    ap.add_argument("--real", action="store_true", help="also run the real run (slow)")
    ap.add_argument("--sweep", action="store_true", help="also run the recipe sweep (slow)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    out = ["--out", args.out]
    convert.main(out)
    train_step.main(out)
    loglikelihood.main(out)
    decode.main(["--threads", "1", *out])
    parity.main(["--threads", "1", *out])
    lookup_prior.main(out)
    demo = Path(args.demo)
    demo_model = demo / "card" / "final"
    with tempfile.TemporaryDirectory() as tmp:
        if demo_model.exists():
            prompts = str(demo_prompts(demo, 16, Path(tmp) / "demo_prompts.jsonl"))
            decode.main(["--model", str(demo_model), "--prompt-file", prompts, "--prompts", "48", "--stop", "\\n",
                         "--max-new-tokens", "16", "--threads", "1", "--name", "decode_demo", *out])
            scaling.main(["--model", str(demo_model), "--prompt-file", prompts, "--prompts", "48", "--stop", "\\n",
                          "--max-new-tokens", "16", *out])
        else:
            print(f"no finished demo in {demo} (run `make demo`): decoding on the demo model skipped")
            scaling.main(out)
    if args.sweep:
        recipe_sweep.main(["--results", args.out])
    if args.real:
        real_run.main(["--results", args.out])
    print(json.dumps({"results": sorted(p.name for p in Path(args.out).glob("*.md"))}, indent=1))


if __name__ == "__main__":
    main()

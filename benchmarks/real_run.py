"""The real run: stories260K converted, adapted on TinyStories, evaluated with lm-eval in every decoding mode.

    python -m benchmarks.real_run [--steps 1500] [--nproc-per-node 2] [--out runs/real] [--results benchmarks/results]

1. convert the real stories260K (``$CARD_DATA_DIR/stories260K_hf``);
2. training text: the first 90% of the TinyStories paragraphs (``datasets`` split ``train[:90%]``); the
   last 10% is what the bundled ``card_tinystories_*`` tasks evaluate on, so it is never trained on;
3. adapt with ``recipes/stories260k-cpu.yaml`` (CARD objective), and, in the same run, fine-tune the same
   converted model with plain AR loss (``objective.kind=ar``) on the same data, steps and batches;
4. ``card eval`` the adapted model on PIQA, HellaSwag, TinyStories perplexity and continuation in AR,
   parallel@0.9/0.7/0.5 and lossless modes, with the unconverted stories260K as the baseline, and the AR
   fine-tuned model in AR mode; one merged report;
5. the decoding benchmark on the adapted model (tokens per forward, agreement with AR, break-even), on
   held-out prompts (the continuation task's).
Writes ``real_run.json`` / ``real_run.md`` into ``--results`` and the lm-eval report into ``OUT/report``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks import decode as decode_bench
from benchmarks.common import data_dir, environment, markdown_table, write_results
from card.adapt import adapt
from card.convert import convert
from card.eval.report import markdown, merge_results, write_report
from card.eval.runner import evaluate
from card.eval.tasks.shared.shared_tasks import TINYSTORIES, TRAIN_SPLIT, tinystories_continuation

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "stories260k-cpu.yaml")
TASKS = ["card_piqa", "card_hellaswag", "card_tinystories_ppl", "card_tinystories_cont"]
MODES = ["ar", "parallel@0.9", "parallel@0.7", "parallel@0.5", "lossless"]


def training_text(dst: Path) -> Path:
    """The TinyStories paragraphs the evaluation tasks do not use, one blank line apart."""
    import datasets

    ds = datasets.load_dataset("text", data_files=str(data_dir() / TINYSTORIES), sample_by="paragraph",
                               split=TRAIN_SPLIT)
    paragraphs = [t.strip() for t in ds["text"] if t.strip()]
    dst.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return dst


def heldout_prompts(n: int) -> list[str]:
    """The first ``n`` prompts of the ``card_tinystories_cont`` task: first sentences of held-out paragraphs."""
    return [row["prompt"] for row in tinystories_continuation()["test"].select(range(n))]


def prepare(out: Path) -> tuple[Path, Path]:
    """The converted stories260K (``OUT/card-init``, made once) and the training text (``OUT/...txt``)."""
    card_init = out / "card-init"
    if not card_init.exists():
        convert(str(data_dir() / "stories260K_hf"), card_init)
    return card_init, training_text(out / "tinystories_train90.txt")


def final_losses(run_dir: Path) -> dict:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    val = [x for x in lines if x.get("split") == "validation"]
    return {"val_ar_loss_start": val[0]["val_ar_loss"], "val_ar_loss_end": val[-1]["val_ar_loss"],
            "val_loss_start": val[0]["val_loss"], "val_loss_end": val[-1]["val_loss"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--nproc-per-node", type=int, default=2)
    ap.add_argument("--limit", type=int, default=500, help="documents per evaluation task")
    ap.add_argument("--out", default="runs/real")
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    source = data_dir() / "stories260K_hf"
    card_init, text = prepare(out)
    common = [f"model={card_init}", f"data.path={text}", f"train.max_steps={args.steps}", "train.eval_every=250",
              "train.save_every=500"]
    card = adapt(RECIPE, common, output_dir=out / "card", nproc_per_node=args.nproc_per_node)
    ar_ft = adapt(RECIPE, [*common, "objective.kind=ar"], output_dir=out / "ar-ft", nproc_per_node=args.nproc_per_node)
    t_train = time.perf_counter() - t0

    main_eval = evaluate(card.final, TASKS, MODES, baseline=str(source), limit=args.limit, batch_size=16,
                         command="python -m benchmarks.real_run")
    ar_ft_eval = evaluate(ar_ft.final, [t for t in TASKS if t != "card_tinystories_cont"], ["ar"], limit=args.limit,
                          batch_size=16, command="python -m benchmarks.real_run (AR fine-tuned)")
    merged = merge_results([main_eval, ar_ft_eval], ["card", "ar-ft"])
    write_report(merged, out / "report")
    prompts = out / "heldout_prompts.jsonl"  # the prompts above are in the training text
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in heldout_prompts(8)))
    decode_data, decode_md = decode_bench.run(str(card.final), 128, 8, 3, None, None, str(prompts))
    write_results(args.results, "decode_stories260k_adapted", decode_data, decode_md)

    losses = {"card": final_losses(out / "card"), "ar-ft": final_losses(out / "ar-ft")}
    source_ar = losses["card"]["val_ar_loss_start"]  # step 0: the converted model == the source model
    rows = [{"model": "stories260K (source, step 0)", "val_ar_loss": source_ar, "ratio_to_source": 1.0},
            {"model": f"CARD-adapted, {args.steps} steps", "val_ar_loss": losses["card"]["val_ar_loss_end"],
             "val_card_loss": f"{losses['card']['val_loss_start']:.3f} -> {losses['card']['val_loss_end']:.3f}",
             "ratio_to_source": losses["card"]["val_ar_loss_end"] / source_ar},
            {"model": f"plain AR fine-tuned, {args.steps} steps", "val_ar_loss": losses["ar-ft"]["val_ar_loss_end"],
             "ratio_to_source": losses["ar-ft"]["val_ar_loss_end"] / source_ar}]
    md = "\n\n".join([
        f"# Real run: stories260K, {args.steps} steps, {args.nproc_per_node} DeepSpeed ranks",
        "## Validation AR loss (same held-out blocks, same run)",
        markdown_table(rows, [("model", "model"), ("val_ar_loss", "val AR loss"),
                              ("ratio_to_source", "vs source"), ("val_card_loss", "val CARD loss")]),
        markdown(merged).split("\n", 1)[1],
        decode_md,
    ])
    data = {"benchmark": "real_run", "environment": environment(), "steps": args.steps,
            "seconds": {"train": t_train, "total": time.perf_counter() - t0}, "losses": losses,
            "val_ar_rows": rows, "report": str(out / "report")}
    write_results(args.results, "real_run", data, md)
    print(md)
    return data


if __name__ == "__main__":
    main()

"""Conversion benchmark: ``card.convert`` vs a plain ``from_pretrained`` + ``save_pretrained`` of the same model.

    python -m benchmarks.convert [--out benchmarks/results] [--repeats 6]

Models: the real stories260K (HF folder in ``$CARD_DATA_DIR``) and a randomly initialised 134M-parameter
Llama (12 layers, width 768, untied, the real Llama-2 32k SentencePiece tokenizer from the data folder), saved
locally first. For each, the median wall time of (a) load + save of model and tokenizer, (b) conversion
with verification (the default: it reloads the written checkpoint and compares logits), (c) conversion with
``--no-verify``; the runs are interleaved so machine noise hits all three alike. Reports (b)/(a) and (c)/(a).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import transformers as tf

from benchmarks.common import build_llama, data_dir, environment, markdown_table, write_results
from card.convert import convert


def build_llama_134m(path: Path) -> Path:
    """A Llama-architecture checkpoint of about 134M parameters (untied) with the real Llama-2 tokenizer."""
    return build_llama(path, hidden=768, layers=12, heads=12, ffn=2048, tied=False)


def load_and_save(src: Path, dst: Path) -> None:
    model = tf.AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    tok = tf.AutoTokenizer.from_pretrained(src)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """(wall seconds, result) of one call, started with no dirty pages queued: otherwise a run pays for
    the previous run's writeback."""
    os.sync()
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t0, result


def measure(name: str, src: Path, work: Path, repeats: int) -> dict:
    jobs = {"load_save": lambda dst: load_and_save(src, dst), "convert": lambda dst: convert(str(src), dst),
            "convert_no_verify": lambda dst: convert(str(src), dst, verify=False)}
    times: dict[str, list[float]] = {k: [] for k in jobs}
    last = {}
    for i in range(repeats):
        order = list(jobs)[i % 3:] + list(jobs)[:i % 3]  # rotated, so no job always follows the same one
        for key in order:
            seconds, last[key] = timed(jobs[key], work / f"{key}{i}")
            times[key].append(seconds)
            shutil.rmtree(work / f"{key}{i}")
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {f"{k}_range": f"{min(v):.2f}-{max(v):.2f}" for k, v in times.items()}
    return {"model": name, "params": last["convert"].params, **{f"{k}_s": v for k, v in med.items()}, **spread,
            "convert_over_load_save": med["convert"] / med["load_save"],
            "no_verify_over_load_save": med["convert_no_verify"] / med["load_save"], "runs": times}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--repeats", type=int, default=6)  # a multiple of 3: each job in each slot
    ap.add_argument("--work-dir", default=None, help="where the checkpoints are written (default: the system's temp)")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        tmp = Path(tmp)
        rows.append(measure("stories260K", data_dir() / "stories260K_hf", tmp, args.repeats))
        rows.append(measure("llama-134M", build_llama_134m(tmp / "llama134m"), tmp, args.repeats))
    cols = [("model", "model"), ("params", "params"), ("load_save_s", "load+save s"), ("load_save_range", "range"),
            ("convert_s", "convert s"), ("convert_range", "range"), ("convert_over_load_save", "convert / load+save"),
            ("convert_no_verify_s", "convert --no-verify s"), ("convert_no_verify_range", "range"),
            ("no_verify_over_load_save", "no-verify / load+save")]
    md = "# Conversion vs load + save\n\n" + markdown_table(rows, cols) + "\n\nMedian (and range) of " \
         f"{args.repeats} interleaved runs; convert includes the default verification (reload + logits check)."
    data = {"benchmark": "convert", "environment": environment(), "repeats": args.repeats, "results": rows}
    write_results(args.out, "convert", data, md)
    print(md)
    return data


if __name__ == "__main__":
    main()

"""Lossless compression with CARD models (card compress) against gzip, bzip2, xz and zstd.

    python -m benchmarks.compress [--model NAME=CKPT ...] [--slice NAME=BYTES ...] [--budget-slice NAME=BYTES ...]
                                  [--window NAME=TOKENS ...] [--no-stories260k] [--budgets 1,0.5,0.25]
                                  [--work DIR] [--out benchmarks/results] [--name compress]

Texts: the held-out TinyStories text (the last 10% of the paragraphs, ``train[90%:]``, which no model here
trained on; 83 KB) and the GSM8K test questions (one per line). Models: stories260K converted from the data
folder (unless ``--no-stories260k``), plus every ``--model NAME=CKPT`` (e.g. an adapted stories260K, SmolLM2-135M converted).
``--slice NAME=BYTES`` codes only the first BYTES of each text with that model (large models are slow on
CPU); ``--budget-slice NAME=BYTES`` the same for the budget modes only; ``--window NAME=TOKENS`` sets the
coding window (default: card compress's). The standard compressors are run on every distinct slice.

Budget modes plan with a slot profile measured on *training* text (the first 90% of the TinyStories
paragraphs, ``card profile``), never on the texts being compressed; each checkpoint is copied into
``--work`` first so the inputs stay untouched. Every compressed file is decompressed and compared byte for
byte; KB/s are original kilobytes per second of compression and of decompression (one run each: both replay
the same forwards). Standard compressors: Python's zlib (as gzip -9), bz2 (-9), lzma (xz -9) and zstandard
(-19), median of 3 timings.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import data_dir, environment, markdown_table, write_results

PROFILE_ROWS = {"default": 32}
STANDARD = ("gzip -9", "bzip2 -9", "xz -9", "zstd -19")


def texts() -> dict[str, bytes]:
    import datasets

    from card.eval.tasks.shared.shared_tasks import HELDOUT_SPLIT, TINYSTORIES

    ds = datasets.load_dataset("text", data_files=str(data_dir() / TINYSTORIES), sample_by="paragraph",
                               split=HELDOUT_SPLIT)
    stories = "\n\n".join(t.strip() for t in ds["text"] if t.strip()) + "\n"
    rows = [json.loads(x) for x in (data_dir() / "eval" / "gsm8k_test.jsonl").read_text().splitlines() if x.strip()]
    gsm = "\n".join(r["question"] for r in rows) + "\n"
    return {"tinystories-heldout": stories.encode(), "gsm8k-questions": gsm.encode()}


def training_text(dst: Path) -> Path:
    from benchmarks.real_run import training_text as write

    return write(dst)


def standard(name: str, data: bytes) -> tuple[int, float]:
    import zstandard

    fn = {"gzip -9": lambda d: gzip.compress(d, 9, mtime=0), "bzip2 -9": lambda d: bz2.compress(d, 9),
          "xz -9": lambda d: lzma.compress(d, preset=9), "zstd -19": zstandard.ZstdCompressor(level=19).compress}[name]
    times, out = [], b""
    for _ in range(3):
        t = time.perf_counter()
        out = fn(data)
        times.append(time.perf_counter() - t)
    return len(out), statistics.median(times)


def prepare(name: str, ckpt: Path, work: Path, train_txt: Path, rows: int) -> Path:
    """A copy of ``ckpt`` under ``work`` with a slot profile measured on the training text."""
    from card.profile import profile_checkpoint

    dst = work / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(ckpt, dst)
    profile_checkpoint(dst, train_txt, max_rows=rows, write=True)
    return dst


def run_model(name: str, ckpt: Path, data: dict[str, bytes], budgets: list[float], limit: int | None,
              budget_limit: int | None = None, window: int | None = None) -> list[dict]:
    from card.ardm.compress import Codec

    codec = Codec.load(ckpt)
    rows = []
    for text, full in data.items():
        for lim, bs in _slices(budgets, limit, budget_limit):
            rows += _code_text(codec, name, text, full[:lim] if lim else full, bs, window)
    return rows


def _slices(budgets: list[float], limit: int | None, budget_limit: int | None) -> list[tuple[int | None, list[float]]]:
    exact = [b for b in budgets if b >= 1]
    rest = [b for b in budgets if b < 1]
    if budget_limit is None or budget_limit == limit:
        return [(limit, budgets)]
    return [(lim, bs) for lim, bs in ((limit, exact), (budget_limit, rest)) if bs]


def _code_text(codec, name: str, text: str, raw: bytes, budgets: list[float], window: int | None) -> list[dict]:
    rows = []
    for b in budgets:
        blob, st = codec.compress(raw, budget=b, window=window)
        out, back = codec.decompress(blob)
        assert out == raw, f"{name} {text} budget {b}: round trip differs"
        row = {"model": name, "text": text, "bytes": len(raw), "mode": "exact" if b >= 1 else f"budget {b:g}",
               "size": st.output_bytes, "bits_per_byte": st.bits_per_byte, "tokens": st.tokens,
               "forwards": st.forwards, "tokens_per_forward": st.tokens_per_forward, "token_mode": st.mode,
               "compress_kb_s": len(raw) / 1000 / st.seconds, "decompress_kb_s": len(raw) / 1000 / back.seconds,
               "window": st.settings["window"], "threads": st.settings["threads"]}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    for c in STANDARD:
        size, secs = standard(c, raw)
        rows.append({"model": c, "text": text, "bytes": len(raw), "mode": "-", "size": size,
                     "bits_per_byte": 8 * size / len(raw), "compress_kb_s": len(raw) / 1000 / secs,
                     "compare_with": name})
    return rows


def markdown(doc: dict) -> str:
    cols = [("text", "text"), ("bytes", "bytes"), ("model", "compressor"), ("mode", "mode"), ("size", "size"),
            ("bits_per_byte", "bits/byte"), ("tokens_per_forward", "tokens/forward"),
            ("compress_kb_s", "compress KB/s"), ("decompress_kb_s", "decompress KB/s")]
    lines = [f"# card compress vs standard compressors ({doc['environment']['cpu']}, "
             f"{doc['environment']['threads']} threads)", "",
             "Every CARD row was decompressed and compared byte for byte. Budget rows plan with a slot profile "
             "measured on training text. Standard compressors on the same bytes follow each model's rows.", "",
             f"Command: `{doc['command']}`", ""]
    lines.append(markdown_table(doc["rows"], cols))
    for m in doc["models"]:
        lines += ["", f"- **{m['name']}**: `{m['source']}`; slot profile: "
                  + ", ".join(f"slot {j + 1} {r[-1]:.2f} bits" for j, r in enumerate(m["profile_bits"][:4]))
                  + " (longest-prefix bucket)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], help="NAME=CKPT, a CARD checkpoint (repeatable)")
    ap.add_argument("--slice", action="append", default=[], help="NAME=BYTES: code only the first BYTES per text")
    ap.add_argument("--budget-slice", action="append", default=[], help="NAME=BYTES for the budget modes only")
    ap.add_argument("--window", action="append", default=[], help="NAME=TOKENS: coding window for that model")
    ap.add_argument("--no-stories260k", action="store_true", help="skip the converted stories260K")
    ap.add_argument("--profile-rows", action="append", default=[], help="NAME=ROWS of training text to profile on")
    ap.add_argument("--budgets", default="1,0.5,0.25")
    ap.add_argument("--work", default=None, help="scratch folder for the profiled checkpoint copies")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="compress")
    args = ap.parse_args(argv)
    budgets = [float(x) for x in args.budgets.split(",")]
    slices = {k: int(v) for k, v in (s.split("=", 1) for s in args.slice)}
    budget_slices = {k: int(v) for k, v in (s.split("=", 1) for s in args.budget_slice)}
    windows = {k: int(v) for k, v in (s.split("=", 1) for s in args.window)}
    prof_rows = {k: int(v) for k, v in (s.split("=", 1) for s in args.profile_rows)}
    work = Path(args.work or tempfile.mkdtemp(prefix="card-compress-"))
    work.mkdir(parents=True, exist_ok=True)
    train_txt = training_text(work / "tinystories_train90.txt")
    models = [] if args.no_stories260k else [("stories260K", None)]
    models += [tuple(m.split("=", 1)) for m in args.model]
    data = texts()
    doc = {"command": "python -m benchmarks.compress " + " ".join(argv if argv is not None else sys.argv[1:]),
           "environment": environment(), "texts": {k: len(v) for k, v in data.items()}, "models": [], "rows": []}
    for name, src in models:
        if src is None:
            from benchmarks.common import converted_stories260k

            src = converted_stories260k(work / "src")
        ckpt = prepare(name, Path(src), work, train_txt, prof_rows.get(name, PROFILE_ROWS["default"]))
        from card.checkpoint import check_checkpoint_path

        meta = check_checkpoint_path(ckpt, require_card=True)
        doc["models"].append({"name": name, "source": str(src), "adaptation_steps": sum(a.get("steps", 0) for a in meta.adaptation),
                              "profile_bits": meta.slot_profile["loss_bits"], "slice": slices.get(name),
                              "budget_slice": budget_slices.get(name), "window": windows.get(name)})
        doc["rows"] += run_model(name, ckpt, data, budgets, slices.get(name), budget_slices.get(name), windows.get(name))
        write_results(args.out, args.name, doc, markdown(doc))  # after each model: a slow last one loses nothing
    md = markdown(doc)
    print(md)
    return doc


if __name__ == "__main__":
    main()

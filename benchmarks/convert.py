"""Conversion benchmark: ``card.convert`` vs a plain ``from_pretrained`` + ``save_pretrained`` of the same model.

    python -m benchmarks.convert [--out benchmarks/results] [--repeats 3]

Models: the real stories260K (HF folder in ``$CARD_DATA_DIR``) and a randomly initialised 110M-parameter
Llama (12 layers, width 768, the real Llama-2 32k SentencePiece tokenizer from the data folder), saved
locally first. For each, the median wall time of (a) load + save of model and tokenizer, (b) conversion
with verification (the default: it reloads the written checkpoint and compares logits), (c) conversion with
``--no-verify``; the runs are interleaved so machine noise hits all three alike. Reports (b)/(a) and (c)/(a).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

from benchmarks.common import data_dir, environment, markdown_table, write_results
from card.convert import convert


def build_llama_110m(path: Path) -> Path:
    """A Llama-architecture checkpoint of about 110M parameters with the real Llama-2 tokenizer."""
    src = Path(tempfile.mkdtemp())
    shutil.copy(data_dir() / "llama2_tokenizer" / "tokenizer.model", src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",'
        ' "add_bos_token": true, "add_eos_token": false, "legacy": false, "model_max_length": 1024}'
    )
    tok = tf.AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    shutil.rmtree(src)
    return path


def load_and_save(src: Path, dst: Path) -> None:
    model = tf.AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    tok = tf.AutoTokenizer.from_pretrained(src)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)


def timed(fn, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def measure(name: str, src: Path, work: Path, repeats: int) -> dict:
    times: dict[str, list[float]] = {"load_save": [], "convert": [], "convert_no_verify": []}
    params = None
    for i in range(repeats):
        times["load_save"].append(timed(load_and_save, src, work / f"plain{i}"))
        t0 = time.perf_counter()
        report = convert(str(src), work / f"card{i}")
        times["convert"].append(time.perf_counter() - t0)
        times["convert_no_verify"].append(timed(convert, str(src), work / f"cardnv{i}", verify=False))
        params = report.params
        for d in (f"plain{i}", f"card{i}", f"cardnv{i}"):
            shutil.rmtree(work / d)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "params": params, **{f"{k}_s": v for k, v in med.items()},
            "convert_over_load_save": med["convert"] / med["load_save"],
            "no_verify_over_load_save": med["convert_no_verify"] / med["load_save"], "runs": times}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows.append(measure("stories260K", data_dir() / "stories260K_hf", tmp, args.repeats))
        rows.append(measure("llama-110M", build_llama_110m(tmp / "llama110m"), tmp, args.repeats))
    cols = [("model", "model"), ("params", "params"), ("load_save_s", "load+save s"), ("convert_s", "convert s"),
            ("convert_over_load_save", "convert / load+save"), ("convert_no_verify_s", "convert --no-verify s"),
            ("no_verify_over_load_save", "no-verify / load+save")]
    md = "# Conversion vs load + save\n\n" + markdown_table(rows, cols) + "\n\nMedian of " \
         f"{args.repeats} interleaved runs; convert includes the default verification (reload + logits check)."
    data = {"benchmark": "convert", "environment": environment(), "repeats": args.repeats, "results": rows}
    write_results(args.out, "convert", data, md)
    print(md)
    return data


if __name__ == "__main__":
    main()

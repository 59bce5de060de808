"""Real-model benchmark: SmolLM2-135M-Instruct (GGUF Q4_1, from ``card fetch-model``) through every stage.

    python -m benchmarks.real_model [--limit 500] [--gsm8k-limit 100] [--prompts 16] [--max-new-tokens 64]
                                    [--repeats 2] [--adapt-minutes 0] [--threads N] [--work DIR]
                                    [--out benchmarks/results]

Phases (each a section of ``real_model.json`` / ``real_model.md``):

1. convert: ``card-convert model.gguf`` (with verification, and ``--no-verify``) vs what a user must do
   without it: transformers' GGUF load (dequantisation) + rebuild without ``quantization_config`` + save;
   the same for the dequantised HF folder (``card-convert`` vs ``from_pretrained`` + ``save_pretrained``).
   Interleaved, median of ``--repeats``.
2. AR decoding vs ``transformers`` ``generate`` (greedy, batch 1) on GSM8K test questions as chat prompts:
   tokens/s (median of interleaved repeats) and whether the tokens are identical.
3. lm-eval: PIQA and HellaSwag (``--limit`` docs each) and GSM8K (``--gsm8k-limit``, chat-formatted not:
   the bundled 0-shot task) for the dequantised source (``hf`` folder, AR) and the converted model (AR).
4. decoding modes of the unadapted model: ar, parallel@0.9, parallel@0.7, lossless on the chat prompts:
   tokens/forward, tokens/s, speed vs AR, agreement with AR.
5. with ``--adapt-minutes M > 0``: ``card adapt`` (ZeRO-2, 2 ranks on CPU) on chat-formatted GSM8K train
   data, masks and loss on the assistant turns, for as many steps as fit in M minutes (2 steps are timed
   first; the run is then resumed with ``max_steps`` set from that), then phase 4 again on the adapted
   model, with the AR validation loss before and after, and phase 3 (AR) on the adapted model.

Each finished phase is written to ``real_model.json`` / ``.md`` at once, so a run stopped early keeps what it
measured (the document says where it stopped).

A 135M model at CPU compute will not predict far ahead: these numbers are the measured starting line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

from benchmarks.common import data_dir, environment, markdown_table, write_results
from card.chat import chat_prompt_ids, end_of_turn_ids
from card.models import model_path

NAME = "smollm2-135m-instruct"
MODES = [("ar", "ar", {}), ("parallel@0.9", "parallel", {"threshold": 0.9}),
         ("parallel@0.7", "parallel", {"threshold": 0.7}), ("lossless", "lossless", {})]
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ data
def gsm8k(split: str, n: int) -> list[dict]:
    with open(data_dir() / "eval" / f"gsm8k_{split}.jsonl") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def gsm8k_chat_file(dst: Path, n: int) -> Path:
    """The first ``n`` GSM8K training problems as conversations: user question, assistant worked answer."""
    dst.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["question"]},
                                                    {"role": "assistant", "content": r["answer"]}]}) + "\n"
                           for r in gsm8k("train", n)))
    return dst


def chat_prompts(tok, n: int) -> list[list[int]]:
    return [chat_prompt_ids(tok, r["question"]) for r in gsm8k("test", n)]


# ------------------------------------------------------------------------------------------ phases
def gguf_load_save(gguf: Path, dst: Path) -> None:
    """Without card: transformers' GGUF load, rebuilt so it can be saved, then saved with its tokenizer."""
    from card.convert.gguf import load_gguf

    model, tok, _ = load_gguf(gguf, torch.float32)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)


def hf_load_save(src: Path, dst: Path) -> None:
    tf.AutoModelForCausalLM.from_pretrained(src, dtype="auto").save_pretrained(dst)
    tf.AutoTokenizer.from_pretrained(src).save_pretrained(dst)


def timed(fn, *args, **kwargs) -> float:
    os.sync()
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def phase_convert(gguf: Path, work: Path, repeats: int) -> dict:
    from card.convert import convert

    hf = work / "smollm2-hf"
    if not hf.exists():
        gguf_load_save(gguf, hf)
    jobs = {
        "gguf": {"load_save": lambda d: gguf_load_save(gguf, d), "convert": lambda d: convert(str(gguf), d),
                 "convert_no_verify": lambda d: convert(str(gguf), d, verify=False)},
        "hf": {"load_save": lambda d: hf_load_save(hf, d), "convert": lambda d: convert(str(hf), d),
               "convert_no_verify": lambda d: convert(str(hf), d, verify=False)},
    }
    out = {}
    for src, js in jobs.items():
        times = {k: [] for k in js}
        for i in range(repeats):
            order = list(js)[i % 3:] + list(js)[:i % 3]
            for k in order:
                d = work / f"{src}-{k}-{i}"
                times[k].append(timed(js[k], d))
                shutil.rmtree(d)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[src] = {"seconds": med, "runs": times, "convert_over_load_save": med["convert"] / med["load_save"],
                    "no_verify_over_load_save": med["convert_no_verify"] / med["load_save"]}
    report = convert(str(gguf), work / "smollm2-card", overwrite=True)
    out["max_abs_diff"] = report.max_abs_diff
    out["argmax_equal"] = report.argmax_equal
    return out


def phase_generate(ck, prompts, eos, max_new: int, repeats: int) -> dict:
    from card.eval.decoding import decode_ar

    def ours():
        return [r.token_ids for r in decode_ar(ck.model, ck.tokenizer, prompts, max_new_tokens=max_new,
                                               eos_token_ids=eos, batch_size=1)]

    def theirs():
        res = []
        for ids in prompts:
            x = torch.tensor([ids])
            y = ck.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                                  eos_token_id=eos, past_key_values=tf.DynamicCache(config=ck.model.config))
            res.append(y[0, x.shape[1]:].tolist())
        return res

    times = {"ar": [], "generate": []}
    tokens = {}
    for i in range(repeats):
        for k, fn in (("ar", ours), ("generate", theirs))[::(1 if i % 2 == 0 else -1)]:
            t0 = time.perf_counter()
            tokens[k] = fn()
            times[k].append(time.perf_counter() - t0)
    n = {k: sum(map(len, v)) for k, v in tokens.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"prompts": len(prompts), "max_new_tokens": max_new, "tokens": n, "seconds": med,
            "tokens_per_second": {k: n[k] / med[k] for k in med}, "identical": tokens["ar"] == tokens["generate"],
            "ar_over_generate": (n["ar"] / med["ar"]) / (n["generate"] / med["generate"])}


def phase_modes(ck, prompts, eos, max_new: int, block_size: int | str, repeats: int) -> list[dict]:
    from card.eval.decoding import decode

    results, times = {}, {label: [] for label, _, _ in MODES}
    for i in range(repeats):
        for label, mode, s in (MODES if i % 2 == 0 else MODES[::-1]):
            extra = {} if mode == "ar" else {"block_size": block_size, "mask_id": ck.meta.mask_token_id}
            t0 = time.perf_counter()
            results[label] = decode(mode, ck.model, ck.tokenizer, prompts, max_new_tokens=max_new, eos_token_ids=eos,
                                    batch_size=1, **s, **extra)
            times[label].append(time.perf_counter() - t0)
    ar = results["ar"]
    rows = []
    for label, _, _ in MODES:
        rs = results[label]
        toks, fwd = sum(r.new_tokens for r in rs), sum(r.forwards for r in rs)
        same = sum(a == b for x, y in zip(rs, ar) for a, b in zip(x.token_ids, y.token_ids))
        sec = statistics.median(times[label])
        rows.append({"mode": label, "tokens": toks, "forwards": fwd, "tokens_per_forward": toks / fwd,
                     "seconds": sec, "tokens_per_second": toks / sec,
                     "agreement_with_ar": same / max(1, sum(len(y.token_ids) for y in ar))})
    for r in rows:
        r["speed_vs_ar"] = r["tokens_per_second"] / rows[0]["tokens_per_second"]
    return rows


def phase_lm_eval(card_dir: Path, hf_dir: Path | None, limit: int, gsm8k_limit: int, out: Path) -> dict:
    from card.eval.runner import evaluate

    res = {}
    for tasks, lim in (("card_piqa,card_hellaswag", limit), ("card_gsm8k", gsm8k_limit)):
        if lim <= 0:
            continue
        doc = evaluate(str(card_dir), tasks, "ar", baseline=None if hf_dir is None else str(hf_dir), limit=lim,
                       batch_size=8, out=out / tasks.replace(",", "+"), bootstrap_iters=1000)
        for run in doc.runs:
            for task, sc in run.scores.items():
                res.setdefault(task, {})[run.label] = {k: v for k, v in sc.items() if "," in k}
        res.setdefault("_seconds", {})[tasks] = doc.seconds
    return res


def phase_adapt(card_dir: Path, work: Path, minutes: float, seq_len: int) -> dict:
    data = gsm8k_chat_file(work / "gsm8k_chat.jsonl", 7473)
    run = work / "adapt"
    shutil.rmtree(run, ignore_errors=True)
    card = Path(sys.executable).parent / "card"
    base = [str(card), "adapt", "recipes/stories260k-cpu.yaml", "--set", f"model={card_dir}",
            "--set", f"data.path={data}", "--set", "data.messages_field=messages", "--set", "data.separator=none",
            "--set", "data.validation_fraction=0.01", "--set", "data.max_validation_blocks=16",
            "--set", "objective.mask_scope=completion", "--set", "objective.loss_scope=completion",
            "--set", "objective.tail_factor=null", "--set", f"train.seq_len={seq_len}",
            "--set", "train.micro_batch_size=4", "--set", "train.lr=5e-5", "--set", "train.warmup_steps=0",
            "--set", "train.log_every=1", "--set", "train.eval_every=0", "--set", "train.save_every=0",
            "--nproc-per-node", "2", "--output-dir", str(run)]
    t0 = time.perf_counter()
    subprocess.run(base + ["--set", "train.max_steps=2"], cwd=REPO, check=True, capture_output=True)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x.get("split") != "validation"]
    per_step = (train[-1]["elapsed"] - train[0]["elapsed"]) or train[-1]["elapsed"] / 2
    steps = max(2, int(minutes * 60 / per_step))
    if steps > 2:
        subprocess.run(base + ["--set", f"train.max_steps={steps}"], cwd=REPO, check=True, capture_output=True)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in lines if x.get("split") == "validation"]
    train = [x for x in lines if x.get("split") != "validation"]
    return {"steps": train[-1]["step"], "seconds": time.perf_counter() - t0, "seconds_per_step": per_step,
            "tokens": train[-1]["tokens"], "tokens_per_second": train[-1]["tokens_per_second"],
            "val_ar_loss_before": val[0]["val_ar_loss"], "val_ar_loss_after": val[-1]["val_ar_loss"],
            "val_loss_before": val[0]["val_loss"], "val_loss_after": val[-1]["val_loss"],
            "seq_len": seq_len, "final": str(run / "final")}


# ------------------------------------------------------------------------------------------ report
MODE_COLS = [("mode", "mode"), ("tokens_per_forward", "tokens/forward"), ("tokens_per_second", "tokens/s"),
             ("speed_vs_ar", "speed vs AR"), ("agreement_with_ar", "same tokens as AR")]


def _convert_md(c: dict) -> list[str]:
    return ["### conversion (median seconds)", "",
            markdown_table([{"source": s, **c[s]["seconds"], "ratio": c[s]["convert_over_load_save"],
                             "ratio_nv": c[s]["no_verify_over_load_save"]} for s in ("gguf", "hf")],
                           [("source", "source"), ("load_save", "load + save"), ("convert", "card-convert"),
                            ("convert_no_verify", "--no-verify"), ("ratio", "convert / load+save"),
                            ("ratio_nv", "no-verify / load+save")]),
            "", f"max |Δlogit| vs the dequantised model: {c['max_abs_diff']}, argmax equal: {c['argmax_equal']}", ""]


def _lm_eval_md(results: dict, title: str) -> list[str]:
    rows = []
    for task, runs in results.items():
        if task.startswith("_"):
            continue
        for label, sc in runs.items():
            rows.append({"task": task, "run": label, **{k.split(",")[0] + "/" + k.split(",")[1]: v
                                                        for k, v in sc.items() if "stderr" not in k}})
    keys = sorted({k for row in rows for k in row} - {"task", "run"})
    return [f"### {title}", "", markdown_table(rows, [("task", "task"), ("run", "run")] + [(k, k) for k in keys]), ""]


def markdown(r: dict) -> str:
    """The sections measured so far (a run stopped early still reports its finished phases)."""
    lines = ["## SmolLM2-135M-Instruct (GGUF Q4_1)", "", f"settings: {json.dumps(r['settings'])}", ""]
    if "convert" in r:
        lines += _convert_md(r["convert"])
    if "generate" in r:
        g = r["generate"]
        lines += ["### AR decode vs transformers generate (greedy, batch 1, chat prompts)", "",
                  f"ours {g['tokens_per_second']['ar']:.1f} tokens/s, generate {g['tokens_per_second']['generate']:.1f} "
                  f"tokens/s ({g['ar_over_generate']:.2f}x), identical tokens: {g['identical']}", ""]
    if "modes" in r:
        lines += ["### decoding modes, unadapted (batch 1, chat prompts)", "", markdown_table(r["modes"], MODE_COLS), ""]
    if r.get("lm_eval"):
        lines += _lm_eval_md(r["lm_eval"], "lm-eval (source = dequantised HF folder, AR; converted = CARD checkpoint, AR)")
    if r.get("adapt"):
        a = r["adapt"]
        lines += [f"### after {a['steps']} adaptation steps ({a['seconds'] / 60:.1f} min, "
                  f"{a['seconds_per_step']:.1f} s/step, {a['tokens_per_second']:.0f} tokens/s, seq {a['seq_len']})", "",
                  f"AR validation loss {a['val_ar_loss_before']:.4f} -> {a['val_ar_loss_after']:.4f}; "
                  f"CARD validation loss {a['val_loss_before']:.4f} -> {a['val_loss_after']:.4f}", ""]
    if r.get("modes_adapted"):
        lines += ["### decoding modes, adapted (batch 1, chat prompts)", "", markdown_table(r["modes_adapted"], MODE_COLS),
                  ""]
    if r.get("lm_eval_adapted"):
        lines += _lm_eval_md(r["lm_eval_adapted"], "lm-eval after adaptation (CARD checkpoint, AR)")
    if r.get("resumed"):
        lines += [f"resumed run: phases {', '.join(r['resumed']['phases_kept'])} come from an earlier run "
                  f"(its settings that differ: {json.dumps(r['resumed']['their_settings_that_differ'])})", ""]
    if r.get("partial"):
        lines += [f"partial run: {r['partial']}", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=500, help="PIQA and HellaSwag docs (0: skip)")
    ap.add_argument("--gsm8k-limit", type=int, default=100, help="GSM8K docs (0: skip)")
    ap.add_argument("--prompts", type=int, default=16, help="GSM8K test questions for the decoding phases")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=lambda v: v if v == "auto" else int(v), default="auto",
                    help="masks per forward: auto (chosen from the measured cost, the default) or a fixed K")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--adapt-minutes", type=float, default=0.0)
    ap.add_argument("--adapt-seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 on a busy box)")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--resume", action="store_true",
                    help="keep the phases an earlier, stopped run (same --out and --work) finished; run the rest")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    gguf = model_path(NAME, check=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="card-real-model-"))
    work.mkdir(parents=True, exist_ok=True)
    r = {"settings": {k: v for k, v in vars(args).items() if k not in ("work", "out", "resume")},
         "environment": environment()}
    if args.resume:
        r = _resumed(Path(args.out) / "real_model.json", r)

    def phase(key: str, fn, *a):
        """Run one phase and write everything measured so far, so a stopped run keeps its finished phases."""
        if key in r:
            return
        r["partial"] = f"stopped during the {key} phase"
        write_results(args.out, "real_model", r, markdown(r))
        r[key] = fn(*a)
        print(json.dumps(r[key], indent=1, default=str), flush=True)

    try:
        _phases(args, gguf, work, r, phase)
        r.pop("partial", None)
        md = markdown(r)
        write_results(args.out, "real_model", r, md)
        print(md)
        return r
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _resumed(path: Path, fresh: dict) -> dict:
    """The earlier run's finished phases under this run's settings; the settings that differ are recorded."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return fresh
    kept = [k for k in PHASES if k in old]
    changed = {k: v for k, v in old.get("settings", {}).items() if fresh["settings"].get(k) != v}
    return {**{k: old[k] for k in kept}, **fresh,
            "resumed": {"phases_kept": kept, "their_settings_that_differ": changed}}


PHASES = ("convert", "generate", "modes", "lm_eval", "adapt", "modes_adapted", "lm_eval_adapted")


def _phases(args, gguf: Path, work: Path, r: dict, phase) -> None:
    from card.checkpoint import load_checkpoint

    card_dir = work / "smollm2-card"
    phase("convert", phase_convert, gguf, work, args.repeats)
    ck = load_checkpoint(card_dir, dtype="float32", require_card=True)
    prompts, eos = chat_prompts(ck.tokenizer, args.prompts), end_of_turn_ids(ck.tokenizer)
    phase("generate", phase_generate, ck, prompts, eos, args.max_new_tokens, args.repeats)
    phase("modes", phase_modes, ck, prompts, eos, args.max_new_tokens, args.block_size, args.repeats)
    del ck
    phase("lm_eval", phase_lm_eval, card_dir, work / "smollm2-hf", args.limit, args.gsm8k_limit, work / "eval")
    if args.adapt_minutes <= 0:
        return
    phase("adapt", phase_adapt, card_dir, work, args.adapt_minutes, args.adapt_seq_len)
    final = Path(r["adapt"]["final"])
    ck = load_checkpoint(final, dtype="float32", require_card=True)
    phase("modes_adapted", phase_modes, ck, prompts, eos, args.max_new_tokens, args.block_size, args.repeats)
    del ck
    phase("lm_eval_adapted", phase_lm_eval, final, None, args.limit, args.gsm8k_limit, work / "eval-adapted")


if __name__ == "__main__":
    main()

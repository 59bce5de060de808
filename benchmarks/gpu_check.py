"""GPU check: SmolLM2-135M-Instruct converted, adapted and evaluated on one GPU, in one command (< 8 min).

    python -m benchmarks.gpu_check [--adapt-minutes 4] [--prompts 64] [--piqa-limit 500] [--out gpu_check.json]
    python -m benchmarks.gpu_check --dry-run            # the same path on CPU with tiny step counts (CI runs it)

1. convert the GGUF file (``card fetch-model smollm2-135m-instruct``) in bfloat16 (float32 in ``--dry-run``);
2. ``card adapt`` with DeepSpeed ZeRO-2 on the GPU on chat-formatted GSM8K train data (masks and loss on
   the assistant turns) for about ``--adapt-minutes``: 2 steps are timed, then the run is resumed with as
   many steps as fit;
3. decode GSM8K test questions (chat prompts) at batch 1 and 16 in ar, lossless and parallel@0.9 / 0.7:
   tokens/forward, tokens/s, agreement with AR, exact match of the final number;
4. PIQA through the lm-eval ``card`` and ``hf`` backends on the adapted checkpoint (acc must agree).

Everything goes into one json (``--out``). ``--checkpoint DIR`` skips step 1 with an already converted one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.real_model import NAME, REPO, chat_prompts, gsm8k, gsm8k_chat_file

MODES = [("ar", "ar", {}), ("lossless", "lossless", {}), ("parallel@0.9", "parallel", {"threshold": 0.9}),
         ("parallel@0.7", "parallel", {"threshold": 0.7})]
NUMBER = re.compile(r"-?[0-9][0-9,]*\.?[0-9]*")


def final_number(text: str) -> str | None:
    """The answer a GSM8K solution ends with: after ``####`` if present, else the last number in the text."""
    text = text.split("####")[-1] if "####" in text else text
    found = NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def settings(dry_run: bool, args) -> dict:
    if dry_run:
        return {"device": "cpu", "dtype": "float32", "adapt_minutes": 0.0, "seq_len": 192, "micro_batch": 1,
                "prompts": 2, "max_new_tokens": 8, "batches": [1, 2], "piqa_limit": 2}
    return {"device": "cuda", "dtype": "bfloat16", "adapt_minutes": args.adapt_minutes, "seq_len": 512,
            "micro_batch": 16, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "batches": [1, 16],
            "piqa_limit": args.piqa_limit}


def adapt(ckpt: Path, work: Path, s: dict) -> dict:
    data = gsm8k_chat_file(work / "gsm8k_chat.jsonl", 64 if s["device"] == "cpu" else 7473)
    run = work / "adapt"
    env = {**os.environ, "CARD_CACHE_DIR": str(work / "cache")}
    if s["device"] == "cuda":
        env["DS_ACCELERATOR"] = "cuda"  # the Makefile exports cpu for the CPU machines
    cmd = [str(Path(sys.executable).parent / "card"), "adapt", "recipes/stories260k-cpu.yaml", "--set", f"model={ckpt}",
           "--set", f"data.path={data}", "--set", "data.messages_field=messages", "--set", "data.separator=none",
           "--set", "data.validation_fraction=0.02", "--set", "data.max_validation_blocks=8",
           "--set", "objective.mask_scope=completion", "--set", "objective.loss_scope=completion",
           "--set", "objective.tail_factor=null", "--set", f"train.seq_len={s['seq_len']}",
           "--set", f"train.micro_batch_size={s['micro_batch']}", "--set", "train.lr=5e-5",
           "--set", "train.warmup_steps=0", "--set", "train.log_every=1", "--set", "train.eval_every=0",
           "--set", "train.save_every=0", "--set", f"train.precision={'fp32' if s['device'] == 'cpu' else 'auto'}",
           "--output-dir", str(run)]
    t0 = time.perf_counter()

    def launch(steps: int) -> None:
        p = subprocess.run(cmd + ["--set", f"train.max_steps={steps}"], cwd=REPO, env=env, capture_output=True,
                           text=True)
        if p.returncode != 0:
            raise SystemExit(f"card adapt failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")

    launch(2)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x.get("split") != "validation"]
    per_step = max(1e-3, train[-1]["elapsed"] - train[0]["elapsed"])
    steps = max(2, int(s["adapt_minutes"] * 60 / per_step))
    if steps > 2:
        launch(steps)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in lines if x.get("split") == "validation"]
    train = [x for x in lines if x.get("split") != "validation"]
    return {"final": str(run / "final"), "steps": train[-1]["step"], "seconds": time.perf_counter() - t0,
            "seconds_per_step": per_step, "tokens_per_second": train[-1]["tokens_per_second"],
            "val_ar_loss": [val[0]["val_ar_loss"], val[-1]["val_ar_loss"]],
            "val_loss": [val[0]["val_loss"], val[-1]["val_loss"]]}


def decode_modes(ckpt: str, s: dict) -> list[dict]:
    from card.chat import end_of_turn_ids
    from card.checkpoint import load_checkpoint
    from card.eval.decoding import decode

    ck = load_checkpoint(ckpt, dtype=s["dtype"], device=s["device"], require_card=True)
    prompts, eos = chat_prompts(ck.tokenizer, s["prompts"]), end_of_turn_ids(ck.tokenizer)
    gold = [final_number(r["answer"]) for r in gsm8k("test", s["prompts"])]
    rows = []
    for batch in s["batches"]:
        ar = None
        for label, mode, extra in MODES:
            if mode != "ar":
                extra = {**extra, "block_size": "auto", "mask_id": ck.meta.mask_token_id}  # the product default
            if s["device"] == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            rs = decode(mode, ck.model, ck.tokenizer, prompts, max_new_tokens=s["max_new_tokens"], eos_token_ids=eos,
                        batch_size=batch, **extra)
            if s["device"] == "cuda":
                torch.cuda.synchronize()
            sec = time.perf_counter() - t0
            ar = rs if mode == "ar" else ar
            toks, fwd = sum(r.new_tokens for r in rs), sum(r.forwards for r in rs)
            same = sum(a == b for x, y in zip(rs, ar) for a, b in zip(x.token_ids, y.token_ids))
            rows.append({"batch": batch, "mode": label, "tokens": toks, "forwards": fwd,
                         "tokens_per_forward": toks / fwd, "seconds": sec, "tokens_per_second": toks / sec,
                         "agreement_with_ar": same / max(1, sum(len(y.token_ids) for y in ar)),
                         "exact_match": sum(final_number(r.text) == g for r, g in zip(rs, gold)) / len(gold)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def piqa(ckpt: str, s: dict) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from card.eval.lm_model import CardLM
    from card.eval.runner import BUNDLED_TASKS

    tm = TaskManager(include_path=str(BUNDLED_TASKS), include_defaults=False)
    out = {}
    for name, cls in (("card", CardLM), ("hf", HFLM)):
        lm = cls(pretrained=ckpt, dtype=s["dtype"], device=s["device"], batch_size=32)
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=["card_piqa"], task_manager=tm, limit=s["piqa_limit"],
                                      bootstrap_iters=0)
        out[name] = {**{k: v for k, v in res["results"]["card_piqa"].items() if "," in k},
                     "seconds": time.perf_counter() - t0}
        del lm
    out["acc_equal"] = out["card"]["acc,none"] == out["hf"]["acc,none"]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny step counts: checks the path, not the GPU")
    ap.add_argument("--adapt-minutes", type=float, default=4.0)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--piqa-limit", type=int, default=500)
    ap.add_argument("--checkpoint", default=None, help="an already converted SmolLM2 CARD checkpoint (skips step 1)")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json")
    args = ap.parse_args(argv)
    s = settings(args.dry_run, args)
    if s["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run on a GPU machine, or pass --dry-run for the CPU check")
    from benchmarks.common import environment
    from card.convert import convert
    from card.io import atomic_write_text
    from card.models import model_path

    work = Path(args.work or tempfile.mkdtemp(prefix="card-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        r = {"dry_run": args.dry_run, "settings": s, "environment": environment(),
             "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
        if args.checkpoint:
            ckpt = Path(args.checkpoint)
            r["convert"] = {"skipped": str(ckpt)}
        else:
            ckpt = work / "smollm2-card"
            rep = convert(str(model_path(NAME, check=True)), ckpt, dtype=s["dtype"])
            r["convert"] = {"seconds": rep.seconds, "max_abs_diff": rep.max_abs_diff, "dtype": rep.dtype}
        r["adapt"] = adapt(ckpt, work, s)
        r["decode"] = decode_modes(r["adapt"]["final"], s)
        r["piqa"] = piqa(r["adapt"]["final"], s)
        r["seconds"] = time.perf_counter() - t0
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(r, indent=2) + "\n")
        print(f"wrote {args.out} ({r['seconds']:.0f} s)")
        return r
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

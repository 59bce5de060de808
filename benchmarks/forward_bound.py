"""How much of a decode is the model's forwards: the speedup each mode could reach if the loop cost nothing.

    python -m benchmarks.forward_bound CKPT --prompt-file F [--prompt-file G ...] [--modes ar,parallel@0.9,lossless]
                                       [--batch-size 32] [--threads 2] [--max-new-tokens 16] [--stop '\\n']
                                       [--repeats 5] [--lm-eval-order] [--out benchmarks/results] [--name forward_bound]

Every mode decodes the same prompts (token ids, as lm-eval passes them) in interleaved repeats, each after a
garbage collection and with the collector off; with ``--lm-eval-order`` each prompt file is decoded on its
own, longest prompts first, with its own acceptance estimates, as the lm-eval model decodes each task.
``model.forward`` is wrapped to sum the wall time spent inside it and the tokens fed to it. Per mode:
forwards, tokens fed, the whole decode and the time inside forwards (medians), the speedup over
AR, and the bound the forwards alone set on it, AR's forward time over the mode's. Where the speedup equals
the bound the loop's own work no longer matters: the forwards themselves do.

The last row is what no decoder can beat on this hardware: one forward per batch over every prompt and
its whole answer (the AR answer, masks in place of all but its first token, rows left-padded), as if each
batch were written in its prefill forward. It needs ``ar`` among the modes (its answers set the lengths).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import environment, gc_paused, markdown_table, stop_strings, write_results
from benchmarks.decode import file_prompts


def run(ckpt: str, prompt_files: list[str], modes: list[str], batch_size: int, max_new_tokens: int,
        stop: list[str], repeats: int, lm_eval_order: bool = False) -> dict:
    from card.checkpoint import load_checkpoint
    from card.eval.decoding import decode_spec, prepare, start_estimates

    ck = load_checkpoint(ckpt, dtype="float32", require_card=True)
    groups = [[ck.tokenizer(p)["input_ids"] for p in file_prompts(path)] for path in prompt_files]
    if lm_eval_order:  # as the lm-eval model decodes: each task on its own, longest prompts first
        groups = [sorted(g, key=lambda ids: -len(ids)) for g in groups]
    else:
        groups = [[p for g in groups for p in g]]
    prompts = [p for g in groups for p in g]
    model, inner = ck.model, ck.model.forward
    clock = {"seconds": 0.0, "forwards": 0, "fed": 0}

    def timed_forward(*args, **kwargs):
        t = time.perf_counter()
        out = inner(*args, **kwargs)
        clock["seconds"] += time.perf_counter() - t
        clock["forwards"] += 1
        clock["fed"] += kwargs["input_ids"].numel()
        return out

    def decode_groups(mode: str, some: list[list[list[int]]]) -> None:
        for g in some:  # one set of acceptance estimates per task, as the lm-eval model keeps
            decode_spec(model, ck.tokenizer, g, mode, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        stop_strings=stop, estimates=start_estimates(model, mode, len(g[len(g) // 2])))

    model.forward = timed_forward
    for mode in modes:  # warm-up, and the cost model measured outside the timing
        prepare(model, mode, [batch_size])
        decode_groups(mode, [prompts[:2 * batch_size]])
    oracle = [x for g in groups for x in oracle_inputs(ck, g, batch_size, max_new_tokens, stop)] if "ar" in modes else None
    oracle_s: list[float] = []
    total: dict[str, list[float]] = {m: [] for m in modes}
    inside: dict[str, list[float]] = {m: [] for m in modes}
    forwards: dict[str, int] = {}
    fed: dict[str, int] = {}
    for _ in range(repeats):
        for mode in modes:
            clock.update(seconds=0.0, forwards=0, fed=0)
            with gc_paused():
                t = time.perf_counter()
                decode_groups(mode, groups)
                total[mode].append(time.perf_counter() - t)
            inside[mode].append(clock["seconds"])
            forwards[mode], fed[mode] = clock["forwards"], clock["fed"]
        if oracle is not None:
            with gc_paused(), torch.inference_mode():
                t = time.perf_counter()
                for kwargs in oracle:
                    inner(**kwargs)
                oracle_s.append(time.perf_counter() - t)
    med = {m: statistics.median(total[m]) for m in modes}
    med_in = {m: statistics.median(inside[m]) for m in modes}
    base = modes[0]
    rows = [{"mode": m, "forwards": forwards[m], "fed": fed[m], "decode_ms": 1000 * med[m], "forward_ms": 1000 * med_in[m],
             "speedup_vs_first": med[base] / med[m], "forward_bound": med_in[base] / med_in[m]} for m in modes]
    if oracle is not None:
        o = statistics.median(oracle_s)
        rows.append({"mode": "one forward per batch", "forwards": len(oracle),
                     "fed": sum(x["input_ids"].numel() for x in oracle), "decode_ms": 1000 * o,
                     "forward_ms": 1000 * o, "speedup_vs_first": med[base] / o, "forward_bound": med_in[base] / o})
    return {"settings": {"model": ckpt, "prompt_files": prompt_files, "lm_eval_order": lm_eval_order,
                         "prompts": len(prompts), "modes": modes,
                         "batch_size": batch_size, "max_new_tokens": max_new_tokens, "stop_strings": stop,
                         "repeats": repeats, **environment()},
            "results": rows}


def oracle_inputs(ck, prompts: list[list[int]], batch_size: int, max_new_tokens: int, stop: list[str]) -> list[dict]:
    """Per batch, the model inputs of one forward over each prompt + its AR answer (masks after its first token)."""
    from card.eval.decoding import decode

    answers = decode("ar", ck.model, ck.tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     stop_strings=stop)
    mask, pad = ck.meta.mask_token_id, ck.tokenizer.pad_token_id or 0
    out = []
    for start in range(0, len(prompts), batch_size):
        seqs = [p + [mask] * (a.new_tokens - 1) for p, a in zip(prompts[start:start + batch_size],
                                                                answers[start:start + batch_size])]
        width = max(map(len, seqs))
        ids = torch.tensor([[pad] * (width - len(q)) + q for q in seqs])
        attention = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in seqs], dtype=torch.bool)
        positions = torch.tensor([[0] * (width - len(q)) + list(range(len(q))) for q in seqs])
        keep = max(a.new_tokens for a in answers[start:start + batch_size])
        out.append({"input_ids": ids, "attention_mask": attention, "position_ids": positions, "use_cache": True,
                    "logits_to_keep": keep})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--prompt-file", action="append", required=True, help="JSONL with a 'prompt' field; repeatable")
    ap.add_argument("--modes", default="ar,parallel@0.9,parallel@0.5,lossless", help="the first is the baseline")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable); '\\n' is a newline")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lm-eval-order", action="store_true",
                    help="decode each prompt file on its own, longest prompts first, as the lm-eval model does")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="forward_bound")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    stop = list(stop_strings(a.stop))
    doc = run(a.ckpt, a.prompt_file, [m.strip() for m in a.modes.split(",") if m.strip()], a.batch_size,
              a.max_new_tokens, stop, a.repeats, a.lm_eval_order)
    s = doc["settings"]
    md = "\n\n".join([
        f"## Forward time bound: {s['model']}, {s['prompts']} prompts, batch {s['batch_size']}, "
        f"{s['threads']} thread(s), median of {s['repeats']} interleaved repeats"
        + (", each file decoded on its own, longest prompts first (lm-eval's order)" if s["lm_eval_order"] else ""),
        markdown_table(doc["results"], [("mode", "mode"), ("forwards", "forwards"), ("fed", "tokens fed"),
                                        ("decode_ms", "decode ms"),
                                        ("forward_ms", "inside forwards ms"),
                                        ("speedup_vs_first", f"speedup vs {s['modes'][0]}"),
                                        ("forward_bound", "bound from the forwards alone")]),
    ])
    write_results(a.out, a.name, doc, md)
    print(md)


if __name__ == "__main__":
    main()

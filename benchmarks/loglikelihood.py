"""Loglikelihood benchmark: the lm-eval ``card`` model vs lm-eval's own ``hf`` backend, same model, same requests.

    python -m benchmarks.loglikelihood [--items 200] [--batch-size 16] [--repeats 7] [--out benchmarks/results]

Model: the real stories260K converted to CARD (both backends load the same converted checkpoint). Requests:
HellaSwag validation items from the shared data (context, each of the 4 endings), built once and given to
both models' ``loglikelihood``. Reports requests per second (median of interleaved repeats), the ratio, and
the largest per-request difference between the two (they should agree exactly: CARD scores likelihoods
from the clean-context AR path in one pass, with no Monte Carlo).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from benchmarks.common import converted_stories260k, environment, markdown_table, write_results
from card.eval.lm_model import CardLM
from card.eval.tasks.shared.shared_tasks import hellaswag


def requests(items: int) -> list[Instance]:
    docs = hellaswag()["validation"].select(range(items))
    out = []
    for i, doc in enumerate(docs):
        for j, ending in enumerate(doc["choices"]):
            out.append(Instance(request_type="loglikelihood", doc=doc, arguments=(doc["query"], " " + ending),
                                idx=j, metadata=("card_hellaswag", i, 1)))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(converted_stories260k(tmp))
        models = {
            "card": CardLM(pretrained=ckpt, device="cpu", dtype="float32", batch_size=args.batch_size),
            "hf": HFLM(pretrained=ckpt, device="cpu", dtype="float32", batch_size=args.batch_size),
        }
        reqs = requests(args.items)
        times: dict[str, list[float]] = {k: [] for k in models}
        values: dict[str, list] = {}
        for lm in models.values():  # warm-up (allocator, thread pools), not timed
            lm.loglikelihood(reqs[: 4 * args.batch_size], disable_tqdm=True)
        for _ in range(args.repeats):
            for name, lm in models.items():
                t0 = time.perf_counter()
                values[name] = lm.loglikelihood(reqs, disable_tqdm=True)
                times[name].append(time.perf_counter() - t0)
    diff = max(abs(a[0] - b[0]) for a, b in zip(values["card"], values["hf"], strict=True))
    same_greedy = all(a[1] == b[1] for a, b in zip(values["card"], values["hf"], strict=True))
    rows = [{"backend": name, "requests": len(reqs), "seconds": statistics.median(t),
             "requests_per_second": len(reqs) / statistics.median(t)} for name, t in times.items()]
    ratio = rows[0]["requests_per_second"] / rows[1]["requests_per_second"]
    md = ("# Loglikelihood: lm-eval `card` model vs lm-eval `hf` backend\n\n"
          + markdown_table(rows, [("backend", "backend"), ("requests", "requests"), ("seconds", "seconds (median)"),
                                  ("requests_per_second", "requests/s")])
          + f"\n\ncard / hf requests per second: {ratio:.3f}; max |Δ loglikelihood| = {diff:.2e}; "
            f"is_greedy flags identical: {same_greedy}. Model: stories260K converted; {args.items} HellaSwag items "
            f"x 4 endings; batch size {args.batch_size}; median of {args.repeats} interleaved repeats.")
    data = {"benchmark": "loglikelihood", "environment": environment(), "items": args.items,
            "batch_size": args.batch_size, "results": rows, "card_over_hf": ratio, "max_abs_diff": diff,
            "is_greedy_identical": same_greedy, "runs": times}
    write_results(args.out, "loglikelihood", data, md)
    print(md)
    return data


if __name__ == "__main__":
    main()

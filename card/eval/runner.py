"""``card eval``: run lm-eval on a CARD checkpoint in several decoding modes and write a comparison report.

``evaluate(ckpt, tasks, modes, ...)`` works in three steps:

1. Check everything that can be checked without loading a model: the mode strings and thresholds, the
   numeric settings, the checkpoint paths (``config.json`` only) and the task names (against a
   ``TaskManager`` over the bundled tasks and ``include_path``; lm-eval's 14,685 built-in tasks are indexed
   only when a name is not found locally). Each problem is a one-line ``CardError``.
2. Load the model once and run ``lm_eval.simple_evaluate`` for each mode with a ``CardLM`` over it, then
   load the ``baseline`` (the unconverted checkpoint), if given, and run it in AR mode. Tasks that do not
   generate (loglikelihood, multiple choice, perplexity) do not depend on the decoding mode: they run once
   per model, in its first mode, and the other modes reuse their scores (``scores_from`` says so).
3. Put together the results document (``card.eval.results.Results``) and, with ``out``, write
   ``results.json``, ``report.md``, ``report.html`` and ``samples.jsonl`` (every generation request's
   response and decode statistics, per run).

Speed is compared with the CARD model's own AR run (``ar`` is added to the modes when missing): a run's
``decode.speedup_vs_ar`` is its tokens per second over AR's, and ``same_output_as_ar`` is the fraction of
its generation requests whose whole response equals AR's exactly, a per-request measure (for the baseline
this checks the conversion).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Sequence

from card.checkpoint import check_checkpoint_path, resolve_dtype
from card.errors import CardError
from card.eval.decoding import DecodingSpec, parse_block_size, parse_modes
from card.eval.decoding.cost import cpu_model
from card.eval.results import DecodeTotals, ModelRecord, Results, Run, RunDecode

BUNDLED_TASKS = Path(__file__).resolve().parent / "tasks"
DEFAULT_MODES = "ar,parallel@0.9,parallel@0.7,lossless"
BASELINE_LABEL = "baseline (AR)"
PACKAGES = ("card-toolkit", "torch", "transformers", "lm_eval", "datasets", "deepspeed", "tokenizers", "accelerate",
            "numpy")


# ------------------------------------------------------------------------------------------ modes
# ``--modes`` entries are ``DecodingSpec``s (``card.eval.decoding.parse_modes``, re-exported here).
ModeSpec = DecodingSpec


@dataclass(frozen=True)
class RunPlan:
    """One run: a model with its decoding spec, resolved from the checkpoint's defaults."""

    label: str
    model: str  # "card" | "baseline"
    spec: DecodingSpec

    @property
    def mode(self) -> str:
        return self.spec.mode

    @property
    def threshold(self) -> float | None:
        return self.spec.threshold

    @property
    def block_size(self) -> int | None:
        return self.spec.block_size


def plan_runs(specs: list[DecodingSpec], meta, block_size: int | str | None) -> list[RunPlan]:
    """The CARD model's runs: ``ar`` first when it was not asked for, duplicates dropped, labels resolved.

    ``block_size`` (None or ``"auto"``: automatic lookahead up to the checkpoint's K; an integer: fixed K)
    applies to every parallel and lossless spec; a fixed K is named in the labels (``lossless K=4``).
    """
    if not any(s.mode == "ar" for s in specs):
        specs = [DecodingSpec("ar"), *specs]
    k, lookahead = parse_block_size(block_size)
    plans: list[RunPlan] = []
    for s in specs:
        if s.mode in ("parallel", "lossless"):
            s = s.with_(block_size=k, lookahead=lookahead)
        if s.mode != "ar":
            s = s.resolve(meta)  # budget: refused here, before any run, when the checkpoint has no profile
        plan = RunPlan(s.label(name_block_size=lookahead == "fixed"), "card", s)
        if plan not in plans:
            plans.append(plan)
    return plans


# ------------------------------------------------------------------------------------------ tasks
def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [x for v in value for x in str(v).split(",")]
    return list(dict.fromkeys(x.strip() for x in items if x.strip()))


def task_manager(tasks: list[str], include_paths: list[Path]):
    """A TaskManager that knows every name in ``tasks``; lm-eval's built-in index only when needed."""
    from lm_eval.tasks import TaskManager

    paths = [BUNDLED_TASKS, *include_paths]
    tm = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    if any(t not in tm.all_tasks for t in tasks):
        tm = TaskManager(include_path=[str(p) for p in paths], include_defaults=True)
    missing = [t for t in tasks if t not in tm.all_tasks]
    if missing:
        raise CardError(f"unknown task {missing[0]!r}: not among the bundled tasks, --include-path or lm-eval's "
                        f"registry (bundled: {', '.join(sorted(_bundled_task_names(tm)))})")
    return tm


def _bundled_task_names(tm) -> list[str]:
    return [name for name, e in tm.task_index.items()
            if getattr(e, "yaml_path", None) and BUNDLED_TASKS in Path(e.yaml_path).resolve().parents]


def generative_tasks(tm, tasks: list[str]) -> dict[str, bool]:
    """For each requested name: does any of its tasks use ``generate_until``? Loads each task (and its data)."""
    out = {}
    for name in tasks:
        try:
            loaded = tm.load([name])
        except Exception as e:  # offline hub datasets, broken YAML: lm-eval raises assorted types
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CardError(f"cannot load task {name}: {first}") from None
        out[name] = any(t.OUTPUT_TYPE == "generate_until" for t in loaded["tasks"].values())
    return out


# ------------------------------------------------------------------------------------------ checks
def _check_int(name: str, value, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise CardError(f"{name} must be an integer >= {minimum}, not {value!r}")


def _check_limit(limit) -> None:
    if limit is None:
        return
    ok = (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1) or (
        isinstance(limit, float) and 0 < limit < 1)
    if not ok:
        raise CardError(f"limit must be an integer >= 1 (documents per task) or a fraction in (0, 1), not {limit!r}")


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CardError(f"unknown device {device!r}; use e.g. cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CardError(f"device {device} requested but CUDA is not available here")


# ------------------------------------------------------------------------------------------ records
def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Hardware and software the numbers were measured on."""
    import torch

    gpu = None
    if torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_model(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "versions": {p: _version(p) for p in PACKAGES}}


def model_record(ck) -> ModelRecord:
    """Path, weights checksum, size, dtype and CARD metadata of a loaded checkpoint."""
    from card.io import state_dict_sha256

    m = ck.model
    return ModelRecord(path=str(Path(ck.path).resolve()), sha256=state_dict_sha256(m.state_dict()),
                       params=sum(p.numel() for p in m.parameters()), dtype=str(m.dtype).removeprefix("torch."),
                       architecture=(getattr(m.config, "architectures", None) or [type(m).__name__])[0],
                       card=ck.meta.to_dict() if ck.meta is not None else None)


def _plain(obj):
    """lm-eval's results as plain JSON values (functions in configs become strings, numpy scalars floats)."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable))


# ------------------------------------------------------------------------------------------ running
LM_EVAL_KEYS = ("configs", "versions", "n-shot", "higher_is_better", "n-samples")  # copied from lm-eval's results


def _scores(res: dict, first: Run | None) -> tuple[dict, dict]:
    """This run's scores per task, plus the scores it reuses from its model's first run (and where from)."""
    scores = dict(res.get("results", {}))
    scores_from = {}
    if first is not None:
        for task, value in first.scores.items():
            if task not in scores:
                scores[task] = value
                scores_from[task] = first.scores_from.get(task, first.label)
    return {k: scores[k] for k in sorted(scores)}, scores_from


def _generation_samples(res: dict, log: list[dict]) -> dict[tuple[str, int], dict]:
    """Each generation request's response, filtered response and decode statistics, keyed by (task, doc_id)."""
    stats = {(e["task"], e["doc_id"]): e for e in log}
    out = {}
    for task, items in sorted(res.get("samples", {}).items()):
        if res["configs"][task].get("output_type") != "generate_until":
            continue
        for s in sorted(items, key=lambda s: s["doc_id"]):
            e = stats.get((task, s["doc_id"]), {})
            out[task, s["doc_id"]] = {"task": task, "doc_id": s["doc_id"], "response": s["resps"],
                                      "filtered": s["filtered_resps"],
                                      **{k: e[k] for k in ("new_tokens", "forwards", "seconds", "finish_reason") if k in e}}
    return out


Samples = dict[tuple[str, int], dict]  # (task, doc_id) -> a generation request's response and decode stats


def _run_model(ck, plans: list[RunPlan], gen_tasks: list[str], other_tasks: list[str], tm, lm_info: dict,
               eval_kwargs: dict, seed: int, batch_size: int) -> list[tuple[Run, Samples]]:
    """Run one loaded model in each planned mode; returns each run with its generation samples."""
    import lm_eval

    from card.eval.lm_model import CardLM, decode_totals

    runs: list[tuple[Run, Samples]] = []
    for plan in plans:
        first = runs[0][0] if runs else None
        tasks = gen_tasks + (other_tasks if first is None else [])  # non-generative tasks: first mode only
        t0 = time.perf_counter()
        lm = CardLM(ck.model, tokenizer=ck.tokenizer, decoding=plan.spec, seed=seed, batch_size=batch_size)
        res = {}
        if tasks:
            res = _plain(lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, log_samples=True,
                                                 batch_size=batch_size, **eval_kwargs))
        log = lm.pop_decode_log()
        for key in LM_EVAL_KEYS:
            lm_info.setdefault(key, {}).update(res.get(key, {}))
        scores, scores_from = _scores(res, first)
        per_task = {t: DecodeTotals(**decode_totals([e for e in log if e["task"] == t]))
                    for t in sorted({e["task"] for e in log})}
        run = Run(label=plan.label, model=plan.model, mode=plan.mode, threshold=plan.threshold,
                  block_size=plan.block_size, decoding=plan.spec.settings(), scores=scores, scores_from=scores_from,
                  decode=RunDecode(**decode_totals(log), tasks=per_task), seconds=time.perf_counter() - t0)
        runs.append((run, _generation_samples(res, log)))
    return runs


def _compare_with_ar(runs: list[tuple[Run, Samples]]) -> None:
    """Fill ``decode.speedup_vs_ar`` and ``same_output_as_ar`` (per request) against the CARD model's AR run."""
    ar, ar_samples = next((r, s) for r, s in runs if r.model == "card" and r.mode == "ar")
    ar_tps = ar.decode.tokens_per_second
    for run, samples in runs:
        tps = run.decode.tokens_per_second
        run.decode.speedup_vs_ar = tps / ar_tps if tps and ar_tps else None
        keys = [k for k in samples if k in ar_samples]
        if keys:
            same = sum(samples[k]["response"] == ar_samples[k]["response"] for k in keys)
            run.same_output_as_ar = same / len(keys)


def evaluate(
    ckpt: str | os.PathLike,
    tasks: str | Sequence[str],
    modes: str | Sequence[str] = DEFAULT_MODES,
    *,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    baseline: str | os.PathLike | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    seed: int = 1234,
    block_size: int | str | None = None,
    out: str | os.PathLike | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    bootstrap_iters: int = 100000,
    command: str | None = None,
    apply_chat_template: bool = False,
    fewshot_as_multiturn: bool = False,
) -> Results:
    """Evaluate ``ckpt`` on ``tasks`` in every mode (and ``baseline`` in AR); return the results document.

    ``tasks`` and ``modes`` are comma-separated strings or lists. Modes: ``ar``, ``lossless``, ``parallel``
    (the checkpoint's threshold) and ``parallel@T``; ``block_size`` applies to parallel and lossless (None or
    ``"auto"``: masks per forward chosen from the measured cost, up to the checkpoint's K; an integer: fixed K).
    ``seed`` seeds Python, numpy, torch, lm-eval's few-shot sampler and sampled decoding.
    ``apply_chat_template`` / ``fewshot_as_multiturn`` are lm-eval's own options (prompts rendered with the
    tokenizer's chat template; few-shot examples as earlier turns).
    With ``out``, writes results.json, report.md, report.html and samples.jsonl there. ``command`` is the
    command line recorded in the settings. Raises ``CardError`` for bad input before any model is loaded.
    """
    # 1. everything that can be checked before loading a model
    specs = parse_modes(modes)
    task_list = _as_list(tasks)
    if not task_list:
        raise CardError("no tasks given; use e.g. --tasks card_piqa,card_gsm8k")
    parse_block_size(block_size)
    _check_limit(limit)
    _check_int("num_fewshot", num_fewshot, 0)
    _check_int("batch size", batch_size, 1)
    _check_int("seed", seed, 0)
    _check_int("bootstrap_iters", bootstrap_iters, 0)
    if fewshot_as_multiturn and not apply_chat_template:
        raise CardError("--fewshot-as-multiturn needs --apply-chat-template")
    resolve_dtype(dtype)
    _check_device(device)
    if include_path is None:
        includes = []
    elif isinstance(include_path, (str, os.PathLike)):
        includes = [Path(include_path)]
    else:
        includes = [Path(p) for p in include_path]
    for p in includes:
        if not p.is_dir():
            raise CardError(f"--include-path {p} is not a directory")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise CardError(f"--out {out} exists and is not a directory")
    needs_card = any(s.mode != "ar" for s in specs)
    meta = check_checkpoint_path(ckpt, require_card=needs_card)
    if meta is None:  # a plain checkpoint can only be run in AR mode
        plans = [RunPlan("ar", "card", DecodingSpec("ar"))]
    else:
        plans = plan_runs(specs, meta, block_size)
    if baseline is not None:
        check_checkpoint_path(baseline)
    tm = task_manager(task_list, includes)
    generative = generative_tasks(tm, task_list)
    gen_tasks = [t for t in task_list if generative[t]]
    other_tasks = [t for t in task_list if not generative[t]]

    # 2. load once, run every mode; then the baseline
    from card.checkpoint import load_checkpoint

    eval_kwargs = dict(limit=limit, num_fewshot=num_fewshot, random_seed=seed, numpy_random_seed=seed,
                       torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=bootstrap_iters,
                       apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn)
    lm_info: dict[str, Any] = {}
    started = time.perf_counter()
    ck = load_checkpoint(ckpt, dtype=dtype, device=device, require_card=needs_card)
    if apply_chat_template:
        from card.chat import check_chat_template

        check_chat_template(ck.tokenizer, f"{ckpt}'s tokenizer")
    model = model_record(ck)
    runs = _run_model(ck, plans, gen_tasks, other_tasks, tm, lm_info, eval_kwargs, seed, batch_size)
    del ck
    base = None
    if baseline is not None:
        bck = load_checkpoint(baseline, dtype=dtype, device=device)
        base = model_record(bck)
        runs = _run_model(bck, [RunPlan(BASELINE_LABEL, "baseline", DecodingSpec("ar"))], gen_tasks, other_tasks, tm,
                          lm_info, eval_kwargs, seed, batch_size) + runs
        del bck
    _compare_with_ar(runs)

    # 3. the results document
    import lm_eval

    samples = [{"run": r.label, **x} for r, found in runs for x in found.values()]
    settings = {
        "tasks": task_list, "modes": [s.text for s in specs],
        "runs": [r.label for r, _ in runs],
        "generation_tasks": gen_tasks, "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
        "block_size": block_size, "seeds": {"python": seed, "numpy": seed, "torch": seed, "fewshot": seed,
                                            "sampling": seed},
        "include_paths": [str(BUNDLED_TASKS), *(str(p.resolve()) for p in includes)], "device": device,
        "dtype": dtype, "bootstrap_iters": bootstrap_iters, "command": command,
        "apply_chat_template": apply_chat_template, "fewshot_as_multiturn": fewshot_as_multiturn,
    }
    results = Results(
        model=model, runs=[r for r, _ in runs], baseline=base,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), settings=settings, environment=environment(),
        lm_eval={"version": lm_eval.__version__, **{k: {t: v[t] for t in sorted(v)} for k, v in lm_info.items()}},
        seconds=time.perf_counter() - started,
    )
    if out is not None:
        from card.eval.report import write_report
        from card.io import atomic_write_text

        write_report(results, out)
        atomic_write_text(Path(out) / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    return results


def command_line() -> str:
    """The current process's command line, shell-quoted (what ``card eval`` records)."""
    import shlex

    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])

"""``card demo``: the whole toolkit end to end, offline, through the same code paths as the stage commands.

Embedded default (no ``model``):

1. generate tasks with checkable answers (``card.demo.tasks``), build a small Llama with a character
   tokenizer and pre-train it as an ordinary AR model (``card.adapt.adapt`` with ``objective.kind: ar``);
2. convert it (``card.convert.convert``);
3. adapt it with the CARD objective (``card.adapt.adapt``, DeepSpeed, masks confined to the answers);
4. evaluate with lm-eval on held-out problems (exact match): the AR source model, the CARD model in AR
   mode, parallel decoding at several thresholds and lossless (``card.eval.runner.evaluate``);
5. write the report, print the comparison table and check the demo's claims.

With ``model`` and ``data`` the same pipeline runs on a real checkpoint (steps 2-5, adapting on a text
corpus with ``recipes`` ``text.yaml``, evaluated on ``tasks``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from card.errors import CardError

if TYPE_CHECKING:  # card.eval imports torch; the CLI imports this module for --help
    from card.eval.results import Results, Run

RECIPES = Path(__file__).resolve().parent / "recipes"
FULL = {"ar_steps": 1500, "card_steps": 1500, "n_train": 96_000, "n_eval": 200}
QUICK = {"ar_steps": 300, "card_steps": 300, "n_train": 19_200, "n_eval": 24}
GLOBAL_ROWS = 64  # rows per optimizer step, split over the processes
THRESHOLDS = (0.9, 0.7, 0.5)  # 0.9 is the checkpoint's default (card metadata)
DEFAULT_REAL_TASKS = "card_tinystories_cont,card_tinystories_ppl,card_piqa"
DEMO_METRIC = "exact_match"  # the metric of the generated tasks (``task_yaml``), read back by ``demo_checks``


@dataclass
class Check:
    claim: str
    passed: bool
    detail: str


@dataclass
class DemoResult:
    out: Path
    report: Path
    results: Results
    checks: list[Check] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def demo_model_config(vocab_size: int, tokenizer):
    """The embedded default: a 0.9M-parameter Llama (4 layers, width 128) over a character vocabulary."""
    import transformers as tf

    return tf.LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def task_yaml(name: str, data_file: Path, max_gen_toks: int = 16) -> str:
    """An lm-eval generation task over one held-out JSONL file (absolute path: lm-eval resolves relative
    ``data_files`` against the working directory)."""
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file.resolve()}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: {DEMO_METRIC}
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _stage(console, n: int, total: int, what: str) -> float:
    console.rule(f"[bold]{n}/{total}[/] {what}", align="left")
    return time.perf_counter()


def run_demo(
    out: str | os.PathLike = "runs/demo",
    *,
    quick: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    nproc_per_node: int | None = None,
    model: str | None = None,
    data: str | None = None,
    tasks: str | Sequence[str] | None = None,
    ar_overrides: Sequence[str] = (),
    card_overrides: Sequence[str] = (),
    console=None,
) -> DemoResult:
    """Run the demo into ``out`` (refused if it exists, unless ``overwrite``); see the module docstring."""
    from rich.console import Console

    console = console or Console(stderr=True)
    if (model is None) != (data is None):
        raise CardError("--model and --data go together (a checkpoint and a text corpus to adapt it on)")
    if model is None and tasks is not None:
        raise CardError("--tasks applies with --model/--data; the embedded demo evaluates its own generated tasks")
    from card.io import staged_directory

    if nproc_per_node is not None and nproc_per_node < 1:
        raise CardError(f"need --nproc-per-node >= 1 (got {nproc_per_node})")
    nproc = nproc_per_node or max(1, min(2, os.cpu_count() or 1))
    if GLOBAL_ROWS % nproc:
        raise CardError(f"--nproc-per-node must divide {GLOBAL_ROWS}")
    # A failure (or, at the next run, a kill) leaves nothing behind and an overwritten OUT comes back.
    with staged_directory(out, overwrite, inputs=[model, data], label="--out") as out:
        if model is None:
            return _embedded(out, quick, seed, nproc, ar_overrides, card_overrides, console)
        return _real(out, quick, seed, nproc, model, data, tasks or DEFAULT_REAL_TASKS, card_overrides, console)


def _embedded(out: Path, quick: bool, seed: int, nproc: int, ar_overrides, card_overrides, console) -> DemoResult:
    import torch
    import transformers as tf

    from card.adapt import adapt
    from card.convert import convert
    from card.demo.tasks import TASKS, build_char_tokenizer, write_task_files
    from card.eval.runner import evaluate

    size = QUICK if quick else FULL
    seconds: dict[str, float] = {}
    t = _stage(console, 1, 5, "generate tasks and pre-train a small Llama as an AR model")
    files = write_task_files(out / "data", size["n_train"], size["n_eval"], seed)
    tasks_dir = out / "tasks"
    tasks_dir.mkdir()
    task_names = [f"demo_{name}" for name in TASKS]
    for name in TASKS:
        (tasks_dir / f"demo_{name}.yaml").write_text(task_yaml(f"demo_{name}", files[name]))
    tok = build_char_tokenizer()
    torch.manual_seed(seed)
    init = tf.LlamaForCausalLM(demo_model_config(len(tok), tok))
    init.save_pretrained(out / "init")
    tok.save_pretrained(out / "init")
    params = sum(p.numel() for p in init.parameters())
    console.print(f"{len(TASKS)} tasks ({', '.join(TASKS)}), {size['n_train']:,} training rows, {size['n_eval']} "
                  f"held-out problems per task; Llama with {params:,} parameters; {nproc} process(es)")
    common = [f"data.path={files['train']}", f"seed={seed}", f"train.micro_batch_size={GLOBAL_ROWS // nproc}"]
    ar = adapt(str(RECIPES / "ar.yaml"), [f"model={out / 'init'}", *common, f"train.max_steps={size['ar_steps']}",
                                          *ar_overrides], output_dir=out / "ar", nproc_per_node=nproc)
    seconds["pretrain"] = time.perf_counter() - t

    t = _stage(console, 2, 5, "convert the AR model into a CARD checkpoint")
    report = convert(str(ar.final), out / "card-init")
    console.print(f"mask token id {report.mask_token_id}, vocabulary {report.vocab_before} -> {report.vocab_after}, "
                  f"AR logits verified (max |diff| {report.max_abs_diff:.1e})")
    seconds["convert"] = time.perf_counter() - t

    t = _stage(console, 3, 5, "adapt with the CARD objective (DeepSpeed, masks on the answers)")
    card = adapt(str(RECIPES / "card.yaml"), [f"model={out / 'card-init'}", *common,
                                              f"train.max_steps={size['card_steps']}", *card_overrides],
                 output_dir=out / "card", nproc_per_node=nproc)
    seconds["adapt"] = time.perf_counter() - t

    t = _stage(console, 4, 5, "evaluate with lm-eval: AR source, CARD AR, parallel, lossless")
    modes = ["ar", *(f"parallel@{x}" for x in THRESHOLDS), "lossless"]
    results = evaluate(card.final, task_names, modes, include_path=[tasks_dir], baseline=ar.final,
                       batch_size=32, seed=seed, out=out / "report", bootstrap_iters=1000,
                       command="card demo" + (" --quick" if quick else ""))
    seconds["evaluate"] = time.perf_counter() - t

    _stage(console, 5, 5, "report")
    checks = demo_checks(results, task_names, default_threshold=THRESHOLDS[0])
    return DemoResult(out, out / "report", results, checks, seconds)


def _real(out: Path, quick: bool, seed: int, nproc: int, model: str, data: str, tasks, card_overrides,
          console) -> DemoResult:
    from card.adapt import adapt
    from card.convert import convert
    from card.eval.runner import evaluate

    seconds: dict[str, float] = {}
    t = _stage(console, 1, 3, f"convert {model}")
    convert(model, out / "card-init")
    seconds["convert"] = time.perf_counter() - t
    t = _stage(console, 2, 3, f"adapt on {data} with the CARD objective")
    steps = ["train.max_steps=30"] if quick else []
    card = adapt(str(RECIPES / "text.yaml"), [f"model={out / 'card-init'}", f"data.path={data}", f"seed={seed}",
                                              *steps, *card_overrides], output_dir=out / "card", nproc_per_node=nproc)
    seconds["adapt"] = time.perf_counter() - t
    t = _stage(console, 3, 3, "evaluate with lm-eval")
    modes = ["ar", *(f"parallel@{x}" for x in THRESHOLDS), "lossless"]
    results = evaluate(card.final, tasks, modes, baseline=model, limit=16 if quick else None, seed=seed,
                       out=out / "report", command="card demo --model ... --data ...")
    seconds["evaluate"] = time.perf_counter() - t
    return DemoResult(out, out / "report", results, [], seconds)


def mean_score(run: Run, task_names: Sequence[str], metric: str = DEMO_METRIC) -> float:
    """The run's ``metric`` averaged over ``task_names``."""
    values = [run.score(t, metric) for t in task_names]
    if any(v is None for v in values):
        raise CardError(f"run {run.label} has no {metric} score for every task of {', '.join(task_names)}")
    return sum(values) / len(values)


def demo_checks(results: Results, task_names: Sequence[str], default_threshold: float) -> list[Check]:
    """The demo's claims, read off the results: parallel decoding at the default threshold averages >= 2
    tokens per forward within 2 points of AR exact match, and lossless reproduces AR outputs exactly."""
    ar, par, lossless = (results.run(x) for x in ("ar", f"parallel@{default_threshold}", "lossless"))
    em_ar, em_par = mean_score(ar, task_names), mean_score(par, task_names)
    tpf = par.decode.tokens_per_forward
    return [
        Check(f"parallel@{default_threshold} averages >= 2 tokens per forward", tpf >= 2, f"{tpf:.2f} tokens/forward"),
        Check(f"parallel@{default_threshold} exact match within 2 points of AR", em_par >= em_ar - 0.02,
              f"{em_par:.3f} vs AR {em_ar:.3f}"),
        Check("lossless outputs identical to AR", lossless.same_output_as_ar == 1.0,
              f"{lossless.same_output_as_ar:.3f} of outputs identical, "
              f"{lossless.decode.tokens_per_forward:.2f} tokens/forward"),
    ]


def print_summary(result: DemoResult, console) -> None:
    """The comparison table, the claims' verdicts, the stage times and where the report is."""
    from card.eval.report import print_results_table

    print_results_table(result.results, "card demo: held-out exact match and decoding speed")
    for c in result.checks:
        mark = "[bold green]PASS[/]" if c.passed else "[bold red]FAIL[/]"
        console.print(f"{mark} {c.claim}: {c.detail}", highlight=False)
    total = sum(result.seconds.values())
    console.print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()) + f" (total {total:.0f} s)")
    console.print(f"report: {result.report / 'report.html'} (also report.md, results.json)")

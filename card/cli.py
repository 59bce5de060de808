"""The ``card`` command line: a thin layer over the library API (each command calls one function).

Heavy imports (torch, transformers, deepspeed, lm-eval) happen inside the commands so that ``--help``
stays instant.
"""

from __future__ import annotations

import sys
from functools import wraps
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from card.demo.pipeline import DEFAULT_REAL_TASKS
from card.errors import CardError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="CARD toolkit: convert, adapt and evaluate causal LMs.")
console = Console(stderr=True)


@app.callback()
def main() -> None:
    """CARD toolkit: convert, adapt and evaluate causal LMs."""
    from card.quiet import quiet_progress_when_not_a_terminal

    quiet_progress_when_not_a_terminal()


def user_errors(fn):
    """Print ``CardError`` as one red line and exit 2, instead of a traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CardError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)

    return wrapper


def summary_table(title: str, rows: list[tuple[str, object]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, str(v))
    return table


# --------------------------------------------------------------------------------------------- convert
def convert_command(
    src: str = typer.Argument(..., help="HF checkpoint directory, hub id, GGUF file, or llama2.c model.bin"),
    dst: str = typer.Argument(..., help="output directory for the CARD checkpoint"),
    mask_token: Optional[str] = typer.Option(None, help="reuse this existing token as the mask token"),
    dtype: str = typer.Option("auto", help="auto|float32|bfloat16|float16"),
    tokenizer: Optional[str] = typer.Option(None, help="SentencePiece .model of a llama2.c checkpoint"),
    gguf_file: Optional[str] = typer.Option(None, "--gguf-file", help="GGUF file inside the folder or hub repo SRC"),
    overwrite: bool = typer.Option(False, help="replace DST if it exists"),
    verify: bool = typer.Option(True, help="reload DST and compare its AR logits with the source"),
) -> None:
    """Convert a pretrained causal LM into a CARD checkpoint."""
    from card.quiet import quiet_progress_when_not_a_terminal

    quiet_progress_when_not_a_terminal()  # card-convert has no callback of its own
    from card.convert import convert

    r = convert(src, dst, mask_token=mask_token, dtype=dtype, overwrite=overwrite, verify=verify, tokenizer=tokenizer,
                gguf_file=gguf_file)
    if r.verified is None:
        verdict = "skipped (--no-verify)"
    else:
        verdict = f"passed: max |Δlogit| {r.max_abs_diff:.2e}, argmax identical"
    Console().print(summary_table(f"converted {r.src} -> {r.dst}", [
        ("architecture", f"{r.architecture} ({r.model_type}, {r.source_format}"
                         + (f" {r.quantization}" if r.quantization else "") + ")"),
        ("parameters", f"{r.params:,}"),
        ("dtype", r.dtype),
        ("mask token", f"{r.mask_token!r} id {r.mask_token_id} ({'new' if r.mask_token_added else 'existing'})"),
        ("vocab (rows)", f"{r.vocab_before} -> {r.vocab_after}"),
        ("tokenizer", f"{r.tokenizer_before} -> {r.tokenizer_after}"),
        ("verification", verdict),
        ("seconds", f"{r.seconds:.1f}"),
    ]))


app.command("convert")(user_errors(convert_command))
convert_app = typer.Typer(add_completion=False, help="Convert a pretrained causal LM into a CARD checkpoint.")
convert_app.command()(user_errors(convert_command))


# -------------------------------------------------------------------------------------------- generate
STEP_STYLES = ("bold cyan", "bold magenta")  # alternate per forward: tokens of one colour came from one forward


def generate_command(
    ckpt: str = typer.Argument(..., help="checkpoint directory (CARD, or plain AR for --decoding ar)"),
    prompt: str = typer.Argument(..., help="prompt text"),
    decoding: str = typer.Option("ar", help="ar|parallel|lossless|budget, or parallel@T, budget@F"),
    budget: Optional[float] = typer.Option(None, help="budget: forwards per token in (0, 1], planned over the "
                                           "checkpoint's slot profile"),
    threshold: Optional[float] = typer.Option(None, help="parallel: confidence threshold (default: checkpoint's)"),
    block_size: str = typer.Option("auto", help="parallel/lossless: 'auto' (masks per forward chosen from the "
                                   "measured cost, up to the checkpoint's K) or a fixed K"),
    drafts: Optional[str] = typer.Option(None, help="lossless: mask|ngram|mask+ngram (default: mask+ngram with "
                                         "auto, mask with a fixed K)"),
    max_new_tokens: int = typer.Option(128, help="generate at most this many tokens"),
    temperature: float = typer.Option(0.0, help="0 = greedy (ar, parallel)"),
    top_p: float = typer.Option(1.0, help="nucleus sampling mass (with --temperature > 0)"),
    seed: int = typer.Option(0, help="sampling seed"),
    dtype: str = typer.Option("auto", help="auto|float32|bfloat16|float16"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object instead of streaming text"),
    chat: bool = typer.Option(False, "--chat", help="send PROMPT as a user message through the chat template; "
                              "stop at its end-of-turn token"),
    system: Optional[str] = typer.Option(None, "--system", help="with --chat: a system message before PROMPT"),
) -> None:
    """Generate text, streaming each forward's committed tokens (alternating colours), then a stats line."""
    import json

    from card.checkpoint import check_checkpoint_path, load_checkpoint
    from card.eval.decoding import DecodingSpec, check_max_new_tokens, generate

    check_max_new_tokens(max_new_tokens)
    spec = DecodingSpec.parse(decoding, threshold=threshold, block_size=block_size, drafts=drafts, budget=budget,
                              temperature=temperature if temperature else None, top_p=top_p, seed=seed)
    if system is not None and not chat:
        raise CardError("--system needs --chat")
    meta = check_checkpoint_path(ckpt, require_card=spec.mode != "ar")
    spec = spec.resolve(meta)
    ck = load_checkpoint(ckpt, dtype=dtype)
    query, call = prompt, {}
    if chat:
        from card.chat import chat_prompt_ids, end_of_turn_ids

        query = chat_prompt_ids(ck.tokenizer, prompt, system)
        call["eos_token_ids"] = end_of_turn_ids(ck.tokenizer)
    out = Console(highlight=False, soft_wrap=True)
    on_step = None
    if not json_output:
        # Decode prompt + generated tokens and print what each forward adds: decoding the new tokens alone
        # would lose SentencePiece's leading spaces and split multi-byte characters.
        ids = list(query) if chat else list(ck.tokenizer(prompt)["input_ids"])
        shown = [ck.tokenizer.decode(ids, skip_special_tokens=True)]
        forwards = [0]

        def echo_prompt() -> None:  # a chat prompt is shown as rendered by the template, dimmed
            out.print(shown[0] if chat else prompt, style="dim" if chat else None, end="")

        def on_step(_index: int, new: list[int]) -> None:
            if forwards[0] == 0:  # only once decoding has started: a refused prompt is not echoed first
                echo_prompt()
            ids.extend(new)
            text = ck.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")  # wait for whole characters
            if text.startswith(shown[0]) and len(text) > len(shown[0]):
                out.print(text[len(shown[0]):], style=STEP_STYLES[forwards[0] % 2], end="")
                shown[0] = text
            forwards[0] += 1

    r = generate(ck, [query], spec, max_new_tokens=max_new_tokens, on_step=on_step, **call)[0]
    if json_output:
        keys = ("text", "token_ids", "new_tokens", "forwards", "tokens_per_forward", "seconds", "tokens_per_second",
                "finish_reason", "settings", "prompt_ids", "steps", "lookahead")
        d = r.to_dict()
        typer.echo(json.dumps({"prompt": prompt, **({"chat": True, "system": system} if chat else {}),
                               **{k: d[k] for k in keys}}))
        return
    if forwards[0] == 0:
        echo_prompt()
    out.print()
    look = r.lookahead
    if "cost" in look:
        c = look["cost"]
        out.print(f"[dim]lookahead {look['policy']}: {look['masks_per_forward']:.2f} masks and "
                  f"{look['drafts'] / max(1, r.forwards):.2f} drafts per forward (up to K={look['max']}, prior: "
                  f"{look['prior']}); break-even: {look['break_even_1']:.2f} tokens/forward for 1 extra token, "
                  f"{c['break_even']:.2f} for {c['break_even_k']} (c(1, q) measured on {c['device']}, "
                  f"{c['threads']} thread(s))[/]")
    out.print(f"[dim]{r.new_tokens} tokens in {r.forwards} forwards ({r.tokens_per_forward:.2f} tokens/forward), "
              f"{r.seconds:.2f} s, {r.tokens_per_second:.1f} tokens/s, {spec.text}, finish: {r.finish_reason}[/]")


app.command("generate")(user_errors(generate_command))


# ----------------------------------------------------------------------------------------------- adapt
def adapt_command(
    recipe: str = typer.Argument(..., help="YAML recipe (see recipes/)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a recipe key: key.sub=value (repeatable)"),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", help="run directory (default: the recipe's output_dir)"),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", help="processes on this node; > 1 launches torchrun"),
    nnodes: int = typer.Option(1, "--nnodes", help="number of nodes (run the same command on each)"),
    node_rank: int = typer.Option(0, "--node-rank", help="this node's rank (static rendezvous)"),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="address of node 0 (static rendezvous)"),
    master_port: Optional[int] = typer.Option(None, "--master-port", help="port on node 0 (default 29500 multi-node)"),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT for c10d rendezvous instead"),
    prepare_only: bool = typer.Option(False, "--prepare-only", help="check, cache the data, write the run dir; no training"),
) -> None:
    """Adapt a CARD checkpoint under the CARD objective (DeepSpeed ZeRO); resumes automatically."""
    from card.adapt import adapt

    r = adapt(recipe, overrides=set_ or (), output_dir=output_dir, nproc_per_node=nproc_per_node, nnodes=nnodes,
              node_rank=node_rank, master_addr=master_addr, master_port=master_port, rdzv_endpoint=rdzv_endpoint,
              prepare_only=prepare_only)
    if r.final.exists() and not prepare_only:
        typer.echo(f"final checkpoint: {r.final}\nmetrics: {r.output_dir / 'metrics.jsonl'}")


app.command("adapt")(user_errors(adapt_command))


# ------------------------------------------------------------------------------------------------ eval
def eval_command(
    ckpt: str = typer.Argument(..., help="CARD checkpoint directory (a plain one allows only --modes ar)"),
    tasks: str = typer.Option(..., help="comma-separated lm-eval tasks, e.g. card_piqa,card_gsm8k,card_tinystories_ppl"),
    include_path: Optional[list[str]] = typer.Option(None, "--include-path", help="folder of extra task YAMLs (repeatable)"),
    modes: str = typer.Option("ar,parallel@0.9,parallel@0.7,lossless", help="comma-separated: ar, lossless, parallel "
                              "(checkpoint's threshold), parallel@T (T in (0, 1]), budget@F (F forwards per "
                              "token, needs a slot profile)"),
    baseline: Optional[str] = typer.Option(None, help="unconverted source checkpoint, evaluated in AR mode too"),
    limit: Optional[float] = typer.Option(None, help="documents per task (or a fraction < 1)"),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="few-shot examples (default: the task's)"),
    batch_size: int = typer.Option(8, help="requests per batch (likelihoods and generation)"),
    seed: int = typer.Option(1234, help="seed for Python, numpy, torch, few-shot sampling and sampled decoding"),
    block_size: str = typer.Option("auto", help="parallel/lossless: 'auto' (masks per forward chosen from the measured "
                                   "cost, up to the checkpoint's K) or a fixed K"),
    out: Optional[str] = typer.Option(None, help="write results.json, report.md, report.html, samples.jsonl here"),
    overwrite: bool = typer.Option(False, help="replace OUT if it exists"),
    dtype: str = typer.Option("auto", help="auto|float32|bfloat16|float16"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    apply_chat_template: bool = typer.Option(False, "--apply-chat-template",
                                             help="lm-eval's: render prompts with the tokenizer's chat template"),
    fewshot_as_multiturn: bool = typer.Option(False, "--fewshot-as-multiturn",
                                              help="lm-eval's: few-shot examples as earlier chat turns"),
) -> None:
    """Evaluate a CARD checkpoint with lm-eval in several decoding modes and write a comparison report."""
    import contextlib

    from card.eval.report import print_results_table
    from card.eval.runner import command_line, evaluate
    from card.io import atomic_directory

    if limit is not None and limit == int(limit):
        limit = int(limit)
    claim = contextlib.nullcontext(None) if out is None else atomic_directory(
        out, overwrite, inputs=[ckpt, baseline, *(include_path or [])], label="--out")
    with claim as tmp:  # OUT appears whole, after the last score, or not at all
        results = evaluate(ckpt, tasks, modes, include_path=include_path, baseline=baseline, limit=limit,
                           num_fewshot=num_fewshot, batch_size=batch_size, seed=seed, block_size=block_size, out=tmp,
                           dtype=dtype, device=device, command=command_line(),
                           apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn)
    print_results_table(results, f"card eval {ckpt}")
    if out:
        typer.echo(f"wrote {out}/results.json, report.md, report.html, samples.jsonl")


app.command("eval")(user_errors(eval_command))


def report_command(
    dirs: list[str] = typer.Argument(..., help="folders (or results.json files) written by card eval"),
    out: str = typer.Option(..., help="folder for the merged results.json, report.md and report.html"),
    overwrite: bool = typer.Option(False, help="replace OUT if it exists"),
) -> None:
    """Merge earlier card eval results into one report."""
    from pathlib import Path

    from card.eval.report import load_results, merge_results, print_results_table, write_report
    from card.io import atomic_directory, check_destination

    inputs = [d if Path(d).is_dir() else Path(d).parent for d in dirs]
    check_destination(out, overwrite, inputs=inputs, label="--out")  # before reading anything
    docs = [load_results(d) for d in dirs]
    names = [Path(d).name for d in dirs]
    if len(set(names)) < len(names):
        names = list(dirs)
    merged = merge_results(docs, names)
    with atomic_directory(out, overwrite, inputs=inputs, label="--out") as tmp:
        write_report(merged, tmp)
    print_results_table(merged, f"card report ({len(docs)} result sets)")
    typer.echo(f"wrote {out}/results.json, report.md, report.html")


app.command("report")(user_errors(report_command))


def lm_eval_command(ctx: typer.Context) -> None:
    """Run lm-eval's own CLI with the `card` model registered: card lm-eval --model card --model_args ... --tasks ..."""
    import card.eval.lm_model  # noqa: F401  (registers the `card` model)
    from lm_eval.__main__ import cli_evaluate

    from card.eval.runner import BUNDLED_TASKS

    args = list(ctx.args)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(BUNDLED_TASKS)]  # the bundled card_* tasks, as `card eval` finds them
    argv = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = argv


app.command("lm-eval", add_help_option=False,
            context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(user_errors(lm_eval_command))


# --------------------------------------------------------------------------------------------- profile
def profile_command(
    ckpt: str = typer.Argument(..., help="CARD checkpoint directory (a fresh conversion too)"),
    data: str = typer.Option(..., help="UTF-8 text file to measure on (held-out text)"),
    write: bool = typer.Option(False, help="store the profile in the checkpoint's card metadata (config.json)"),
    block_size: Optional[int] = typer.Option(None, help="masks per forward K (default: the checkpoint's block size)"),
    buckets: str = typer.Option("0,16,64,256", help="prefix-length bucket edges, comma-separated, starting at 0"),
    seq_len: Optional[int] = typer.Option(None, help="row length in tokens (default: min(512, positions - K))"),
    max_rows: int = typer.Option(64, help="measure at most this many rows of the text"),
) -> None:
    """Measure per-slot loss (bits) and greedy accuracy by prefix length: slot 1 is AR, slot j+1 is mask j."""
    from card.profile import profile_checkpoint

    edges = [int(x) for x in buckets.split(",") if x.strip()]
    p = profile_checkpoint(ckpt, data, K=block_size, bucket_edges=edges, seq_len=seq_len, max_rows=max_rows, write=write)
    table = Table(title=f"slot profile of {ckpt}: {p['measured_by']}, {p['tokens']:,} tokens", title_justify="left")
    table.add_column("slot", justify="right")
    e = p["bucket_edges"]
    names = [f"{a}-{b - 1}" for a, b in zip(e, e[1:])] + [f"{e[-1]}+"]
    for n in names:
        table.add_column(f"prefix {n}\nbits / acc", justify="right")
    for j in range(p["slots"]):
        cells = ["-" if l is None else f"{l:.2f} / {a:.2f}" for l, a in zip(p["loss_bits"][j], p["accuracy"][j])]
        table.add_row(f"{j + 1}{' (AR)' if j == 0 else ''}", *cells)
    Console(highlight=False).print(table)
    if write:
        typer.echo(f"wrote the profile into {ckpt}/config.json (card.slot_profile)")


app.command("profile")(user_errors(profile_command))


# ------------------------------------------------------------------------------------ compress / decompress
def _token_bar(desc: str):
    """A tqdm bar over tokens, created at the first report (the total is known only then); silent when
    stderr is not a terminal."""
    from tqdm.auto import tqdm

    state: dict = {}

    def tick(k: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=desc, unit="tok", disable=None, file=sys.stderr, leave=False)
        state["bar"].update(k)

    return tick, lambda: state["bar"].close() if "bar" in state else None


def compress_command(
    ckpt: str = typer.Argument(..., help="CARD checkpoint directory (decompression needs the same one)"),
    src: str = typer.Argument(..., help="file to compress (any bytes)"),
    dst: str = typer.Argument(..., help="compressed output file"),
    budget: float = typer.Option(1.0, help="forwards per token for decompression: 1 = exact AR, 0.5 = half as "
                                 "many (ARDM groups planned over the checkpoint's slot profile)"),
    window: Optional[int] = typer.Option(None, help="tokens per window; each window restarts from BOS "
                                         "(default: min(1024, positions - 16))"),
    batch: int = typer.Option(64, help="windows coded side by side in one forward"),
    overwrite: bool = typer.Option(False, help="replace DST if it exists"),
) -> None:
    """Compress a file losslessly with a CARD model and a range coder."""
    from card.ardm.compress import compress_file

    tick, close = _token_bar("compress")
    try:
        stats = compress_file(ckpt, src, dst, budget=budget, window=window, batch=batch, overwrite=overwrite,
                              on_forward=tick)
    finally:
        close()
    typer.echo(stats.summary("compressed"))


def decompress_command(
    ckpt: str = typer.Argument(..., help="the CARD checkpoint the file was compressed with"),
    src: str = typer.Argument(..., help="file written by card compress"),
    dst: str = typer.Argument(..., help="output file (written only if the checksum matches)"),
    overwrite: bool = typer.Option(False, help="replace DST if it exists"),
) -> None:
    """Decompress a file written by card compress (same checkpoint, same kind of machine)."""
    from card.ardm.compress import decompress_file

    tick, close = _token_bar("decompress")
    try:
        stats = decompress_file(ckpt, src, dst, overwrite=overwrite, on_forward=tick)
    finally:
        close()
    typer.echo(stats.summary("decompressed"))


app.command("compress")(user_errors(compress_command))
app.command("decompress")(user_errors(decompress_command))


# ----------------------------------------------------------------------------------------- fetch-model
def fetch_model_command(
    name: str = typer.Argument(..., help="model to fetch, e.g. smollm2-135m-instruct"),
) -> None:
    """Download a real model file (sha256-checked) into the model cache ($CARD_CACHE_DIR/models)."""
    from card.models import fetch_model

    path, downloaded = fetch_model(name)
    typer.echo(f"{'fetched' if downloaded else 'already present'}: {path}")


app.command("fetch-model")(user_errors(fetch_model_command))


# ------------------------------------------------------------------------------------------------ demo
def demo_command(
    out: str = typer.Option("runs/demo", help="run folder (data, checkpoints, report)"),
    quick: bool = typer.Option(False, help="a small, fast version (CI): fewer steps and held-out problems"),
    overwrite: bool = typer.Option(False, help="replace OUT if it exists"),
    seed: int = typer.Option(0, help="seed for the tasks, the model and the training order"),
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", help="DeepSpeed processes (default: 2 on CPU)"),
    model: Optional[str] = typer.Option(None, help="a real checkpoint (dir or hub id) instead of the embedded model"),
    data: Optional[str] = typer.Option(None, help="with --model: text corpus (file, folder or hub id) to adapt on"),
    tasks: Optional[str] = typer.Option(None, help=f"with --model: lm-eval tasks (default {DEFAULT_REAL_TASKS})"),
    set_ar: Optional[list[str]] = typer.Option(None, "--set-ar", help="override a key of the AR pre-training recipe"),
    set_card: Optional[list[str]] = typer.Option(None, "--set-card", help="override a key of the CARD recipe"),
) -> None:
    """Run the whole pipeline end to end (pre-train, convert, adapt, evaluate, report) and print the table."""
    from card.demo.pipeline import print_summary, run_demo

    result = run_demo(out, quick=quick, overwrite=overwrite, seed=seed, nproc_per_node=nproc_per_node, model=model,
                      data=data, tasks=tasks, ar_overrides=set_ar or (), card_overrides=set_card or (), console=console)
    print_summary(result, Console(highlight=False))


app.command("demo")(user_errors(demo_command))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

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

from card.errors import CardError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="CARD toolkit: convert, adapt and evaluate causal LMs.")
console = Console(stderr=True)


@app.callback()
def main() -> None:
    """CARD toolkit: convert, adapt and evaluate causal LMs."""


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
    src: str = typer.Argument(..., help="HF checkpoint directory, hub id, or llama2.c model.bin"),
    dst: str = typer.Argument(..., help="output directory for the CARD checkpoint"),
    mask_token: Optional[str] = typer.Option(None, help="reuse this existing token as the mask token"),
    dtype: str = typer.Option("auto", help="auto|float32|bfloat16|float16"),
    tokenizer: Optional[str] = typer.Option(None, help="SentencePiece .model of a llama2.c checkpoint"),
    overwrite: bool = typer.Option(False, help="replace DST if it exists"),
    verify: bool = typer.Option(True, help="reload DST and compare its AR logits with the source"),
) -> None:
    """Convert a pretrained causal LM into a CARD checkpoint."""
    from card.convert import convert

    r = convert(src, dst, mask_token=mask_token, dtype=dtype, overwrite=overwrite, verify=verify, tokenizer=tokenizer)
    if r.verified is None:
        verdict = "skipped (--no-verify)"
    else:
        verdict = f"passed: max |Δlogit| {r.max_abs_diff:.2e}, argmax identical"
    Console().print(summary_table(f"converted {r.src} -> {r.dst}", [
        ("architecture", f"{r.architecture} ({r.model_type}, {r.source_format})"),
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

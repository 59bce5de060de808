"""Comparison reports of a results document (``card.eval.results.Results``): ``report.md``, a
self-contained ``report.html``, and the same table in the terminal.

A results document holds one entry per *run* (a model in a decoding mode: the unconverted baseline in AR
mode, the CARD model in AR / parallel@threshold / lossless), each with lm-eval's scores and the decode
totals, plus everything needed to re-run it (model checksums, settings, seeds, versions, hardware). The
table's columns are declared once (``SPEED_COLUMNS``, with their meanings, which the notes print).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from card.errors import CardError
from card.eval.results import Results, Run
from card.io import atomic_write_text

RESULTS = "results.json"
REUSED_MARK = "†"  # a score computed in another run of the same model (see ``notes``)
# Preferred headline metric per task, in order; the first present is shown in tables and plots.
METRIC_PREFERENCE = ("bleu", "exact_match", "acc", "acc_norm", "word_perplexity", "bits_per_byte")


def primary_metric(scores: dict[str, Any]) -> str | None:
    keys = [k for k in scores if "," in k and not k.split(",")[0].endswith("_stderr")]
    for name in METRIC_PREFERENCE:
        for k in keys:
            if k.split(",")[0] == name:
                return k
    return keys[0] if keys else None


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


# Columns after the score columns: what each one shows, declared once (the tables and the notes read it).
@dataclass(frozen=True)
class Column:
    header: str
    meaning: str
    cell: Callable[[Run], str]


def _speedup(r: Run) -> str:
    x = r.decode.speedup_vs_ar
    return _fmt(x, 2) + ("x" if x else "")


SPEED_COLUMNS = (
    Column("tok/fwd", "generated tokens per forward pass over the generation tasks (per request, so independent "
           "of the batch size)", lambda r: _fmt(r.decode.tokens_per_forward, 2)),
    Column("tok/s", "generated tokens per wall-clock second", lambda r: _fmt(r.decode.tokens_per_second, 1)),
    Column("speedup", "tok/s over the CARD model's AR run in the same invocation", _speedup),
    Column("same output as AR", "fraction of generation requests whose output equals that AR run's exactly "
           "(for the baseline: 1.0 when the CARD model is its unadapted conversion, a check that conversion keeps "
           "the AR model)", lambda r: _fmt(r.same_output_as_ar, 3)),
)


def task_metric_columns(results: Results) -> list[tuple[str, str]]:
    """(task, metric key) pairs shown as table columns, in first-seen order."""
    cols: list[tuple[str, str]] = []
    for run in results.runs:
        for task, scores in run.scores.items():
            m = primary_metric(scores)
            if m and (task, m) not in cols:
                cols.append((task, m))
    return cols


@dataclass
class ComparisonTable:
    """The comparison table (one row per run): the label, one column per (task, metric), the speed columns."""

    scores: list[tuple[str, str]]  # (task, metric name) of each score column
    speed: tuple[Column, ...]
    rows: list[list[str]]

    @property
    def header(self) -> list[str]:
        return ["run"] + [f"{t} {m}" for t, m in self.scores] + [c.header for c in self.speed]


def _score_cell(run: Run, task: str, metric: str) -> str:
    s = run.scores.get(task, {})
    v, se = s.get(metric), s.get(metric.replace(",", "_stderr,", 1))
    return (_fmt(v) + (f" ± {_fmt(se)}" if isinstance(se, float) and not math.isnan(se) else "")
            + (REUSED_MARK if task in run.scores_from else ""))


def comparison_table(results: Results) -> ComparisonTable:
    cols = task_metric_columns(results)
    rows = [[run.label, *(_score_cell(run, t, m) for t, m in cols), *(c.cell(run) for c in SPEED_COLUMNS)]
            for run in results.runs]
    return ComparisonTable([(t, m.split(",")[0]) for t, m in cols], SPEED_COLUMNS, rows)


def notes(results: Results) -> list[str]:
    """Footnotes explaining the table's columns and marks."""
    out = ["; ".join(f"{c.header}: {c.meaning}" for c in SPEED_COLUMNS) + "."]
    if any(r.scores_from for r in results.runs):
        out.append(f"{REUSED_MARK} Tasks that do not generate (loglikelihood, multiple choice, perplexity) do not "
                   "depend on the decoding mode: they were scored once per model, in its first mode, and reused.")
    return out


def _settings_json(results: Results) -> str:
    return json.dumps({"settings": results.settings, "environment": results.environment}, indent=2)


def markdown(results: Results) -> str:
    table = comparison_table(results)
    header = table.header
    out = ["# CARD evaluation report", ""]
    m = results.model
    out.append(f"Model: `{m.path}` (sha256 `{str(m.sha256 or '')[:16]}…`, {m.params:,} params)"
               if isinstance(m.params, int) else f"Model: `{m.path}`")
    if results.baseline:
        out.append(f"Baseline (unconverted, AR): `{results.baseline.path}`")
    out += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in table.rows]
    for note in notes(results):
        out += ["", note]
    out += ["", "## Settings", "", "```json", _settings_json(results), "```", ""]
    return "\n".join(out)


def print_results_table(results: Results, title: str, console=None) -> None:
    """The comparison table and its footnotes in the terminal (stdout unless ``console`` is given)."""
    from rich.console import Console
    from rich.table import Table

    table = comparison_table(results)
    out = console or Console(highlight=False)
    if console is None and not out.is_terminal:  # piped or captured: the whole table, not squeezed into 80 columns
        out = Console(highlight=False, width=200)
    t = Table(title=title, title_justify="left")
    t.add_column("run", no_wrap=True)
    for task, metric in table.scores:  # the task over its metric
        t.add_column(f"{task}\n{metric}", justify="right")
    for c in table.speed:
        t.add_column(c.header, justify="right")
    for row in table.rows:
        t.add_row(*row)
    out.print(t)
    for note in notes(results):
        out.print(note, style="dim")


def _plot_png(results: Results, x_key: str, x_label: str) -> str | None:
    """Each generation task's score against its speed measure (one panel per task, one point per run); base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def speed(run: Run, task: str):
        totals = run.decode.tasks.get(task)
        return None if totals is None else getattr(totals, x_key)

    panels = []
    for t, m in task_metric_columns(results):
        pts: dict[tuple[float, float], list[str]] = {}  # runs at the same point share one label
        for r in results.runs:
            x, y = speed(r, t), r.scores.get(t, {}).get(m)
            if isinstance(x, (int, float)) and isinstance(y, (int, float)):
                pts.setdefault((x, y), []).append(r.label)
        if pts:
            panels.append((t, m, pts))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=110, squeeze=False)
    for ax, (t, m, pts) in zip(axes[0], panels):
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o")
        for (x, y), labels in pts.items():
            ax.annotate(", ".join(labels), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel(x_label)
        ax.set_ylabel(m.split(",")[0])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


HTML_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
              ".table{overflow-x:auto}table{border-collapse:collapse}"
              "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
              "img{max-width:100%;height:auto}"  # plots scale down to the page width
              "pre{background:#f6f6f6;padding:1em;overflow:auto}summary{cursor:pointer;font-weight:bold}")


def html_report(results: Results) -> str:
    table = comparison_table(results)
    plots = [(_plot_png(results, "tokens_per_forward", "generated tokens per forward"), "Quality vs tokens per forward"),
             (_plot_png(results, "tokens_per_second", "generated tokens per second"), "Quality vs tokens per second")]
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>CARD evaluation report</title>",
             f"<style>{HTML_STYLE}</style></head><body>",
             "<h1>CARD evaluation report</h1>",
             f"<p>Model: <code>{esc(str(results.model.path))}</code></p>",
             "<div class='table'><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in table.header) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in table.rows]
    parts.append("</table></div>")
    parts += [f"<p><small>{esc(note)}</small></p>" for note in notes(results)]
    for png, title in plots:
        if png:
            parts.append(f"<h2>{esc(title)}</h2><img alt='{esc(title)}' src='data:image/png;base64,{png}'>")
    # Last and collapsed: a page of settings must not stand between the reader and the results.
    parts.append("<details><summary>Settings and environment</summary><pre>" + esc(_settings_json(results))
                 + "</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(results: Results, out_dir: str | Path) -> Path:
    """Write results.json, report.md and report.html into ``out_dir`` (each atomically)."""
    out = Path(out_dir)
    atomic_write_text(out / RESULTS, json.dumps(results.to_dict(), indent=2, default=str))
    atomic_write_text(out / "report.md", markdown(results))
    atomic_write_text(out / "report.html", html_report(results))
    return out


def load_results(path: str | Path) -> Results:
    """A ``results.json`` (or the folder holding one) written by ``card eval`` or ``card report``."""
    p = Path(path)
    f = p / RESULTS if p.is_dir() else p
    if not f.exists():
        raise CardError(f"no {RESULTS} in {path}")
    try:
        doc = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CardError(f"{f} is not valid JSON: {e}") from None
    return Results.from_dict(doc, str(f))


def merge_results(docs: list[Results], names: list[str]) -> Results:
    """One document with every run; labels are prefixed by their source's name when they collide."""
    if not docs:
        raise CardError("nothing to merge")
    labels = [r.label for d in docs for r in d.runs]
    clash = len(labels) != len(set(labels))
    runs = [dataclasses.replace(r, label=f"{name}:{r.label}" if clash else r.label)
            for d, name in zip(docs, names, strict=True) for r in d.runs]
    return dataclasses.replace(docs[0], runs=runs, merged_from=list(names))

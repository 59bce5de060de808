"""Comparison reports of a results document (``card.eval.results.Results``): ``report.md``, a
self-contained ``report.html``, and the same table in the terminal.

A results document holds one entry per *run* (a model in a decoding mode: the unconverted baseline in AR
mode, the CARD model in AR / parallel@threshold / lossless), each with lm-eval's scores and the decode
totals, plus everything needed to re-run it (model checksums, settings, seeds, versions, hardware). The
table's columns are declared once (``SPEED_COLUMNS``, with their meanings, which the notes print).

When both ``budget@F`` (a fixed plan of tokens per forward) and ``parallel@T`` (a confidence threshold) runs are
present, both reports compare them at matching forwards (``budget_curves``, ``budget_matches``): a
quality-vs-forwards plot in report.html and a table of nearest pairs in report.md.
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
    out += budget_markdown(results)
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
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=110, squeeze=False)
    for ax, (t, m, pts) in zip(axes[0], panels):
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o")
        for (x, y), labels in pts.items():
            ax.annotate(", ".join(labels), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel(x_label)
        ax.set_ylabel(m.split(",")[0])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _figure_png(fig)


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (reports never open a window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_png(fig) -> str:
    """``fig`` as a base64 PNG, the figure closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


# ------------------------------------------------------------------------------------------ budget vs threshold
# Quality against forwards for the two ways of committing several tokens per forward: a fixed plan
# (``budget@F``, planned before decoding from the slot profile) and a confidence threshold (``parallel@T``).
# The CARD model's AR run is the common point at one forward per token. Families are read from each run's
# recorded mode (``Run.mode``), never from its label.
CURVE_TITLE = "Quality vs forwards: fixed budget plan vs confidence threshold"
CURVE_FAMILIES = ("budget", "parallel")  # the compared families, in legend order
LOWER_IS_BETTER = ("word_perplexity", "byte_perplexity", "bits_per_byte")
MATCHING_SPEED = 1.1  # tokens per forward within this ratio count as the same number of forwards


@dataclass(frozen=True)
class CurvePoint:
    """One run on one task: its label, family ("ar", "budget" or "parallel"), speed and score."""

    label: str
    family: str
    tokens_per_forward: float
    score: float

    @property
    def forwards_per_token(self) -> float:
        return 1.0 / self.tokens_per_forward


@dataclass(frozen=True)
class TaskCurve:
    """One generation task's curve: the AR point and each family's points, sorted by forwards per token."""

    task: str
    metric: str  # lm-eval's "metric,filter" key
    higher_is_better: bool
    ar: CurvePoint | None
    families: dict[str, list[CurvePoint]]

    @property
    def metric_name(self) -> str:
        return self.metric.split(",")[0]


def _family(run: Run) -> str | None:
    if run.model != "card":  # the unconverted baseline is another model
        return None
    return run.mode if run.mode in ("ar", *CURVE_FAMILIES) else None


def _curve_point(run: Run, task: str, metric: str) -> CurvePoint | None:
    family, totals = _family(run), run.decode.tasks.get(task)
    tpf, score = (totals.tokens_per_forward if totals else None), run.scores.get(task, {}).get(metric)
    if family is None or not isinstance(tpf, (int, float)) or tpf <= 0 or not isinstance(score, (int, float)):
        return None
    return CurvePoint(run.label, family, float(tpf), float(score))


def _higher_is_better(results: Results, task: str, metric: str) -> bool:
    name = metric.split(",")[0]
    recorded = results.lm_eval.get("higher_is_better", {}).get(task, {}).get(name)
    return bool(recorded) if isinstance(recorded, bool) else name not in LOWER_IS_BETTER


def budget_curves(results: Results) -> list[TaskCurve]:
    """Per generation task, the AR, budget and parallel points; empty unless both families were run.

    A task counts when its runs have decode totals (tasks that only score likelihoods have none).
    """
    curves = []
    for task, metric in task_metric_columns(results):
        points = [p for r in results.runs if (p := _curve_point(r, task, metric)) is not None]
        families = {f: sorted((p for p in points if p.family == f), key=lambda p: p.forwards_per_token)
                    for f in CURVE_FAMILIES}
        if all(families.values()):
            ar = next((p for p in points if p.family == "ar"), None)
            curves.append(TaskCurve(task, metric, _higher_is_better(results, task, metric), ar, families))
    return curves


@dataclass(frozen=True)
class Match:
    """A budget run and the parallel run nearest to it in tokens per forward (ratio-wise), on one task."""

    task: str
    metric: str
    budget: CurvePoint
    parallel: CurvePoint
    better: str  # "budget", "parallel", "tie" or "neither" (see ``_better``)


def _nearest(point: CurvePoint, others: list[CurvePoint]) -> CurvePoint:
    return min(others, key=lambda o: abs(math.log(o.tokens_per_forward / point.tokens_per_forward)))


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _better(curve: TaskCurve, b: CurvePoint, p: CurvePoint) -> str:
    """The run that scores at least as well with at most as many forwards (tokens per forward within
    ``MATCHING_SPEED`` of each other count as equal); "tie" when both match, "neither" when one scores better
    and the other needs fewer forwards."""
    quality = _sign(b.score - p.score) * (1 if curve.higher_is_better else -1)  # > 0: budget scores better
    ratio = b.tokens_per_forward / p.tokens_per_forward
    speed = 0 if 1 / MATCHING_SPEED <= ratio <= MATCHING_SPEED else _sign(ratio - 1)  # > 0: budget is faster
    if quality == speed == 0:
        return "tie"
    if quality >= 0 and speed >= 0:
        return "budget"
    return "parallel" if quality <= 0 and speed <= 0 else "neither"


def budget_matches(curves: list[TaskCurve]) -> list[Match]:
    """For each task and budget run, the parallel run at the nearest tokens per forward, and which scores better."""
    out = []
    for c in curves:
        for b in c.families["budget"]:
            p = _nearest(b, c.families["parallel"])
            out.append(Match(c.task, c.metric_name, b, p, _better(c, b, p)))
    return out


def _match_line(m: Match) -> str:
    """``at 2.00 tok/fwd: budget@0.5 0.930 vs parallel@0.7 (2.10 tok/fwd) 0.950: parallel better``."""
    b, p = m.budget, m.parallel
    verdict = {"tie": "tie", "neither": "neither dominates"}.get(m.better, f"{m.better} better")
    return (f"at {b.tokens_per_forward:.2f} tok/fwd: {b.label} {_fmt(b.score)} vs {p.label} "
            f"({p.tokens_per_forward:.2f} tok/fwd) {_fmt(p.score)}: {verdict}")


def budget_markdown(results: Results) -> list[str]:
    """The report.md section comparing each budget run with the parallel run nearest in tokens per forward."""
    matches = budget_matches(budget_curves(results))
    if not matches:
        return []
    out = ["", "## Fixed budget plan vs confidence threshold", "",
           "Each budget run beside the parallel run nearest to it in tokens per forward (per task, the "
           "ratio of the two closest to 1); the CARD model's AR run is the common point at 1 token per forward. "
           f"better: the run that scores at least as well with at most as many forwards (tokens per forward "
           f"within {MATCHING_SPEED:g}x count as equal); neither: one scores better, the other needs fewer "
           "forwards.", "",
           "| task | metric | budget run | tok/fwd | score | nearest parallel run | tok/fwd | score | better |",
           "|---|---|---|---|---|---|---|---|---|"]
    for m in matches:
        b, p = m.budget, m.parallel
        out.append(f"| {m.task} | {m.metric} | {b.label} | {b.tokens_per_forward:.2f} | {_fmt(b.score)} | {p.label} "
                   f"| {p.tokens_per_forward:.2f} | {_fmt(p.score)} | {m.better} |")
    return out + [""] + [f"- {m.task}: {_match_line(m)}" for m in matches]


PLOT_MARGIN_X = 0.18  # the panels' x margin, a fraction of the data's range: room for the labels at the edges
PANEL_POINTS = 160  # a panel's plotting height in points (3 inches less title and axis labels)
CURVE_STYLE = {"budget": dict(fmt="s-", color="tab:blue", lw=2.2, zorder=2, label="budget@F (fixed plan)"),
               "parallel": dict(fmt="o--", color="tab:orange", lw=1.4, zorder=3,
                                label="parallel@T (confidence threshold)")}


@dataclass(frozen=True)
class CurveLabel:
    """A point's label: at (x, y) in forwards per token and score, moved by (dx, dy) points."""

    x: float
    y: float
    text: str
    dx: int  # < 0: the label ends at its point (right-aligned)
    dy: int


def curve_labels(c: TaskCurve, char_width: float = 0.03) -> list[CurveLabel]:
    """Where each point's label goes, so that labels do not overlap.

    Points at one position share a label; budget labels go below their points, the others above; a label that
    would run past the right edge ends at its point instead; a label that would overlap an earlier one on its
    side (``char_width``: a character's width as a fraction of the x range) moves one line further out. Labels
    of a merged document (``card report``) drop their source's name where the rest is unique.
    """
    points = ([c.ar] if c.ar else []) + [p for f in CURVE_FAMILIES for p in c.families[f]]
    short = {p.label: p.label.split(":", 1)[-1] for p in points}  # "K4:parallel@0.9 K=4" of a merged document
    if len(set(short.values())) < len(short):  # the source names are needed to tell the points apart
        short = {k: k for k in short}
    merged: dict[tuple[float, float], list[CurvePoint]] = {}
    for p in points:
        merged.setdefault((round(p.forwards_per_token, 4), p.score), []).append(p)
    xs, ys = [x for x, _ in merged], [y for _, y in merged]
    xspan, yspan = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float, float, int, int]] = []  # from, to (x fractions), y fraction, side, level
    out = []
    for (x, y), group in sorted(merged.items()):
        text = ", ".join(dict.fromkeys(short[p.label] for p in group))
        side = -1 if all(p.family == "budget" for p in group) else 1
        fx, fy, width = (x - min(xs)) / xspan, (y - min(ys)) / yspan, len(text) * char_width
        left = fx + width > 1 + PLOT_MARGIN_X and fx - width >= -PLOT_MARGIN_X  # past the right edge: end at it
        lo, hi = (fx - width, fx) if left else (fx, fx + width)
        level = 0
        while any(s == side and lv == level and abs(fy - gy) < 0.1 and lo < b and a < hi for a, b, gy, s, lv in placed):
            level += 1
        placed.append((lo, hi, fy, side, level))
        out.append(CurveLabel(x, y, text, -3 if left else 3, 4 + 8 * level if side > 0 else -10 - 8 * level))
    return out


def _draw_curve(ax, c: TaskCurve) -> None:
    """One panel: a line per family, each starting at the AR point; every point annotated with its label(s)."""
    for family in CURVE_FAMILIES:
        pts = sorted(([c.ar] if c.ar else []) + c.families[family], key=lambda p: p.forwards_per_token)
        style = dict(CURVE_STYLE[family])
        ax.plot([p.forwards_per_token for p in pts], [p.score for p in pts], style.pop("fmt"), ms=4, **style)
    if c.ar:
        ax.plot([c.ar.forwards_per_token], [c.ar.score], "k*", ms=10, zorder=4, label="ar (1 token per forward)")
    labels = curve_labels(c)
    for lb in labels:
        ax.annotate(lb.text, (lb.x, lb.y), textcoords="offset points", xytext=(lb.dx, lb.dy), fontsize=6,
                    ha="right" if lb.dx < 0 else "left").set_in_layout(False)
    room = min(0.4, (6 + max(abs(lb.dy) for lb in labels)) / PANEL_POINTS)  # the labels' share of the height
    ax.margins(x=PLOT_MARGIN_X, y=max(0.12, room / (1 - 2 * room)))  # a margin m leaves m / (1 + 2m) free
    ax.set_title(c.task, fontsize=9)
    ax.set_xlabel("forwards per generated token", fontsize=8)
    ax.set_ylabel(c.metric_name, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def budget_curve_png(results: Results, per_row: int = 3) -> str | None:
    """The quality-vs-forwards panels (one per generation task, ``per_row`` a row) as a base64 PNG; None if none."""
    curves = budget_curves(results)
    if not curves:
        return None
    rows, cols = math.ceil(len(curves) / per_row), min(per_row, len(curves))
    height = 3.0 * rows + 0.4  # inches; the last 0.4 hold the legend
    fig, axes = _pyplot().subplots(rows, cols, figsize=(3.6 * cols, height), dpi=110, squeeze=False)
    for ax, c in zip(axes.flat, curves):
        _draw_curve(ax, c)
    for ax in list(axes.flat)[len(curves):]:
        ax.set_visible(False)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.4 / height, 1, 1))
    return _figure_png(fig)


HTML_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
              ".table{overflow-x:auto}table{border-collapse:collapse}"
              "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
              "img{max-width:100%;height:auto}"  # plots scale down to the page width
              "pre{background:#f6f6f6;padding:1em;overflow:auto}summary{cursor:pointer;font-weight:bold}")


def html_report(results: Results) -> str:
    table = comparison_table(results)
    plots = [(_plot_png(results, "tokens_per_forward", "generated tokens per forward"), "Quality vs tokens per forward"),
             (_plot_png(results, "tokens_per_second", "generated tokens per second"), "Quality vs tokens per second"),
             (budget_curve_png(results), CURVE_TITLE)]
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
    parts += [f"<p><small>{esc(m.task)}: {esc(_match_line(m))}</small></p>"
              for m in budget_matches(budget_curves(results))]
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

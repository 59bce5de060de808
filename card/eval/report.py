"""Comparison reports: ``results.json`` -> ``report.md`` and a self-contained ``report.html``.

A results document holds one entry per *run* (a model in a decoding mode: the unconverted baseline in AR
mode, the CARD model in AR / parallel@threshold / lossless), each with lm-eval's scores and the decode
totals, plus everything needed to re-run it (model checksums, settings, seeds, versions, hardware).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from card.errors import CardError
from card.io import atomic_write_text

RESULTS = "results.json"
# Preferred headline metric per task, in order; the first present is shown in tables and plots.
REUSED_MARK = "†"  # a score computed in another run of the same model (see ``notes``)
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


def task_metric_columns(results: dict) -> list[tuple[str, str]]:
    """(task, metric key) pairs shown as table columns, in first-seen order."""
    cols: list[tuple[str, str]] = []
    for run in results["runs"]:
        for task, scores in run["scores"].items():
            m = primary_metric(scores)
            if m and (task, m) not in cols:
                cols.append((task, m))
    return cols


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (one row per run)."""
    cols = task_metric_columns(results)
    header = ["run"] + [f"{t} {m.split(',')[0]}" for t, m in cols] + ["tok/fwd", "tok/s", "speedup", "agree w/ AR"]
    rows = []
    for run in results["runs"]:
        d = run.get("decode") or {}
        cells = [run["label"]]
        for t, m in cols:
            s = run["scores"].get(t, {})
            v, se = s.get(m), s.get(m.replace(",", "_stderr,", 1))
            cells.append(_fmt(v) + (f" ± {_fmt(se)}" if isinstance(se, float) and not math.isnan(se) else "")
                         + (REUSED_MARK if t in run.get("scores_from", {}) else ""))
        agree = run.get("agreement_with_ar")
        cells += [_fmt(d.get("tokens_per_forward"), 2), _fmt(d.get("tokens_per_second"), 1),
                  _fmt(d.get("speedup_vs_ar"), 2) + ("x" if d.get("speedup_vs_ar") else ""),
                  _fmt(agree, 3) if agree is not None else "–"]
        rows.append(cells)
    return header, rows


def notes(results: dict) -> list[str]:
    """Footnotes explaining the table's columns and marks."""
    out = ["tok/fwd: generated tokens per forward pass over the generation tasks (per request, so independent "
           "of the batch size); tok/s: generated tokens per wall-clock second; speedup: tok/s over the CARD "
           "model's AR run in the same invocation; agree w/ AR: fraction of generation requests whose output "
           "equals that AR run's exactly (for the baseline: 1.0 when the CARD model is its unadapted "
           "conversion, a check that conversion keeps the AR model)."]
    if any(r.get("scores_from") for r in results["runs"]):
        out.append(f"{REUSED_MARK} Tasks that do not generate (loglikelihood, multiple choice, perplexity) do not "
                   "depend on the decoding mode: they were scored once per model, in its first mode, and reused.")
    return out


def markdown(results: dict) -> str:
    header, rows = table_rows(results)
    out = ["# CARD evaluation report", ""]
    m = results.get("model", {})
    out.append(f"Model: `{m.get('path')}` (sha256 `{str(m.get('sha256', ''))[:16]}…`, {m.get('params', '?'):,} params)"
               if isinstance(m.get("params"), int) else f"Model: `{m.get('path')}`")
    if results.get("baseline"):
        out.append(f"Baseline (unconverted, AR): `{results['baseline'].get('path')}`")
    out += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    for note in notes(results):
        out += ["", note]
    out += ["", "## Settings", "", "```json",
            json.dumps({"settings": results.get("settings"), "environment": results.get("environment")}, indent=2),
            "```", ""]
    return "\n".join(out)


def _plot_png(results: dict, x_key: str, x_label: str) -> str | None:
    """Each generation task's score against its speed measure (one panel per task, one point per run); base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def speed(run: dict, task: str):
        return ((run.get("decode") or {}).get("tasks", {}).get(task) or {}).get(x_key)

    panels = []
    for t, m in task_metric_columns(results):
        pts: dict[tuple[float, float], list[str]] = {}  # runs at the same point share one label
        for r in results["runs"]:
            x, y = speed(r, t), r["scores"].get(t, {}).get(m)
            if isinstance(x, (int, float)) and isinstance(y, (int, float)):
                pts.setdefault((x, y), []).append(r["label"])
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


def html_report(results: dict) -> str:
    header, rows = table_rows(results)
    plots = [(_plot_png(results, "tokens_per_forward", "generated tokens per forward"), "Quality vs tokens per forward"),
             (_plot_png(results, "tokens_per_second", "generated tokens per second"), "Quality vs tokens per second")]
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>CARD evaluation report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
             "pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>",
             "<h1>CARD evaluation report</h1>",
             f"<p>Model: <code>{esc(str(results.get('model', {}).get('path')))}</code></p>",
             "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows]
    parts.append("</table>")
    parts += [f"<p><small>{esc(note)}</small></p>" for note in notes(results)]
    for png, title in plots:
        if png:
            parts.append(f"<h2>{esc(title)}</h2><img alt='{esc(title)}' src='data:image/png;base64,{png}'>")
    parts.append("<h2>Settings</h2><pre>" + esc(json.dumps(
        {"settings": results.get("settings"), "environment": results.get("environment")}, indent=2)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(results: dict, out_dir: str | Path) -> Path:
    """Write results.json, report.md and report.html into ``out_dir`` (each atomically)."""
    out = Path(out_dir)
    atomic_write_text(out / RESULTS, json.dumps(results, indent=2, default=str))
    atomic_write_text(out / "report.md", markdown(results))
    atomic_write_text(out / "report.html", html_report(results))
    return out


def load_results(path: str | Path) -> dict:
    p = Path(path)
    f = p / RESULTS if p.is_dir() else p
    if not f.exists():
        raise CardError(f"no {RESULTS} in {path}")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CardError(f"{f} is not valid JSON: {e}") from None


def merge_results(docs: list[dict], names: list[str]) -> dict:
    """One document with every run; labels are prefixed by their source's name when they collide."""
    if not docs:
        raise CardError("nothing to merge")
    labels = [r["label"] for d in docs for r in d["runs"]]
    clash = len(labels) != len(set(labels))
    merged = {k: v for k, v in docs[0].items() if k != "runs"}
    merged["runs"] = [{**r, "label": f"{name}:{r['label']}" if clash else r["label"]}
                      for d, name in zip(docs, names, strict=True) for r in d["runs"]]
    merged["merged_from"] = names
    return merged

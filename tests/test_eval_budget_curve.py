"""The quality-vs-forwards comparison in card eval's reports (card.eval.report): budget@F runs (a fixed plan)
beside parallel@T runs (a confidence threshold), with the CARD model's AR run as the common point. Documents
are built as dicts shaped like ``evaluate``'s results.json and read with ``Results.from_dict``."""

from __future__ import annotations

import base64
import re

import pytest

from card.eval.report import (
    CURVE_TITLE,
    budget_curve_png,
    budget_curves,
    budget_matches,
    curve_labels,
    html_report,
    markdown,
    merge_results,
    write_report,
)
from card.eval.results import Results

# label -> (tokens per forward on t_gen, exact match on t_gen)
RUNS = {
    "ar": (1.0, 0.95),
    "parallel@0.9": (2.5, 0.95),
    "parallel@0.7": (3.2, 0.90),
    "parallel@0.5": (4.0, 0.80),
    "budget@1": (1.0, 0.95),
    "budget@0.5": (2.0, 0.93),
    "budget@0.33": (3.0, 0.91),
    "budget@0.25": (4.0, 0.70),
}


def _spec(label: str) -> dict:
    mode, _, value = label.partition("@")
    if mode == "parallel":
        return {"mode": mode, "threshold": float(value), "block_size": 8, "lookahead": "auto", "rule": "prefix"}
    return {"mode": mode, "budget": float(value)} if mode == "budget" else {"mode": mode}


def _totals(tpf: float) -> dict:
    return {"requests": 4, "generated_tokens": 40, "forwards": round(40 / tpf), "tokens_per_forward": tpf,
            "seconds": 0.5, "tokens_per_second": 80.0 * tpf}


def run_dict(label: str, tpf: float | None, score: float, model: str = "card") -> dict:
    """One run as ``evaluate`` writes it; ``tpf=None``: a run without generation (no decode totals)."""
    spec = _spec(label)
    scores = {"t_mc": {"acc,none": 0.3, "acc_stderr,none": 0.02}}
    decode: dict = {}
    if tpf is not None:
        scores["t_gen"] = {"exact_match,none": score, "exact_match_stderr,none": 0.01}
        decode = {**_totals(tpf), "speedup_vs_ar": tpf, "tasks": {"t_gen": _totals(tpf)}}
    return {"label": label, "model": model, "mode": spec["mode"], "threshold": spec.get("threshold"),
            "block_size": spec.get("block_size"), "decoding": spec, "scores": scores, "scores_from": {},
            "decode": decode, "same_output_as_ar": 1.0 if tpf is not None else None, "seconds": 1.0}


def document(labels=tuple(RUNS), baseline: bool = True, generation: bool = True) -> Results:
    speeds = {label: RUNS.get(label, (2.2, 0.92)) for label in labels}  # a label not in RUNS: 2.2 tok/fwd, 0.92
    runs = [run_dict(label, speeds[label][0] if generation else None, speeds[label][1]) for label in labels]
    if baseline:  # another model in AR mode: not a point of the CARD model's curve
        runs.insert(0, run_dict("baseline (AR)", 1.0, 0.5, model="baseline"))
    return Results.from_dict({"card_eval_version": 1, "model": {"path": "/m", "sha256": "ab" * 32, "params": 1000},
                              "settings": {"tasks": ["t_gen", "t_mc"]}, "runs": runs,
                              "lm_eval": {"higher_is_better": {"t_gen": {"exact_match": True}}}})


def test_the_curve_has_one_sorted_line_per_family_and_the_ar_point():
    (curve,) = budget_curves(document())  # t_mc has no decode totals: no curve
    assert (curve.task, curve.metric, curve.higher_is_better) == ("t_gen", "exact_match,none", True)
    assert curve.ar.label == "ar" and curve.ar.forwards_per_token == 1.0
    assert list(curve.families) == ["budget", "parallel"]
    budget, parallel = curve.families["budget"], curve.families["parallel"]
    assert [p.label for p in budget] == ["budget@0.25", "budget@0.33", "budget@0.5", "budget@1"]
    assert [p.label for p in parallel] == ["parallel@0.5", "parallel@0.7", "parallel@0.9"]
    assert [p.forwards_per_token for p in budget] == pytest.approx([0.25, 1 / 3, 0.5, 1.0])
    assert [p.forwards_per_token for p in parallel] == pytest.approx([0.25, 1 / 3.2, 0.4])
    assert [p.score for p in parallel] == [0.80, 0.90, 0.95]
    assert all(p.family == "budget" for p in budget) and all(p.family == "parallel" for p in parallel)


def test_the_family_comes_from_the_recorded_mode_not_the_label():
    d = document()
    d.runs[-1].label = "my plan"  # budget@0.25, relabelled (e.g. by card report's merge)
    curve = budget_curves(d)[0]
    assert "my plan" in [p.label for p in curve.families["budget"]]


def test_each_budget_run_is_paired_with_the_nearest_parallel_run():
    matches = budget_matches(budget_curves(document()))
    pairs = {m.budget.label: (m.parallel.label, m.better) for m in matches}
    assert pairs == {
        "budget@0.25": ("parallel@0.5", "parallel"),  # 4.0 vs 4.0 tok/fwd: 0.70 < 0.80
        "budget@0.33": ("parallel@0.7", "budget"),  # 3.0 vs 3.2 (within 10%: the same forwards): 0.91 > 0.90
        "budget@0.5": ("parallel@0.9", "parallel"),  # 2.0 vs 2.5: fewer forwards and 0.93 < 0.95
        "budget@1": ("parallel@0.9", "parallel"),  # 1.0 vs 2.5: the same score with fewer forwards
    }


def _verdicts(d: Results) -> dict[str, str]:
    return {m.budget.label: m.better for m in budget_matches(budget_curves(d))}


def _set_score(d: Results, label: str, score: float) -> None:
    d.run(label).scores["t_gen"]["exact_match,none"] = score


def test_a_tie_needs_the_same_score_at_matching_forwards_and_neither_is_a_trade_off():
    d = document()
    _set_score(d, "budget@0.25", 0.80)  # 4.0 tok/fwd like parallel@0.5, same score
    _set_score(d, "budget@0.5", 0.97)  # better than parallel@0.9 (0.95) but with more forwards (2.0 vs 2.5 tok/fwd)
    assert _verdicts(d)["budget@0.25"] == "tie" and _verdicts(d)["budget@0.5"] == "neither"
    assert "budget@0.5 0.970 vs parallel@0.9 (2.50 tok/fwd) 0.950: neither dominates" in markdown(d)


def test_lower_is_better_metrics_flip_the_verdict():
    d = document()
    d.lm_eval["higher_is_better"]["t_gen"]["exact_match"] = False
    assert _verdicts(d)["budget@0.25"] == "budget" and _verdicts(d)["budget@0.33"] == "parallel"


def test_report_md_has_the_comparison_table_and_lines():
    md = markdown(document())
    assert "## Fixed budget plan vs confidence threshold" in md
    assert "| t_gen | exact_match | budget@0.5 | 2.00 | 0.930 | parallel@0.9 | 2.50 | 0.950 | parallel |" in md
    assert "| t_gen | exact_match | budget@1 | 1.00 | 0.950 | parallel@0.9 | 2.50 | 0.950 | parallel |" in md
    assert "at 2.00 tok/fwd: budget@0.5 0.930 vs parallel@0.9 (2.50 tok/fwd) 0.950: parallel better" in md
    assert "at 3.00 tok/fwd: budget@0.33 0.910 vs parallel@0.7 (3.20 tok/fwd) 0.900: budget better" in md
    assert md.index("## Fixed budget plan") < md.index("## Settings")


def test_report_html_has_the_plot_and_it_is_a_png(tmp_path):
    page = html_report(document())
    assert f"<h2>{CURVE_TITLE}</h2><img" in page and page.count("<img") == 3
    assert page.index(CURVE_TITLE) < page.index("<details>")
    png = base64.b64decode(budget_curve_png(document()))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    write_report(document(), tmp_path)
    assert CURVE_TITLE in (tmp_path / "report.html").read_text()


def test_labels_share_a_position_and_step_aside_from_their_neighbours():
    d = document()
    for label in ("parallel@0.7", "parallel@0.5", "budget@0.33"):  # a flat curve, crowded at the left
        _set_score(d, label, 0.95)
    labels = {lb.text: lb for lb in curve_labels(budget_curves(d)[0])}
    ar = labels["ar, budget@1"]  # ar and budget@1 at one point: one label, above (not all budget)
    assert (ar.x, ar.dy) == (1.0, 4) and ar.dx < 0  # at the right edge: it ends at its point
    assert (labels["budget@0.25"].dy, labels["budget@0.25"].dx) == (-10, 3)  # budget below, alone at its height
    # parallel above, each one line higher than its overlapping left neighbour; budget below, likewise
    assert [labels[k].dy for k in ("parallel@0.5", "parallel@0.7", "parallel@0.9")] == [4, 12, 20]
    assert [labels[k].dy for k in ("budget@0.33", "budget@0.5")] == [-10, -18]


def test_labels_of_a_merged_document_drop_the_source_names_when_the_rest_is_unique():
    d = merge_results([document(), document(("ar", "parallel@0.9"), baseline=False)], ["main", "extra"])
    curve = budget_curves(d)[0]
    assert curve.ar.label == "main:ar" and len(curve.families["parallel"]) == 4  # the first document's ar
    texts = {lb.text for lb in curve_labels(curve)}
    assert {"main:ar, main:budget@1", "main:parallel@0.9, extra:parallel@0.9"} <= texts  # parallel@0.9 twice: kept
    merged = merge_results([document(), document(("ar", "parallel@0.6"), baseline=False)], ["main", "extra"])
    assert {"ar, budget@1", "parallel@0.6"} <= {lb.text for lb in curve_labels(budget_curves(merged)[0])}


def test_panels_wrap_at_three_a_row():
    d = document()
    for run in d.runs:  # five generation tasks
        for t in ("t2", "t3", "t4", "t5"):
            run.scores[t] = run.scores["t_gen"]
            run.decode.tasks[t] = run.decode.tasks["t_gen"]
    png = base64.b64decode(budget_curve_png(d))
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert len(budget_curves(d)) == 5 and width <= 1300 and height > width / 2  # 3 panels a row, two rows


@pytest.mark.parametrize("labels", [("ar", "parallel@0.9", "parallel@0.7"), ("ar", "budget@0.5"), ("ar",)])
def test_without_both_families_there_is_no_curve_section(labels):
    d = document(labels)
    assert budget_curves(d) == [] and budget_curve_png(d) is None
    assert "Fixed budget plan" not in markdown(d)
    page = html_report(d)
    assert CURVE_TITLE not in page and "</html>" in page


def test_runs_without_decode_totals_give_no_curve():
    d = document(generation=False, baseline=False)  # loglikelihood-only tasks
    assert budget_curves(d) == [] and budget_curve_png(d) is None
    assert "Fixed budget plan" not in markdown(d) and CURVE_TITLE not in html_report(d)
    assert not re.search(r"<img", html_report(d))

"""The results document's shape (card.eval.results) and its rendering (card.eval.report), without a model:
documents are built by hand, written and read back through the real report functions and the real CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from card.cli import app
from card.errors import CardError
from card.eval.report import (
    SPEED_COLUMNS,
    comparison_table,
    html_report,
    load_results,
    markdown,
    merge_results,
    notes,
    print_results_table,
    write_report,
)
from card.eval.results import DecodeTotals, ModelRecord, Results, Run, RunDecode


def doc(labels=("ar", "parallel@0.9")) -> Results:
    runs = []
    for i, label in enumerate(labels):
        tasks = {"t_gen": DecodeTotals(4, 10 * (i + 1), 10, float(i + 1), 0.5, 20.0 * (i + 1))}
        runs.append(Run(label=label, model="card", mode=label.split("@")[0], threshold=0.9 if i else None,
                        block_size=8 if i else None,
                        scores={"t_gen": {"exact_match,none": 0.5 + 0.1 * i, "exact_match_stderr,none": 0.05},
                                "t_mc": {"acc,none": 0.3, "acc_stderr,none": 0.02}},
                        scores_from={"t_mc": "ar"} if i else {},
                        decode=RunDecode(4, 10 * (i + 1), 10, float(i + 1), 0.5, 20.0 * (i + 1),
                                         speedup_vs_ar=float(i + 1), tasks=tasks),
                        same_output_as_ar=1.0 - 0.25 * i, seconds=1.0))
    return Results(model=ModelRecord(path="/m", sha256="ab" * 32, params=1000), runs=runs,
                   settings={"tasks": ["t_gen", "t_mc"]}, environment={"cores": 2})


def test_round_trip_through_results_json(tmp_path):
    r = doc()
    write_report(r, tmp_path)
    assert load_results(tmp_path) == r
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["runs"][1]["same_output_as_ar"] == 0.75 and "merged_from" not in on_disk
    assert list(on_disk["runs"][0]) == ["label", "model", "mode", "threshold", "block_size", "decoding", "scores", "scores_from",
                                        "decode", "same_output_as_ar", "seconds"]


def test_an_earlier_document_reads_agreement_with_ar_as_same_output_as_ar(tmp_path):
    d = doc().to_dict()
    for run in d["runs"]:
        run["agreement_with_ar"] = run.pop("same_output_as_ar")
    (tmp_path / "results.json").write_text(json.dumps(d))
    assert [r.same_output_as_ar for r in load_results(tmp_path).runs] == [1.0, 0.75]


@pytest.mark.parametrize("content, message", [
    ({"a": 1}, "is not a card eval results document (no list of runs)"),
    ([1, 2], "is not a card eval results document (expected an object, got a list)"),
    ({"runs": [{"foo": 1}]}, "run 0 has no 'label' (keys: foo)"),
    ({"runs": [1]}, "run 0 is not an object (got a number)"),
    ({"runs": [{"label": "x", "model": "card", "mode": "ar", "scores": {"t": 1}}]}, "scores must map each task"),
])
def test_a_document_of_the_wrong_shape_is_one_line(tmp_path, content, message):
    f = tmp_path / "results.json"
    f.write_text(json.dumps(content))
    with pytest.raises(CardError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_results(f)
    assert "\n" not in str(e.value)
    r = CliRunner().invoke(app, ["report", str(f), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and message in r.output
    assert not (tmp_path / "out").exists()


def test_not_json_is_one_line(tmp_path):
    f = tmp_path / "results.json"
    f.write_text("{")
    with pytest.raises(CardError, match="is not valid JSON"):
        load_results(f)


def test_table_columns_are_declared_once():
    r = doc()
    table = comparison_table(r)
    assert table.header == ["run", "t_gen exact_match", "t_mc acc", *(c.header for c in SPEED_COLUMNS)]
    assert table.scores == [("t_gen", "exact_match"), ("t_mc", "acc")]
    assert table.rows[1] == ["parallel@0.9", "0.600 ± 0.050", "0.300 ± 0.020†", "2.00", "40.0", "2.00x", "0.750"]
    assert all(f"{c.header}: {c.meaning}" in notes(r)[0] for c in SPEED_COLUMNS)
    md = markdown(r)
    assert "| " + " | ".join(table.header) + " |" in md and "| " + " | ".join(table.rows[1]) + " |" in md


def test_terminal_table_has_every_column(capsys):
    from rich.console import Console

    console = Console(width=200, highlight=False)
    print_results_table(doc(), "title", console)
    out = capsys.readouterr().out
    assert all(c.header in out for c in SPEED_COLUMNS) and "parallel@0.9" in out and "exact_match" in out


def test_html_plots_fit_the_page_and_the_settings_come_last():
    html = html_report(doc())
    assert html.count("<img") == 2 and "img{max-width:100%;height:auto}" in html
    assert html.index("<details>") > html.rindex("<img") > html.index("</table>")
    assert html.rstrip().endswith("</pre></details>\n</body></html>")


def test_merge_prefixes_colliding_labels():
    merged = merge_results([doc(), doc()], ["a", "b"])
    assert [r.label for r in merged.runs] == ["a:ar", "a:parallel@0.9", "b:ar", "b:parallel@0.9"]
    assert merged.merged_from == ["a", "b"] and merged.to_dict()["merged_from"] == ["a", "b"]
    assert [r.label for r in merge_results([doc(["x"]), doc(["y"])], ["a", "b"]).runs] == ["x", "y"]


def test_run_lookup_and_scores():
    r = doc()
    assert r.run("parallel@0.9").score("t_gen", "exact_match") == pytest.approx(0.6)
    assert r.run("ar").score("t_gen", "bleu") is None
    with pytest.raises(CardError, match="no run labelled 'lossless'"):
        r.run("lossless")

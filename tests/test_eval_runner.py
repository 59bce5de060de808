"""``card eval`` / ``card report`` / ``card lm-eval`` and ``card.eval.runner.evaluate`` on the real stories260K.

One evaluation through the Python API and the same one through the CLI (which must give identical scores),
each with the unconverted stories260K as the baseline, on local offline tasks with a small limit.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from card.cli import app
from card.errors import CardError
from card.eval.results import Results
from card.eval.runner import BUNDLED_TASKS, evaluate, parse_modes

TASKS = "card_piqa,card_gsm8k,card_tinystories_ppl"
MODES = "ar,parallel@0.5,lossless"
LIMIT = 8
pytestmark = pytest.mark.usefixtures("one_thread")

# A fixed K: automatic lookahead (the default) keeps an unadapted model's parallel runs at AR, and this test
# needs the parallel decoder to commit several tokens per forward.
K = 8
P, L = f"parallel@0.5 K={K}", f"lossless K={K}"
LABELS = ["baseline (AR)", "ar", P, L]






@pytest.fixture(scope="module")
def api_run(stories_card, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "api"
    results = evaluate(stories_card, TASKS, MODES, baseline=data_dir / "stories260K_hf", limit=LIMIT, out=out,
                       block_size=K)
    return results, out


@pytest.fixture(scope="module")
def cli_run(stories_card, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "cli"
    r = CliRunner().invoke(app, ["eval", str(stories_card), "--tasks", TASKS, "--modes", MODES, "--baseline",
                                 str(data_dir / "stories260K_hf"), "--limit", str(LIMIT), "--block-size", str(K),
                                 "--out", str(out)])
    return r, out


# ------------------------------------------------------------------------------------------ results
def test_results_json_has_everything_needed_to_rerun(api_run):
    results, out = api_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["runs"] == json.loads(json.dumps(results.to_dict()["runs"]))
    assert Results.from_dict(on_disk) == Results.from_dict(json.loads(json.dumps(results.to_dict())))
    for m in (results.model, results.baseline):
        assert re.fullmatch(r"[0-9a-f]{64}", m.sha256) and m.params > 0 and m.dtype == "float32"
    assert results.model.card["decoding"] == {"threshold": 0.9, "block_size": 8}
    assert results.baseline.card is None
    assert results.model.sha256 != results.baseline.sha256  # the mask row was added
    s = results.settings
    assert s["tasks"] == TASKS.split(",") and s["limit"] == LIMIT and s["batch_size"] == 8
    assert s["seeds"] == {"python": 1234, "numpy": 1234, "torch": 1234, "fewshot": 1234, "sampling": 1234}
    assert s["generation_tasks"] == ["card_gsm8k"] and s["device"] == "cpu"
    env = results.environment
    assert env["cores"] >= 1 and env["torch_threads"] == 1 and env["python"]
    assert all(env["versions"][p] for p in ("torch", "transformers", "lm_eval", "datasets", "tokenizers"))
    lm = results.lm_eval
    assert lm["version"] == env["versions"]["lm_eval"]
    for task in TASKS.split(","):
        assert lm["configs"][task]["task"] == task and lm["versions"][task] == 1.0
        assert lm["n-shot"][task] == 0 and lm["n-samples"][task]["effective"] == LIMIT
        assert task in lm["higher_is_better"]
    assert (out / "samples.jsonl").exists()


def test_runs_scores_and_decode_totals(api_run):
    results, _ = api_run
    runs = {r.label: r for r in results.runs}
    assert [r.label for r in results.runs] == LABELS
    for run in results.runs:
        assert sorted(run.scores) == sorted(TASKS.split(","))
        piqa = run.scores["card_piqa"]
        assert 0 <= piqa["acc,none"] <= 1 and isinstance(piqa["acc_stderr,none"], float)
        assert "exact_match_stderr,strict-match" in run.scores["card_gsm8k"]
        assert run.scores["card_tinystories_ppl"]["word_perplexity,none"] > 1
        d = run.decode
        assert d.requests == LIMIT and d.generated_tokens > 0 and d.forwards > 0
        assert d.tokens_per_forward == pytest.approx(d.generated_tokens / d.forwards)
        assert d.seconds > 0 and d.tokens_per_second > 0 and d.speedup_vs_ar > 0
        assert list(d.tasks) == ["card_gsm8k"]
    # the modes' non-generative scores are the AR run's, marked as reused
    assert runs["ar"].scores_from == {} and runs["baseline (AR)"].scores_from == {}
    for label in (P, L):
        assert runs[label].scores_from == {"card_piqa": "ar", "card_tinystories_ppl": "ar"}
        assert runs[label].scores["card_piqa"] == runs["ar"].scores["card_piqa"]
    assert runs["ar"].decode.speedup_vs_ar == 1.0
    assert runs["ar"].decode.tokens_per_forward == 1.0
    assert runs[P].decode.tokens_per_forward > 1
    assert runs[P].threshold == 0.5 and runs[P].block_size == 8
    assert runs[L].decode.tokens_per_forward >= 1
    # lossless is exactly AR, and so is the unconverted source in AR mode (the conversion changes nothing)
    assert runs[L].same_output_as_ar == 1.0 and runs["baseline (AR)"].same_output_as_ar == 1.0
    assert runs[L].scores["card_gsm8k"] == runs["ar"].scores["card_gsm8k"]
    assert 0 <= runs[P].same_output_as_ar <= 1


def test_reports_are_written_and_self_contained(api_run):
    results, out = api_run
    md = (out / "report.md").read_text()
    assert f"| {P} |" in md and "tok/fwd" in md and "## Settings" in md and "†" in md
    row = next(line for line in md.splitlines() if line.startswith(f"| {P} |"))
    tok_per_fwd = float(row.strip("| ").split(" | ")[-4])
    assert tok_per_fwd > 1
    html = (out / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") >= 2
    for attr in re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", html):
        assert attr.startswith("data:"), attr
    assert "<script" not in html and "<link" not in html
    # plots scale to the page width; the settings come last, collapsed
    assert "img{max-width:100%;height:auto}" in html
    assert html.index("<details>") > html.rindex("<img") and html.index("Settings") > html.rindex("<img")
    assert html.rstrip().endswith("</pre></details>\n</body></html>")


def test_cli_eval_gives_the_same_scores(api_run, cli_run):
    r, out = cli_run
    assert r.exit_code == 0, r.output
    for name in ("results.json", "report.md", "report.html", "samples.jsonl"):
        assert (out / name).exists()
    assert "parallel@0.5" in r.output and "tok/fwd" in r.output
    again = json.loads((out / "results.json").read_text())
    first = api_run[0]
    assert [r["scores"] for r in again["runs"]] == [r.scores for r in first.runs]
    for a, b in zip(again["runs"], first.runs, strict=True):
        assert a["same_output_as_ar"] == b.same_output_as_ar
        assert {k: a["decode"][k] for k in ("generated_tokens", "forwards", "requests")} == \
               {k: getattr(b.decode, k) for k in ("generated_tokens", "forwards", "requests")}
    assert again["model"]["sha256"] == first.model.sha256
    assert isinstance(again["settings"]["command"], str) and first.settings["command"] is None


def test_card_report_merges_two_results(api_run, cli_run, tmp_path):
    merged_dir = tmp_path / "merged"
    r = CliRunner().invoke(app, ["report", str(api_run[1]), str(cli_run[1]), "--out", str(merged_dir)])
    assert r.exit_code == 0, r.output
    merged = json.loads((merged_dir / "results.json").read_text())
    assert [x["label"] for x in merged["runs"]] == [f"{n}:{label}" for n in ("api", "cli") for label in LABELS]
    assert merged["merged_from"] == ["api", "cli"]
    assert (merged_dir / "report.html").read_text().count("data:image/png;base64,") >= 2
    assert "cli:parallel@0.5" in (merged_dir / "report.md").read_text()
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "no results.json" in bad.output


# ------------------------------------------------------------------------------------------ bad input
def test_mode_strings():
    assert [(m.mode, m.threshold) for m in parse_modes("ar, parallel ,parallel@0.7,lossless")] == [
        ("ar", None), ("parallel", None), ("parallel", 0.7), ("lossless", None)]
    for bad, message in [("fast", "unknown mode 'fast'"), ("ar@0.5", "unknown mode 'ar@0.5'"),
                         ("parallel@x", "not a threshold"), ("parallel@0", r"threshold must be in \(0, 1\]"),
                         ("parallel@1.5", r"threshold must be in \(0, 1\]"), ("", "no decoding modes")]:
        with pytest.raises(CardError, match=message):
            parse_modes(bad)


def test_bad_input_fails_before_any_model_is_loaded(stories_card, data_dir, tmp_path):
    missing = tmp_path / "missing"
    # Mode and threshold errors come first: the checkpoint here does not even exist.
    with pytest.raises(CardError, match="unknown mode"):
        evaluate(missing, "card_piqa", "ar,turbo")
    with pytest.raises(CardError, match=r"threshold must be in \(0, 1\]"):
        evaluate(missing, "card_piqa", "parallel@2")
    with pytest.raises(CardError, match="does not exist"):
        evaluate(missing, "card_piqa", "ar")
    with pytest.raises(CardError, match="not a CARD checkpoint"):
        evaluate(data_dir / "stories260K_hf", "card_piqa", "ar,parallel")
    with pytest.raises(CardError, match="does not exist"):
        evaluate(stories_card, "card_piqa", "ar", baseline=missing)
    # A checkpoint with a config but no weights: an unknown task must be reported before loading would fail.
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(stories_card / "config.json", config_only / "config.json")
    with pytest.raises(CardError, match="unknown task 'card_nonexistent'"):
        evaluate(config_only, "card_piqa,card_nonexistent", "ar,parallel@0.7")
    with pytest.raises(CardError, match="cannot load checkpoint"):  # ... and that loading would have failed
        evaluate(config_only, "card_piqa", "ar", limit=1)


def test_cli_bad_input_is_one_line(tmp_path):
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "missing"), "--tasks", "card_piqa", "--modes", "ar,parallel@1.5"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == ["error: threshold must be in (0, 1], not 1.5"]


# ------------------------------------------------------------------------------------------ lm-eval CLI
def test_lm_eval_passthrough_runs_the_card_model(stories_card, tmp_path):
    out = tmp_path / "lm-eval"
    r = CliRunner().invoke(app, [
        "lm-eval", "--model", "card", "--model_args",
        f"pretrained={stories_card},decoding=parallel,threshold=0.7", "--tasks", "card_gsm8k",
        "--include_path", str(BUNDLED_TASKS), "--limit", "2", "--device", "cpu", "--batch_size", "2",
        "--output_path", str(out)])
    assert r.exit_code == 0, r.output
    (result_file,) = out.rglob("results_*.json")
    res = json.loads(result_file.read_text())
    assert res["config"]["model"] == "card"
    assert res["config"]["card"] == {"decoding": "parallel", "threshold": 0.7, "block_size": 8, "lookahead": "auto"}
    assert res["n-samples"]["card_gsm8k"]["effective"] == 2

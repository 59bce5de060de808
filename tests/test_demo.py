"""card demo end to end (the --quick variant CI runs): pre-train, convert, DeepSpeed adaptation, lm-eval, report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from card.demo.pipeline import run_demo
from card.errors import CardError

CARD = Path(sys.executable).parent / "card"


@pytest.mark.slow
def test_demo_quick_writes_the_report_and_parallel_decodes_several_tokens_per_forward(tmp_path):
    out = tmp_path / "demo"
    p = subprocess.run([str(CARD), "demo", "--quick", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    for name in ("results.json", "report.md", "report.html"):
        assert (out / "report" / name).stat().st_size > 0
    results = json.loads((out / "report" / "results.json").read_text())
    runs = {r["label"]: r for r in results["runs"]}
    assert set(runs) == {"baseline (AR)", "ar", "parallel@0.9", "parallel@0.7", "parallel@0.5", "lossless"}
    tasks = ["demo_copy", "demo_rev", "demo_add"]
    for run in runs.values():
        assert set(tasks) <= set(run["scores"]) and run["decode"]["generated_tokens"] > 0
    assert runs["parallel@0.9"]["decode"]["tokens_per_forward"] > 1
    assert runs["lossless"]["same_output_as_ar"] == 1.0  # lossless == AR, whatever the training reached
    assert all(runs["lossless"]["scores"][t]["exact_match,none"] == runs["ar"]["scores"][t]["exact_match,none"]
               for t in tasks)
    # the pipeline's pieces are where the report says: an AR source without CARD metadata, a CARD model with
    # one adaptation record
    ar_cfg = json.loads((out / "ar" / "final" / "config.json").read_text())
    card_cfg = json.loads((out / "card" / "final" / "config.json").read_text())
    assert "card" not in ar_cfg and card_cfg["card"]["adaptation"][0]["objective"]["kind"] == "card"
    # the demo recipe's decoding section reached the consolidated checkpoint, and the profile covers its block
    assert card_cfg["card"]["decoding"]["block_size"] == 16 and card_cfg["card"]["slot_profile"]["slots"] == 17
    for claim in ("tokens per forward", "within 2 points of AR", "lossless outputs identical to AR"):
        assert claim in p.stdout
    assert "report:" in p.stdout


def test_demo_bad_arguments_fail_before_any_work(tmp_path):
    with pytest.raises(CardError, match="--model and --data go together"):
        run_demo(tmp_path / "a", model="x")
    with pytest.raises(CardError, match="--tasks applies with --model"):
        run_demo(tmp_path / "b", tasks="demo_copy")
    (tmp_path / "c").mkdir()
    with pytest.raises(CardError, match="already exists; pass --overwrite"):
        run_demo(tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

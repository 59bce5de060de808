"""What an adaptation run reports: ``metrics.jsonl`` (and TensorBoard), the adaptation record stored in the
final checkpoint, ``summary.json`` and the end-of-run table.

The keys of a training line (README, "What a run leaves in DIR"):

* ``loss``: the training objective, averaged over ranks and micro-batches: the weighted CARD loss for
  ``objective.kind: card``, the plain next-token CE for ``kind: ar``;
* ``ar_loss``: the clean-input next-token CE on the step's batch. For ``kind: card`` it is a separate
  eval-mode forward over the step's first micro-batch before the update (the AR probe); for ``kind: ar``
  the training loss already is that CE, so it is ``loss`` and no probe runs;
* ``corrupt_ce``: the unweighted mean CE on the input the model trained on (for ``kind: ar`` the input is
  clean, so it equals ``loss``); ``mask_ratio``: masked over valid input positions (0 for ``kind: ar``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def round_metric(x: float | None, digits: int = 8) -> float | None:
    """``x`` to ``digits`` significant digits; None for None and non-finite values (keeps the JSON strict)."""
    return None if x is None or not math.isfinite(x) else float(f"{x:.{digits}g}")


class MetricsLog:
    """Rank 0's ``metrics.jsonl`` and TensorBoard writer. On resume, lines after the resumed step are
    dropped first (they belong to the interrupted attempt)."""

    def __init__(self, run_dir: Path, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        self.last: dict[str, dict] = {}
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if rec.get("step", 0) <= resumed_step:
                    kept.append(line)
                    self.last[rec.get("split", "train")] = rec
        self.path.write_text("".join(f"{line}\n" for line in kept))
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resumed_step + 1 if resumed_step > 0 else None)

    def write(self, rec: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        split = rec.get("split", "train")
        self.last[split] = rec
        for k, v in rec.items():
            if k not in ("step", "split") and isinstance(v, (int, float)) and v is not None:
                self.tb.add_scalar(f"{split}/{k}", v, rec["step"])
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def final_losses(last: dict[str, dict]) -> dict:
    """The last logged training and validation losses (the adaptation record's ``final``)."""
    return {k: last.get(s, {}).get(k) for s, k in (("train", "loss"), ("train", "ar_loss"),
                                                   ("validation", "val_loss"), ("validation", "val_ar_loss"))}


def write_summary(summary: dict, run_dir: Path) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


def print_summary(summary: dict, metrics_path: Path) -> None:
    """The end-of-run table on stderr: first -> last value of each loss, throughput, time."""
    from rich.console import Console
    from rich.table import Table

    lines = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    train = [x for x in lines if x.get("split") == "train"]
    val = [x for x in lines if x.get("split") == "validation"]
    table = Table(title=f"adaptation finished: {summary['final']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    span = lambda xs, k: f"{xs[0][k]:.4f} -> {xs[-1][k]:.4f}" if xs and xs[0].get(k) is not None else "-"  # noqa: E731
    for k, v in [("steps", summary["steps"]), ("tokens", f"{summary['tokens']:,}"),
                 ("processes / ZeRO stage", f"{summary['world_size']} / {summary['zero_stage']}"),
                 ("CARD loss (first -> last log)", span(train, "loss")), ("AR loss on the batch", span(train, "ar_loss")),
                 ("validation CARD loss", span(val, "val_loss")), ("validation AR loss", span(val, "val_ar_loss")),
                 ("tokens/s (last log)", train[-1]["tokens_per_second"] if train else "-"),
                 ("seconds", summary["seconds"])]:
        table.add_row(k, str(v))
    Console(stderr=True).print(table)

"""The results document of ``card eval``: typed, from the runner to the report, the CLI and the demo.

``results.json`` is ``Results.to_dict()``; ``Results.from_dict`` reads one back and refuses a document of
the wrong shape with one line. A *run* is one model in one decoding mode (the unconverted baseline in AR
mode, the CARD model in AR / parallel@threshold / lossless) with lm-eval's scores and the decode totals.

Two measures compare a run with the CARD model's own AR run in the same invocation:

* ``decode.speedup_vs_ar``: its generated tokens per second over the AR run's;
* ``same_output_as_ar``: the fraction of its generation *requests* whose whole response equals the AR
  run's exactly (per request, not per token; older documents call it ``agreement_with_ar``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from card.errors import CardError

SCHEMA_VERSION = 1  # the document's "card_eval_version"
OLD_NAMES = {"agreement_with_ar": "same_output_as_ar"}  # keys of earlier documents, read under their new name


@dataclass
class DecodeTotals:
    """Decode totals over a run's generation requests (``card.eval.lm_model.decode_totals``)."""

    requests: int = 0
    generated_tokens: int = 0
    forwards: int = 0  # per request: a batched forward counts once for each request it advanced
    tokens_per_forward: float | None = None
    seconds: float = 0.0  # wall time, each batch counted once
    tokens_per_second: float | None = None


@dataclass
class RunDecode(DecodeTotals):
    """A run's decode totals, its speed relative to AR, and the totals per generation task."""

    speedup_vs_ar: float | None = None
    tasks: dict[str, DecodeTotals] = field(default_factory=dict)


@dataclass
class Run:
    label: str
    model: str  # "card" | "baseline"
    mode: str  # "ar" | "parallel" | "lossless"
    threshold: float | None = None
    block_size: int | str | None = None  # a fixed K, or "auto"
    decoding: dict[str, Any] = field(default_factory=dict)  # the resolved decoding spec's settings
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> lm-eval's "metric,filter" -> value
    scores_from: dict[str, str] = field(default_factory=dict)  # task -> label of the run whose score is reused
    decode: RunDecode = field(default_factory=RunDecode)
    same_output_as_ar: float | None = None  # per request; None without generation tasks
    seconds: float = 0.0

    def score(self, task: str, metric: str) -> float | None:
        """The value of lm-eval metric ``metric`` (any filter, the first one listed) on ``task``."""
        for key, value in self.scores.get(task, {}).items():
            if key.split(",")[0] == metric:
                return value
        return None


@dataclass
class ModelRecord:
    """A loaded checkpoint: where it is, a checksum of its weights, its size and its CARD metadata."""

    path: str
    sha256: str | None = None
    params: int | None = None
    dtype: str | None = None
    architecture: str | None = None
    card: dict[str, Any] | None = None  # the checkpoint's card metadata; None for a plain AR checkpoint


@dataclass
class Results:
    model: ModelRecord
    runs: list[Run]
    baseline: ModelRecord | None = None
    created: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # everything needed to re-run: tasks, modes, seeds, ...
    environment: dict[str, Any] = field(default_factory=dict)  # hardware and package versions
    lm_eval: dict[str, Any] = field(default_factory=dict)  # lm-eval's version, task configs, versions, n-shot, ...
    seconds: float = 0.0
    merged_from: list[str] | None = None  # the sources of a merged document (``card report``)
    card_eval_version: int = SCHEMA_VERSION

    def run(self, label: str) -> Run:
        for r in self.runs:
            if r.label == label:
                return r
        raise CardError(f"no run labelled {label!r} (runs: {', '.join(r.label for r in self.runs)})")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        order = ["card_eval_version", "created", "model", "baseline", "settings", "environment", "lm_eval", "runs",
                 "seconds", "merged_from"]
        return {k: d[k] for k in order if not (k == "merged_from" and d[k] is None)}

    @classmethod
    def from_dict(cls, doc: Any, source: str = "results") -> "Results":
        """A document read from JSON; ``CardError`` (one line) when its shape is not a results document."""
        if not isinstance(doc, dict):
            raise CardError(f"{source} is not a card eval results document (expected an object, got {_kind(doc)})")
        runs = doc.get("runs")
        if not isinstance(runs, list) or not runs:
            raise CardError(f"{source} is not a card eval results document (no list of runs)")
        model = doc.get("model")
        return cls(
            model=_build(ModelRecord, model if isinstance(model, dict) else {"path": None}, f"{source}: model"),
            runs=[_run(r, f"{source}: run {i}") for i, r in enumerate(runs)],
            baseline=None if doc.get("baseline") is None else _build(ModelRecord, doc["baseline"], f"{source}: baseline"),
            **{k: doc[k] for k in ("created", "settings", "environment", "lm_eval", "seconds", "merged_from",
                                   "card_eval_version") if k in doc},
        )


def _kind(x: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(type(x), type(x).__name__)


def _build(cls, d: Any, where: str, required: tuple[str, ...] = ()):
    if not isinstance(d, dict):
        raise CardError(f"{where} is not an object (got {_kind(d)})")
    d = {OLD_NAMES.get(k, k): v for k, v in d.items()}
    names = {f.name for f in dataclasses.fields(cls)}
    missing = [k for k in required if k not in d]
    if missing:
        raise CardError(f"{where} has no {missing[0]!r} (keys: {', '.join(map(str, d)) or 'none'})")
    return cls(**{k: v for k, v in d.items() if k in names})


def _run(d: Any, where: str) -> Run:
    run = _build(Run, d, where, required=("label", "model", "mode", "scores"))
    if not isinstance(run.scores, dict) or not all(isinstance(v, dict) for v in run.scores.values()):
        raise CardError(f"{where}: scores must map each task to its metrics")
    decode = run.decode if isinstance(run.decode, dict) else {}
    tasks = {t: _build(DecodeTotals, v, f"{where}: decode.tasks.{t}") for t, v in (decode.get("tasks") or {}).items()}
    run.decode = _build(RunDecode, {**decode, "tasks": tasks}, f"{where}: decode")
    return run

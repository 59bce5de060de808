"""Start an adaptation run: check everything cheap first, then train in-process (one process) or under
torchrun (several processes, one or more nodes).

Before any worker starts, the launcher resolves the recipe into a run exactly as the workers will
(``card.adapt.resolve``: CARD checkpoint, ``seq_len``, the filled DeepSpeed config), builds the tokenised
data cache and writes the resolved recipe to ``OUTPUT/recipe.yaml``, which is all the workers read. A worker failure comes back as one line: the
failing rank's error and torchrun's exit code; the full log is ``OUTPUT/logs/launch.log``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from card.adapt.distributed import die_with_parent, free_port, single_process_env, worker_env
from card.adapt.recipe import Recipe, dump_recipe, load_recipe
from card.adapt.resolve import resolve_run
from card.errors import CardError
from card.io import atomic_write_text


@dataclass
class AdaptResult:
    output_dir: Path
    final: Path  # the consolidated HF checkpoint
    metrics: dict = field(default_factory=dict)  # the last training metrics line
    validation: dict = field(default_factory=dict)  # the last validation line
    summary: dict = field(default_factory=dict)  # OUTPUT/summary.json


def preflight(recipe: Recipe, world_size: int) -> None:
    """Everything that can fail before training, in the order of its cost: the model's config and the
    DeepSpeed config (``resolve_run``, as every worker does), then the data (tokenised into the cache here,
    so workers start from a cache hit)."""
    import transformers as tf

    from card.adapt.data import load_data, tokenizer_fingerprint

    run = resolve_run(recipe, world_size)
    tok = tf.AutoTokenizer.from_pretrained(run.model.path)
    load_data(recipe.data, tok, recipe.train.seq_len, run.separator, tokenizer_fingerprint(run.model.path),
              log=lambda m: print(m, file=sys.stderr, flush=True))


def torchrun_command(
    run_dir: Path, nproc_per_node: int, nnodes: int = 1, node_rank: int = 0, master_addr: str | None = None,
    master_port: int | None = None, rdzv_endpoint: str | None = None,
) -> list[str]:
    """``torchrun`` (as ``python -m torch.distributed.run``, the same interpreter) running every rank's
    ``python -m card.adapt.train --run-dir DIR``. Static rendezvous (``--node_rank`` + master address) or
    c10d rendezvous (``--rdzv_endpoint``, any node order)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc_per_node), "--nnodes", str(nnodes)]
    if rdzv_endpoint:
        run_id = "card-" + hashlib.sha256(str(run_dir).encode()).hexdigest()[:12]
        cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", rdzv_endpoint, "--rdzv_id", run_id]
    else:
        if nnodes > 1 and not master_addr:
            raise CardError("--master-addr (or --rdzv-endpoint) is required with --nnodes > 1")
        cmd += ["--node_rank", str(node_rank), "--master_addr", master_addr or "127.0.0.1",
                "--master_port", str(master_port or (29500 if nnodes > 1 else free_port()))]
    return cmd + ["-m", "card.adapt.train", "--run-dir", str(run_dir)]


# torchrun's own report of a failed worker (a log line from torch.distributed.elastic, then a traceback of
# ChildFailedError): everything from it on is left out of the console; the worker's error is already shown.
_ELASTIC_FAILURE = re.compile(r"torch/distributed/elastic/.*(failed \(exitcode|closing signal)|ChildFailedError")
_WORKER_ERROR = re.compile(r"^error \(rank \d+\): ")


class _StderrFilter:
    """Copies a child's stderr to ours (progress-bar carriage returns included) and to a log file,
    leaving out torchrun's failure report and the per-rank error lines the launcher summarises."""

    def __init__(self, log_path: Path):
        self.log = log_path.open("ab")
        self.pending = b""
        self.muted = False

    def feed(self, chunk: bytes) -> None:
        self.log.write(chunk)
        self.pending += chunk
        while True:
            cut = max(self.pending.rfind(b"\n"), self.pending.rfind(b"\r"))
            if cut < 0:
                return
            head, self.pending = self.pending[: cut + 1], self.pending[cut + 1:]
            for seg in re.findall(rb"[^\r\n]*[\r\n]", head):
                self._emit(seg)

    def _emit(self, seg: bytes) -> None:
        text = seg.decode("utf-8", "replace")
        if _ELASTIC_FAILURE.search(text):
            self.muted = True
        if self.muted or _WORKER_ERROR.match(text):
            return
        sys.stderr.write(text)
        sys.stderr.flush()

    def close(self) -> None:
        if self.pending:
            self._emit(self.pending + b"\n")
        self.log.close()


def run_torchrun(cmd: list[str], env: dict[str, str], run_dir: Path) -> None:
    """Run ``cmd``; on failure raise one ``CardError`` with the first failing rank's error and the exit code."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for f in logs.glob("error-rank*.json"):
        f.unlink()
    print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
    filt = _StderrFilter(logs / "launch.log")
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, preexec_fn=die_with_parent)
    try:
        while chunk := os.read(proc.stderr.fileno(), 65536):
            filt.feed(chunk)
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.wait()  # torchrun received the same SIGINT and stops its workers
        raise
    finally:
        filt.close()
    if rc == 0:
        return
    errors = sorted(logs.glob("error-rank*.json"), key=lambda p: p.stat().st_mtime_ns)
    if errors:  # the first rank to fail is the cause; the others usually fail because it left
        e = json.loads(errors[0].read_text())
        raise CardError(f"{e['message']} (rank {e['rank']}, exit code {e['exit_code']})")
    how = f"exited with code {rc}" if rc > 0 else f"was killed by signal {-rc}"
    raise CardError(f"training failed: torchrun {how} and no worker reported an error (killed? out of memory?); "
                    f"see {logs / 'launch.log'}")


def run_in_process(run_dir: Path) -> None:
    """One process, no launcher: the distributed environment of a world of one on a free local port."""
    from card.adapt.train import run

    with single_process_env():
        run(run_dir)


def adapt(
    recipe_or_path: Recipe | str | os.PathLike,
    overrides: Sequence[str] = (),
    output_dir: str | os.PathLike | None = None,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
    rdzv_endpoint: str | None = None,
    prepare_only: bool = False,
) -> AdaptResult:
    """Adapt a CARD checkpoint under the CARD objective as the recipe says; resume from
    ``OUTPUT/checkpoints/latest`` when present. Returns where the results are and the last metrics.

    ``prepare_only``: check everything, build the data cache and write ``OUTPUT/recipe.yaml``, then stop,
    for launchers of your own (``srun``, ``deepspeed --hostfile``) that run
    ``python -m card.adapt.train --run-dir OUTPUT`` on every rank.

    Raises ``CardError`` (one line) for a bad recipe, model or data before any worker starts, and for a
    failed run (the failing rank's message).
    """
    if isinstance(recipe_or_path, Recipe):
        if overrides:
            raise CardError("overrides apply to a recipe file; edit the Recipe object instead")
        recipe = recipe_or_path
        if output_dir is not None:
            recipe.output_dir = str(Path(output_dir).resolve())
    else:
        recipe = load_recipe(recipe_or_path, list(overrides), None if output_dir is None else str(output_dir))
    if nproc_per_node < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise CardError(f"need --nproc-per-node >= 1, --nnodes >= 1 and 0 <= --node-rank < --nnodes "
                        f"(got {nproc_per_node}, {nnodes}, {node_rank})")
    if nnodes > 1 and not (master_addr or rdzv_endpoint) and not prepare_only:
        raise CardError("--master-addr (or --rdzv-endpoint) is required with --nnodes > 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    preflight(recipe, nproc_per_node * nnodes)
    run_dir = Path(recipe.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
    if prepare_only:
        print(f"prepared {run_dir}; every rank runs: python -m card.adapt.train --run-dir {run_dir}", file=sys.stderr)
    elif nproc_per_node == 1 and nnodes == 1:
        run_in_process(run_dir)
    else:
        cmd = torchrun_command(run_dir, nproc_per_node, nnodes, node_rank, master_addr, master_port, rdzv_endpoint)
        run_torchrun(cmd, worker_env(nproc_per_node), run_dir)
    return read_result(run_dir)


def read_result(run_dir: Path) -> AdaptResult:
    """The outcome of a finished run directory (on a node other than the first, only what is shared)."""
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return AdaptResult(run_dir, run_dir / "final", summary.get("train", {}), summary.get("validation", {}), summary)

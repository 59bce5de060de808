"""The trainer: what every rank of an adaptation run executes.

``python -m card.adapt.train --run-dir DIR`` (under torchrun), or ``run(DIR)`` in-process for a single
process. ``DIR/recipe.yaml`` (a resolved recipe, written by the launcher) is its only input. What it
guarantees:

* the data order, the masks and dropout are pure functions of (seed, step, micro-step, rank), so a run
  resumed from ``DIR/checkpoints/latest`` logs the same losses as an uninterrupted one;
* a non-finite loss (checked on all ranks every step) stops the run before any further checkpoint;
* the final checkpoint ``DIR/final`` is a plain HF checkpoint (consolidated from the ZeRO shards, also under
  ZeRO-3) in the source's dtype, with the ``card`` metadata and an ``adaptation`` record appended.

``train`` is the loop, top to bottom: set up, step, validate, save, finish. The pieces it calls live in
``resolve`` (the recipe as a run), ``distributed`` (the process group), ``engine`` (DeepSpeed, checkpoints,
consolidation), ``metrics`` (the log and the summary) and ``objective`` (the losses).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from card.adapt.data import Batch, Rows, load_data, tokenizer_fingerprint
from card.adapt.distributed import Topology, all_reduce_sum, barrier, die_with_parent, init_distributed
from card.adapt.engine import build_engine, consolidate, resume, save_checkpoint
from card.adapt.metrics import MetricsLog, final_losses, print_summary, round_metric, write_summary
from card.adapt.objective import ar_loss, card_loss, causal_lm_loss
from card.adapt.recipe import recipe_from_dict
from card.adapt.resolve import ResolvedRun, first_line, lr_factor, resolve_run
from card.errors import CardError
from card.quiet import progress_disabled


def mix_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts: different parts give independent streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _on(batch: Batch, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch.ids.to(device), batch.valid.to(device), batch.completion.to(device)


@torch.no_grad()
def validation_losses(run: ResolvedRun, engine, rows: Rows, topo: Topology, device) -> tuple[float, float]:
    """(CARD loss with fixed masks, clean AR loss) over the validation rows, token-weighted across ranks
    (both the AR loss for a plain checkpoint, which has no mask token).

    Under ZeRO-3 every forward is collective, so every rank runs the same number of them (ranks with no
    batch left re-run one with weight 0).
    """
    mb = run.recipe.train.micro_batch_size
    batches = [list(range(i, min(i + mb, len(rows)))) for i in range(0, len(rows), mb)]
    mine = batches[topo.rank::topo.world]
    sums = [0.0, 0.0, 0.0, 0.0]
    engine.eval()
    for k in range(math.ceil(len(batches) / topo.world)):
        index, weight = (mine[k], 1.0) if k < len(mine) else (batches[0], 0.0)
        ids, valid, completion = _on(rows.batch(index), device)
        noise, targets = run.noise_and_targets(completion)
        ar, n = ar_loss(engine, ids, valid, targets)
        card, m = ar, n  # without a mask token (plain AR checkpoint) the validation loss is the AR loss
        if run.mask_id is not None:
            gen = torch.Generator().manual_seed(mix_seed(run.recipe.seed, "validation", index[0]))
            out = card_loss(engine, ids, run.mask_id, run.objective, gen, valid, noise, targets)
            card, m = out.loss.item(), out.tokens
        sums = [s + weight * v for s, v in zip(sums, (card * m, m, ar * n, n))]
    engine.train()
    s = all_reduce_sum(sums, device)
    return s[0] / max(s[1], 1), s[2] / max(s[3], 1)


def _fmt4(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


# ------------------------------------------------------------------------------------------ the loop
def train(run: ResolvedRun, run_dir: Path, topo: Topology) -> dict:
    """Train ``run`` on this rank; returns the summary (rank 0; other ranks get an empty dict)."""
    from tqdm.auto import tqdm

    t = run.recipe.train
    trainer = Trainer(run, run_dir, topo)
    trainer.setup()  # data, engine, resume
    if trainer.start == 0:
        trainer.validate(0)
    batches = trainer.data.step_batches(trainer.start, topo.rank, topo.world, t.gradient_accumulation_steps,
                                        t.micro_batch_size, run.recipe.seed)
    bar = tqdm(total=t.max_steps, initial=trainer.start, desc="adapt",
               disable=topo.rank != 0 or progress_disabled(), dynamic_ncols=True,
               mininterval=1.0)
    for step in range(trainer.start, t.max_steps):
        n = step + 1
        line = trainer.train_step(step, next(batches), log_now=n % t.log_every == 0 or n == t.max_steps)
        if line is not None:
            bar.set_postfix(loss=_fmt4(line["loss"]), ar=_fmt4(line["ar_loss"]), refresh=False)
        bar.update(1)
        if t.eval_every and n % t.eval_every == 0 and n != t.max_steps:
            trainer.validate(n)
        if t.save_every and n % t.save_every == 0 and n != t.max_steps:
            trainer.save(n)
    bar.close()
    if trainer.start < t.max_steps:  # else: a finished run started again; only the consolidation is redone
        trainer.validate(t.max_steps)
        trainer.save(t.max_steps)
    return trainer.finish()


class Trainer:
    """One rank's state during ``train``: the data, the engine, the counters and the metrics log."""

    def __init__(self, run: ResolvedRun, run_dir: Path, topo: Topology):
        self.run, self.recipe, self.run_dir, self.topo = run, run.recipe, run_dir, topo
        self.device = torch.device("cuda", torch.cuda.current_device()) if run.cuda else torch.device("cpu")
        self.t_start = time.perf_counter()
        self.start, self.tokens_seen, self.elapsed0 = 0, 0, 0.0
        self.window_tokens, self.window_time = 0, 0.0  # since the last training line, for tokens/s
        self.last_good: Path | None = None  # the newest checkpoint, named when the run diverges
        self.data = self.engine = None
        self.metrics: MetricsLog | None = None

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def log(self, msg: str) -> None:
        if self.topo.rank == 0:
            print(msg, file=sys.stderr, flush=True)

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t_start

    # ---------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        if self.topo.rank == 0:
            (self.run_dir / "ds_config.json").write_text(json.dumps(self.run.ds_config, indent=1))
        self.data = self._load_data()
        self.engine = build_engine(self.run)
        resumed = resume(self.engine, self.checkpoints, self.recipe)
        if resumed is not None:
            self.start, self.tokens_seen, self.elapsed0 = resumed.step, resumed.tokens, resumed.elapsed
            self.last_good = resumed.path
            changed = f" (recipe changed: {', '.join(resumed.changed)})" if resumed.changed else ""
            self.log(f"resuming from {resumed.path} at step {resumed.step}{changed}")
        if self.topo.rank == 0:
            self.metrics = MetricsLog(self.run_dir, self.start if resumed is not None else -1)

    def _load_data(self):
        """One builder per node (local rank 0); the other ranks load its cache after the barrier."""
        import transformers as tf

        path, spec, seq_len = self.run.model.path, self.recipe.data, self.recipe.train.seq_len
        tok = tf.AutoTokenizer.from_pretrained(path)
        load = lambda build: load_data(spec, tok, seq_len, self.run.separator, tokenizer_fingerprint(path), build,  # noqa: E731
                                       log=self.log if build else (lambda _: None))
        data = load(True) if self.topo.local_rank == 0 else None
        barrier()
        return data if data is not None else load(False)

    # ----------------------------------------------------------------------------------------- step
    def train_step(self, step: int, micro_batches: list[Batch], log_now: bool) -> dict | None:
        """One optimizer step over this rank's micro-batches; stops the run on divergence. Returns the
        metrics line when ``log_now`` (rank 0), else None."""
        t0 = time.perf_counter()
        torch.manual_seed(mix_seed(self.recipe.seed, "dropout", step, self.topo.rank))
        ar = self._ar_probe(micro_batches[0]) if log_now and not self.run.plain_ar else 0.0
        sums = [0.0, 0.0, 0.0, 0.0]  # loss, corrupt_ce, mask_ratio, input tokens
        for micro, b in enumerate(micro_batches):
            values = self._micro_step(step, micro, b)
            if self.run.plain_ar and log_now:  # the training loss is the AR loss: no probe
                ar += values[0] / len(micro_batches)
            sums = [s + v for s, v in zip(sums, values)]
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        # fp32/bf16 DeepSpeed silently skips a step whose gradients overflow (fp16 does so by design, with
        # loss scaling), so a non-finite gradient norm is divergence as much as a non-finite loss.
        bad_grad = grad_norm is not None and not math.isfinite(grad_norm) and self.run.precision != "fp16"
        reduced = all_reduce_sum([*sums, ar, float(bad_grad)], self.device)
        k = self.topo.world * len(micro_batches)
        self._stop_if_diverged(step + 1, reduced[0] / k, reduced[5] > 0, grad_norm)
        self.tokens_seen += int(reduced[3])
        self.window_tokens += int(reduced[3])
        self.window_time += time.perf_counter() - t0
        if not (log_now and self.metrics):
            return None
        t = self.recipe.train
        line = {"step": step + 1, "split": "train", "loss": round_metric(reduced[0] / k),
                "ar_loss": round_metric(reduced[4] / self.topo.world), "corrupt_ce": round_metric(reduced[1] / k),
                "mask_ratio": round_metric(reduced[2] / k), "lr": round_metric(t.lr * lr_factor(step, t)),
                "grad_norm": round_metric(grad_norm), "tokens": self.tokens_seen,
                "tokens_per_second": round(self.window_tokens / max(self.window_time, 1e-9), 1),
                "elapsed": round(self.elapsed(), 2)}
        self.metrics.write(line)
        self.window_tokens, self.window_time = 0, 0.0
        return line

    def _micro_step(self, step: int, micro: int, b: Batch) -> tuple[float, float, float, float]:
        """Forward, backward and engine step of one micro-batch: (loss, corrupt_ce, mask_ratio, input tokens)."""
        ids, valid, completion = _on(b, self.device)
        noise, targets = self.run.noise_and_targets(completion)
        if self.run.plain_ar:
            out = causal_lm_loss(self.engine, ids, valid, targets)
            corrupt_ce, mask_ratio = float(out.loss.detach()), 0.0  # t = 0: the input is clean
        else:
            g = (step * self.recipe.train.gradient_accumulation_steps + micro) * self.topo.world + self.topo.rank
            gen = torch.Generator().manual_seed(mix_seed(self.recipe.seed, "mask", g))  # g: global micro-batch number
            out = card_loss(self.engine, ids, self.run.mask_id, self.run.objective, gen, valid, noise, targets)
            corrupt_ce, mask_ratio = out.corrupt_ce, out.mask_ratio
        self.engine.backward(out.loss)
        self.engine.step()
        return out.loss.item(), corrupt_ce, mask_ratio, float(valid.sum())

    def _ar_probe(self, b: Batch) -> float:
        """Clean-input CE of the step's first micro-batch before the update, in eval mode (the ``ar_loss``
        metric under the CARD objective; a collective forward under ZeRO-3, so every rank runs it)."""
        self.engine.eval()
        ids, valid, completion = _on(b, self.device)
        loss = ar_loss(self.engine, ids, valid, self.run.noise_and_targets(completion)[1])[0]
        self.engine.train()
        return loss

    def _stop_if_diverged(self, n: int, loss: float, bad_grad: bool, grad_norm: float | None) -> None:
        if math.isfinite(loss) and not bad_grad:
            return
        what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient norm became {grad_norm}"
        where = f"Last good checkpoint: {self.last_good}" if self.last_good else "No checkpoint was saved"
        raise CardError(f"{what} at step {n}; stopping. {where}")

    # ------------------------------------------------------------------------------- validate, save
    def validate(self, step: int) -> tuple[float, float] | None:
        """The validation losses at ``step`` (every rank computes them, rank 0 logs them):
        (val_loss, val_ar_loss), or None when the run holds out no rows."""
        if len(self.data.validation) == 0:
            return None
        val_loss, val_ar = validation_losses(self.run, self.engine, self.data.validation, self.topo, self.device)
        if self.metrics:
            self.metrics.write({"step": step, "split": "validation", "val_loss": round_metric(val_loss),
                                "val_ar_loss": round_metric(val_ar), "elapsed": round(self.elapsed(), 2)})
            self.log(f"step {step}: val_loss {val_loss:.4f}, val_ar_loss {val_ar:.4f}")
        return val_loss, val_ar

    def save(self, step: int) -> None:
        client = {"step": step, "tokens": self.tokens_seen, "elapsed": self.elapsed(), "recipe": self.recipe.to_dict()}
        self.last_good = save_checkpoint(self.engine, self.checkpoints, step, client,
                                         self.recipe.train.save_total_limit, self.topo.rank)

    # --------------------------------------------------------------------------------------- finish
    def adaptation_record(self) -> dict:
        """What the final checkpoint's ``card.adaptation`` list gains for this run."""
        r, t = self.recipe, self.recipe.train
        return {
            "recipe": r.name, "recipe_sha256": r.sha256(), "steps": t.max_steps, "tokens": self.tokens_seen,
            "seq_len": t.seq_len, "world_size": self.topo.world, "zero_stage": self.run.zero_stage,
            "precision": self.run.precision, "data": r.data.path,
            "objective": {"kind": r.objective.kind, **asdict(self.run.objective)},
            "final": final_losses(self.metrics.last),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }

    def finish(self) -> dict:
        """Rank 0: consolidate the last checkpoint into ``final/`` and write the summary."""
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # rank 0's model construction below must not run zero.Init
        if self.topo.rank != 0:
            return {}
        tag, final = f"step{self.recipe.train.max_steps}", self.run_dir / "final"
        record = self.adaptation_record()
        self.log(f"consolidating {self.checkpoints / tag} -> {final}")
        consolidate(self.checkpoints, tag, self.run.model.path, final, record, asdict(self.recipe.decoding))
        from card.profile import profile_final_checkpoint  # per-slot loss curves into final's card metadata

        profile_final_checkpoint(final, self.data.validation, log=self.log)
        self.metrics.close()
        last = self.metrics.last
        summary = {"output_dir": str(self.run_dir), "final": str(final), "steps": self.recipe.train.max_steps,
                   "tokens": self.tokens_seen, "seconds": round(self.elapsed(), 2), "world_size": self.topo.world,
                   "zero_stage": self.run.zero_stage, "train": last.get("train", {}),
                   "validation": last.get("validation", {}), "data": self.data.info}
        write_summary(summary, self.run_dir)
        print_summary(summary, self.metrics.path)
        return summary


# -------------------------------------------------------------------------------------------- entry
def run(run_dir: str | os.PathLike) -> dict:
    """Train the recipe in ``run_dir/recipe.yaml`` on this rank (RANK/WORLD_SIZE/... from the environment).

    Returns the summary written to ``run_dir/summary.json`` (on rank 0; other ranks get an empty dict).
    The process group stays up afterwards: DeepSpeed caches its groups, so a second in-process run must
    reuse it rather than create a new one (workers destroy it in ``main`` before they exit).
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    run_dir = Path(run_dir).resolve()
    recipe = recipe_from_dict(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
    topo = Topology.from_env()
    cuda = torch.cuda.is_available()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    init_distributed(cuda)
    try:
        return train(resolve_run(recipe, topo.world, cuda), run_dir, topo)
    finally:
        unset_hf_deepspeed_config()


def _record_error(run_dir: Path, rank: int, message: str, exit_code: int) -> None:
    """``logs/error-rank{R}.json``: what the launcher reports as the run's one-line failure."""
    try:
        d = run_dir / "logs"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"error-rank{rank}.json").write_text(json.dumps({"rank": rank, "message": message, "exit_code": exit_code}))
    except OSError:
        pass


def main(argv: list[str] | None = None) -> None:
    """Entry point of one worker: ``python -m card.adapt.train --run-dir DIR`` (under torchrun)."""
    parser = argparse.ArgumentParser(description="one rank of a CARD adaptation run (launched by `card adapt`)")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    # Known noise: DeepSpeed calls torch.distributed functions that torch 2.13 deprecates.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-rank "Loading weights" bars
    die_with_parent()
    run_dir = Path(args.run_dir)
    rank = int(os.environ.get("RANK", "0"))
    try:
        run(run_dir)
        torch.distributed.destroy_process_group()
    except CardError as e:
        _record_error(run_dir, rank, str(e), 2)
        print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception as e:  # a bug: keep the traceback (Python exits with 1)
        _record_error(run_dir, rank, f"{type(e).__name__}: {first_line(e)}", 1)
        raise


if __name__ == "__main__":
    main()

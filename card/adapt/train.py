"""The distributed CARD training loop on a DeepSpeed engine.

This module is what every rank runs: ``python -m card.adapt.train --run-dir DIR`` (under torchrun), or
``run(DIR)`` in-process for a single process. ``DIR/recipe.yaml`` (a resolved recipe, written by the
launcher) is its only input. What it guarantees:

* the data order, the masks and dropout are pure functions of (seed, step, micro-step, rank), so a run
  resumed from ``DIR/checkpoints/latest`` logs the same losses as an uninterrupted one;
* a non-finite loss (checked on all ranks every step) stops the run before any further checkpoint;
* the final checkpoint ``DIR/final`` is a plain HF checkpoint (consolidated from the ZeRO shards, also under
  ZeRO-3) in the source's dtype, with the ``card`` metadata and an ``adaptation`` record appended.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from card.adapt.launch import die_with_parent
from card.adapt.objective import ObjectiveConfig, ar_loss, card_loss, causal_lm_loss
from card.adapt.recipe import Recipe, recipe_from_dict
from card.errors import CardError
from card.metadata import CardMetadata, ObjectiveDefaults, read_metadata, write_metadata

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------- small helpers
def mix_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts: different parts give independent streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def lr_factor(step: int, t) -> float:
    """The multiplier of ``train.lr`` for optimizer step ``step`` (0-based): linear warmup from
    1/warmup_steps to 1, then cosine to ``min_lr_ratio`` at ``max_steps`` (or constant)."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_precision(precision: str, cuda: bool) -> str:
    if precision != "auto":
        return precision
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -------------------------------------------------------------------------------------------- model
@dataclass
class ModelInfo:
    path: str  # local directory
    config: Any  # transformers PretrainedConfig
    meta: CardMetadata | None  # None: a plain AR checkpoint (allowed for objective.kind: ar)

    @property
    def doc_separator(self) -> str:
        return self.meta.doc_separator if self.meta else "eos"


def max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def resolve_model(recipe: Recipe) -> ModelInfo:
    """The recipe's checkpoint as a local directory, checked from its config alone (no weights read):
    it must hold ``train.seq_len`` positions and, for the CARD objective, be a CARD checkpoint."""
    import transformers as tf

    from card.checkpoint import check_checkpoint_path

    path = recipe.model
    if not Path(path).exists():
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(recipe.model)
        except Exception as e:
            raise CardError(f"recipe key model: {recipe.model!r} is not a local directory and the hub could not "
                            f"provide it ({_first_line(e)})") from None
    try:
        meta = check_checkpoint_path(path, require_card=recipe.objective.kind == "card")
    except CardError as e:
        raise CardError(f"recipe key model: {e}") from None
    config = tf.AutoConfig.from_pretrained(path)
    limit = max_positions(config)
    if limit is not None and recipe.train.seq_len > limit:
        raise CardError(f"recipe key train.seq_len: {recipe.train.seq_len} exceeds the model's maximum of {limit} positions")
    return ModelInfo(str(path), config, meta)


def objective_config(recipe: Recipe, meta: CardMetadata | None) -> ObjectiveConfig:
    o, d = recipe.objective, (meta.objective if meta else ObjectiveDefaults())
    return ObjectiveConfig(
        tail_factor=d.tail_factor if o.tail_factor is None else o.tail_factor,
        decay_p=d.decay_p if o.decay_p is None else o.decay_p,
        beta=d.beta if o.beta is None else o.beta,
        t_min=o.t_min,
        t_max=o.t_max,
    )


# ---------------------------------------------------------------------------------- DeepSpeed config
DEFAULT_DS_CONFIG: dict = {"zero_optimization": {"stage": 2}}


def build_ds_config(recipe: Recipe, world_size: int, hidden_size: int | None, cuda: bool) -> dict:
    """The DeepSpeed config with every ``"auto"`` filled from the recipe (as HF Trainer does).

    An explicit value that contradicts the recipe, a ``scheduler`` block (the schedule is the recipe's) or an
    ``"auto"`` we cannot fill is a one-line error naming the DeepSpeed key.
    """
    label = f"deepspeed config {recipe.deepspeed}" if recipe.deepspeed else "default deepspeed config"
    cfg = json.loads(Path(recipe.deepspeed).read_text()) if recipe.deepspeed else json.loads(json.dumps(DEFAULT_DS_CONFIG))
    t = recipe.train
    precision = resolve_precision(t.precision, cuda)

    def err(key: str, msg: str) -> CardError:
        return CardError(f"{label}: key {key}: {msg}")

    def fill(node: dict, key: str, value: Any, full: str, source: str) -> None:
        current = node.get(key, "auto")
        if current == "auto":
            node[key] = value
        elif current != value and not (isinstance(current, (int, float)) and isinstance(value, (int, float))
                                       and math.isclose(current, value)):
            raise err(full, f"{current} conflicts with {source} = {value}; set it to \"auto\" or remove it")

    if "scheduler" in cfg:
        raise err("scheduler", "remove it: the learning-rate schedule comes from train.lr_schedule / warmup_steps")
    fill(cfg, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train_micro_batch_size_per_gpu", "train.micro_batch_size")
    fill(cfg, "gradient_accumulation_steps", t.gradient_accumulation_steps, "gradient_accumulation_steps",
         "train.gradient_accumulation_steps")
    fill(cfg, "train_batch_size", t.micro_batch_size * t.gradient_accumulation_steps * world_size, "train_batch_size",
         f"train.micro_batch_size x train.gradient_accumulation_steps x {world_size} processes")
    fill(cfg, "gradient_clipping", float(t.grad_clip), "gradient_clipping", "train.grad_clip")
    for name in ("bf16", "fp16"):
        want = precision == name
        block = cfg.get(name)
        if block is None:
            if want:
                cfg[name] = {"enabled": True}
            continue
        enabled = block.get("enabled", "auto")
        if enabled == "auto":
            block["enabled"] = want
        elif bool(enabled) != want:
            raise err(f"{name}.enabled", f"{str(enabled).lower()} conflicts with train.precision (resolved to {precision})")
    zero = cfg.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise err("zero_optimization.stage", f"must be 0, 1, 2 or 3, got {stage!r}")
    if hidden_size:
        for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                           ("stage3_param_persistence_threshold", 10 * hidden_size)):
            if zero.get(key) == "auto":
                zero[key] = value
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    params = opt.setdefault("params", {})
    for key, value, source in (("lr", t.lr, "train.lr"), ("weight_decay", t.weight_decay, "train.weight_decay"),
                               ("betas", list(t.betas), "train.betas"), ("eps", t.eps, "train.eps")):
        if params.get(key, "auto") == "auto":
            params[key] = value
        elif key in ("lr", "weight_decay") and params[key] != value:
            raise err(f"optimizer.params.{key}", f"{params[key]} conflicts with {source} = {value}; set it to \"auto\"")
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)

    def leftover(node: Any, prefix: str) -> None:
        if node == "auto":
            raise err(prefix, "\"auto\" is not supported for this key; give a value")
        if isinstance(node, dict):
            for k, v in node.items():
                leftover(v, f"{prefix}.{k}" if prefix else k)

    leftover(cfg, "")
    return cfg


# ------------------------------------------------------------------------------------- distributed
def init_distributed(cuda: bool) -> None:
    """torch.distributed via DeepSpeed (gloo on CPU, NCCL on GPUs).

    On CPU, DeepSpeed JIT-compiles its shared-memory communication op at the first init (45-80 s with a
    C++ compiler, a crash without one); that op only speeds up inference all-reduce, so it is skipped
    unless CARD_DS_SHM=1. The patch must go through sys.modules: ``import deepspeed.comm.torch as m``
    binds PyTorch's ``torch`` (deepspeed.comm re-exports it).
    """
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401

    if not cuda and os.environ.get("CARD_DS_SHM") != "1":
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")


def _barrier() -> None:
    torch.distributed.barrier()


def _all_reduce(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------------------ metrics
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


def _round(x: float | None, digits: int = 8) -> float | None:
    """``x`` to ``digits`` significant digits; None for None and non-finite values (keeps the JSON strict)."""
    return None if x is None or not math.isfinite(x) else float(f"{x:.{digits}g}")


# ------------------------------------------------------------------------------------------ training
@dataclass
class Context:
    recipe: Recipe
    run_dir: Path
    rank: int
    world: int
    device: Any
    mask_id: int | None  # None for objective.kind: ar on a plain checkpoint
    objective: ObjectiveConfig
    completion_only: bool  # masks only hit completion tokens
    completion_loss: bool  # only completion tokens are targets

    def targets(self, maskable):
        return maskable if self.completion_loss else None

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, file=sys.stderr, flush=True)

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


def _to(batch, device):
    return batch.ids.to(device), batch.valid.to(device), batch.maskable.to(device)


@torch.no_grad()
def validate(ctx: Context, engine, rows) -> tuple[float, float]:
    """(CARD loss with fixed masks, clean AR loss) over the validation rows, token-weighted across ranks
    (both the AR loss for a plain checkpoint, which has no mask token).

    Under ZeRO-3 every forward is collective, so every rank runs the same number of them (ranks with no
    batch left re-run one with weight 0).
    """
    mb = ctx.recipe.train.micro_batch_size
    batches = [list(range(i, min(i + mb, len(rows)))) for i in range(0, len(rows), mb)]
    mine = batches[ctx.rank::ctx.world]
    sums = [0.0, 0.0, 0.0, 0.0]
    engine.eval()
    for k in range(math.ceil(len(batches) / ctx.world)):
        index, weight = (mine[k], 1.0) if k < len(mine) else (batches[0], 0.0)
        ids, valid, maskable = _to(rows.batch(index), ctx.device)
        ar, n = ar_loss(engine, ids, valid, ctx.targets(maskable))
        card, m = ar, n  # without a mask token (plain AR checkpoint) the validation loss is the AR loss
        if ctx.mask_id is not None:
            gen = torch.Generator().manual_seed(mix_seed(ctx.recipe.seed, "validation", index[0]))
            out = card_loss(engine, ids, ctx.mask_id, ctx.objective, gen, valid,
                            maskable if ctx.completion_only else None, ctx.targets(maskable))
            card, m = out.loss.item(), out.tokens
        sums = [s + weight * v for s, v in zip(sums, (card * m, m, ar * n, n))]
    engine.train()
    s = _all_reduce(sums, ctx.device)
    return s[0] / max(s[1], 1), s[2] / max(s[3], 1)


def _param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms and biases); under ZeRO-3 shapes are in ``ds_shape``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if weight_decay == 0:
        return [{"params": params}]
    ndim = lambda p: len(getattr(p, "ds_shape", p.shape))  # noqa: E731
    groups = [{"params": [p for p in params if ndim(p) >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if ndim(p) < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _latest_checkpoint(ckdir: Path) -> Path | None:
    latest = ckdir / "latest"
    return ckdir / latest.read_text().strip() if latest.exists() else None


def _prune(ckdir: Path, keep: int) -> None:
    tags = sorted((p for p in ckdir.glob("step*") if p.is_dir() and p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))
    latest = _latest_checkpoint(ckdir)
    for p in tags[:-keep]:
        if p != latest:
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(ctx: Context, engine, step: int, client: dict) -> None:
    """A DeepSpeed checkpoint with optimizer and scheduler state (collective); keeps the newest
    ``save_total_limit``."""
    engine.save_checkpoint(str(ctx.checkpoints), tag=f"step{step}", client_state=client)
    _barrier()
    if ctx.rank == 0:
        _prune(ctx.checkpoints, ctx.recipe.train.save_total_limit)


def consolidate(ckdir: Path, tag: str, info: ModelInfo, dst: Path, record: dict) -> None:
    """Rank 0: ZeRO shards -> one fp32 state dict -> a model built on the meta device from the source config
    (no second copy of the weights in memory) -> the source dtype -> ``dst``, written atomically with the
    tokenizer, the generation config and the ``card`` metadata plus ``record``."""
    import transformers as tf
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from card.io import atomic_directory

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckdir), tag=tag)
    config = tf.AutoConfig.from_pretrained(info.path)
    src_dtype = getattr(config, "dtype", None) or torch.float32
    src_dtype = getattr(torch, src_dtype) if isinstance(src_dtype, str) else src_dtype
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if unexpected or missing:
        raise CardError(f"consolidation of {ckdir / tag} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.to(src_dtype)
    meta = read_metadata(config)
    if meta is not None:  # a plain AR checkpoint trained with objective.kind: ar stays a plain checkpoint
        meta.adaptation.append(record)
        write_metadata(model.config, meta)
    try:
        model.generation_config = tf.GenerationConfig.from_pretrained(info.path)
    except OSError:
        pass  # the source had none; keep the default one
    tok = tf.AutoTokenizer.from_pretrained(info.path)
    with atomic_directory(dst, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def _restore_lr(engine, recipe: Recipe) -> None:
    """After a resume the recipe's ``train.lr`` wins over the one stored with the scheduler (so a changed
    learning rate takes effect); the schedule's position is the checkpoint's."""
    sched = engine.lr_scheduler
    sched.base_lrs = [recipe.train.lr for _ in sched.base_lrs]
    for g in sched.optimizer.param_groups:
        g["initial_lr"] = recipe.train.lr
        g["lr"] = recipe.train.lr * lr_factor(sched.last_epoch, recipe.train)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


def run(run_dir: str | os.PathLike) -> dict:
    """Train the recipe in ``run_dir/recipe.yaml`` on this rank (RANK/WORLD_SIZE/... from the environment).

    Returns the summary written to ``run_dir/summary.json`` (on rank 0; other ranks get an empty dict).
    The process group stays up afterwards: DeepSpeed caches its groups, so a second in-process run must
    reuse it rather than create a new one (workers destroy it in ``main`` before they exit).
    """
    run_dir = Path(run_dir).resolve()
    recipe = recipe_from_dict(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    init_distributed(cuda)
    try:
        return _train(recipe, run_dir, rank, world, local_rank, cuda)
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def _train(recipe: Recipe, run_dir: Path, rank: int, world: int, local_rank: int, cuda: bool) -> dict:
    import deepspeed
    import transformers as tf
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from card.adapt.data import load_data, tokenizer_fingerprint

    t_start = time.perf_counter()
    t = recipe.train
    info = resolve_model(recipe)
    ds_config = build_ds_config(recipe, world, getattr(info.config, "hidden_size", None), cuda)
    precision = resolve_precision(t.precision, cuda)
    stage = ds_config["zero_optimization"].get("stage", 0)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    ctx = Context(recipe, run_dir, rank, world, device, info.meta.mask_token_id if info.meta else None,
                  objective_config(recipe, info.meta),
                  recipe.objective.mask_scope == "completion", recipe.objective.loss_scope == "completion")
    if rank == 0:
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=1))

    # Data: one builder per node (local rank 0), the other ranks load its cache after the barrier.
    tok = tf.AutoTokenizer.from_pretrained(info.path)
    separator = recipe.data.separator or info.doc_separator
    load = lambda build: load_data(recipe.data, tok, t.seq_len, separator, tokenizer_fingerprint(info.path), build,  # noqa: E731
                                   log=ctx.log if build else (lambda _: None))
    data = load(True) if local_rank == 0 else None
    _barrier()
    if data is None:
        data = load(False)

    # Model: under ZeRO-3 the live HfDeepSpeedConfig makes from_pretrained load it partitioned (zero.Init)
    # on every rank; it must stay referenced until deepspeed.initialize is done.
    dschf = HfDeepSpeedConfig(ds_config) if stage == 3 else None  # noqa: F841
    model = tf.AutoModelForCausalLM.from_pretrained(info.path, dtype=DTYPES[precision])
    model.config.use_cache = False
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=_param_groups(model, t.weight_decay), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t)),
    )

    # Resume.
    start, tokens_seen, elapsed0 = 0, 0, 0.0
    latest = _latest_checkpoint(ctx.checkpoints)
    if latest is not None:
        try:
            path, client = engine.load_checkpoint(str(ctx.checkpoints))
        except Exception as e:
            raise CardError(f"cannot resume from {latest}: {_first_line(e)} (same number of processes and ZeRO stage?)") from None
        if path is None:
            raise CardError(f"cannot resume from {latest}: DeepSpeed found no checkpoint there")
        start, tokens_seen, elapsed0 = client["step"], client["tokens"], client.get("elapsed", 0.0)
        _restore_lr(engine, recipe)
        changed = sorted(k for k, v in _flat(recipe.to_dict()).items() if _flat(client.get("recipe", {})).get(k, v) != v)
        ctx.log(f"resuming from {latest} at step {start}" + (f" (recipe changed: {', '.join(changed)})" if changed else ""))
    metrics = MetricsLog(run_dir, start if latest is not None else -1) if rank == 0 else None
    last_good = latest

    def client_state(step: int) -> dict:
        return {"step": step, "tokens": tokens_seen, "elapsed": elapsed0 + time.perf_counter() - t_start,
                "recipe": recipe.to_dict()}

    def run_validation(step: int) -> None:
        if len(data.validation) == 0:
            return
        val_loss, val_ar = validate(ctx, engine, data.validation)
        if metrics:
            metrics.write({"step": step, "split": "validation", "val_loss": _round(val_loss), "val_ar_loss": _round(val_ar),
                           "elapsed": round(elapsed0 + time.perf_counter() - t_start, 2)})
            ctx.log(f"step {step}: val_loss {val_loss:.4f}, val_ar_loss {val_ar:.4f}")

    if start == 0:
        run_validation(0)
    from tqdm.auto import tqdm

    bar = tqdm(total=t.max_steps, initial=start, desc="adapt", disable=rank != 0, dynamic_ncols=True, mininterval=1.0)
    batches = data.step_batches(start, rank, world, t.gradient_accumulation_steps, t.micro_batch_size, recipe.seed)
    window_tokens, window_time = 0, 0.0
    for step in range(start, t.max_steps):
        n = step + 1
        t0 = time.perf_counter()
        torch.manual_seed(mix_seed(recipe.seed, "dropout", step, rank))
        micro_batches = next(batches)
        log_now = n % t.log_every == 0 or n == t.max_steps
        plain_ar = recipe.objective.kind == "ar"
        ar = 0.0
        if log_now and not plain_ar:  # the clean-input diagnostic on the step's first micro-batch, before the update
            engine.eval()  # (a collective forward under ZeRO-3: every rank runs it)
            ids, valid, maskable = _to(micro_batches[0], device)
            ar = ar_loss(engine, ids, valid, ctx.targets(maskable))[0]
            engine.train()
        sums = [0.0, 0.0, 0.0, 0.0]  # loss, corrupt_ce, mask_ratio, input tokens
        for micro, b in enumerate(micro_batches):
            ids, valid, maskable = _to(b, device)
            g = (step * t.gradient_accumulation_steps + micro) * world + rank  # global micro-batch number
            gen = torch.Generator().manual_seed(mix_seed(recipe.seed, "mask", g))
            if plain_ar:
                out = causal_lm_loss(engine, ids, valid, ctx.targets(maskable))
                ar += out.loss.item() / len(micro_batches) if log_now else 0.0  # the training loss is the AR loss
            else:
                out = card_loss(engine, ids, ctx.mask_id, ctx.objective, gen, valid,
                                maskable if ctx.completion_only else None, ctx.targets(maskable))
            engine.backward(out.loss)
            engine.step()
            sums = [s + v for s, v in zip(sums, (out.loss.item(), out.corrupt_ce, out.mask_ratio, float(valid.sum())))]
        grad_norm = engine.get_global_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        # fp32/bf16 DeepSpeed silently skips a step whose gradients overflow (fp16 does so by design, with
        # loss scaling), so a non-finite gradient norm is divergence as much as a non-finite loss.
        bad_grad = grad_norm is not None and not math.isfinite(grad_norm) and precision != "fp16"
        reduced = _all_reduce([*sums, ar, float(bad_grad)], device)
        loss = reduced[0] / (world * len(micro_batches))
        if not math.isfinite(loss) or reduced[5] > 0:
            what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient norm became {grad_norm}"
            where = f"Last good checkpoint: {last_good}" if last_good else "No checkpoint was saved"
            raise CardError(f"{what} at step {n}; stopping. {where}")
        step_tokens = int(reduced[3])
        tokens_seen += step_tokens
        window_tokens += step_tokens
        window_time += time.perf_counter() - t0
        if log_now and metrics:
            k = world * len(micro_batches)
            rec = {"step": n, "split": "train", "loss": _round(loss), "ar_loss": _round(reduced[4] / world),
                   "corrupt_ce": _round(reduced[1] / k), "mask_ratio": _round(reduced[2] / k),
                   "lr": _round(t.lr * lr_factor(step, t)),
                   "grad_norm": _round(grad_norm),
                   "tokens": tokens_seen, "tokens_per_second": round(window_tokens / max(window_time, 1e-9), 1),
                   "elapsed": round(elapsed0 + time.perf_counter() - t_start, 2)}
            metrics.write(rec)
            bar.set_postfix(loss=f"{loss:.4f}", ar=f"{reduced[4] / world:.4f}", refresh=False)
            window_tokens, window_time = 0, 0.0
        bar.update(1)
        if t.eval_every and n % t.eval_every == 0 and n != t.max_steps:
            run_validation(n)
        if t.save_every and n % t.save_every == 0 and n != t.max_steps:
            save_checkpoint(ctx, engine, n, client_state(n))
            last_good = ctx.checkpoints / f"step{n}"
    bar.close()

    tag = f"step{t.max_steps}"
    if start < t.max_steps:  # else: a finished run started again; only the consolidation is redone
        run_validation(t.max_steps)
        save_checkpoint(ctx, engine, t.max_steps, client_state(t.max_steps))
    unset_hf_deepspeed_config()  # rank 0's model construction below must not run zero.Init (pitfall 6)
    if rank != 0:
        return {}
    last = metrics.last
    record = {
        "recipe": recipe.name, "recipe_sha256": recipe.sha256(), "steps": t.max_steps, "tokens": tokens_seen,
        "seq_len": t.seq_len, "world_size": world, "zero_stage": stage, "precision": precision,
        "data": recipe.data.path, "objective": {"kind": recipe.objective.kind, **asdict(ctx.objective)},
        "final": {k: last.get(s, {}).get(k) for s, k in (("train", "loss"), ("train", "ar_loss"),
                                                            ("validation", "val_loss"), ("validation", "val_ar_loss"))},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    ctx.log(f"consolidating {ctx.checkpoints / tag} -> {run_dir / 'final'}")
    consolidate(ctx.checkpoints, tag, info, run_dir / "final", record)
    from card.profile import profile_final_checkpoint  # per-slot loss curves into final's card metadata

    profile_final_checkpoint(run_dir / "final", data.validation, log=ctx.log)
    metrics.close()
    summary = {"output_dir": str(run_dir), "final": str(run_dir / "final"), "steps": t.max_steps, "tokens": tokens_seen,
               "seconds": round(elapsed0 + time.perf_counter() - t_start, 2), "world_size": world, "zero_stage": stage,
               "train": last.get("train", {}), "validation": last.get("validation", {}), "data": data.info}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    _print_summary(summary, metrics.path)
    return summary


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _print_summary(summary: dict, metrics_path: Path) -> None:
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


# -------------------------------------------------------------------------------------------- main
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
    # Known noise (platform notes, pitfall 14): DeepSpeed calls torch collectives torch 2.13 deprecates.
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
        _record_error(run_dir, rank, f"{type(e).__name__}: {_first_line(e)}", 1)
        raise


if __name__ == "__main__":
    main()

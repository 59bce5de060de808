"""Resolve a recipe into a run: the model it trains, the objective's constants, the precision, the filled
DeepSpeed config and the learning-rate schedule.

The launcher's preflight and every worker call ``resolve_run`` on the same recipe, so what was checked
before the workers started is what they train. Nothing here loads weights: the model is read from its
``config.json`` alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from card.adapt.objective import ObjectiveConfig
from card.adapt.recipe import Recipe, TrainConfig
from card.checkpoint import check_checkpoint_path, max_positions, precision_dtype
from card.errors import CardError
from card.metadata import CardMetadata, ObjectiveDefaults

DEFAULT_DS_CONFIG: dict = {"zero_optimization": {"stage": 2}}


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when the message is empty)."""
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

    @property
    def hidden_size(self) -> int | None:
        return getattr(self.config, "hidden_size", None)


def resolve_model(recipe: Recipe) -> ModelInfo:
    """The recipe's checkpoint as a local directory, checked from its config alone (no weights read):
    it must hold ``train.seq_len`` positions and, for the CARD objective, be a CARD checkpoint."""
    import transformers as tf

    path = recipe.model
    if not Path(path).exists():
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(recipe.model)
        except Exception as e:
            raise CardError(f"recipe key model: {recipe.model!r} is not a local directory and the hub could not "
                            f"provide it ({first_line(e)})") from None
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
    """The objective's constants: the recipe's where it gives them, else the checkpoint's defaults."""
    o, d = recipe.objective, (meta.objective if meta else ObjectiveDefaults())
    return ObjectiveConfig(
        tail_factor=d.tail_factor if o.tail_factor is None else o.tail_factor,
        decay_p=d.decay_p if o.decay_p is None else o.decay_p,
        beta=d.beta if o.beta is None else o.beta,
        t_min=o.t_min,
        t_max=o.t_max,
    )


def resolve_precision(precision: str, cuda: bool) -> str:
    """``train.precision`` with ``auto`` resolved: bf16 on GPUs that support it, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"


# ---------------------------------------------------------------------------------------- schedule
def lr_factor(step: int, t: TrainConfig) -> float:
    """The multiplier of ``train.lr`` for optimizer step ``step`` (0-based): linear warmup from
    1/warmup_steps to 1, then cosine to ``min_lr_ratio`` at ``max_steps`` (or constant)::

        f(s) = (s + 1) / warmup                                   for s < warmup
        f(s) = r + (1 - r) * (1 + cos(pi * min(1, (s - warmup) / (max_steps - warmup)))) / 2
    """
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------- DeepSpeed config
class _Filler:
    """Fills ``"auto"`` values of one DeepSpeed config and names the key of any contradiction."""

    def __init__(self, label: str):
        self.label = label

    def err(self, key: str, msg: str) -> CardError:
        return CardError(f"{self.label}: key {key}: {msg}")

    def fill(self, node: dict, key: str, value: Any, full: str, source: str) -> None:
        current = node.get(key, "auto")
        if current == "auto":
            node[key] = value
        elif current != value and not (isinstance(current, (int, float)) and isinstance(value, (int, float))
                                       and math.isclose(current, value)):
            raise self.err(full, f"{current} conflicts with {source} = {value}; set it to \"auto\" or remove it")

    def leftover(self, node: Any, prefix: str = "") -> None:
        if node == "auto":
            raise self.err(prefix, "\"auto\" is not supported for this key; give a value")
        if isinstance(node, dict):
            for k, v in node.items():
                self.leftover(v, f"{prefix}.{k}" if prefix else k)


def _fill_batch(f: _Filler, cfg: dict, t: TrainConfig, world_size: int) -> None:
    f.fill(cfg, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train_micro_batch_size_per_gpu",
           "train.micro_batch_size")
    f.fill(cfg, "gradient_accumulation_steps", t.gradient_accumulation_steps, "gradient_accumulation_steps",
           "train.gradient_accumulation_steps")
    f.fill(cfg, "train_batch_size", t.micro_batch_size * t.gradient_accumulation_steps * world_size, "train_batch_size",
           f"train.micro_batch_size x train.gradient_accumulation_steps x {world_size} processes")
    f.fill(cfg, "gradient_clipping", float(t.grad_clip), "gradient_clipping", "train.grad_clip")


def _fill_precision(f: _Filler, cfg: dict, precision: str) -> None:
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
            raise f.err(f"{name}.enabled", f"{str(enabled).lower()} conflicts with train.precision (resolved to {precision})")


def _fill_zero(f: _Filler, cfg: dict, hidden_size: int | None) -> None:
    zero = cfg.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise f.err("zero_optimization.stage", f"must be 0, 1, 2 or 3, got {stage!r}")
    if hidden_size:
        for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                           ("stage3_param_persistence_threshold", 10 * hidden_size)):
            if zero.get(key) == "auto":
                zero[key] = value


def _fill_optimizer(f: _Filler, cfg: dict, t: TrainConfig) -> None:
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    params = opt.setdefault("params", {})
    for key, value, source in (("lr", t.lr, "train.lr"), ("weight_decay", t.weight_decay, "train.weight_decay"),
                               ("betas", list(t.betas), "train.betas"), ("eps", t.eps, "train.eps")):
        if params.get(key, "auto") == "auto":
            params[key] = value
        elif key in ("lr", "weight_decay") and params[key] != value:
            raise f.err(f"optimizer.params.{key}", f"{params[key]} conflicts with {source} = {value}; set it to \"auto\"")


def build_ds_config(recipe: Recipe, world_size: int, hidden_size: int | None, cuda: bool) -> dict:
    """The DeepSpeed config with every ``"auto"`` filled from the recipe (as HF Trainer does).

    An explicit value that contradicts the recipe, a ``scheduler`` block (the schedule is the recipe's) or an
    ``"auto"`` we cannot fill is a one-line error naming the DeepSpeed key.
    """
    label = f"deepspeed config {recipe.deepspeed}" if recipe.deepspeed else "default deepspeed config"
    cfg = json.loads(Path(recipe.deepspeed).read_text()) if recipe.deepspeed else json.loads(json.dumps(DEFAULT_DS_CONFIG))
    f = _Filler(label)
    if "scheduler" in cfg:
        raise f.err("scheduler", "remove it: the learning-rate schedule comes from train.lr_schedule / warmup_steps")
    _fill_batch(f, cfg, recipe.train, world_size)
    _fill_precision(f, cfg, resolve_precision(recipe.train.precision, cuda))
    _fill_zero(f, cfg, hidden_size)
    _fill_optimizer(f, cfg, recipe.train)
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    f.leftover(cfg)
    return cfg


# --------------------------------------------------------------------------------------------- run
@dataclass
class ResolvedRun:
    """Everything a rank needs to know about its run before it loads data or weights."""

    recipe: Recipe
    model: ModelInfo
    world_size: int
    cuda: bool
    precision: str  # fp32 | bf16 | fp16 (auto resolved)
    ds_config: dict  # every "auto" filled
    objective: ObjectiveConfig  # the CARD objective's constants (unused for objective.kind: ar)

    @property
    def zero_stage(self) -> int:
        return self.ds_config["zero_optimization"].get("stage", 0)

    @property
    def dtype(self) -> torch.dtype:
        return precision_dtype(self.precision)

    @property
    def mask_id(self) -> int | None:
        """None for objective.kind: ar on a plain checkpoint (there is no mask token)."""
        return self.model.meta.mask_token_id if self.model.meta else None

    @property
    def plain_ar(self) -> bool:
        return self.recipe.objective.kind == "ar"

    @property
    def separator(self) -> str:
        return self.recipe.data.separator or self.model.doc_separator

    def noise_and_targets(self, completion: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(positions the noise may hit, supervised targets) of a batch whose completion mask is
        ``completion``, as ``objective.mask_scope`` / ``loss_scope`` say; None means every valid position."""
        o = self.recipe.objective
        return (completion if o.mask_scope == "completion" else None,
                completion if o.loss_scope == "completion" else None)


def resolve_run(recipe: Recipe, world_size: int, cuda: bool | None = None) -> ResolvedRun:
    """The recipe resolved for a world of ``world_size`` processes (``cuda`` None: whether CUDA is here)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    info = resolve_model(recipe)
    ds_config = build_ds_config(recipe, world_size, info.hidden_size, cuda)
    return ResolvedRun(recipe, info, world_size, cuda, resolve_precision(recipe.train.precision, cuda), ds_config,
                       objective_config(recipe, info.meta))

"""The DeepSpeed engine of an adaptation run: building it, checkpoints (save, prune, resume) and the
consolidation of the ZeRO shards into a plain HF checkpoint.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from card.adapt.distributed import barrier
from card.adapt.recipe import Recipe, TrainConfig
from card.adapt.resolve import ResolvedRun, first_line, lr_factor
from card.errors import CardError
from card.metadata import read_metadata, write_metadata


# ---------------------------------------------------------------------------------------------- build
def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms and biases); under ZeRO-3 shapes are in ``ds_shape``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if weight_decay == 0:
        return [{"params": params}]
    ndim = lambda p: len(getattr(p, "ds_shape", p.shape))  # noqa: E731
    groups = [{"params": [p for p in params if ndim(p) >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if ndim(p) < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_engine(run: ResolvedRun):
    """The run's model loaded in its precision, wrapped in a DeepSpeed engine with the recipe's AdamW
    parameter groups and learning-rate schedule (``lr_factor``). Needs the process group (``init_distributed``).

    Under ZeRO-3 a live ``HfDeepSpeedConfig`` makes ``from_pretrained`` load the model partitioned
    (zero.Init) on every rank; it must stay referenced until ``deepspeed.initialize`` is done.
    """
    import deepspeed
    import transformers as tf
    from transformers.integrations import HfDeepSpeedConfig

    t = run.recipe.train
    dschf = HfDeepSpeedConfig(run.ds_config) if run.zero_stage == 3 else None  # noqa: F841
    model = tf.AutoModelForCausalLM.from_pretrained(run.model.path, dtype=run.dtype)
    model.config.use_cache = False
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, t.weight_decay), config=run.ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t)),
    )
    return engine


# ----------------------------------------------------------------------------------------- checkpoints
def latest_checkpoint(ckdir: Path) -> Path | None:
    latest = ckdir / "latest"
    return ckdir / latest.read_text().strip() if latest.exists() else None


def prune_checkpoints(ckdir: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` ``stepN`` checkpoints (never the one ``latest`` names)."""
    tags = sorted((p for p in ckdir.glob("step*") if p.is_dir() and p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))
    latest = latest_checkpoint(ckdir)
    for p in tags[:-keep]:
        if p != latest:
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(engine, ckdir: Path, step: int, client: dict, keep: int, rank: int) -> Path:
    """A DeepSpeed checkpoint ``ckdir/step{step}`` with optimizer and scheduler state (collective); keeps
    the newest ``keep``. Returns its path."""
    engine.save_checkpoint(str(ckdir), tag=f"step{step}", client_state=client)
    barrier()
    if rank == 0:
        prune_checkpoints(ckdir, keep)
    return ckdir / f"step{step}"


@dataclass
class Resumed:
    """Where a resumed run continues: the checkpoint and its client state."""

    path: Path
    step: int
    tokens: int
    elapsed: float
    changed: list[str]  # recipe keys whose value differs from the checkpoint's


def resume(engine, ckdir: Path, recipe: Recipe) -> Resumed | None:
    """Load ``ckdir/latest`` into ``engine`` (None when there is none); the recipe's ``train.lr`` wins."""
    latest = latest_checkpoint(ckdir)
    if latest is None:
        return None
    try:
        path, client = engine.load_checkpoint(str(ckdir))
    except Exception as e:
        raise CardError(f"cannot resume from {latest}: {first_line(e)} (same number of processes and ZeRO stage?)") from None
    if path is None:
        raise CardError(f"cannot resume from {latest}: DeepSpeed found no checkpoint there")
    restore_lr(engine, recipe.train)
    before, now = flatten(client.get("recipe", {})), flatten(recipe.to_dict())
    changed = sorted(k for k, v in now.items() if before.get(k, v) != v)
    return Resumed(latest, client["step"], client["tokens"], client.get("elapsed", 0.0), changed)


def restore_lr(engine, t: TrainConfig) -> None:
    """After a resume the recipe's ``train.lr`` wins over the one stored with the scheduler (so a changed
    learning rate takes effect); the schedule's position is the checkpoint's."""
    sched = engine.lr_scheduler
    sched.base_lrs = [t.lr for _ in sched.base_lrs]
    for g in sched.optimizer.param_groups:
        g["initial_lr"] = t.lr
        g["lr"] = t.lr * lr_factor(sched.last_epoch, t)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------------------- consolidation
def consolidate(ckdir: Path, tag: str, model_path: str, dst: Path, record: dict,
                decoding: dict | None = None) -> None:
    """Rank 0: ZeRO shards -> one fp32 state dict -> a model built on the meta device from the source config
    (no second copy of the weights in memory) -> the source dtype -> ``dst``, written atomically with the
    tokenizer, the generation config and the ``card`` metadata plus ``record`` and the recipe's ``decoding``
    defaults (keys set to None keep the source's).

    Call ``unset_hf_deepspeed_config()`` first: a live ZeRO-3 config would make this model's construction
    run zero.Init (a collective that rank 0 would wait on alone).
    """
    import transformers as tf
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from card.io import atomic_directory

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckdir), tag=tag)
    config = tf.AutoConfig.from_pretrained(model_path)
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
        for key, value in (decoding or {}).items():
            if value is not None:
                setattr(meta.decoding, key, value)
        write_metadata(model.config, meta)
    try:
        model.generation_config = tf.GenerationConfig.from_pretrained(model_path)
    except OSError:
        pass  # the source had none; keep the default one
    tok = tf.AutoTokenizer.from_pretrained(model_path)
    with atomic_directory(dst, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

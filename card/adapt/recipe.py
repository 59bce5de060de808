"""Adaptation recipes: a typed schema, YAML loading, ``--set key.sub=value`` overrides, validation.

Every problem is a one-line ``CardError`` that names the key path (``recipe key train.seq_len: ...``) and is
raised before any model or data is loaded.

Relative paths: input paths written in the recipe file (``model``, ``deepspeed``, ``data.path``,
``data.data_files``, ``data.validation_path``) resolve against the recipe file's directory; paths given with
``--set`` resolve against the current directory; ``output_dir`` and ``data.cache_dir`` always resolve
against the current directory. ``${VAR}`` and ``${VAR:-default}`` in strings expand from the environment.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import json
import os
import re
import types
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from card.errors import CardError

# Builder names `datasets` accepts as `data.path` together with `data.data_files`.
FILE_BUILDERS = ("text", "json", "csv", "parquet")


@dataclass
class DataConfig:
    path: str | None = None  # local file or folder, a builder name (text/json/csv/parquet) or a hub dataset id
    name: str | None = None  # hub dataset configuration
    split: str = "train"  # hub datasets only; local files have one split
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    text_field: str = "text"
    sample_by: Literal["line", "paragraph", "document"] = "paragraph"  # .txt files: what one document is
    streaming: bool = False  # tokenise on the fly, no cache (for datasets too large to tokenise up front)
    shuffle_buffer: int = 10_000  # streaming only: documents in the shuffle buffer
    separator: Literal["eos", "bos", "none"] | None = None  # None: the checkpoint's card.doc_separator
    validation_fraction: float = 0.01  # every (1/fraction)-th document is held out
    validation_path: str | None = None  # a separate validation file/folder (then nothing is held out)
    max_validation_blocks: int = 64
    cache_dir: str | None = None  # default $CARD_CACHE_DIR or ~/.cache/card/data
    prompt_field: str | None = None  # with completion_field: one unpacked row per record
    completion_field: str | None = None
    messages_field: str | None = None  # a list of {role, content}: chat template; assistant turns = completion
    packing: bool = True  # False: one document per row, truncated and right-padded


@dataclass
class ObjectiveSection:
    kind: Literal["card", "ar"] = "card"  # ar: plain next-token CE on clean input (AR pre-training/fine-tuning)
    tail_factor: float | None = None  # None: from the checkpoint's card metadata
    decay_p: float | None = None
    beta: float | None = None
    t_min: float = 0.0
    t_max: float = 1.0
    mask_scope: Literal["all", "completion"] = "all"  # completion: masks only hit completion tokens
    loss_scope: Literal["all", "completion"] = "all"  # completion: only completion tokens are targets (SFT-style)


@dataclass
class DecodingSection:
    """The decoding defaults the final checkpoint records (``card.decoding``); None keeps the checkpoint's.

    ``block_size`` is also how many masks the slot profile measured at the end of the run covers, which is
    what automatic lookahead starts from: a recipe whose answers run to 14 tokens sets 16.
    """

    threshold: float | None = None
    block_size: int | None = None


@dataclass
class TrainConfig:
    max_steps: int = 1000
    seq_len: int = 512
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0  # 0 disables clipping
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPUs that have it, else fp32
    gradient_checkpointing: bool = False
    log_every: int = 10
    eval_every: int = 0  # 0: validate only at the end
    save_every: int = 0  # 0: only the final checkpoint
    save_total_limit: int = 2


@dataclass
class Recipe:
    model: str | None = None  # CARD checkpoint directory or hub id (required)
    output_dir: str | None = None  # default runs/<recipe name>
    seed: int = 0
    deepspeed: str | None = None  # DeepSpeed JSON config; None: ZeRO-2 with the recipe's settings
    name: str = "recipe"  # recorded in the checkpoint's adaptation history
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    decoding: DecodingSection = field(default_factory=DecodingSection)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------- type checks
def _err(key: str, msg: str) -> CardError:
    return CardError(f"recipe key {key}: {msg}")


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in get_args(tp) if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in get_args(tp) else "")
    if origin is list:
        return f"a list of {_describe(get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp``; raises a one-line error naming ``key``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except CardError:
                pass
        raise _err(key, f"expected {_describe(tp)}, got {_show(value)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise _err(key, f"expected {_describe(tp)}, got {_show(value)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _err(key, f"expected {_describe(tp)}, got {_show(value)}")
        return [_coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _err(key, f"expected a mapping, got {_show(value)}")
        return {str(k): _coerce(v, get_args(tp)[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise _err(key, f"expected {_describe(tp)}, got {_show(value)}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from ``raw``, rejecting unknown keys (with a suggestion) and bad types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _err(prefix or "(top level)", f"expected a mapping, got {_show(raw)}")
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
            raise CardError(f"unknown recipe key {key}{hint}")
        tp = hints[k]
        kwargs[k] = _build(tp, v, key) if is_dataclass(tp) else _coerce(v, tp, key)
    return cls(**kwargs)


# ----------------------------------------------------------------------------------- env and overrides
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, key: str) -> Any:
    """Expand ``${VAR}`` / ``${VAR:-default}`` in every string of ``value``."""
    if isinstance(value, dict):
        return {k: _expand(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        var, default = m.group(1), m.group(2)
        if var in os.environ:
            return os.environ[var]
        if default is not None:
            return default
        raise _err(key, f"environment variable {var} is not set (or override the key with --set {key}=...)")

    return _ENV.sub(sub, value)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 3e-4); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
        raise CardError(f"--set expects key.sub=value, got {text!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def _set(raw: dict, path: list[str], value: Any) -> None:
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise _err(".".join(path[: i + 1]), f"is not a section, cannot set {'.'.join(path)}")
        node = child
    node[path[-1]] = value


# ----------------------------------------------------------------------------------------------- paths
# (key path, kind): "input" paths follow the origin rule; "maybe" ones may also be hub ids; "output" use CWD.
_PATH_KEYS = {
    ("model",): "maybe",
    ("deepspeed",): "input",
    ("output_dir",): "output",
    ("data", "path"): "maybe",
    ("data", "validation_path"): "maybe",
    ("data", "cache_dir"): "output",
}


def _looks_local(value: str, base: Path) -> bool:
    return value.startswith(("/", ".", "~")) or (base / value).exists()


def _resolve_path(value: str, base: Path) -> str:
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else (base / p).resolve())


def _get(raw: dict, path: tuple[str, ...]) -> Any:
    node: Any = raw
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _resolve_paths(raw: dict, recipe_dir: Path, overridden: set[tuple[str, ...]]) -> None:
    cwd = Path.cwd()

    def base_for(path: tuple[str, ...]) -> Path:
        return cwd if any(path[: i + 1] in overridden for i in range(len(path))) else recipe_dir

    for path, kind in _PATH_KEYS.items():
        value = _get(raw, path)
        if not isinstance(value, str) or not value:
            continue
        base = cwd if kind == "output" else base_for(path)
        if kind == "maybe" and not _looks_local(value, base):
            continue  # a hub id
        _set(raw, list(path), _resolve_path(value, base))
    data = raw.get("data")
    files = data.get("data_files") if isinstance(data, dict) else None
    if files is not None and _local_data(data):
        base = base_for(("data", "data_files"))
        fix = lambda v: _resolve_path(v, base) if isinstance(v, str) else v  # noqa: E731
        if isinstance(files, str):
            data["data_files"] = fix(files)
        elif isinstance(files, list):
            data["data_files"] = [fix(v) for v in files]
        elif isinstance(files, dict):
            data["data_files"] = {k: [fix(x) for x in v] if isinstance(v, list) else fix(v) for k, v in files.items()}


def _local_data(data: dict) -> bool:
    """``data_files`` are local paths when ``data.path`` is a builder name or absent (not a hub dataset)."""
    path = data.get("path")
    return path is None or path in FILE_BUILDERS


# ------------------------------------------------------------------------------------------ validation
def _check_range(key: str, value: Any, ok: bool, rule: str) -> None:
    if not ok:
        raise _err(key, f"must be {rule}, got {_show(value)}")


def _check_exists(key: str, value: str) -> None:
    if any(c in value for c in "*?["):
        if not glob.glob(value, recursive=True):
            raise _err(key, f"no file matches {value}")
    elif not Path(value).exists():
        raise _err(key, f"no such file or directory: {value}")


def validate(r: Recipe) -> Recipe:
    """Value ranges, cross-key rules and the existence of local input files. Returns ``r``."""
    t, d, o = r.train, r.data, r.objective
    if not r.model:
        raise _err("model", "is required (a CARD checkpoint directory; convert a model with card-convert first)")
    if Path(r.model).is_absolute() and not Path(r.model).exists():
        raise _err("model", f"no such directory: {r.model}")
    for name in ("max_steps", "seq_len", "micro_batch_size", "gradient_accumulation_steps", "log_every", "save_total_limit"):
        v = getattr(t, name)
        _check_range(f"train.{name}", v, v >= (2 if name == "seq_len" else 1), ">= 2" if name == "seq_len" else ">= 1")
    for name in ("warmup_steps", "eval_every", "save_every"):
        v = getattr(t, name)
        _check_range(f"train.{name}", v, v >= 0, ">= 0")
    _check_range("train.lr", t.lr, t.lr > 0, "> 0")
    _check_range("train.min_lr_ratio", t.min_lr_ratio, 0 <= t.min_lr_ratio <= 1, "between 0 and 1")
    _check_range("train.weight_decay", t.weight_decay, t.weight_decay >= 0, ">= 0")
    _check_range("train.grad_clip", t.grad_clip, t.grad_clip >= 0, ">= 0 (0 disables clipping)")
    _check_range("train.betas", t.betas, len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "two numbers in [0, 1)")
    _check_range("train.eps", t.eps, t.eps > 0, "> 0")
    _check_range("objective.t_min", o.t_min, 0 <= o.t_min <= 1, "between 0 and 1")
    _check_range("objective.t_max", o.t_max, o.t_min <= o.t_max <= 1, "between objective.t_min and 1")
    if o.tail_factor is not None:
        _check_range("objective.tail_factor", o.tail_factor, o.tail_factor >= 1, ">= 1")
    if o.decay_p is not None:
        _check_range("objective.decay_p", o.decay_p, 0 <= o.decay_p <= 1, "between 0 and 1")
    if o.beta is not None:
        _check_range("objective.beta", o.beta, o.beta > 0, "> 0")
    if r.decoding.threshold is not None:
        _check_range("decoding.threshold", r.decoding.threshold, 0 < r.decoding.threshold <= 1, "in (0, 1]")
    if r.decoding.block_size is not None:
        _check_range("decoding.block_size", r.decoding.block_size, r.decoding.block_size >= 0, ">= 0")
    _check_range("data.validation_fraction", d.validation_fraction, 0 <= d.validation_fraction < 1, "in [0, 1)")
    _check_range("data.max_validation_blocks", d.max_validation_blocks, d.max_validation_blocks >= 1, ">= 1")
    _check_range("data.shuffle_buffer", d.shuffle_buffer, d.shuffle_buffer >= 1, ">= 1")
    if (d.prompt_field is None) != (d.completion_field is None):
        missing = "data.completion_field" if d.completion_field is None else "data.prompt_field"
        raise _err(missing, "is required when the other of data.prompt_field / data.completion_field is set")
    if d.messages_field is not None and d.prompt_field is not None:
        raise _err("data.messages_field", "cannot be combined with data.prompt_field / data.completion_field")
    for key, scope in (("objective.mask_scope", o.mask_scope), ("objective.loss_scope", o.loss_scope)):
        if scope == "completion" and d.completion_field is None and d.messages_field is None:
            raise _err(key, "'completion' needs data.prompt_field and data.completion_field, or data.messages_field")
    if d.path is None and d.data_files is None:
        raise _err("data.path", "is required (a text/json/jsonl/csv/parquet file or folder, or a hub dataset id)")
    if d.path is not None and Path(d.path).is_absolute():
        _check_exists("data.path", d.path)
    if d.validation_path is not None and Path(d.validation_path).is_absolute():
        _check_exists("data.validation_path", d.validation_path)
    if d.data_files is not None and (d.path is None or d.path in FILE_BUILDERS):
        files = d.data_files
        items = [files] if isinstance(files, str) else files if isinstance(files, list) else [
            x for v in files.values() for x in ([v] if isinstance(v, str) else v)]
        for i, f in enumerate(items):
            _check_exists("data.data_files" if isinstance(files, str) else f"data.data_files[{i}]", f)
    if r.deepspeed is not None:
        _check_exists("deepspeed", r.deepspeed)
        try:
            json.loads(Path(r.deepspeed).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _err("deepspeed", f"{r.deepspeed} is not valid JSON ({e})") from None
    return r


# ---------------------------------------------------------------------------------------------- public
def load_recipe(
    path: str | os.PathLike | None,
    overrides: list[str] | tuple[str, ...] = (),
    output_dir: str | None = None,
) -> Recipe:
    """Read a YAML recipe, apply ``--set`` overrides, expand ``${VAR}``, resolve paths, validate.

    ``path`` None starts from the defaults (then ``--set model=...`` etc. must supply the rest).
    Returns a fully resolved ``Recipe`` (absolute local paths, ``output_dir`` set) or raises ``CardError``.
    """
    raw: dict = {}
    recipe_dir = Path.cwd()
    name = "recipe"
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise CardError(f"recipe {path} is a directory; pass a YAML recipe file (see recipes/)")
        if not p.is_file():
            raise CardError(f"recipe {path} does not exist")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise CardError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise CardError(f"recipe {path} must be a mapping of keys, not {type(raw).__name__}")
        recipe_dir, name = p.resolve().parent, p.stem
    raw.setdefault("name", name)
    overridden: set[tuple[str, ...]] = set()
    for text in overrides:
        key, value = parse_override(text)
        _set(raw, key, value)
        overridden.add(tuple(key))
    if output_dir is not None:
        raw["output_dir"] = output_dir
        overridden.add(("output_dir",))
    raw = _expand(raw, "")
    _resolve_paths(raw, recipe_dir, overridden)
    recipe = _build(Recipe, raw, "")
    if recipe.output_dir is None:
        recipe.output_dir = str((Path.cwd() / "runs" / recipe.name).resolve())
    validate(recipe)
    check_output_dir(recipe)
    return recipe


def check_output_dir(r: Recipe) -> None:
    """The run directory must be usable (a writable folder, not the current one, not inside or equal to an
    input); an existing one is fine, it is resumed. Checked where a run starts, not in every worker."""
    from card.io import check_destination

    d = r.data
    check_destination(r.output_dir, replace=False, label="recipe key output_dir:",
                      inputs=[r.model, d.path, d.validation_path, r.deepspeed])


def recipe_from_dict(raw: dict) -> Recipe:
    """A ``Recipe`` from an already resolved dict (e.g. a run directory's ``recipe.yaml``)."""
    return validate(_build(Recipe, raw, ""))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)

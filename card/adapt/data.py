"""Training data: load with ``datasets``, tokenise with document separators, pack into blocks, hold out
a validation split, cache the result, and serve micro-batches in an order that is a pure function of
(seed, step, micro-step, rank).

Documents. A record's text is ``record[text_field]`` (``.txt`` files: one document per line, paragraph or
file, ``data.sample_by``). Document ``i`` (in source order) is held out for validation when
``floor((i+1) * f) > floor(i * f)`` with ``f = data.validation_fraction``: exactly ``floor(n * f)`` evenly
spread documents, chosen without randomness, so the split is the same for every seed and in streaming mode.

Rows. Packed text (the default): documents are concatenated with the separator (``eos`` after each
document, ``bos`` before each one, as the model was pretrained) and cut into ``seq_len`` blocks; the last
partial block is dropped; every token is real and maskable. Unpacked text (``packing: false``): one
document per row, truncated and right-padded. Prompt/completion records: one row
``prompt + completion`` with the separator in the same place, right-padded, the prompt truncated from the
left when the row is too long; ``completion`` marks the completion tokens (and a trailing EOS).

Cache. The tokenised rows are stored as ``.npy`` files under ``cache_dir/<name>-<key>/``, where the key
hashes the data spec (paths, sizes and mtimes of local files), the tokenizer files, ``seq_len``, the
separator and the split settings. A second run with the same key loads the arrays at once.
"""

from __future__ import annotations

import array
import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from card.adapt.recipe import FILE_BUILDERS, DataConfig
from card.errors import CardError
from card.io import atomic_directory
from card.paths import cache_dir

CACHE_VERSION = 1
EXTENSIONS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja")
ENCODE_BATCH = 512  # documents per tokenizer call


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) long
    valid: torch.Tensor  # (B, T) bool: real tokens (not padding)
    completion: torch.Tensor  # (B, T) bool: completion tokens of prompt/completion rows, else == valid


@dataclass
class Rows:
    """Fixed-length rows. ``valid`` None means every token is real; ``completion`` None means no
    prompt/completion structure (every valid token is a completion token)."""

    ids: np.ndarray  # (N, T) int32
    valid: np.ndarray | None = None  # (N, T) bool
    completion: np.ndarray | None = None  # (N, T) bool

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def batch(self, index: np.ndarray | list[int]) -> Batch:
        index = np.asarray(index)
        ids = torch.from_numpy(np.ascontiguousarray(self.ids[index])).long()
        valid = torch.ones_like(ids, dtype=torch.bool) if self.valid is None else torch.from_numpy(self.valid[index].copy())
        comp = valid if self.completion is None else torch.from_numpy(self.completion[index].copy()) & valid
        return Batch(ids, valid, comp)


# --------------------------------------------------------------------------------------------- sources
def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for c in COMPRESSIONS:
        name = name.removesuffix(c)
    return EXTENSIONS.get(Path(name).suffix)


def local_files(path: str, key: str) -> tuple[str, list[str]]:
    """(builder, sorted files) of a local file or folder; one kind of file per source."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(
        f for f in p.rglob("*") if f.is_file() and _kind(f) and not any(s.startswith(".") for s in f.relative_to(p).parts))
    if not files:
        raise CardError(f"recipe key {key}: {path} holds no .txt/.json/.jsonl/.csv/.parquet files")
    kinds = {_kind(f) for f in files}
    if None in kinds:
        raise CardError(f"recipe key {key}: cannot tell the format of {path} (use .txt, .json, .jsonl, .csv or .parquet)")
    if len(kinds) > 1:
        raise CardError(f"recipe key {key}: {path} mixes file formats ({', '.join(sorted(kinds))}); keep one kind")
    return kinds.pop(), [str(f) for f in files]


def _is_local(path: str | None) -> bool:
    return path is not None and os.path.isabs(path) and os.path.exists(path)


def _open_source(path: str | None, spec: DataConfig, key: str, streaming: bool) -> Iterable[dict]:
    """Records of one source, in a fixed order. Local files are always read as a stream (the tokenised
    cache replaces datasets' own Arrow copy); hub datasets use ``datasets``' cache unless ``streaming``."""
    from datasets import load_dataset

    kwargs: dict[str, Any] = {}
    if _is_local(path):
        builder, files = local_files(path, key)
        args, kwargs, streaming = (builder,), {"data_files": files, "split": "train"}, True
    elif path is None or path in FILE_BUILDERS:
        builder = path or _builder_of(spec.data_files, key)
        args, kwargs, streaming = (builder,), {"data_files": spec.data_files, "split": "train"}, True
    else:
        builder = None
        args = (path,)
        kwargs = {"name": spec.name, "split": spec.split}
        if spec.data_files is not None:
            kwargs["data_files"] = spec.data_files
    if builder == "text":
        kwargs["sample_by"] = spec.sample_by
    try:
        records = load_dataset(*args, streaming=streaming, **kwargs)
    except Exception as e:  # datasets raises many types; the first line says what went wrong
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CardError(f"recipe key {key}: cannot load dataset {path}: {first}") from None
    local = kwargs.get("data_files") if builder is not None else None
    return _Checked(records, key, path, local if isinstance(local, list) else _file_list(local), builder)


def _file_list(data_files: Any) -> list[str]:
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [f for v in data_files.values() for f in ([v] if isinstance(v, str) else v)]
    return [f for f in data_files or [] if isinstance(f, str)]


@dataclass
class _Checked:
    """Records of a source whose read errors (bad bytes, malformed lines) become one line naming the file
    and the line: ``datasets`` reads lazily and reports them as long tracebacks from deep inside Arrow."""

    records: Iterable[dict]
    key: str
    path: str | None
    files: list[str]
    builder: str | None

    def __iter__(self) -> Iterator[dict]:
        _quiet_reader_errors()
        it = iter(self.records)
        while True:
            try:
                rec = next(it)
            except StopIteration:
                return
            except CardError:
                raise
            except Exception as e:
                raise CardError(f"recipe key {self.key}: {read_error(self.files, self.builder, e)}") from None
            yield rec


def _drop_reported(record) -> bool:
    return not record.getMessage().startswith("Failed to load JSON from file")


@functools.lru_cache(maxsize=1)
def _quiet_reader_errors() -> None:
    """``datasets``' JSON reader logs its parse error before raising it; ``_Checked`` reports it as one line."""
    import logging

    logging.getLogger("datasets.packaged_modules.json.json").addFilter(_drop_reported)


def read_error(files: list[str], builder: str | None, error: BaseException) -> str:
    """Where a source cannot be read: the first file and line that is not UTF-8 text (or, for JSON lines,
    not one JSON value), else the reader's own first line."""
    for f in files:
        if _kind(Path(f)) is None or Path(f).name.lower().endswith(COMPRESSIONS) or not os.path.isfile(f):
            continue
        where = _bad_line(f, builder)
        if where:
            return where
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    named = f"{files[0]}: " if len(files) == 1 else ""
    return f"cannot read {named}{first}"


def _bad_line(path: str, builder: str | None) -> str | None:
    whole_json = False
    if builder == "json":
        try:  # a .json file may be one JSON document spanning many lines
            json.loads(Path(path).read_bytes())
            whole_json = True
        except (ValueError, UnicodeDecodeError):
            pass
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{path} line {n} is not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
            if builder == "json" and not whole_json and line.strip():
                try:
                    json.loads(line)
                except ValueError as e:
                    return f"{path} line {n} is not valid JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')})"
    return None


def _builder_of(data_files: Any, key: str) -> str:
    first = data_files if isinstance(data_files, str) else (
        data_files[0] if isinstance(data_files, list) else next(iter(data_files.values())))
    first = first if isinstance(first, str) else first[0]
    kind = _kind(Path(first))
    if kind is None:
        raise CardError(f"recipe key data.data_files: cannot tell the format of {first}")
    return kind


def source_fingerprint(path: str | None, spec: DataConfig, key: str) -> Any:
    """What identifies a source's content: local files by path, size and mtime; hub data by its spec."""
    if _is_local(path):
        _, files = local_files(path, key)
    elif path is None or path in FILE_BUILDERS:
        files = spec.data_files if isinstance(spec.data_files, list) else [spec.data_files]
        files = [f for f in files if isinstance(f, str)]
    else:
        return {"hub": path, "name": spec.name, "split": spec.split, "data_files": spec.data_files}
    return [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files if os.path.exists(f)]


def tokenizer_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over the tokenizer files of a checkpoint directory."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        f = Path(model_dir) / name
        if f.exists():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- documents
def is_validation(index: int, fraction: float) -> bool:
    """Document ``index`` is held out: exactly floor(n * fraction) of the first n documents, evenly spread."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


@dataclass
class Document:
    text: str
    prompt: str | None = None  # set for prompt/completion records (then ``text`` is the completion)
    messages: list[dict[str, str]] | None = None  # set for chat records (``data.messages_field``)


def _documents(records: Iterable[dict], spec: DataConfig, key: str) -> Iterator[Document]:
    """Non-empty documents of ``records``; a missing column is a one-line error naming the key."""
    if spec.messages_field is not None:
        yield from _chat_documents(records, spec.messages_field, key)
        return
    pc = spec.prompt_field is not None
    checked = False
    for rec in records:
        if not checked:
            for f, k in ([(spec.prompt_field, "data.prompt_field"), (spec.completion_field, "data.completion_field")]
                         if pc else [(spec.text_field, "data.text_field")]):
                if f not in rec:
                    raise CardError(f"recipe key {k}: column {f!r} not found in {key.split('.')[-1]} "
                                    f"(columns: {', '.join(map(str, rec))})")
            checked = True
        if pc:
            p, c = rec[spec.prompt_field], rec[spec.completion_field]
            if c is not None and str(c).strip():
                yield Document(str(c), "" if p is None else str(p))
        else:
            t = rec[spec.text_field]
            if t is not None and str(t).strip():
                yield Document(str(t))


def _split(docs: Iterable[Document], fraction: float, want_validation: bool) -> Iterator[Document]:
    for i, d in enumerate(docs):
        if is_validation(i, fraction) == want_validation:
            yield d


# ------------------------------------------------------------------------------------------------ rows
@dataclass
class RowFormat:
    seq_len: int
    separator: str  # "eos" | "bos" | "none"
    sep_id: int | None
    pad_id: int
    packing: bool
    prompt_completion: bool
    chat: bool = False  # rows are conversations rendered with the chat template (``data.messages_field``)


def _encode(tok, texts: list[str]) -> list[list[int]]:
    return tok(texts, add_special_tokens=False)["input_ids"]


def _prompt_completion_ids(tok, docs: list[Document]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) per record, split where ``prompt + completion`` diverges from ``prompt``
    alone, so the completion is tokenised in context (no spurious word-start piece)."""
    full = _encode(tok, [d.prompt + d.text for d in docs])
    prompts = _encode(tok, [d.prompt for d in docs])
    out = []
    for f, p in zip(full, prompts):
        n = 0
        while n < min(len(f), len(p)) and f[n] == p[n]:
            n += 1
        out.append((f[:n], f[n:]))
    return out


def _chunks(it: Iterable[Document], size: int) -> Iterator[list[Document]]:
    buf: list[Document] = []
    for d in it:
        buf.append(d)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def iter_rows(docs: Iterable[Document], tok, fmt: RowFormat, stats: dict) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
    """Rows (ids, valid or None, completion or None) from ``docs``; updates ``stats`` counters."""
    T, sep = fmt.seq_len, ([] if fmt.sep_id is None else [fmt.sep_id])
    before, after = (sep, []) if fmt.separator == "bos" else ([], sep)
    buffer = array.array("i")
    for chunk in _chunks(docs, ENCODE_BATCH):
        stats["documents"] += len(chunk)
        if fmt.chat:
            yield from _chat_rows(tok, chunk, fmt, stats)
            continue
        if fmt.prompt_completion:
            for p, c in _prompt_completion_ids(tok, chunk):
                comp = c + after
                room = T - len(before) - len(comp)
                if room < 0:  # the completion alone overflows the row: keep its start
                    comp, room = comp[: T - len(before)], 0
                    stats["truncated"] += 1
                elif len(p) > room:
                    stats["truncated"] += 1
                p = p[max(0, len(p) - room):]  # keep the prompt's end, nearest the completion
                yield _padded(before + p + comp, len(before) + len(p), T, fmt.pad_id)
                stats["tokens"] += len(before) + len(p) + len(comp)
            continue
        for ids in _encode(tok, [d.text for d in chunk]):
            ids = before + ids + after
            stats["tokens"] += len(ids)
            if fmt.packing:
                buffer.extend(ids)
                while len(buffer) >= T:
                    yield np.frombuffer(buffer[:T].tobytes(), dtype=np.int32).copy(), None, None
                    del buffer[:T]
            else:
                if len(ids) > T:
                    stats["truncated"] += 1
                row, valid, _ = _padded(ids[:T], 0, T, fmt.pad_id)
                yield row, valid, None
    stats["dropped_tokens"] += len(buffer)


def _padded(ids: list[int], completion_start: int, T: int, pad_id: int):
    row = np.full(T, pad_id, dtype=np.int32)
    row[: len(ids)] = ids
    valid = np.zeros(T, dtype=bool)
    valid[: len(ids)] = True
    comp = np.zeros(T, dtype=bool)
    comp[completion_start: len(ids)] = True
    return row, valid, comp


# ------------------------------------------------------------------------------------------ chat records
def _chat_documents(records: Iterable[dict], field_name: str, key: str) -> Iterator[Document]:
    """Conversations of ``records[field_name]``: lists of ``{role, content}`` with at least one assistant turn."""
    for n, rec in enumerate(records):
        if field_name not in rec:
            raise CardError(f"recipe key data.messages_field: column {field_name!r} not found in {key.split('.')[-1]} "
                            f"(columns: {', '.join(map(str, rec))})")
        conv = rec[field_name]
        if conv is None:
            continue
        if not isinstance(conv, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in conv):
            raise CardError(f"recipe key data.messages_field: record {n} is not a list of {{role, content}} messages")
        if any(m["role"] == "assistant" and m["content"].strip() for m in conv):
            yield Document("", messages=[{"role": m["role"], "content": m["content"]} for m in conv])


def _chat_rows(tok, docs: list[Document], fmt: RowFormat, stats: dict):
    """One right-padded row per conversation, rendered with the chat template; ``completion`` marks the tokens
    of the assistant turns (their answers and end-of-turn tokens). A row too long keeps its start."""
    from card.chat import render_with_spans

    T = fmt.seq_len
    for d in docs:
        text, spans = render_with_spans(tok, d.messages)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        comp = [any(s < e_span and e > s_span for s_span, e_span in spans) for s, e in offsets]
        if len(ids) > T:
            stats["truncated"] += 1
            ids, comp = ids[:T], comp[:T]
        stats["tokens"] += len(ids)
        row = np.full(T, fmt.pad_id, dtype=np.int32)
        row[: len(ids)] = ids
        valid = np.zeros(T, dtype=bool)
        valid[: len(ids)] = True
        completion = np.zeros(T, dtype=bool)
        completion[: len(ids)] = comp
        yield row, valid, completion


def collect(rows: Iterable[tuple], limit: int | None = None) -> Rows:
    """Stack rows into arrays (at most ``limit``); ``valid``/``completion`` stay None when never given."""
    ids, valid, comp = [], [], []
    for r in rows:
        ids.append(r[0])
        valid.append(r[1])
        comp.append(r[2])
        if limit is not None and len(ids) >= limit:
            break
    if not ids:
        return Rows(np.zeros((0, 0), dtype=np.int32))
    stack = lambda xs: None if xs[0] is None else np.stack(xs)  # noqa: E731
    return Rows(np.stack(ids), stack(valid), stack(comp))


# ------------------------------------------------------------------------------------- prepared data
@dataclass
class PreparedData:
    """Tokenised training and validation rows held in memory (memory-mapped from the cache)."""

    train: Rows
    validation: Rows
    info: dict = field(default_factory=dict)  # documents, tokens, blocks, cache path, cache_hit, seconds

    def step_batches(self, start_step: int, rank: int, world: int, gas: int, mb: int, seed: int) -> Iterator[list[Batch]]:
        """For each step from ``start_step`` on: this rank's ``gas`` micro-batches (see ``sample_index``)."""
        step = start_step
        while True:
            yield [self.train.batch(micro_batch_indices(len(self.train), seed, step, micro, rank, world, gas, mb))
                   for micro in range(gas)]
            step += 1


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def sample_index(n: int, seed: int, sample: int) -> int:
    """Row of global sample number ``sample``: epoch ``sample // n`` visits all rows in a seeded order."""
    return int(_permutation(n, seed, sample // n)[sample % n])


def micro_batch_indices(n: int, seed: int, step: int, micro: int, rank: int, world: int, gas: int, mb: int) -> list[int]:
    """Rows of one micro-batch: a pure function of (seed, step, micro, rank) and the batch shape.

    Global samples are numbered ``((step * gas + micro) * world + rank) * mb + b``, so a step's global batch
    is the same set of rows whichever way it is split into ranks and accumulation steps.
    """
    first = ((step * gas + micro) * world + rank) * mb
    return [sample_index(n, seed, first + b) for b in range(mb)]


def cache_root(spec: DataConfig) -> Path:
    if spec.cache_dir:
        return Path(spec.cache_dir)
    return cache_dir("data")


def cache_key(spec: DataConfig, fmt: RowFormat, tokenizer_fp: str) -> str:
    parts = {
        "version": CACHE_VERSION,
        "source": source_fingerprint(spec.path, spec, "data.path"),
        "validation_source": None if spec.validation_path is None else source_fingerprint(spec.validation_path, spec, "data.validation_path"),
        "spec": {k: getattr(spec, k) for k in ("path", "name", "split", "data_files", "text_field", "sample_by",
                                               "validation_fraction", "validation_path", "max_validation_blocks",
                                               "prompt_field", "completion_field", "packing", "messages_field")},
        "format": [fmt.seq_len, fmt.separator, fmt.sep_id, fmt.pad_id],
        "tokenizer": tokenizer_fp,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _cache_name(spec: DataConfig) -> str:
    base = Path(spec.path).name if spec.path else "data"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in base)[:40]


def _save(dst: Path, train: Rows, validation: Rows, info: dict) -> None:
    for split, rows in (("train", train), ("validation", validation)):
        np.save(dst / f"{split}_ids.npy", rows.ids)
        if rows.valid is not None:
            np.save(dst / f"{split}_valid.npy", rows.valid)
        if rows.completion is not None:
            np.save(dst / f"{split}_completion.npy", rows.completion)
    (dst / "info.json").write_text(json.dumps(info, indent=1))


def _load(src: Path) -> tuple[Rows, Rows, dict]:
    def rows(split: str) -> Rows:
        opt = lambda n: np.load(src / f"{split}_{n}.npy", mmap_mode="r") if (src / f"{split}_{n}.npy").exists() else None  # noqa: E731
        return Rows(np.load(src / f"{split}_ids.npy", mmap_mode="r"), opt("valid"), opt("completion"))

    return rows("train"), rows("validation"), json.loads((src / "info.json").read_text())


def row_format(spec: DataConfig, tok, seq_len: int, separator: str) -> RowFormat:
    """The row layout; a separator the tokenizer lacks is a one-line error."""
    sep_id = None
    if separator != "none":
        sep_id = tok.eos_token_id if separator == "eos" else tok.bos_token_id
        if sep_id is None:
            raise CardError(f"recipe key data.separator: the tokenizer has no {separator} token; choose another separator")
    pad_id = next((i for i in (tok.pad_token_id, tok.eos_token_id, sep_id) if i is not None), 0)
    fmt = RowFormat(seq_len, separator, sep_id, pad_id, spec.packing, spec.prompt_field is not None)
    if spec.messages_field is not None:
        if not getattr(tok, "chat_template", None):
            raise CardError("recipe key data.messages_field: the model's tokenizer has no chat template to render "
                            "the conversations with")
        fmt.chat = True
    return fmt


def _build(spec: DataConfig, tok, fmt: RowFormat, log: Callable[[str], None]) -> tuple[Rows, Rows, dict]:
    t0 = time.perf_counter()
    train_stats = dict(documents=0, tokens=0, dropped_tokens=0, truncated=0)
    val_stats = dict(train_stats)
    docs = lambda path, key: _documents(_open_source(path, spec, key, spec.streaming), spec, key)  # noqa: E731
    if spec.validation_path is not None:
        train_docs = docs(spec.path, "data.path")
        val_docs = docs(spec.validation_path, "data.validation_path")
    else:
        train_docs = _split(docs(spec.path, "data.path"), spec.validation_fraction, False)
        val_docs = _split(docs(spec.path, "data.path"), spec.validation_fraction, True)
    log(f"tokenising {spec.path or spec.data_files} ...")
    train = collect(iter_rows(train_docs, tok, fmt, train_stats))
    validation = collect(iter_rows(val_docs, tok, fmt, val_stats), limit=spec.max_validation_blocks)
    if train_stats["documents"] == 0:
        raise CardError(f"recipe key data.path: {spec.path or spec.data_files} has no training documents "
                        f"(no non-empty {spec.completion_field or spec.text_field!r} values)")
    if len(train) == 0:
        raise CardError(f"recipe key train.seq_len: the training split has {train_stats['tokens']} tokens, "
                        f"fewer than one block of {fmt.seq_len}")
    want_val = spec.validation_path is not None or spec.validation_fraction > 0
    if want_val and len(validation) == 0:
        key = "data.validation_path" if spec.validation_path else "data.validation_fraction"
        raise CardError(f"recipe key {key}: the validation split is empty ({val_stats['documents']} documents, "
                        f"{val_stats['tokens']} tokens; need one block of {fmt.seq_len}); "
                        f"set data.validation_fraction: 0 to train without validation")
    info = {"train": {**train_stats, "rows": len(train)}, "validation": {**val_stats, "rows": len(validation)},
            "seq_len": fmt.seq_len, "separator": fmt.separator, "build_seconds": round(time.perf_counter() - t0, 3)}
    return train, validation, info


def prepare_data(
    spec: DataConfig, tok, seq_len: int, separator: str, tokenizer_fp: str, build: bool = True,
    log: Callable[[str], None] = print,
) -> PreparedData:
    """Tokenised train/validation rows, from the cache when possible.

    With ``build`` False (ranks that waited for another rank to build) a missing cache is an error.
    The cache directory appears atomically, so concurrent builders never see a partial one.
    """
    fmt = row_format(spec, tok, seq_len, separator)
    dst = cache_root(spec) / f"{_cache_name(spec)}-{cache_key(spec, fmt, tokenizer_fp)}"
    t0 = time.perf_counter()
    if not (dst / "info.json").exists():
        if not build:
            raise CardError(f"data cache {dst} is missing (another rank should have built it)")
        train, validation, info = _build(spec, tok, fmt, log)
        try:
            with atomic_directory(dst) as tmp:
                _save(tmp, train, validation, info)
        except CardError:
            if not (dst / "info.json").exists():  # not a lost race with another builder
                raise
        hit = False
    else:
        hit = True
    train, validation, info = _load(dst)
    info.update(cache=str(dst), cache_hit=hit, seconds=round(time.perf_counter() - t0, 3))
    log(f"data: {'cache hit' if hit else 'cached'} {dst} ({len(train)} training rows, {len(validation)} validation rows "
        f"of {seq_len} tokens, {info['seconds']:.1f}s)")
    return PreparedData(train, validation, info)


# ------------------------------------------------------------------------------------------- streaming
def _shuffled(docs: Iterable[Document], buffer: int, rng: np.random.Generator) -> Iterator[Document]:
    """A shuffle buffer: fill ``buffer`` documents, then emit a random one for each new arrival."""
    buf: list[Document] = []
    for d in docs:
        if len(buf) < buffer:
            buf.append(d)
            continue
        i = int(rng.integers(len(buf)))
        buf[i], d = d, buf[i]
        yield d
    rng.shuffle(buf)
    yield from buf


@dataclass
class StreamingData:
    """Rows tokenised on the fly from a stream (no cache). Rank ``r`` of ``w`` reads the training documents
    ``i`` with ``i % w == r`` (so each rank tokenises only its share) through a shuffle buffer seeded by
    (seed, epoch, rank), packs them, and takes ``gas * mb`` rows per step; resuming at step ``s`` skips the
    ``s * gas * mb`` rows consumed before. The order is a function of (seed, world size, rank)."""

    spec: DataConfig
    tok: Any
    fmt: RowFormat
    validation: Rows
    info: dict = field(default_factory=dict)

    def _train_docs(self, rank: int, world: int) -> Iterator[Document]:
        spec = self.spec
        docs = _documents(_open_source(spec.path, spec, "data.path", True), spec, "data.path")
        if spec.validation_path is None:
            docs = _split(docs, spec.validation_fraction, False)
        return (d for i, d in enumerate(docs) if i % world == rank)

    def rows(self, seed: int, rank: int = 0, world: int = 1) -> Iterator[tuple]:
        """This rank's endless sequence of training rows, epoch after epoch."""
        epoch = 0
        while True:
            stats = dict(documents=0, tokens=0, dropped_tokens=0, truncated=0)
            rng = np.random.default_rng([seed, epoch, rank])
            produced = False
            for row in iter_rows(_shuffled(self._train_docs(rank, world), self.spec.shuffle_buffer, rng), self.tok, self.fmt, stats):
                produced = True
                yield row
            if not produced:
                raise CardError(f"recipe key data.path: the stream {self.spec.path} yields no training rows of "
                                f"{self.fmt.seq_len} tokens for rank {rank} of {world}")
            epoch += 1

    def step_batches(self, start_step: int, rank: int, world: int, gas: int, mb: int, seed: int) -> Iterator[list[Batch]]:
        rows = self.rows(seed, rank, world)
        for _ in range(start_step * gas * mb):  # resume: skip what earlier steps consumed
            next(rows)
        while True:
            yield [collect(next(rows) for _ in range(mb)).batch(np.arange(mb)) for _ in range(gas)]


def prepare_streaming(spec: DataConfig, tok, seq_len: int, separator: str, log: Callable[[str], None] = print) -> StreamingData:
    """Streaming data: only the validation rows are materialised (the first ``max_validation_blocks``)."""
    fmt = row_format(spec, tok, seq_len, separator)
    stats = dict(documents=0, tokens=0, dropped_tokens=0, truncated=0)
    if spec.validation_path is not None:
        val_docs = _documents(_open_source(spec.validation_path, spec, "data.validation_path", True), spec, "data.validation_path")
    else:
        val_docs = _split(_documents(_open_source(spec.path, spec, "data.path", True), spec, "data.path"),
                          spec.validation_fraction, True)
    want_val = spec.validation_path is not None or spec.validation_fraction > 0
    validation = collect(iter_rows(val_docs, tok, fmt, stats), limit=spec.max_validation_blocks) if want_val else collect([])
    if want_val and len(validation) == 0:
        key = "data.validation_path" if spec.validation_path else "data.validation_fraction"
        raise CardError(f"recipe key {key}: the validation split is empty (need one block of {seq_len} tokens)")
    data = StreamingData(spec, tok, fmt, validation, {"streaming": True, "validation": {**stats, "rows": len(validation)}})
    next(data.rows(0))  # fail now, not in the first step, if the stream is empty or a column is missing
    log(f"data: streaming {spec.path} ({len(validation)} validation rows of {seq_len} tokens)")
    return data


def load_data(spec: DataConfig, tok, seq_len: int, separator: str, tokenizer_fp: str, build: bool = True,
              log: Callable[[str], None] = print) -> PreparedData | StreamingData:
    """The training data of a recipe: cached rows, or a stream when ``spec.streaming``."""
    if spec.streaming:
        return prepare_streaming(spec, tok, seq_len, separator, log)
    return prepare_data(spec, tok, seq_len, separator, tokenizer_fp, build, log)

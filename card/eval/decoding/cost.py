"""The cost model c(B, q): measured seconds of one decode forward for batch B and q new query tokens.

A forward over q query tokens on top of a cached prefix costs more than over one, by an amount that depends
on the model, the device, the dtype, the threads and the batch: on a CPU the matmuls grow with B * q, on a
GPU a few extra tokens are nearly free. Lookahead pays only when a forward commits more than

    break_even(B, k) = c(B, 1 + k) / c(B, 1)

tokens (k masks or drafts), so the planner (``card.eval.decoding.planner``) reads these numbers.

Measurement: for each batch size on the grid 1, 2, 4, 8, ... (a batch is priced at the next grid point up,
which over-prices lookahead slightly: the conservative side), a cache over a random prefix of
``PREFIX`` tokens is built once, then forwards over q in ``QUERY_GRID`` are timed round-robin (one warm-up
round, then the minimum over rounds until ``BUDGET_S`` is spent: at least 5, at most 25), each with the
2D attention mask the batched decoder passes and followed by the softmax the decoders take, and the cache is
cropped back. Between grid points c is interpolated
linearly in q, and it is made non-decreasing (noise must not make a longer forward look cheaper). Past the
grid (a prompt's forward) it grows with the slope of the measured last segment: where small-M matrix
products are slow paths the made-up non-decreasing table is flat there, and would price a wide forward's
extra tokens at nothing.

Tables are cached in memory and on disk under ``$CARD_CACHE_DIR/cost`` (default ``~/.cache/card/cost``),
one JSON file per (weights fingerprint, device, dtype, threads, torch version).
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import time
import weakref
from pathlib import Path
from typing import Callable

import torch
import transformers as tf

from card import paths
from card.checkpoint import max_positions

BATCH_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUERY_GRID = (1, 2, 3, 5, 9, 17)
PREFIX = 64
MIN_ROUNDS, MAX_ROUNDS = 5, 25
# Timed rounds per batch size stop after this long (at least MIN_ROUNDS: large models). The minimum over
# rounds is the estimate: on a busy machine a forward is often preempted, and with only 2 rounds one busy
# stretch inflated the one-token cost so much that the table came out flat (break-even 1.0: lookahead free).
BUDGET_S = 0.5
# 3: at least 5 rounds (tables measured with 2 are not reused). Files store the tables as measured; older ones
# stored them made non-decreasing, which reads the same except for the slope past the grid.
FORMAT = 3

_MEMORY: dict[str | tuple, "CostModel"] = {}  # by the key's digest, and by the fields it is made from


def cache_dir() -> Path:
    return paths.cache_dir("cost")


def fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of the weights: names, shapes, dtypes and a strided sample of each tensor's values."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


_WEIGHTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """``fingerprint(model)``, made again only once a weight tensor was replaced or changed in place.

    Every decode call looks its cost model up (the lm-eval model makes one call per batch), and hashing the
    weights costs 1 ms on the demo model and 5 ms on SmolLM2-135M; reading each tensor's storage and
    in-place version counter costs a tenth of that.
    """
    try:
        state = tuple((t.data_ptr(), t._version) for t in _tensors(model))
    except RuntimeError:  # inference tensors keep no version counter: hash every time
        return fingerprint(model)
    hit = _WEIGHTS.get(model)
    if hit is None or hit[0] != state:
        hit = _WEIGHTS[model] = (state, fingerprint(model))
    return hit[1]


def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``model`` (a shared one once per holder), by walking the module tree
    directly: ``parameters()`` builds every module's dotted name on the way, four times the cost."""
    out, stack = [], [model]
    while stack:
        module = stack.pop()
        out += [t for t in module._parameters.values() if t is not None]
        out += [t for t in module._buffers.values() if t is not None]
        stack += [m for m in module._modules.values() if m is not None]
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def grid_batch(batch: int) -> int:
    """The grid point a batch is priced at: the smallest grid size >= ``batch``."""
    return next((b for b in BATCH_GRID if b >= batch), BATCH_GRID[-1])


def interpolate(table: dict[int, float], q: float, slope: float | None = None) -> float:
    """c at ``q`` from points {q_i: c_i}: linear between them; past the last, c(q_n) + slope (q - q_n), by
    default with the last segment's slope."""
    qs = sorted(table)
    if q <= qs[0]:
        return table[qs[0]]
    for lo, hi in zip(qs, qs[1:]):
        if q <= hi:
            return table[lo] + (table[hi] - table[lo]) * (q - lo) / (hi - lo)
    if slope is None:
        slope = tail_slope(table)
    return table[qs[-1]] + slope * (q - qs[-1])


def tail_slope(table: dict[int, float]) -> float:
    """(c_n - c_{n-1}) / (q_n - q_{n-1}) of the last two points, at least 0: seconds per extra query token."""
    qs = sorted(table)
    if len(qs) < 2:
        return 0.0
    lo, hi = qs[-2], qs[-1]
    return max(0.0, (table[hi] - table[lo]) / (hi - lo))


def monotone(table: dict[int, float]) -> dict[int, float]:
    """c(B, q) never decreases in q (running maximum) and never exceeds q one-token forwards, q c(B, 1)."""
    out, best = {}, 0.0
    first = table[min(table)]
    for q in sorted(table):
        best = max(best, min(table[q], q * first))
        out[q] = best
    return out


class CostModel:
    """c(B, q) for one model on its device (see the module docstring); measured lazily per batch grid point."""

    def __init__(self, key: dict, measure: Callable[[int], dict[int, float]] | None,
                 measured: dict[int, dict[int, float]] | None = None, path: Path | None = None) -> None:
        self.key = key
        self.measured: dict[int, dict[int, float]] = dict(measured or {})  # per batch grid point, as timed
        self.tables = {b: monotone(t) for b, t in self.measured.items()}  # made non-decreasing
        self._measure = measure
        self.path = path
        self.measured_seconds = 0.0  # time spent measuring in this process
        self._dense: dict[int, tuple[list[float], float]] = {}  # per batch: c at q = 0, 1, ..., and the slope past them

    @classmethod
    def for_model(cls, model: tf.PreTrainedModel) -> "CostModel":
        """The (cached) cost model of ``model`` on its device, dtype and current thread count."""
        device = model.device
        fields = (weights_fingerprint(model), str(device), model.dtype, torch.get_num_threads())
        cm = _MEMORY.get(fields)  # a decode call looks its cost model up: skip the key's JSON and hash
        if cm is not None:
            cm._measure = lambda b: measure_table(model, b)
            return cm
        key = {"format": FORMAT, "weights": fields[0], "device": fields[1], "device_name": device_name(device),
               "dtype": str(model.dtype).removeprefix("torch."), "threads": fields[3], "torch": torch.__version__,
               "prefix": PREFIX, "query_grid": list(QUERY_GRID)}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        if digest in _MEMORY:
            cm = _MEMORY[fields] = _MEMORY[digest]
            cm._measure = lambda b: measure_table(model, b)
            return cm
        path = cache_dir() / f"{digest}.json"
        tables = _read(path, key)
        cm = cls(key, lambda b: measure_table(model, b), tables, path)
        _MEMORY[digest] = _MEMORY[fields] = cm
        return cm

    def measure_up_to(self, batch: int) -> None:
        """Measure every grid size a batch of ``batch`` rows reaches as its rows finish and leave it."""
        for b in BATCH_GRID:
            if b <= grid_batch(batch):
                self.table(b)

    def table(self, batch: int) -> dict[int, float]:
        b = grid_batch(batch)
        if b not in self.tables:
            if self._measure is None:
                raise KeyError(b)
            t0 = time.perf_counter()
            self.measured[b] = self._measure(b)
            self.tables[b] = monotone(self.measured[b])
            self.measured_seconds += time.perf_counter() - t0
            self._save()
        return self.tables[b]

    def __call__(self, batch: int, q: float) -> float:
        """c(B, q) in seconds, q may be fractional (an expected query length)."""
        hit = self._dense.get(batch)  # keyed by the batch itself: the planner asks at every forward
        if hit is None:
            table, slope = self.table(batch), tail_slope(self.measured[grid_batch(batch)])
            hit = self._dense[batch] = (
                [0.0] + [interpolate(table, q, slope) for q in range(1, 2 * max(QUERY_GRID) + 2)], slope)
        dense, slope = hit
        if q < len(dense) - 1:
            lo = int(q)
            return dense[lo] + (dense[lo + 1] - dense[lo]) * (q - lo) if lo >= 1 else dense[1]
        return interpolate(self.table(batch), q, slope)

    def break_even(self, batch: int, k: int) -> float:
        """Tokens a forward with k extra query tokens must commit to match AR: c(B, 1 + k) / c(B, 1)."""
        return self(batch, 1 + k) / self(batch, 1)

    def summary(self, batch: int, k: int) -> dict:
        """What results record: the batch's measured table (ms) and the break-even of k extra tokens."""
        b = grid_batch(batch)
        return {"batch_priced_at": b, "ms": {str(q): 1000 * c for q, c in self.table(b).items()},
                "break_even_k": k, "break_even": self.break_even(batch, k), "threads": self.key["threads"],
                "device": self.key["device"]}

    def _save(self) -> None:
        if self.path is None:
            return
        from card.io import atomic_write_text

        try:
            tables = {**(_read(self.path, self.key) or {}), **self.measured}  # keep what another process added
            data = {"key": self.key, "tables": {str(b): {str(q): c for q, c in t.items()} for b, t in tables.items()}}
            atomic_write_text(self.path, json.dumps(data, indent=1) + "\n")
        except OSError:  # a read-only cache folder only costs a re-measurement next time
            pass


def _read(path: Path, key: dict) -> dict[int, dict[int, float]] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("key") != key:
        return None
    return {int(b): {int(q): float(c) for q, c in t.items()} for b, t in data.get("tables", {}).items()}


@torch.inference_mode()
def measure_table(model: tf.PreTrainedModel, batch: int) -> dict[int, float]:
    """Seconds of one forward (+ softmax over the kept logits) per q in ``QUERY_GRID`` at ``batch``."""
    device = model.device
    limit = max_positions(model.config) or 2048
    prefix = max(1, min(PREFIX, limit - max(QUERY_GRID) - 1))
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, prefix + max(QUERY_GRID)), generator=gen).to(device)
    cache = tf.DynamicCache(config=model.config)
    model(input_ids=ids[:, :prefix], past_key_values=cache, use_cache=True, logits_to_keep=1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once(q: int) -> float:
        pos = torch.arange(prefix, prefix + q, device=device).expand(batch, -1)
        # The batched decoder passes a 2D mask over cache + segment (pads, rejected drafts): so do we.
        mask = None
        if batch > 1:  # with a hole (one padded slot), so the model cannot skip the mask as all-ones
            mask = torch.ones(batch, prefix + q, dtype=torch.bool, device=device)
            mask[0, 0] = False
        sync()
        t = time.perf_counter()
        out = model(input_ids=ids[:, prefix:prefix + q], position_ids=pos, attention_mask=mask,
                    past_key_values=cache, use_cache=True, logits_to_keep=q)
        torch.softmax(out.logits.float(), -1).max(-1)
        sync()
        dt = time.perf_counter() - t
        cache.crop(-q)
        return dt

    for q in QUERY_GRID:  # warm-up round
        once(q)
    best = {q: float("inf") for q in QUERY_GRID}
    start = time.perf_counter()
    for r in range(MAX_ROUNDS):
        for q in QUERY_GRID:
            best[q] = min(best[q], once(q))
        if r + 1 >= MIN_ROUNDS and time.perf_counter() - start > BUDGET_S:
            break
    return best

"""Per-slot loss curves of a CARD model: how well it predicts 1, 2, ..., K+1 tokens ahead.

A CARD forward over a prefix x[0:s] plus K masks gives K+1 distributions (docs/method.md, "Position alignment"): slot 1 from
the logits at the last prefix token (position s-1, exact AR), slot j+1 from the logits at mask j (position
s-1+j). Slot j therefore predicts x[s+j-1]. For every slot j and prefix-length bucket b this module measures

    loss_bits[j][b] = mean over measured (row, s) with s in b of  -log2 p_j(x[s+j-1] | x[0:s], M^(j-1))
    accuracy[j][b]  = mean of  [argmax p_j == x[s+j-1]]
    runs[key][j][b] = mean of  prod_{i=2..j} [slot i passes]   (runs[key][1][b] = 1: slot 1 is always kept)

``runs`` measures what decoding accepts, a contiguous run of mask slots: under ``"greedy"`` a slot passes
when its argmax is the next token (lossless accepts a mask's guess while it equals the AR token), under
``"conf>=t"`` when its top probability is at least t (parallel's prefix rule at threshold t). The ratio
runs[j+1] / runs[j] is the acceptance of mask j given the ones before it, which is what the planner needs;
accuracies alone cannot give it (a deep mask right 5% of the time, whether or not the masks before it were
right, looked accepted 95% of the time after them).

with the decoder's vocabulary (the mask token and padding rows never predicted). Bucket b holds the prefix
lengths ``bucket_edges[b] <= s < bucket_edges[b+1]`` (the last bucket is open). The result is the dict stored
at ``config.json["card"]["slot_profile"]``; the ARDM planner (card.ardm.plan) and the decoding engine read it.

Many prefixes share one forward: the clean row x[0:b] is followed by one block of K masks per measured
prefix s, with a 4D attention mask letting block s see only x[0:s] and its own earlier masks, and position
ids s, s+1, ... for its masks. Each block's logits equal those of a separate forward over x[0:s] + K masks
(tested), at a fraction of the cost.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from card.errors import CardError

FORMAT = 1
DEFAULT_BUCKET_EDGES = (0, 16, 64, 256)
DEFAULT_POSITIONS_PER_FORWARD = 32
DEFAULT_MAX_ROWS = 64
RUN_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)  # parallel thresholds whose acceptance runs a profile records


def bucket_index(s: int | np.ndarray, edges: Sequence[int]) -> int | np.ndarray:
    """The bucket b with ``edges[b] <= s < edges[b+1]`` (the last bucket is ``s >= edges[-1]``)."""
    return np.searchsorted(np.asarray(edges), s, side="right") - 1


def check_bucket_edges(edges: Sequence[int]) -> list[int]:
    edges = [int(e) for e in edges]
    if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise CardError(f"bucket edges must start at 0 and increase strictly, got {edges}")
    return edges


def packed_inputs(row: torch.Tensor, prefixes: Sequence[int], K: int, mask_id: int, dtype: torch.dtype):
    """One sequence measuring every prefix in ``prefixes`` at once.

    Returns ``(input_ids (Q,), position_ids (Q,), additive mask (Q, Q))`` for
    ``x[0:b] + [M]*K per prefix`` with ``b = max(prefixes)``: clean query q attends keys 0..q; mask j (0-based)
    of the block for prefix s sits at index ``b + i*K + j``, has position ``s + j`` and attends x[0:s] and
    masks 0..j of its own block.
    """
    b = max(prefixes)
    m = len(prefixes)
    q = b + m * K
    allowed = torch.zeros(q, q, dtype=torch.bool)
    allowed[:b, :b] = torch.tril(torch.ones(b, b, dtype=torch.bool))
    pos = torch.empty(q, dtype=torch.long)
    pos[:b] = torch.arange(b)
    block = torch.tril(torch.ones(K, K, dtype=torch.bool))
    for i, s in enumerate(prefixes):
        lo = b + i * K
        allowed[lo:lo + K, :s] = True
        allowed[lo:lo + K, lo:lo + K] = block
        pos[lo:lo + K] = torch.arange(s, s + K)
    ids = torch.cat([row[:b], torch.full((m * K,), mask_id, dtype=row.dtype)])
    mask = torch.zeros(q, q, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids, pos, mask


def _card_info(model) -> tuple[int, list[int]]:
    from card.metadata import read_metadata

    meta = read_metadata(model.config)
    if meta is None:
        raise CardError("the model is not a CARD checkpoint (no 'card' key in its config); convert it first")
    return meta.mask_token_id, meta.suppressed_token_ids


@torch.no_grad()
def measure_slot_profile(
    model,
    token_rows: Sequence[Sequence[int]] | np.ndarray | torch.Tensor,
    K: int,
    bucket_edges: Sequence[int] = DEFAULT_BUCKET_EDGES,
    *,
    positions_per_forward: int = DEFAULT_POSITIONS_PER_FORWARD,
    measured_by: str = "measure_slot_profile",
    on_forward: Callable[[], None] | None = None,
    first_prefix: Sequence[int] | None = None,
    thresholds: Sequence[float] = RUN_THRESHOLDS,
) -> dict[str, Any]:
    """Per-slot mean loss (bits), greedy accuracy and acceptance runs by prefix bucket, over every prefix of
    every row.

    ``token_rows``: token id rows (each a clean sequence, usually starting with BOS); every prefix length
    s = 1 .. len(row)-1 is measured, slot j only where the target x[s+j-1] lies inside the row. Rows of equal
    length share batched forwards. ``first_prefix[i]``: row i counts only prefixes s >= first_prefix[i]
    (prompt/completion data: where a decoder writes, not inside the prompt, whose next tokens no model can
    guess). ``thresholds``: the confidence levels whose runs are recorded. Returns the ``slot_profile`` dict
    (module docstring); buckets with no measurement hold ``None``.
    """
    edges = check_bucket_edges(bucket_edges)
    if K < 0:
        raise CardError(f"K (masks per forward) must be >= 0, got {K}")
    mask_id, suppressed = _card_info(model)
    rows = [torch.as_tensor(np.asarray(r), dtype=torch.long).reshape(-1) for r in token_rows]
    firsts = [1] * len(rows) if first_prefix is None else [max(1, int(f)) for f in first_prefix]
    kept = [(r, f) for r, f in zip(rows, firsts) if len(r) >= 2 and f < len(r)]
    if not kept:
        raise CardError("no token row has two or more tokens to measure")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    slots, nb = K + 1, len(edges)
    loss = np.zeros((slots, nb))
    correct = np.zeros((slots, nb))
    count = np.zeros((slots, nb), dtype=np.int64)
    run_keys = ["greedy"] + [f"conf>={float(t):g}" for t in thresholds]
    runs = np.zeros((len(run_keys), slots, nb))
    by_len: dict[int, list[tuple[torch.Tensor, int]]] = {}
    for r, f in kept:
        by_len.setdefault(len(r), []).append((r, f))
    batch_rows = max(1, 4096 // max(1, positions_per_forward * max(K, 1)))
    for L, group in by_len.items():
        for g0 in range(0, len(group), batch_rows):
            x = torch.stack([r for r, _ in group[g0:g0 + batch_rows]])  # (B, L)
            first = torch.tensor([f for _, f in group[g0:g0 + batch_rows]])
            for p0 in range(int(first.min()), L, positions_per_forward):
                prefixes = list(range(p0, min(L, p0 + positions_per_forward)))
                ids, pos, mask = packed_inputs(x[0], prefixes, K, mask_id, dtype)
                b = max(prefixes)
                B = len(x)
                inp = torch.cat([x[:, :b], ids[b:].expand(B, -1)], dim=1).to(device)
                logits = model(input_ids=inp, position_ids=pos.expand(B, -1).to(device),
                               attention_mask=mask.expand(B, 1, -1, -1).to(device), use_cache=False).logits.float()
                if on_forward:
                    on_forward()
                logits[..., suppressed] = float("-inf")
                logp = torch.log_softmax(logits, dim=-1)
                # slot 1 of prefix s: clean logits at s-1, target x[s]; slot j+1: mask j at b + i*K + j-1,
                # target x[s+j]; only targets inside the row count
                q_at, t_at, slot_of, bucket_of, s_of = [], [], [], [], []
                for i, s in enumerate(prefixes):
                    for slot in range(min(slots, L - s)):
                        q_at.append(s - 1 if slot == 0 else b + i * K + slot - 1)
                        t_at.append(s + slot)
                        slot_of.append(slot)
                        bucket_of.append(int(bucket_index(s, edges)))
                        s_of.append(s)
                counted = (torch.tensor(s_of)[None, :] >= first[:, None]).to(device)  # (B, n): row's prefix measured?
                q_at, t_at = torch.tensor(q_at, device=device), torch.tensor(t_at, device=device)
                picked = logp[:, q_at]  # (B, n, V)
                target = x.to(device)[:, t_at]  # (B, n)
                bits = (-picked.gather(2, target[..., None])[..., 0] / math.log(2) * counted).sum(0).cpu().numpy()
                top, arg = picked.max(-1)
                hit = arg == target  # (B, n)
                hits = (hit & counted).sum(0).cpu().numpy()
                np.add.at(loss, (slot_of, bucket_of), bits)
                np.add.at(correct, (slot_of, bucket_of), hits)
                np.add.at(count, (slot_of, bucket_of), counted.sum(0).cpu().numpy())
                passes = [hit] + [top.exp() >= t for t in thresholds]  # per run key: (B, n) slot passes
                kept_runs = _runs(torch.stack(passes), slot_of) & counted  # (keys, B, n)
                np.add.at(runs, (slice(None), slot_of, bucket_of), kept_runs.sum(1).cpu().numpy())
    mean = lambda a: [[None if c == 0 else round(float(v / c), 5) for v, c in zip(av, cv)] for av, cv in zip(a, count)]  # noqa: E731
    return {"format": FORMAT, "measured_by": measured_by, "tokens": int(sum(len(r) for r, _ in kept)),
            "bucket_edges": edges, "slots": slots, "loss_bits": mean(loss), "accuracy": mean(correct),
            "runs": {k: mean(r) for k, r in zip(run_keys, runs)}, "count": count.tolist()}


def _runs(passes: torch.Tensor, slot_of: Sequence[int]) -> torch.Tensor:
    """``passes[..., n]`` over consecutive (prefix, slot) entries, each prefix's slots 0, 1, 2, ... in order:
    whether slots 1..slot of the entry's prefix all pass (slot 0, the AR token, always counts as passing).

    A run holds while no failure has been counted since its prefix's slot 0: with F the running count of
    failures, entry i passes iff F[i] == F[start(i)], start(i) = i - slot(i).
    """
    slot = torch.tensor(slot_of, device=passes.device)
    fails = (~passes).long()
    fails[..., slot == 0] = 0
    total = fails.cumsum(-1)
    start = torch.arange(len(slot_of), device=passes.device) - slot
    return total == total[..., start]


def check_profile(profile: Any) -> dict[str, Any]:
    """A stored ``slot_profile`` in the agreed schema, or a one-line error."""
    keys = ("format", "bucket_edges", "slots", "loss_bits", "accuracy", "count")
    if not isinstance(profile, dict) or any(k not in profile for k in keys):
        raise CardError("slot_profile is missing or malformed; measure it with card profile CKPT --data FILE --write")
    if profile["format"] != FORMAT:
        raise CardError(f"slot_profile format {profile['format']} is not supported (this toolkit reads {FORMAT})")
    nb, slots = len(profile["bucket_edges"]), profile["slots"]
    tables = [(k, profile[k]) for k in ("loss_bits", "accuracy", "count")]
    runs = profile.get("runs", {})  # optional: profiles measured before runs were recorded lack it
    if not isinstance(runs, dict):
        raise CardError("slot_profile runs must map a pass rule to a table")
    tables += [(f"runs[{k}]", t) for k, t in runs.items()]
    for k, table in tables:
        if len(table) != slots or any(len(r) != nb for r in table):
            raise CardError(f"slot_profile {k} is not {slots} slots x {nb} buckets")
    return profile


# ------------------------------------------------------------------------------------------ data rows
def text_rows(tokenizer, text: str, seq_len: int, max_rows: int | None = DEFAULT_MAX_ROWS) -> list[list[int]]:
    """The text's tokens in rows of ``seq_len``: ``[start] + the next seq_len-1 tokens``, the layout
    ``card compress`` windows use (start = BOS, or EOS for tokenizers without one)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise CardError("the tokenizer has neither a BOS nor an EOS token to start rows with")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    step = seq_len - 1
    rows = [[start] + ids[i:i + step] for i in range(0, len(ids), step)]
    rows = [r for r in rows if len(r) >= 2]
    return rows[:max_rows] if max_rows else rows


def rows_from_validation(rows, max_rows: int = DEFAULT_MAX_ROWS) -> tuple[list[list[int]], list[int]]:
    """The real tokens of ``card.adapt.data.Rows`` (padding dropped), at most ``max_rows`` of them, and per row
    the first prefix length to measure: where its completion starts (1 for rows without prompt/completion)."""
    out, firsts = [], []
    for i in range(min(len(rows), max_rows)):
        keep = np.ones(len(rows.ids[i]), dtype=bool) if rows.valid is None else np.asarray(rows.valid[i])
        ids = np.asarray(rows.ids[i])[keep]
        first = 1
        if rows.completion is not None:
            comp = np.flatnonzero(np.asarray(rows.completion[i])[keep])
            first = int(comp[0]) if len(comp) else len(ids)  # no completion token: nothing to measure
        out.append(ids.tolist())
        firsts.append(max(1, first))
    return out, firsts


# ------------------------------------------------------------------------------------------ checkpoints
def write_slot_profile(ckpt: str | os.PathLike, profile: dict[str, Any]) -> None:
    """Store ``profile`` at ``config.json["card"]["slot_profile"]`` of checkpoint ``ckpt``, atomically."""
    from card.io import atomic_write_text

    path = Path(ckpt) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CardError(f"cannot read {path}: {e}") from None
    if "card" not in config:
        raise CardError(f"{ckpt} is not a CARD checkpoint (no 'card' key in config.json)")
    config["card"]["slot_profile"] = check_profile(profile)
    atomic_write_text(path, json.dumps(config, indent=2) + "\n")


def max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def default_seq_len(model, K: int, cap: int = 512) -> int:
    """Rows as long as ``cap`` tokens, leaving room for K mask positions after the longest prefix."""
    limit = max_positions(model.config)
    return min(cap, limit - K) if limit else cap


def profile_checkpoint(
    ckpt: str | os.PathLike,
    data: str | os.PathLike,
    *,
    K: int | None = None,
    bucket_edges: Sequence[int] = DEFAULT_BUCKET_EDGES,
    seq_len: int | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
    positions_per_forward: int = DEFAULT_POSITIONS_PER_FORWARD,
    write: bool = False,
    on_forward: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """``card profile``: measure the slot profile of a CARD checkpoint on a UTF-8 text file (fp32), and with
    ``write`` store it in the checkpoint. ``K`` defaults to the checkpoint's decoding block size."""
    from card.checkpoint import check_checkpoint_path, load_checkpoint

    meta = check_checkpoint_path(ckpt, require_card=True)
    edges = check_bucket_edges(bucket_edges)
    try:
        text = Path(data).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CardError(f"cannot read --data {data} as UTF-8 text: {e}") from None
    ck = load_checkpoint(ckpt, dtype="float32")
    K = meta.decoding.block_size if K is None else K
    seq_len = seq_len or default_seq_len(ck.model, K)
    rows = text_rows(ck.tokenizer, text, seq_len, max_rows)
    if not rows:
        raise CardError(f"--data {data} holds no text to measure")
    profile = measure_slot_profile(ck.model, rows, K, edges, positions_per_forward=positions_per_forward,
                                   measured_by=f"card profile --data {Path(data).name} (seq_len {seq_len})",
                                   on_forward=on_forward)
    if write:
        write_slot_profile(ckpt, profile)
    return profile


def profile_final_checkpoint(final: str | os.PathLike, rows, K: int | None = None,
                             log: Callable[[str], None] = lambda _: None) -> dict[str, Any] | None:
    """``card adapt``'s finish: the slot profile of the consolidated checkpoint on the validation rows (from
    where each completion starts, for prompt/completion data), written into it. Skipped (None) for plain AR
    checkpoints and validation sets with nothing to measure."""
    from card.checkpoint import check_checkpoint_path, load_checkpoint

    if check_checkpoint_path(final) is None or len(rows) == 0:
        return None
    ck = load_checkpoint(final, dtype="float32")
    K = ck.meta.decoding.block_size if K is None else K
    token_rows, firsts = rows_from_validation(rows)
    if not any(1 <= f < len(t) for t, f in zip(token_rows, firsts)):
        return None
    profile = measure_slot_profile(ck.model, token_rows, K, measured_by="card adapt validation", first_prefix=firsts)
    write_slot_profile(final, profile)
    log("slot profile (bits per slot, last bucket): "
        + " ".join("-" if r[-1] is None else f"{r[-1]:.2f}" for r in profile["loss_bits"]))
    return profile

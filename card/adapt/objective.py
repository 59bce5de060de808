"""The CARD training objective (docs/method.md, "Training"): soft-tailed masking, context-aware weights, loss.

Pure tensor functions; every random draw comes from an explicit ``torch.Generator`` so a training step is
a function of its seed. Shapes: ``ids`` and masks are (B, T); ``logits`` are (B, T-1, V).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The causal filter for S is truncated once the decay weight (1-p)^k drops below this.
KERNEL_TOLERANCE = 1e-12


@dataclass(frozen=True)
class ObjectiveConfig:
    tail_factor: float = 1.5  # lambda >= 1
    decay_p: float = 0.5  # p in [0, 1]
    beta: float = 1.0  # > 0
    t_min: float = 0.0  # noise level t ~ U(t_min, t_max) per row
    t_max: float = 1.0


def sample_noise_level(batch: int, generator: torch.Generator, t_min: float = 0.0, t_max: float = 1.0) -> torch.Tensor:
    """t ~ U(t_min, t_max), one per row (float64, so floor(L * t) is exact to compare against)."""
    return t_min + (t_max - t_min) * torch.rand(batch, generator=generator, dtype=torch.float64)


def soft_tail_mask(
    ids: torch.Tensor,
    t: torch.Tensor,
    tail_factor: float,
    mask_id: int,
    generator: torch.Generator,
    maskable: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-tailed masking of each row (docs/method.md, "Masking").

    With L the number of maskable positions in a row::

        N = max(1, floor(L * t))          # tokens to mask (linear schedule)
        W = min(L, floor(lambda * N))     # tail window: the last W maskable positions
        choose N of the W window positions uniformly without replacement -> [MASK]

    ``maskable`` (default: every position) excludes padding, which is never masked; a row with no
    maskable position gets no mask. Vectorised: uniform keys, +inf outside the window, the N smallest
    keys are masked. Returns ``(corrupted_ids, masked)`` with ``masked`` a bool tensor.
    """
    if tail_factor < 1:
        raise ValueError(f"tail_factor must be >= 1, got {tail_factor}")
    maskable = torch.ones_like(ids, dtype=torch.bool) if maskable is None else maskable.bool()
    length = maskable.sum(1)
    n = torch.clamp(torch.floor(length.double() * t.double().to(ids.device)).long(), min=1)
    window = torch.minimum(length, torch.floor(tail_factor * n.double()).long())
    n = torch.minimum(n, window)  # only differs from N when L == 0 (then nothing is masked)
    from_end = maskable.flip(1).long().cumsum(1).flip(1)  # maskable positions at or after j
    in_window = maskable & (from_end <= window[:, None])
    keys = torch.rand(ids.shape, generator=generator, device=generator.device).to(ids.device)
    keys = keys.masked_fill(~in_window, math.inf)
    rank = keys.argsort(1).argsort(1)
    masked = rank < n[:, None]
    return ids.masked_fill(masked, mask_id), masked


def context_weights(masked: torch.Tensor, decay_p: float, beta: float) -> torch.Tensor:
    """Context-aware weights w for every input position (docs/method.md, "Weights")::

        C_j = m_j * (1 + m_{j-1})          # m_{-1} = 0: a mask right after a mask counts double
        S_j = C_j + (1 - p) * S_{j-1}      # S_{-1} = 0
        w_j = 1 / (beta + S_j)

    S is the causal filter S_j = sum_k (1-p)^k C_{j-k}, computed as a convolution whose kernel is cut
    where (1-p)^k < 1e-12 (never with r^-j rescaling, which overflows). Computed in float64.
    """
    if not 0.0 <= decay_p <= 1.0 or beta <= 0:
        raise ValueError(f"need 0 <= decay_p <= 1 and beta > 0, got p={decay_p}, beta={beta}")
    m = masked.double()
    prev = F.pad(m[:, :-1], (1, 0))
    c = m * (1 + prev)
    seq = m.shape[1]
    r = 1.0 - decay_p
    if r == 0.0:
        k = 1
    elif r == 1.0:
        k = seq
    else:
        k = min(seq, max(1, math.ceil(math.log(KERNEL_TOLERANCE) / math.log(r))))
    kernel = r ** torch.arange(k - 1, -1, -1, dtype=torch.float64, device=m.device)  # oldest tap first
    s = F.conv1d(F.pad(c[:, None], (k - 1, 0)), kernel.view(1, 1, k))[:, 0]
    return (1.0 / (beta + s)).float()


def weighted_ce(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean cross-entropy over supervised positions (docs/method.md, "Loss")::

        loss = sum_j w_j * CE(logits_j, x0[j+1]) / sum_j w_j

    ``logits`` (B, T-1, V) at input positions j, ``targets`` = x0[:, 1:], ``weights`` and ``valid`` (B, T-1)
    aligned with the inputs. Returns (loss, per-position CE); CE is zero where not valid.
    """
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    ce = ce * valid
    w = weights * valid
    return (w * ce).sum() / w.sum().clamp_min(1e-12), ce


def _supervised(valid: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """(B, T-1): input position j is supervised when it is real and x0[j+1] is a real, supervised target."""
    tgt = valid if targets is None else (targets.bool() & valid)
    return valid[:, :-1] & tgt[:, 1:]


def _attention_mask(valid: torch.Tensor) -> torch.Tensor | None:
    """None for fully packed rows, so the CARD and AR steps take the same fast causal-attention path."""
    return None if bool(valid.all()) else valid[:, :-1].long()


@dataclass
class CardLoss:
    """One CARD forward's loss and diagnostics."""

    loss: torch.Tensor  # weighted CE, differentiable
    corrupt_ce: float  # unweighted mean CE on the corrupted input
    mask_ratio: float  # masked / valid input positions
    tokens: int  # supervised targets


@dataclass
class ArLoss:
    """One plain next-token forward's loss (clean input)."""

    loss: torch.Tensor  # mean CE over the supervised targets, differentiable
    tokens: int  # supervised targets


def card_loss(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask_id: int,
    cfg: ObjectiveConfig,
    generator: torch.Generator,
    valid: torch.Tensor | None = None,
    maskable: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> CardLoss:
    """One CARD forward: corrupt ``ids`` (clean x0), predict the clean next token at every position.

    Shift exactly as AR training: inputs = x_t[:, :-1], targets = x0[:, 1:]; every valid position is
    supervised, masked or not. ``valid`` marks real (non-padding) tokens; ``maskable`` (default ``valid``)
    the positions the noise may hit; ``targets`` (default ``valid``) the tokens that are supervised as
    targets (e.g. only completions of prompt/completion rows).
    """
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid.bool()
    maskable = valid if maskable is None else (maskable.bool() & valid)
    t = sample_noise_level(ids.shape[0], generator, cfg.t_min, cfg.t_max)
    corrupted, masked = soft_tail_mask(ids, t, cfg.tail_factor, mask_id, generator, maskable)
    weights = context_weights(masked, cfg.decay_p, cfg.beta)
    logits = model(input_ids=corrupted[:, :-1], attention_mask=_attention_mask(valid)).logits
    sup = _supervised(valid, targets)
    loss, ce = weighted_ce(logits, ids[:, 1:], weights[:, :-1], sup)
    n = int(sup.sum())
    return CardLoss(
        loss=loss,
        corrupt_ce=float(ce.detach().sum()) / max(n, 1),
        mask_ratio=float(masked.sum()) / max(int(valid.sum()), 1),
        tokens=n,
    )


def causal_lm_loss(
    model: torch.nn.Module, ids: torch.Tensor, valid: torch.Tensor | None = None, targets: torch.Tensor | None = None
) -> ArLoss:
    """Plain AR cross-entropy on clean input (t = 0; w = 1 everywhere), differentiable::

        loss = sum_j CE(logits_j, x0[j+1]) / (number of supervised j)

    The objective of ordinary AR pre-training / fine-tuning, on the same shift as ``card_loss``;
    ``targets`` as there.
    """
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid.bool()
    logits = model(input_ids=ids[:, :-1], attention_mask=_attention_mask(valid)).logits
    sup = _supervised(valid, targets)
    loss, _ = weighted_ce(logits, ids[:, 1:], torch.ones_like(sup, dtype=torch.float32), sup)
    return ArLoss(loss=loss, tokens=int(sup.sum()))


@torch.no_grad()
def ar_loss(
    model: torch.nn.Module, ids: torch.Tensor, valid: torch.Tensor | None = None, targets: torch.Tensor | None = None
) -> tuple[float, int]:
    """Plain AR cross-entropy on clean input (t = 0): (mean CE, supervised targets)."""
    out = causal_lm_loss(model, ids, valid, targets)
    return float(out.loss), out.tokens

"""Which of a forward's proposed tokens to commit: by confidence (AR, parallel) or by exact verification (lossless).

An acceptor reads the logits of the last D + m + 1 positions of every row (D: the longest draft list,
m: masks) and returns one ``Outcome`` per row. Position alignment: the logits at the last pending token
predict slot 1 (exact AR), the logits at draft j predict the token after draft j (exact AR: drafts are real
tokens), the logits at mask k predict the token after mask k. A prediction is never read from the logits
at its own position.
"""

from __future__ import annotations

import torch

from card.eval.decoding.proposers import Outcome, Proposal


def choose(logits: torch.Tensor, spec, rows, need_confidence: bool, draws: int):
    """Pick a token per slot of ``logits`` (B, n, V); return (tokens, confidences or None).

    Greedy: argmax, confidence = its softmax probability. Sampled: draw from softmax(logits / T) restricted to
    the top-p nucleus; confidence = the drawn token's probability in that distribution. A sampled row draws
    ``draws`` uniforms per forward whatever this forward uses, so its random stream does not depend on the
    lookahead chosen or on the batch it is in.
    """
    if spec.temperature == 0:
        if not need_confidence:
            return logits.argmax(-1), None
        conf, tok = torch.softmax(logits, -1).max(-1)
        return tok, conf
    probs = torch.softmax(logits / spec.temperature, -1)
    if spec.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p (the first one always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= spec.top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    cdf = probs.cumsum(-1)
    n = logits.shape[1]
    u = torch.stack([torch.rand(draws, generator=r.generator)[:n] for r in rows]).to(logits.device)
    target = (u * cdf[..., -1]).unsqueeze(-1)
    tok = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    conf = probs.gather(-1, tok.unsqueeze(-1)).squeeze(-1) / cdf[..., -1]
    return tok, conf


def accept_count(conf: torch.Tensor, threshold: float, rule: str) -> list[int]:
    """Slots accepted per row: slot 1 always, then the contiguous run of mask slots passing the rule.

    ``prefix``: each confidence >= threshold; ``joint``: the running product of confidences >= threshold.
    """
    if conf.shape[1] == 1:
        return [1] * conf.shape[0]
    c = conf[:, 1:]
    ok = (c.cumprod(-1) if rule == "joint" else c) >= threshold
    return (1 + ok.long().cumprod(-1).sum(-1)).tolist()


class ConfidenceAcceptor:
    """AR and parallel decoding: slot 1 always, mask slots while confident (docs/method.md, "Parallel")."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.draws = (spec.block_size or 0) + 1

    def accept(self, logits: torch.Tensor, rows, proposal: Proposal) -> list[Outcome]:
        m = proposal.masks
        tok, conf = choose(logits, self.spec, rows, need_confidence=m > 0, draws=self.draws)
        counts = accept_count(conf, self.spec.threshold, self.spec.rule) if m > 0 else [1] * len(rows)
        tok = tok.tolist()
        return [Outcome(tok[b][:counts[b]], 0, m, counts[b] - 1) for b in range(len(rows))]


class VerifyAcceptor:
    """Lossless decoding: a draft is accepted while it equals the AR argmax before it (docs/method.md, "Lossless").

    At the first mismatch the AR token is committed instead and the later drafts and the masks' guesses are
    discarded; when every draft passes, the AR token predicted at the last draft is committed too and the
    masks' guesses may become the next drafts. The output is greedy AR's, whatever was proposed.
    """

    def accept(self, logits: torch.Tensor, rows, proposal: Proposal) -> list[Outcome]:
        D = max(map(len, proposal.drafts))
        if D == 0 and proposal.masks == 0:  # nothing to verify: an AR step, at an AR step's cost
            return [Outcome([t], 0, 0, 0, []) for t in logits[:, -1].argmax(-1).tolist()]
        preds = logits.argmax(-1).tolist()
        out = []
        for b, drafts in enumerate(proposal.drafts):
            d = len(drafts)
            ar, masks = preds[b][D - d:D + 1], preds[b][D + 1:]  # ar[j] predicts the token after draft j
            ok = 0
            while ok < d and drafts[ok] == ar[ok]:
                ok += 1
            out.append(Outcome(drafts[:ok] + [ar[ok]], ok, d, ok, masks if ok == d else None))
        return out


class CountAcceptor:
    """Budget decoding: commit exactly the planned number of slots per row (``BudgetProposal.commit``).

    Slot 1 is the exact AR choice, slots 2..k the masks' choices (greedy, or sampled as in ``choose``), with
    no confidence test: the plan already decided how many tokens this forward pays for.
    """

    def __init__(self, spec, slots: int) -> None:
        self.spec = spec
        self.draws = slots  # a fixed number per forward, so a row's random stream does not depend on its plan

    def accept(self, logits: torch.Tensor, rows, proposal) -> list[Outcome]:
        tok, _ = choose(logits, self.spec, rows, need_confidence=False, draws=self.draws)
        tok = tok.tolist()
        return [Outcome(tok[b][:k], 0, proposal.masks, k - 1) for b, k in enumerate(proposal.commit)]

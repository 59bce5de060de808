"""What each forward appends after a row's pending tokens: nothing (AR), masks (parallel), drafts + masks (lossless).

A proposer's ``propose(rows)`` returns a ``Proposal`` (the same number of masks for every row, per-row
drafts); after the forward its ``observe`` learns from what the acceptor accepted and prepares the next
drafts. The shape is that of transformers' candidate generators; a new way to propose (a budgeted plan,
strided streams) is a new proposer, not an edit of the engine's loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from card.eval.decoding.planner import (
    EXPLORE,
    MARGIN,
    LOOKUP_PRIOR,
    LOOKUP_PRIOR_STRENGTH,
    LengthStats,
    PRIOR_STRENGTH,
    PROMPT_END_PRIOR,
    Lookahead,
    SlotStats,
    UNBOUNDED,
    accepted_curve,
    critical_gain,
    survival,
)

NGRAM_MAX = 3  # prompt lookup matches the text's last 3, 2 or 1 tokens (longest first)
PROMPT_END = NGRAM_MAX + 1  # the "order" of a lookup on a prompt's first forward, learnt on its own
# In a batch, after n draft choices in a row that found no prompt-lookup draft worth its cost, the next
# min(2^n - 1, LOOKUP_BACKOFF_MAX) forwards skip the lookups and the choice: on text where they never pay,
# their Python work per row would make lossless slower than AR.
LOOKUP_BACKOFF_MAX = 15


@dataclass
class Proposal:
    masks: int  # masks appended to every row
    drafts: list[list[int]]  # per row: draft tokens between the pending tokens and the masks
    sources: list[str | None] = field(default_factory=list)  # per row: "mask", "ngram<n>" or None


@dataclass
class Outcome:
    """What the acceptor made of one row's forward."""

    tokens: list[int]  # tokens to commit, in order
    cached: int  # how many leading ``tokens`` already have their KV cached (accepted drafts)
    proposed: int  # lookahead slots offered (masks in parallel, drafts in lossless)
    accepted: int  # how many of them were accepted
    mask_predictions: list[int] | None = None  # lossless: the masks' guesses, valid only if every draft passed


class NgramIndex:
    """Prompt lookup over one row's text: for n = 3, 2, 1 the latest earlier position of every n-gram.

    ``lookup(L)`` returns up to L tokens that followed the latest earlier occurrence of the text's last n
    tokens (the longest n that has one), and that n. Appending is a list append; the n-gram maps catch up
    at the next lookup (O(n) per token), so rows whose drafts are not being looked up pay nothing for them.
    """

    def __init__(self, ids: list[int]) -> None:
        self.seq: list[int] = []
        self.maps: list[dict[tuple[int, ...], int]] = [{} for _ in range(NGRAM_MAX)]
        self.indexed = 0  # seq[:indexed] is in the maps
        self.extend(ids)

    def extend(self, tokens: list[int]) -> None:
        self.seq.extend(tokens)

    def _catch_up(self) -> None:
        seq, maps = self.seq, self.maps
        for i in range(self.indexed, len(seq)):  # the n-gram ending just before seq[i] is followed by it
            for n in range(1, min(NGRAM_MAX, i) + 1):
                maps[n - 1][tuple(seq[i - n:i])] = i
        self.indexed = len(seq)

    def lookup(self, length: int) -> tuple[list[int], int]:
        if length <= 0:
            return [], 0
        self._catch_up()
        seq = self.seq
        for n in range(min(NGRAM_MAX, len(seq)), 0, -1):
            j = self.maps[n - 1].get(tuple(seq[-n:]))
            if j is not None:
                return seq[j:j + length], n
        return [], 0


def _remaining(row) -> int:
    return row.max_new_tokens - len(row.tokens)


def observed_slots(row, outcome: Outcome, committed: list[int], first_slot_token: int) -> tuple[int, int]:
    """(offered, accepted) lookahead slots of one forward as evidence about the slots' acceptance.

    Slots past the end of an answer are censored, not failures: once a row ends in this forward (EOS, stop
    string or budget), what the masks guess after its last token was never needed, and counting it as a
    rejection made every finished answer look as if its deepest slot had failed, so the planner chose too
    few masks for short answers. ``first_slot_token``: the index in ``committed`` of the token slot 1
    predicts (parallel: 1, as ``committed[0]`` is the AR token; lossless: 0, draft 1 guesses it).
    """
    if row.finish_reason is None:
        return outcome.proposed, outcome.accepted
    needed = max(0, len(committed) - first_slot_token)
    offered = min(outcome.proposed, needed)
    return offered, min(outcome.accepted, offered)


def _batch_remaining(lengths: LengthStats | None, rows) -> list[tuple[int, float]] | None:
    """[(R, P(R))] for the tokens the batch's slowest row still has to write (None: no length estimates)."""
    if lengths is None:
        return None
    if not lengths.weights:  # no answer ended yet: ``remaining_max``'s answer, without a tuple per row
        return [(max(map(_remaining, rows)), 1.0)]
    return lengths.remaining_max([(len(r.tokens), _remaining(r), len(r.prompt_ids)) for r in rows])


def observe_lengths(lengths: LengthStats | None, rows) -> None:
    """Teach ``lengths`` the answers that ended in this forward (one cut by its budget: "at least this long")."""
    if lengths is None:
        return
    for r in rows:
        if r.finish_reason in ("eos", "stop"):
            lengths.observe(len(r.tokens), len(r.prompt_ids))
        elif r.finish_reason is not None:
            lengths.observe(UNBOUNDED, len(r.prompt_ids))


def _pick(md: list[int], g: list[int], n: int, d: int, curves) -> tuple[list[int], str | None, list[float], float]:
    """One lossless row at common draft length d: (drafts, source, S(j) of those drafts, expected accepted).

    ``md``: the row's mask drafts, ``g``: its prompt-lookup drafts from an n-gram match (n = ``PROMPT_END``
    on a prompt's first forward); ``curves``: (A, S) of the mask slots, then of the 1-, 2- and 3-gram lookups
    and of the prompt-end ones. The source expecting more wins.
    """
    (ma, ms) = curves[0]
    e_mask = ma[min(d, len(md))] if md else 0.0
    if g and d > 0:
        na, ns = curves[n]
        k = min(d, len(g))
        if na[k] > e_mask or not md:
            return g[:k], lookup_source(n), ns[:k + 1], na[k]
    return md, ("mask" if md else None), ms[:len(md) + 1], e_mask


def lookup_source(n: int) -> str:
    """The source name of a prompt-lookup draft from an n-gram match (``PROMPT_END``: a prompt's first forward)."""
    return "prompt-end" if n == PROMPT_END else f"ngram{n}"


@dataclass
class Estimates:
    """Running acceptance estimates: of the mask slots, of 1-, 2- and 3-gram prompt-lookup drafts, and of
    lookups on a prompt's first forward (``prompt_end``: the prompt's last tokens are a template boundary,
    whose drafts fare differently from those in the text; on GSM8K none of 16 was accepted).

    One object serves every batch of a decode call, and a caller may pass it on to later calls over the same
    kind of text (the lm-eval model keeps one per task): short answers give each batch only a few forwards,
    too few to learn from if every batch started again from the prior.
    """

    masks: SlotStats
    ngram: list[SlotStats]
    prompt_end: SlotStats
    prior_source: str = "untrained"
    lengths: LengthStats = field(default_factory=LengthStats)
    explore_budget: float = 0.0  # seconds of forward time saved up for trying prompt lookup optimistically

    @classmethod
    def start(cls, prior: list[float], prior_source: str,
              strengths: float | list[float] = PRIOR_STRENGTH) -> "Estimates":
        k = len(prior)
        return cls(SlotStats(prior, strength=strengths),
                   [SlotStats([a] * k, strength=LOOKUP_PRIOR_STRENGTH) for a in LOOKUP_PRIOR],
                   SlotStats([PROMPT_END_PRIOR] * k, strength=LOOKUP_PRIOR_STRENGTH), prior_source)

    def lookups(self) -> list[SlotStats]:
        """The prompt-lookup estimates by n-gram order 1..``PROMPT_END`` (``Estimates.lookups()[n - 1]``)."""
        return [*self.ngram, self.prompt_end]


def _at_prompt_end(row, match: tuple[list[int], int]) -> tuple[list[int], int]:
    """A lookup ``(drafts, n)``, its order set to ``PROMPT_END`` on the row's first forward."""
    return (match[0], PROMPT_END) if row.forwards == 0 and match[0] else match


class MaskProposer:
    """AR (no lookahead) and parallel decoding: m masks after the pending tokens, m from a ``Lookahead``.

    Near the end of the batch's slowest row, m is planned to finish it, with the remaining length of the
    longest of the batch's answers drawn from the lengths of the answers that ended so far
    (``LengthStats.remaining_max``).
    """

    def __init__(self, lookahead: Lookahead | None, stats: SlotStats | None,
                 lengths: LengthStats | None = None) -> None:
        self.lookahead, self.stats, self.lengths = lookahead, stats, lengths

    def start(self, row) -> None:
        pass

    def propose(self, rows) -> Proposal:
        m, la = 0, self.lookahead
        if la is not None:
            B, width = len(rows), max(len(r.pending) for r in rows)
            # The lengths are read only where masks might pay: most forwards of a model whose masks do not.
            remaining = None if la.futile(B, width) else _batch_remaining(self.lengths, rows)
            m = la.masks(B, width, remaining)
        # Masks beyond every row's remaining budget can never be committed; masks only see the slots before
        # them, so dropping the trailing ones changes no prediction.
        m = max(0, min(m, max(_remaining(r) - 1 for r in rows)))
        return Proposal(m, [[] for _ in rows])

    def observe(self, rows, proposal: Proposal, outcomes: list[Outcome], committed: list[list[int]]) -> None:
        if self.stats is not None and proposal.masks:
            for r, o, new in zip(rows, outcomes, committed):
                self.stats.observe(*observed_slots(r, o, new, 1))
            self.stats.forget()
        observe_lengths(self.lengths, rows)


class DraftProposer:
    """Lossless decoding: per row, drafts from the previous forward's masks or from prompt lookup, then m masks.

    With automatic lookahead, m comes from the ``Lookahead`` (the stationary mask-draft model, or near the end
    of the batch's slowest row the plan to finish it, ``lossless_finish_values``) and the drafts of each row
    are the source with the larger expected number of accepted tokens; their common length d is the one
    maximising the expected progress of the batch's slowest row per second, ``critical_gain`` /
    c(B, pending + d + m) (see ``_choose``), never shorter than the mask drafts
    already made (they are what the masks were paid for). In a batch, choices that take no prompt-lookup draft
    make the next lookups wait, 1, 3, 7, then 15 forwards. With a fixed K, a row uses its mask drafts when
    it has them and prompt lookup otherwise, so its steps do not depend on the rest of the batch.
    """

    def __init__(self, k_max: int, sources: tuple[str, ...], lookahead: Lookahead, estimates: Estimates,
                 cost, auto: bool) -> None:
        self.k_max, self.lookahead, self.cost, self.auto = k_max, lookahead, cost, auto
        self.estimates, self.mask_stats, self.lookup_stats = estimates, estimates.masks, estimates.lookups()
        self.stats_by_source = {"mask": self.mask_stats,
                                **{lookup_source(n): s for n, s in enumerate(self.lookup_stats, start=1)}}
        self.lengths = estimates.lengths if auto else None
        self.use_masks = "mask" in sources
        self.use_ngram = "ngram" in sources and k_max > 0
        self._fruitless = 0  # consecutive draft choices that took no prompt-lookup draft
        self._skip = 0  # forwards left before the next lookup (see LOOKUP_BACKOFF_MAX)

    def start(self, row) -> None:
        row.drafts = []
        row.ngram = NgramIndex(row.prompt_ids) if self.use_ngram else None

    @staticmethod
    def _curve(stats: SlotStats, optimistic: bool = True) -> tuple[list[float], list[float]]:
        """(A(j), S(j)) for j = 0..K from the current estimates (read optimistically, ``SlotStats.rates``, or
        at their means).

        Prompt-lookup estimates are read at their means: their prior is measured over several models and
        texts, not a slot profile the plans might undersell, and read optimistically it kept 8-token lookups
        of SmolLM2 on GSM8K in play through several failures each for the 1-, 2- and 3-gram matches (every
        such forward costs 2x an AR step on this CPU; lossless ran at 0.91x AR on three short answers). Their
        optimistic reading is tried only from an exploration budget (``_choose``).
        """
        def make():
            curve = accepted_curve(stats.rates() if optimistic else stats.means())
            return curve, survival(curve, len(curve) - 1)

        return stats.memo("curve" if optimistic else "mean-curve", make)

    def propose(self, rows) -> Proposal:
        B = len(rows)
        mask_d = [r.drafts for r in rows]
        m = 0
        if self.use_masks:
            width = max(len(r.pending) for r in rows) + max(map(len, mask_d))
            if self.lookahead.futile(B, width):
                m = self.lookahead.masks(B, width)
            else:
                slowest = max(rows, key=_remaining)
                m = self.lookahead.masks(B, width, _batch_remaining(self.lengths, rows), len(slowest.drafts))
        ngram: list[tuple[list[int], int]] | None = []
        if self.use_ngram and self._skip == 0:
            ngram = self._lookups(rows, mask_d)
            if ngram is None:  # stalled: no choice was weighed, so no evidence on the lookups; the wait goes on
                ngram = []
                self._skip = min(2 ** self._fruitless - 1, LOOKUP_BACKOFF_MAX)
        elif self.use_ngram:
            self._skip -= 1
        if m == 0 and not ngram and not any(mask_d):  # an AR step: no per-row work
            return Proposal(0, mask_d, [None] * B)
        if not any(g for g, _ in ngram):
            drafts, sources = mask_d, ["mask" if d else None for d in mask_d]
        elif not self.auto:
            drafts = [d if d else g for d, (g, _) in zip(mask_d, ngram)]
            sources = ["mask" if d else (lookup_source(n) if g else None) for d, (g, n) in zip(mask_d, ngram)]
        else:
            # Up to EXPLORE of the forward time, saved up to one forward over the whole block at most.
            est, one = self.estimates, self.cost(B, 1)
            est.explore_budget = min(est.explore_budget + EXPLORE * one, self.cost(B, 1 + self.k_max) - one)
            drafts, sources = self._choose(rows, m, mask_d, ngram)
            if any(s and s != "mask" for s in sources):
                self._fruitless = 0
            elif B > 1:  # one row's lookup is cheap next to a forward; a batch's costs per row
                self._fruitless += 1
                self._skip = min(2 ** self._fruitless - 1, LOOKUP_BACKOFF_MAX)
        m = max(0, min(m, max(_remaining(r) - 1 - len(d) for r, d in zip(rows, drafts))))
        return Proposal(m, drafts, sources)

    def _lookups(self, rows, mask_d) -> list[tuple[list[int], int]] | None:
        """Each row's prompt-lookup draft and its n-gram order; None where the batch is stalled.

        Stalled: with automatic lookahead and no mask drafts, a row holding the batch's largest budget has no
        lookup. That row commits exactly one token whatever the others draft, so the largest budget drops by
        one at most: ``critical_gain`` is 1 for every draft length and any draft only adds cost, the choice
        is no drafts. So the rows holding the largest budget are looked up first, and the others only if all
        of them found a draft: a batch whose rows run abreast is stalled at most of its lookup steps, and
        the draft-length search it skips costs about a tenth of a millisecond at batch 8.
        """
        def lookup(r):
            return _at_prompt_end(r, r.ngram.lookup(min(self.k_max, _remaining(r) - 1)))

        found = {}
        if self.auto and len(rows) > 1 and not any(mask_d):
            remaining = [_remaining(r) for r in rows]
            top = max(remaining)
            for b in (b for b, left in enumerate(remaining) if left == top):
                found[b] = lookup(rows[b])
                if not found[b][0]:
                    return None
        return [found[b] if b in found else lookup(r) for b, r in enumerate(rows)]

    def _choose(self, rows, m, mask_d, ngram):
        """The common draft length d and each row's source maximising the batch's progress per second.

        A static batch is done when its slowest row is, so a forward is worth ``critical_gain``: the
        expected drop of the largest remaining budget. Only rows within d of the largest budget can still be
        the slowest after this forward, and the drop is at most 1 + E[accepted] of any row holding the largest
        budget, which rules most d out before the exact gain is computed. Every row is padded to the same
        width anyway, so each row drafts up to d from its better source; rows that get ahead leave sooner.
        """
        masks = self._curve(self.mask_stats)
        d, picks = self._best_length(rows, m, mask_d, ngram, [masks] + [self._curve(s, False) for s in self.lookup_stats])
        # Prompt lookup is planned at its means; the optimistic reading, which tries sources and lengths the
        # estimates may undersell, is paid for from an exploration budget of ``EXPLORE`` of the forward time.
        B, pending, budget = len(rows), max(len(r.pending) for r in rows), self.estimates.explore_budget
        if budget >= self.cost(B, pending + d + m + 1) - self.cost(B, pending + d + m):  # one more draft affordable
            d_try, tried = self._best_length(rows, m, mask_d, ngram, [masks] + [self._curve(s) for s in self.lookup_stats])
            extra = self.cost(B, pending + d_try + m) - self.cost(B, pending + d + m)
            if d_try != d and extra <= budget:
                self.estimates.explore_budget -= max(0.0, extra)
                picks = tried
        return [p[0] for p in picks], [p[1] for p in picks]

    def _best_length(self, rows, m, mask_d, ngram, curves):
        """``_choose``'s search for the estimates ``curves``: (d, each row's ``_pick`` at d)."""
        B = len(rows)
        pending = max(len(r.pending) for r in rows)
        remaining = [_remaining(r) for r in rows]
        top = max(remaining)
        lead = [b for b, r in enumerate(remaining) if r == top]
        d_min = max(map(len, mask_d))
        d_max = max(d_min, max(len(g) for g, _ in ngram))
        best_d, best_rate = d_min, -1.0
        # The bound grows with d up to its value at d_max and the cost never falls: once even that value
        # cannot beat the best rate, no longer draft can.
        reach = 1.0 + min(_pick(mask_d[b], *ngram[b], d_max, curves)[3] for b in lead)
        for d in range(d_min, d_max + 1):
            cost = self.cost(B, pending + d + m) * (MARGIN if d > d_min else 1.0)  # extra drafts must promise more
            if reach / cost <= best_rate * (1 + 1e-9):
                break
            bound = 1.0 + min(_pick(mask_d[b], *ngram[b], d, curves)[3] for b in lead)
            if bound / cost <= best_rate * (1 + 1e-9):
                continue
            near = [b for b, r in enumerate(remaining) if r >= top - d]
            gain = critical_gain([remaining[b] for b in near],
                                 [_pick(mask_d[b], *ngram[b], d, curves)[2] for b in near])
            if gain / cost > best_rate * (1 + 1e-9):
                best_d, best_rate = d, gain / cost
        return best_d, [_pick(md, g, n, best_d, curves) for md, (g, n) in zip(mask_d, ngram)]

    def observe(self, rows, proposal: Proposal, outcomes: list[Outcome], committed: list[list[int]]) -> None:
        observe_lengths(self.lengths, rows)
        for r, src, o, new in zip(rows, proposal.sources, outcomes, committed):
            if src is not None:
                self.stats_by_source[src].observe(*observed_slots(r, o, new, 0))
            if r.ngram is not None:
                r.ngram.extend(new)
            # Later mask guesses assumed every draft; after a rejection they are conditioned on a wrong token.
            if o.mask_predictions is not None and self.use_masks:
                r.drafts = o.mask_predictions[:max(0, _remaining(r) - 1)]
            else:
                r.drafts = []
        self.mask_stats.forget()
        for s in self.lookup_stats:
            s.forget()


@dataclass
class BudgetProposal(Proposal):
    commit: list[int] = field(default_factory=list)  # per row: exactly how many slots this forward commits


class BudgetProposer:
    """Budget decoding: per row, the forwards' group sizes planned up front by ARDM's DP, k - 1 masks each.

    A row with prompt length p and at most T new tokens gets ``plan_groups(profile, T, budget, p)``: group
    sizes g_1..g_n (n = ceil(budget * T) forwards, within what the profile's slots allow) minimising the
    expected bits sum_i sum_{j<=g_i} l_j(p + t_{i-1}) under the checkpoint's ``slot_profile``. Forward i of
    the row commits exactly g_i tokens (slot 1 and the masks' slots 2..g_i). Rows in a batch share one mask
    count, the largest g - 1 among them; a row planning fewer commits only its own g (masks only see the
    slots before them, so the extra ones change nothing it commits).
    """

    def __init__(self, profile, budget: float) -> None:
        self.profile, self.budget = profile, budget
        self.plans: dict[int, list[int]] = {}

    def start(self, row) -> None:
        from card.ardm.plan import plan_groups

        self.plans[row.index] = plan_groups(self.profile, row.max_new_tokens, self.budget, len(row.prompt_ids))

    def propose(self, rows) -> BudgetProposal:
        # Each forward commits its whole group (or ends the row), so the row's forward count indexes its plan.
        commit = [self.plans[r.index][r.forwards] for r in rows]
        return BudgetProposal(max(commit) - 1, [[] for _ in rows], commit=commit)

    def observe(self, rows, proposal: Proposal, outcomes: list[Outcome], committed: list[list[int]]) -> None:
        pass

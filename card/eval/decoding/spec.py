"""One decoding spec: the mode and every setting that belongs to it, parsed and validated in one place.

``DecodingSpec`` is what the CLI, the lm-eval ``card`` model, the eval runner, the reports and the
benchmarks pass around. Text forms (``DecodingSpec.parse``): ``ar``, ``lossless``, ``parallel`` (the
checkpoint's threshold) and ``parallel@T``, ``budget@F``. Fields left ``None`` take the checkpoint's defaults in
``resolve(meta)``. Every problem is a one-line ``CardError``.

Lookahead. ``block_size`` is K, the most masks a forward may carry. ``lookahead="auto"`` (the default) lets
every forward choose k <= K masks (and drafts) from a measured cost model and running acceptance estimates
(``card.eval.decoding.planner``); ``"fixed"`` always appends K (the paper's decoder). The CLI spells these
``--block-size auto`` and ``--block-size K``.

Drafts (lossless only): ``"mask"`` (the previous forward's mask predictions), ``"ngram"`` (prompt lookup: the
continuation of the latest earlier match of the text's last n tokens) or ``"mask+ngram"`` (per forward, the
source with the larger expected number of accepted tokens). ``None``: ``mask+ngram`` with automatic lookahead,
``mask`` with a fixed one (so a fixed K reproduces the original decoder step for step).

Budget (``budget@F``, F in (0, 1] forwards per token): the tokens committed by each forward are planned
before decoding by ARDM's dynamic program over the checkpoint's ``slot_profile`` (``card.ardm.plan``), and
exactly that many are committed, whatever their confidence. ``budget@1`` is AR.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from card.errors import CardError

MODES = ("ar", "parallel", "lossless", "budget")
RULES = ("prefix", "joint")
LOOKAHEADS = ("auto", "fixed")
DRAFTS = ("mask", "ngram", "mask+ngram")
DEFAULT_MAX_NEW_TOKENS = 64


def parse_block_size(value: Any) -> tuple[int | None, str]:
    """``"auto"``/None -> (None, "auto"); ``K`` (int or digits) -> (K, "fixed"); else ``CardError``."""
    if value is None or value == "auto":
        return None, "auto"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CardError(f"block size must be 'auto' or an integer >= 0, not {value!r}")
    return value, "fixed"


@dataclass(frozen=True)
class DecodingSpec:
    """A decoding mode with its settings (see the module docstring); validated on construction."""

    mode: str = "ar"
    threshold: float | None = None  # parallel: confidence threshold; None: the checkpoint's
    block_size: int | None = None  # K, the most masks per forward; None: the checkpoint's
    lookahead: str = "auto"  # "auto": k <= K chosen per forward; "fixed": always K
    drafts: str | None = None  # lossless draft sources; None: see the module docstring
    rule: str = "prefix"  # parallel acceptance rule
    temperature: float = 0.0  # ar / parallel; 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    budget: float | None = None  # budget: forwards per token, in (0, 1]

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CardError(f"decoding mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.threshold is not None:
            if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not (
                    0 < self.threshold <= 1):
                raise CardError(f"threshold must be in (0, 1], not {self.threshold}")
            if self.mode != "parallel":
                raise CardError(f"threshold applies to parallel decoding only, not {self.mode!r}")
        if self.mode == "budget" and self.budget is None:
            raise CardError("budget decoding needs a budget in (0, 1] forwards per token (e.g. budget@0.5)")
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not (
                    0 < self.budget <= 1):
                raise CardError(f"budget must be in (0, 1] forwards per token, not {self.budget}")
            if self.mode != "budget":
                raise CardError(f"budget applies to budget decoding only, not {self.mode!r}")
        if self.block_size is not None:
            parse_block_size(self.block_size)
        if self.lookahead not in LOOKAHEADS:
            raise CardError(f"lookahead must be one of {', '.join(LOOKAHEADS)}, not {self.lookahead!r}")
        if self.drafts is not None:
            if self.drafts not in DRAFTS:
                raise CardError(f"drafts must be one of {', '.join(DRAFTS)}, not {self.drafts!r}")
            if self.mode != "lossless":
                raise CardError(f"drafts apply to lossless decoding only, not {self.mode!r}")
        if self.rule not in RULES:
            raise CardError(f"acceptance rule must be one of {', '.join(RULES)}, not {self.rule!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not (
                self.temperature >= 0):
            raise CardError(f"temperature must be >= 0, not {self.temperature}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise CardError(f"top-p must be in (0, 1], not {self.top_p}")
        if self.mode == "lossless" and self.temperature > 0:
            raise CardError("lossless decoding is greedy only (temperature 0)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise CardError(f"seed must be an integer, not {self.seed!r}")

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def parse(cls, text: str, **overrides: Any) -> "DecodingSpec":
        """``"ar"``, ``"lossless"``, ``"parallel"``, ``"parallel@T"`` or ``"budget@F"``, then ``overrides`` (``with_``'s keys)."""
        if isinstance(text, DecodingSpec):
            return text.with_(**overrides)
        item = str(text).strip()
        name, at, value = item.partition("@")
        if name not in MODES or (at and name not in ("parallel", "budget")):
            raise CardError(f"unknown mode {item!r}: the decoding mode must be ar, lossless, parallel, parallel@T "
                            "with T in (0, 1] or budget@F with F in (0, 1]")
        number = None
        if at:
            try:
                number = float(value)
            except ValueError:
                what = ("a threshold (use e.g. parallel@0.7)" if name == "parallel"
                        else "a budget (use e.g. budget@0.5)")
                raise CardError(f"unknown mode {item!r}: {value!r} is not {what}") from None
        if name == "budget":
            budget = overrides.pop("budget", None)
            if at and budget is not None and float(budget) != number:
                raise CardError(f"two budgets given: {item!r} and {budget}")
            return cls(name, budget=number if at else budget).with_(**overrides)
        return cls(name, threshold=number).with_(**overrides)

    def with_(self, **overrides: Any) -> "DecodingSpec":
        """A copy with some settings replaced; ``block_size`` may be ``"auto"`` or K (sets ``lookahead``).

        ``None`` values are ignored (they mean "not given"), so callers can pass optional options as they are.
        """
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(given) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise CardError(f"{self.mode} decoding has no setting {', '.join(unknown)}")
        if "block_size" in overrides:  # None and "auto" both mean automatic lookahead
            k, lookahead = parse_block_size(overrides["block_size"])
            given["block_size"] = k
            given.setdefault("lookahead", lookahead)
        return dataclasses.replace(self, **given)

    def resolve(self, meta) -> "DecodingSpec":
        """Fill the threshold and block size from the checkpoint's CARD metadata (``meta``; None: plain AR)."""
        if self.mode == "ar":
            return self
        if meta is None:
            raise CardError(f"{self.mode} decoding needs a CARD checkpoint (no 'card' metadata in the model "
                            "config); convert it with card-convert first, or use --decoding ar")
        if self.mode == "budget":
            if getattr(meta, "slot_profile", None) is None:
                raise CardError("budget decoding needs the checkpoint's slot profile; measure it with "
                                "card profile CKPT --data FILE --write")
            return self
        return dataclasses.replace(
            self,
            threshold=(meta.decoding.threshold if self.threshold is None else self.threshold)
            if self.mode == "parallel" else None,
            block_size=meta.decoding.block_size if self.block_size is None else self.block_size,
        )

    # ------------------------------------------------------------------------------ views
    @property
    def draft_sources(self) -> tuple[str, ...]:
        """The lossless draft sources in use (empty outside lossless)."""
        if self.mode != "lossless":
            return ()
        drafts = self.drafts or ("mask+ngram" if self.lookahead == "auto" else "mask")
        return tuple(drafts.split("+"))

    @property
    def text(self) -> str:
        """The mode as ``parse`` reads it (``parallel@0.9``)."""
        if self.mode == "budget":
            return f"budget@{self.budget:g}"
        return f"parallel@{self.threshold:g}" if self.mode == "parallel" and self.threshold is not None else self.mode

    def label(self, name_block_size: bool = False) -> str:
        """A run label: the mode text, with `` K=k`` when the block size was chosen rather than defaulted."""
        if self.mode in ("ar", "budget") or not name_block_size:
            return self.text
        return f"{self.text} K={self.block_size}" if self.lookahead == "fixed" else f"{self.text} K=auto"

    def settings(self) -> dict[str, Any]:
        """The settings that apply to this mode, as results record them."""
        s: dict[str, Any] = {"mode": self.mode}
        if self.mode == "parallel":
            s.update(threshold=self.threshold, block_size=self.block_size, lookahead=self.lookahead, rule=self.rule)
        if self.mode == "lossless":
            s.update(block_size=self.block_size, lookahead=self.lookahead, drafts="+".join(self.draft_sources))
        if self.mode == "budget":
            s["budget"] = self.budget
        if self.mode != "lossless":
            s.update(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        return s

    def lm_eval_settings(self) -> dict[str, Any]:
        """The ``card`` lm-eval model's record of its decoding (mode, threshold, block size, lookahead)."""
        s: dict[str, Any] = {"decoding": self.mode}
        if self.threshold is not None:
            s["threshold"] = self.threshold
        if self.mode == "budget":
            s["budget"] = self.budget
        elif self.mode != "ar":
            s.update(block_size=self.block_size, lookahead=self.lookahead)
        if self.mode == "lossless":
            s["drafts"] = "+".join(self.draft_sources)
        return s


def parse_modes(modes) -> list[DecodingSpec]:
    """Parse ``"ar,parallel@0.9,lossless"`` (or a list of such strings) into specs; ``CardError`` on a bad entry."""
    items = modes.split(",") if isinstance(modes, str) else [m for s in modes for m in str(s).split(",")]
    specs = [DecodingSpec.parse(item) for item in (s.strip() for s in items) if item]
    if not specs:
        raise CardError("no decoding modes given; use e.g. --modes ar,parallel@0.9,lossless")
    return specs

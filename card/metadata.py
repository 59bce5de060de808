"""CARD metadata stored in a checkpoint's ``config.json`` under the ``card`` key.

Plain ``transformers`` keeps unknown config keys as attributes and writes them back on save, so the
metadata survives ``AutoModelForCausalLM.from_pretrained`` / ``save_pretrained`` without custom code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

FORMAT_VERSION = 1
CONFIG_KEY = "card"
DEFAULT_MASK_TOKEN = "<|mask|>"


@dataclass
class ObjectiveDefaults:
    tail_factor: float = 1.5  # lambda: tail window W = min(L, floor(lambda * N))
    decay_p: float = 0.5  # p: mask pressure decays by (1 - p) per position
    beta: float = 1.0  # w = 1 / (beta + S)


@dataclass
class DecodingDefaults:
    threshold: float = 0.9
    block_size: int = 8


@dataclass
class CardMetadata:
    mask_token: str
    mask_token_id: int
    original_vocab_size: int  # rows of the source's embedding: logits over [0, V) equal the source's
    vocab_size: int  # rows after conversion (padded to a multiple of 64)
    source: dict[str, Any] = field(default_factory=dict)  # name, format, sha256 of the weights
    doc_separator: str = "eos"  # token between documents in training data: "eos" or "bos"
    objective: ObjectiveDefaults = field(default_factory=ObjectiveDefaults)
    decoding: DecodingDefaults = field(default_factory=DecodingDefaults)
    format_version: int = FORMAT_VERSION
    adaptation: list[dict[str, Any]] = field(default_factory=list)  # one entry per CARD adaptation run
    slot_profile: dict[str, Any] | None = None  # per-slot loss/accuracy by prefix bucket (card.profile)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CardMetadata":
        # Unknown keys (written by newer tools, e.g. a slot profile) are skipped: readers take what they know.
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["objective"] = ObjectiveDefaults(**d.get("objective", {}))
        d["decoding"] = DecodingDefaults(**d.get("decoding", {}))
        return cls(**d)

    @property
    def suppressed_token_ids(self) -> list[int]:
        """Ids a decoder must never emit: the mask token and the rows added only as padding."""
        return sorted({self.mask_token_id, *range(self.original_vocab_size, self.vocab_size)})


def read_metadata(config: Any) -> CardMetadata | None:
    """The CARD metadata of a ``PretrainedConfig`` (or a config dict), or None for a plain AR checkpoint."""
    raw = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
    if raw is None:
        return None
    return CardMetadata.from_dict(raw)


def write_metadata(config: Any, meta: CardMetadata) -> None:
    setattr(config, CONFIG_KEY, meta.to_dict())

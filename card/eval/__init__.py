"""Stage 3: decoding and evaluation of CARD checkpoints (``card.eval.decoding``)."""

from card.eval.decoding import (
    MODES,
    RULES,
    DecodeResult,
    Request,
    decode,
    decode_ar,
    decode_lossless,
    decode_parallel,
    generate,
)

__all__ = [
    "MODES",
    "RULES",
    "DecodeResult",
    "Request",
    "decode",
    "decode_ar",
    "decode_lossless",
    "decode_parallel",
    "generate",
]

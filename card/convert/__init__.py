"""Stage 1: turn a pretrained causal LM into a CARD checkpoint (``card.convert.convert``)."""

from card.convert.core import ConvertReport, convert

__all__ = ["ConvertReport", "convert"]

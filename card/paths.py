"""Where the shared real data lives: one setting, ``CARD_DATA_DIR``.

The data dir defaults to ``shared/data`` beside the repository (``../shared/data`` from the repo root); it
holds the real stories260K model, the TinyStories text and the PIQA / HellaSwag / GSM8K files.
"""

from __future__ import annotations

import os
from pathlib import Path

from card.errors import CardError

ENV = "CARD_DATA_DIR"


def shared_data_dir(required: bool = True) -> Path:
    d = Path(os.environ.get(ENV) or Path(__file__).resolve().parents[2] / "shared" / "data").expanduser().resolve()
    if required and not d.is_dir():
        raise CardError(f"shared data folder {d} not found; set {ENV} to the folder holding eval/, tinystories/, stories260K_hf/")
    return d


def cache_dir(kind: str) -> Path:
    """``$CARD_CACHE_DIR/KIND`` (default ``~/.cache/card/KIND``): the one cache root for the data cache
    (``data``), downloaded model files (``models``) and measured decoding costs (``cost``)."""
    root = os.environ.get("CARD_CACHE_DIR") or Path.home() / ".cache" / "card"
    return Path(root).expanduser() / kind

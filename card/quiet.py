"""Progress bars only on a terminal: logs of piped or captured runs hold results, not bar redraws.

tqdm, transformers and huggingface_hub read their switches (``TQDM_DISABLE``, ``HF_HUB_DISABLE_PROGRESS_BARS``)
when they are imported, so the CLI calls ``quiet_progress_when_not_a_terminal()`` before importing them. Code
that passes ``disable=`` to tqdm explicitly (lm-eval's model classes) asks ``progress_disabled()``.
"""

from __future__ import annotations

import os
import sys

QUIET_ENV = "CARD_QUIET_PROGRESS"  # "1": no progress bars; "0": keep them even when piped


def quiet_progress_when_not_a_terminal() -> None:
    """Turn progress bars off when stderr is not a terminal (an explicit setting of any switch wins)."""
    if not sys.stderr.isatty():
        os.environ.setdefault(QUIET_ENV, "1")
    if os.environ.get(QUIET_ENV) == "1":
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def progress_disabled() -> bool:
    return os.environ.get(QUIET_ENV) == "1"

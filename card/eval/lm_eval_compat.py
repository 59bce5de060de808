"""lm-eval 0.4.13 prints something a CARD user should not see; fixed here without changing its results.

``simple_evaluate`` records the git commit of the current directory by running ``git describe --always``
with stderr inherited, so outside a git checkout every evaluation prints ``fatal: not a git repository``.
``install()`` makes lm-eval run the same command with stderr discarded (the hash, or None, is unchanged).
"""

from __future__ import annotations

import os
import subprocess


def _git_commit_hash() -> str | None:
    """lm-eval's ``get_git_commit_hash``, with git's complaint about a missing repository discarded."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        out = subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL)  # noqa: S607
        return out.strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


def install() -> None:
    import lm_eval.evaluator

    lm_eval.evaluator.get_git_commit_hash = _git_commit_hash

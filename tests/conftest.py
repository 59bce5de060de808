import os

# Before anything imports huggingface_hub / datasets: they read these once, at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from card import paths  # noqa: E402
from tests import factory  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The real model and data files (``../shared/data`` beside the repo unless CARD_DATA_DIR says otherwise)."""
    return paths.shared_data_dir(required=False)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    assert (d / "SOURCES.md").exists(), f"shared data not found at {d}; set CARD_DATA_DIR"
    return d


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Factory: ``tiny_ckpt(arch)`` -> path of a saved tiny HF checkpoint, built once per session."""
    cache: dict = {}

    def make(arch: str = "llama", seed: int = 0) -> Path:
        key = (arch, seed)
        if key not in cache:
            cache[key] = factory.save_tiny_checkpoint(tmp_path_factory.mktemp(f"src-{arch}-{seed}"), arch, seed)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def stories_card(data_dir, tmp_path_factory) -> Path:
    """The real stories260K converted to a CARD checkpoint, once per session (read-only for tests)."""
    from card.convert import convert

    dst = tmp_path_factory.mktemp("stories260K-card") / "stories260K-card"
    convert(str(data_dir / "stories260K_hf"), dst)
    return dst


def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and one thread does not fight other jobs on a shared 2-core box."""
    yield from _threads(1)


@pytest.fixture(scope="module")
def two_threads():
    """A 135M model uses both cores."""
    yield from _threads(2)


@pytest.fixture(scope="module")
def private_cost_cache(tmp_path_factory):
    """A private cost-model cache (automatic lookahead measures c(B, q)): tests neither read nor write the user's.

    Module-scoped rather than session-wide: the real-model tests find SmolLM2 under the user's CARD_CACHE_DIR.
    """
    mp = pytest.MonkeyPatch()
    mp.setenv("CARD_CACHE_DIR", str(tmp_path_factory.mktemp("card-cache")))
    yield
    mp.undo()

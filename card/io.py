"""File-system writes that cannot lose anything: outputs appear whole or not at all.

One place checks and claims every output destination (``check_destination``, ``atomic_directory``,
``staged_directory``), and one place finds and removes this tool's stale temporary folders beside a
destination (``sweep_stale``). A temporary folder is ours only if its name follows our pattern
(``.NAME.tmp-*`` / ``.NAME.old-*`` beside ``NAME``, or ``NAME`` itself while a staged run fills it) and it
holds the marker file ``MARKER`` naming the process that made it; it is stale once that process is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from card.errors import CardError

MARKER = ".card-partial"  # inside every temporary folder of ours while it is incomplete
TOOL = "card"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------- temporaries
def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, Linux), so a reused pid is not taken for its owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _start_time(pid)
    return start is None or now is None or now == start


def _write_marker(folder: Path) -> None:
    pid = os.getpid()
    (folder / MARKER).write_text(json.dumps({"tool": TOOL, "pid": pid, "start": _start_time(pid),
                                             "host": socket.gethostname()}))


def _marker(folder: Path) -> dict | None:
    """Our marker in ``folder``, or None when there is none (then the folder is not provably ours)."""
    try:
        mark = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(mark, dict) and mark.get("tool") == TOOL and isinstance(mark.get("pid"), int)
    return mark if ok else None


def _is_stale(folder: Path) -> bool:
    """``folder`` holds our marker and the process that wrote it (on this host) is gone."""
    mark = _marker(folder)
    if mark is None or mark.get("host") != socket.gethostname():
        return False  # not ours, or another host's process may still be writing (shared file systems)
    return not _alive(mark["pid"], mark.get("start"))


def sweep_stale(dst: str | os.PathLike) -> list[Path]:
    """Remove this tool's leftovers of killed runs beside ``dst``; return what was removed.

    ``.NAME.tmp-*``: an unfinished new copy, removed. ``.NAME.old-*``: a previous copy moved aside for a
    swap; if ``dst`` itself is missing (killed between the two renames) it is put back, else removed.
    ``dst`` itself holding a stale marker: a staged run that was killed, removed. Folders that are not
    provably ours (name pattern and marker of a dead process) are never touched.
    """
    dst = Path(dst)
    parent = dst.parent
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    if dst.is_dir() and not dst.is_symlink() and _is_stale(dst):
        shutil.rmtree(dst, ignore_errors=True)
        removed.append(dst)
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return removed
    prefix = f".{dst.name}."
    for p in entries:
        kind = p.name[len(prefix):len(prefix) + 4] if p.name.startswith(prefix) else ""
        if kind not in ("tmp-", "old-") or not p.is_dir() or p.is_symlink() or not _is_stale(p):
            continue
        kept = p / dst.name
        if kind == "old-" and kept.is_dir() and not dst.exists():
            os.replace(kept, dst)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _temporary(dst: Path, kind: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.{kind}-", dir=dst.parent))
    _write_marker(tmp)
    return tmp


# ------------------------------------------------------------------------------------- destinations
def _within(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or inside it (both resolved)."""
    return a == b or b in a.parents


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_writable(folder: Path, what: str) -> None:
    """Create and remove a folder in ``folder``: the only test that also holds for root and read-only mounts."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".card-probe-", dir=folder))
    except OSError as e:
        raise CardError(f"{what}: cannot write in {folder} ({e.strerror or type(e).__name__})") from None


def check_destination(
    dst: str | os.PathLike,
    overwrite: bool = False,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    label: str = "destination",
    replace: bool = True,
) -> Path:
    """Refuse an unusable output folder before any work is done; clear our stale leftovers beside it.

    Refused, each as one line: the current directory (or a folder holding it); one of ``inputs``, or (when
    it is replaced) a folder holding one; an existing non-directory; an existing folder
    without ``overwrite`` (``replace``: the folder is swapped for a new one; otherwise it is written into, as
    a resumable run directory); a path through a file; and a place this process cannot write.
    Missing parent folders are fine: they are created on claiming.
    """
    dst = Path(os.path.expanduser(str(dst)))
    what = f"{label} {dst}"
    real = dst.resolve()
    cwd = Path.cwd().resolve()
    if _within(cwd, real):
        where = "is the current directory" if real == cwd else "contains the current directory"
        raise CardError(f"{what} {where}; name a new folder")
    for src in inputs:
        if src is None:
            continue
        s = Path(os.path.expanduser(str(src))).resolve()
        if not s.exists():
            continue
        if real == s:
            raise CardError(f"{what} is also an input; name a new folder")
        if replace and dst.exists() and _within(s, real):
            raise CardError(f"{what} contains the input {src}; replacing it would delete that; name a new folder")
    sweep_stale(dst)
    if dst.exists() or dst.is_symlink():
        owner = _marker(dst) if dst.is_dir() else None
        if owner is not None:
            raise CardError(f"{what} is being written by another card process (pid {owner['pid']} on {owner.get('host')})")
        if not dst.is_dir():
            raise CardError(f"{what} exists and is not a directory")
        if replace and not overwrite:
            raise CardError(f"{what} already exists; pass --overwrite to replace it")
    base = _nearest_existing(dst if not replace else dst.parent)
    if not base.is_dir():
        raise CardError(f"{what}: cannot create it, {base} is a file, not a directory")
    _probe_writable(base, what)
    return dst


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, deepest last (to remove them on failure)."""
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def _remove_empty(folders: list[Path]) -> None:
    for p in reversed(folders):
        with contextlib.suppress(OSError):
            p.rmdir()


def _publishable(tree: Path) -> None:
    """Give files the permissions of any new file (some writers, e.g. safetensors, create them 0600)."""
    umask = _umask()
    for root, dirs, files in os.walk(tree):
        for name in files:
            f = Path(root) / name
            if not f.is_symlink():
                os.chmod(f, f.stat().st_mode | (0o666 & ~umask))


@contextlib.contextmanager
def atomic_directory(
    dst: str | os.PathLike, overwrite: bool = False, *, inputs: Iterable[str | os.PathLike | None] = (),
    label: str = "destination",
) -> Iterator[Path]:
    """Yield a temporary directory next to ``dst``; on success it replaces ``dst`` in one rename.

    On any exception the temporary directory (and any parent folder made for it) is removed and an existing
    ``dst`` is left untouched. The temporary directory lives in the same parent so the final ``os.replace``
    is a rename, not a copy; its marker lets a later run remove it if this process is killed.
    """
    dst = check_destination(dst, overwrite, inputs=inputs, label=label)
    made = _make_parents(dst.parent)
    try:
        tmp = _temporary(dst, "tmp")
    except OSError as e:
        _remove_empty(made)
        raise CardError(f"{label} {dst}: cannot write in {dst.parent} ({e.strerror})") from None
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should look like any new folder
    try:
        yield tmp
        _publishable(tmp)
        (tmp / MARKER).unlink()
        if dst.exists():
            # Keep the old directory until the new one is in place, so a crash between the two
            # renames still leaves a complete copy on disk (put back by the next sweep).
            old = _temporary(dst, "old")
            os.replace(dst, old / dst.name)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise


@contextlib.contextmanager
def staged_directory(
    dst: str | os.PathLike, overwrite: bool = False, *, inputs: Iterable[str | os.PathLike | None] = (),
    label: str = "--out",
) -> Iterator[Path]:
    """Yield ``dst`` itself, for a job that must write at its final paths (they are recorded inside).

    While the job runs ``dst`` holds the marker; an existing ``dst`` (``overwrite``) waits beside it in
    ``.NAME.old-*``. On success the marker and the old copy go; on any exception ``dst`` is removed and
    the old copy put back. After a kill, the next claim of ``dst`` does the same (``sweep_stale``).
    """
    dst = check_destination(dst, overwrite, inputs=inputs, label=label)
    made = _make_parents(dst.parent)
    old = None
    try:
        if dst.exists():
            old = _temporary(dst, "old")
            os.replace(dst, old / dst.name)
        dst.mkdir()
        _write_marker(dst)
    except OSError as e:
        _remove_empty(made)
        raise CardError(f"{label} {dst}: cannot write in {dst.parent} ({e.strerror})") from None
    try:
        yield dst
        (dst / MARKER).unlink()
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        if old is not None:
            os.replace(old / dst.name, dst)
        _remove_empty(made)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def check_file_destination(
    dst: str | os.PathLike, overwrite: bool = False, *, inputs: Iterable[str | os.PathLike | None] = (),
    label: str = "destination",
) -> Path:
    """Refuse an unusable output *file* before any work is done, as ``check_destination`` does for folders:
    one of ``inputs``; an existing folder; an existing file without ``overwrite``; a path through a file; a
    place this process cannot write."""
    dst = Path(os.path.expanduser(str(dst)))
    what = f"{label} {dst}"
    for src in inputs:
        if src is not None and Path(os.path.expanduser(str(src))).exists() and dst.exists() \
                and os.path.samefile(src, dst):
            raise CardError(f"{what} is also an input; name a new file")
    if dst.is_dir():
        raise CardError(f"{what} is a directory; name a file")
    if dst.exists() and not overwrite:
        raise CardError(f"{what} already exists; pass --overwrite to replace it")
    base = _nearest_existing(dst.parent)
    if not base.is_dir():
        raise CardError(f"{what}: cannot create it, {base} is a file, not a directory")
    _probe_writable(base, what)
    return dst


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file beside it and a rename: all or nothing."""
    _atomic_write(path, data, "wb")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename."""
    _atomic_write(path, text, "w")


def _atomic_write(path: str | os.PathLike, data: str | bytes, mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result should look like any new file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def state_dict_sha256(state_dict: dict) -> str:
    """sha256 over a state dict's tensors in name order (name, dtype, shape and raw bytes).

    Independent of the storage format, so the same weights from safetensors, a .bin or a llama2.c
    export hash the same.
    """
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of the weights
    return h.hexdigest()

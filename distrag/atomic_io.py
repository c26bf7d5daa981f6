"""Atomic file and directory writes: write to a temporary sibling, then rename into place.

What appears is readable as the user's umask allows (0644 files and 0755 folders under the usual 022,
0640 / 0750 under a group-readable 027), like any file the user writes, so that teammates on a shared
cluster can read reports, manifests and indexes. The temporaries are created private (``mkstemp``: 0600,
``mkdtemp``: 0700) and get their final mode before the rename. Secrets are not written here: the run's
key (:mod:`distrag.distributed.run_secret`) is created 0600 whatever the umask.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_UMASK_LOCK = threading.Lock()


def _umask_from_proc() -> int | None:
    """The umask from ``/proc/self/status`` (Linux 4.7+), read without changing it; None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


@functools.lru_cache(maxsize=1)
def _umask_by_setting() -> int:
    """The umask read the only portable way, by setting it and putting it back: once per process, under a
    lock, and through a restrictive 077 so that a file another thread creates meanwhile is private, not open."""
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old)
    return old


def current_umask() -> int:
    """The process's umask (where ``/proc`` cannot tell, as read once at the first call)."""
    mask = _umask_from_proc()
    return _umask_by_setting() if mask is None else mask


def file_mode() -> int:
    """Mode of a written file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode of a written folder: 0777 less the umask."""
    return 0o777 & ~current_umask()


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb", *, fsync: bool = True, **open_kw) -> Iterator[IO]:
    """An open file (``mode`` ``"wb"`` or ``"w"``) that appears at ``path`` complete, when the block ends without an
    exception, or not at all: written to a private temporary sibling, given the umask's mode, renamed into place.
    For output written as it is produced (one line a question); ``fsync=False`` skips forcing it to disk."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a new file: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kw) as f:
            os.fchmod(f.fileno(), file_mode())  # mkstemp's 0600 -> what the user's umask gives
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    """``fsync=False`` keeps the all-or-nothing rename but skips forcing the bytes to disk (for
    hand-off files that are worthless after a crash anyway)."""
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_directory(final: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; on success rename it to ``final``.

    Readers never see a half-written directory: it appears complete or not at all. With
    ``overwrite`` an existing ``final`` is moved aside first and removed after the swap.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, dir_mode())  # mkdtemp's 0700 -> what the user's umask gives
        old = None
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} already exists")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def follow_umask(root: str | Path) -> Path:
    """Give every file and folder under ``root`` (and ``root``) the mode the user's umask gives: for what
    libraries write with modes of their own (safetensors writes weights 0600), so teammates on a shared
    cluster can read a run's models."""
    root = Path(root)
    os.chmod(root, dir_mode() if root.is_dir() else file_mode())
    for path in root.rglob("*"):
        os.chmod(path, dir_mode() if path.is_dir() else file_mode())
    return root

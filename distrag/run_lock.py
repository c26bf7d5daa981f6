"""One run per output folder: ``<output_dir>/.distrag.lock``, an exclusive ``flock`` held while a run writes there.

Two runs writing one ``output_dir`` would interleave index caches, checkpoints and model folders. The
process that writes (``distrag train|eval|sweep|demo``; trainer 0 of a launched job) calls
:func:`lock_output_dir` before anything is loaded or written:

* the lock is free: it takes it and writes its ``pid``, ``host`` and start time into the file; it holds the
  lock until the process ends (the kernel releases a ``flock`` even after ``kill -9``), and removes the
  file at a normal exit;
* another live process holds it: :class:`~distrag.errors.OutputLockedError` at once, naming the folder
  and the holder's pid and host;
* the file is there but nobody holds the lock (its run was killed): the lock is taken over, with a
  warning naming the dead run (a pid on this host that no longer runs, or a run on another host).

The lock is per process and re-entrant: a sweep or the demo runs many experiments on one folder. On
network file systems ``flock`` works across hosts where the file system supports locks (NFSv4, Lustre
with ``flock``); elsewhere only runs on the same host are detected.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from distrag.errors import OutputLockedError
from distrag.process_watch import pid_alive

log = logging.getLogger(__name__)

LOCK_FILE = ".distrag.lock"

_held: dict[Path, int] = {}
"""Folders this process holds the lock of, and the lock file's descriptor."""


def _read(fd: int) -> dict:
    """The holder record in the lock file (empty when unreadable)."""
    try:
        raw = os.pread(fd, 4096, 0)
        record = json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(record: dict) -> str:
    if not record:
        return "a run that left no details"
    started = record.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, float) else ""
    return f"pid {record.get('pid', '?')} on host {record.get('host', '?')}{when}"


def _open_locked(path: Path, folder: Path) -> int:
    """A descriptor of ``path`` holding its exclusive lock; OutputLockedError when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise OutputLockedError(
                f"output_dir {folder} is in use by another run ({_describe(holder)}, lock file {path}): wait for "
                "it to finish, or give this run another output_dir") from None
        try:  # the holder may have removed the file between our open and our lock: lock the new one
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def lock_output_dir(folder: str | Path) -> Path:
    """Take (or, in this process, keep) the lock of ``folder`` for the rest of the process; returns the
    lock file. Raises :class:`OutputLockedError` when another run holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    folder = folder.resolve()
    path = folder / LOCK_FILE
    if folder in _held:
        return path
    fd = _open_locked(path, folder)
    previous, host = _read(fd), socket.gethostname()
    if previous.get("pid") not in (None, os.getpid()):
        dead = previous.get("host") != host or not isinstance(previous.get("pid"), int) \
            or not pid_alive(previous["pid"])
        log.warning("taking over the lock of output_dir %s left by %s%s", folder, _describe(previous),
                    " (no longer running)" if dead else " (its lock was free)")
    record = json.dumps({"pid": os.getpid(), "host": host, "started": time.time()}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    if not _held:
        atexit.register(release_all)
    _held[folder] = fd
    return path


def release_output_dir(folder: str | Path) -> None:
    """Give the lock of ``folder`` back (removing the lock file) if this process holds it."""
    folder = Path(folder).resolve()
    fd = _held.pop(folder, None)
    if fd is None:
        return
    with contextlib.suppress(FileNotFoundError):
        (folder / LOCK_FILE).unlink()  # while still locked: nobody can be mid-takeover of this file
    os.close(fd)


def release_all() -> None:
    """Give back every lock this process holds (at exit)."""
    for folder in list(_held):
        release_output_dir(folder)

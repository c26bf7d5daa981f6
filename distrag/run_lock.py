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

The lock file is opened without following a link (``O_NOFOLLOW``) and must be a regular file of this user
with no other name (one link): anyone who can write ``output_dir`` could otherwise point
``.distrag.lock`` at a file of the user's (a symlink, or a hard link) and have the run truncate and
overwrite it (issue 19). Such a lock file is a :class:`~distrag.errors.ConfigError` on ``output_dir``;
nothing is written through it.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import time
from pathlib import Path

from distrag.errors import ConfigError, OutputLockedError
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


def _open_own(path: Path) -> int:
    """``path`` opened read-write (created when missing) without following a link; ConfigError unless it is a
    regular file of this user with one link (checked on the descriptor: no window between check and use)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            try:
                target = f" (to {os.readlink(path)!r})"
            except OSError:
                target = ""
            raise ConfigError([("output_dir", f"{path} is a symbolic link{target}; the lock file is never followed "
                                              "through a link: remove it")]) from None
        raise
    st = os.fstat(fd)
    problem = ("is not a regular file" if not stat.S_ISREG(st.st_mode)
               else f"belongs to another user (uid {st.st_uid})" if st.st_uid != os.getuid()
               else f"has {st.st_nlink} links (another name of the same file)" if st.st_nlink != 1 else None)
    if problem:
        os.close(fd)
        raise ConfigError([("output_dir", f"{path} {problem}; the run would overwrite it as its lock file: "
                                          "remove it")])
    return fd


def _open_locked(path: Path, folder: Path) -> int:
    """A descriptor of ``path`` holding its exclusive lock; OutputLockedError when another process holds it."""
    while True:
        fd = _open_own(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise OutputLockedError(
                f"output_dir {folder} is in use by another run ({_describe(holder)}, lock file {path}): wait for "
                "it to finish, or give this run another output_dir") from None
        try:  # the holder may have removed the file between our open and our lock: lock the new one
            same = os.lstat(path).st_ino == os.fstat(fd).st_ino
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

"""Processes and signals, below every layer: is a pid alive (zombies count as gone), why did a child end,
ending a process that outlives its job (the index rank's supervisor after training), and SIGTERM taken
as Ctrl-C in a single-process run.

A pid alone does not name a process: the kernel hands a freed pid to the next process that starts. A pid
read from somewhere (a record, a lock file) is therefore paired with its start time (:func:`start_time`),
and a process is only signalled while its start time still matches (:func:`kill_if_same`).

It sits at the base of the package because both ends use it: the output folder's lock
(:mod:`distrag.run_lock`) asks whether a lock holder still runs, the single-process experiment
(:mod:`distrag.training.experiment`) turns SIGTERM into an interrupt, and the distributed refresh
protocol watches and ends the index rank's processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator


def hostname() -> str:
    """This machine's name (the index rank records ``host:pid``; a pid is only checked on the same host)."""
    return socket.gethostname()


def _stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time)`` of ``pid`` from ``/proc/<pid>/stat`` (fields 3 and 22; the start time in clock
    ticks since boot), or None when there is no such process or no ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name (field 2) may hold spaces and ")"
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None. With the host, a pid and its start time name
    one process: a pid the kernel hands to another process later has another start time."""
    stat = _stat(pid)
    return stat[1] if stat is not None else None


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` (on this host) still runs; a zombie (killed, not yet reaped by its
    launcher) is gone, and so is one whose start time is not ``start`` (the pid now names another process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _stat(pid)
    if stat is None:
        return start is None  # no /proc: alive as far as we can tell, unless we were to check who it is
    return stat[0] != "Z" and (start is None or stat[1] == start)


def exit_reason(exitcode: int) -> str:
    """What a child's exit code says: ``exit code 1`` or ``killed by SIGKILL``."""
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def kill_if_same(pid: int, start: int) -> bool:
    """SIGKILL ``pid`` only if it is still the process that started at ``start``; True when it was signalled.

    With ``pidfd_open`` (Linux 5.3+) the check and the signal are about one process: the pidfd is taken first,
    then the start time checked, and the signal goes through the pidfd, so a pid freed and reused in between
    is never hit. Elsewhere the start time is checked just before ``kill``."""
    if hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal"):
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # gone (or pidfds unsupported by this kernel: fall through)
            if not pid_alive(pid):
                return False
        else:
            try:
                if start_time(pid) != start:
                    return False
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                return True
            except (ProcessLookupError, PermissionError):
                return False
            finally:
                os.close(fd)
    if start_time(pid) != start:
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def end_lingering(pid: int, wait_s: float, poll_s: float = 0.1, *, start: int | None = None) -> bool:
    """Wait up to ``wait_s`` for process ``pid`` (the one that started at ``start``) to leave; kill it
    (SIGKILL, which also ends a stopped process) if it does not. Returns True when it had to be killed.

    ``start`` None: the caller vouches that ``pid`` is its own (a child it has not reaped); its start time
    is taken now, so a pid reused while waiting is still never signalled."""
    if start is None:
        start = start_time(pid)
        if start is None:
            return False  # already gone (or no /proc to tell who it is: never signal blind)
    deadline = time.monotonic() + wait_s
    while pid_alive(pid, start) and time.monotonic() < deadline:
        time.sleep(poll_s)
    if not pid_alive(pid, start):
        return False
    return kill_if_same(pid, start)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM raises KeyboardInterrupt like Ctrl-C does (single-process runs: ``kill`` or a
    scheduler's SIGTERM then saves what was trained, as an interrupt does). Main thread only; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

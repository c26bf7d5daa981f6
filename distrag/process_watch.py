"""Processes and signals, below every layer: is a pid alive (zombies count as gone), why did a child end,
ending a process that outlives its job (the index rank's supervisor after training), and SIGTERM taken
as Ctrl-C in a single-process run.

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


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (on this host) still runs; a zombie (killed, not yet reaped by its
    launcher) is gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def exit_reason(exitcode: int) -> str:
    """What a child's exit code says: ``exit code 1`` or ``killed by SIGKILL``."""
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def end_lingering(pid: int, wait_s: float, poll_s: float = 0.1) -> bool:
    """Wait up to ``wait_s`` for ``pid`` to leave; kill it (SIGKILL, which also ends a stopped process)
    if it does not. Returns True when it had to be killed."""
    deadline = time.monotonic() + wait_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(poll_s)
    if not pid_alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    return True


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

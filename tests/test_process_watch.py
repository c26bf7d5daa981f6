"""Process helpers: liveness (a zombie is gone), exit reasons, ending a process that lingers (even stopped),
SIGTERM as Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from distrag.process_watch import (
    end_lingering,
    exit_reason,
    kill_if_same,
    pid_alive,
    sigterm_as_interrupt,
    start_time,
)


def test_pid_alive_sees_running_zombie_and_reaped_processes():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert pid_alive(p.pid)
        p.kill()
        time.sleep(0.3)  # killed, not reaped yet: a zombie
        assert not pid_alive(p.pid)
    finally:
        p.wait()
    assert not pid_alive(p.pid)


def test_exit_reason_names_signals_and_codes():
    assert exit_reason(-9) == "killed by SIGKILL"
    assert exit_reason(1) == "exit code 1"


def test_end_lingering_kills_a_stopped_process_and_leaves_a_finished_one():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    p.send_signal(signal.SIGSTOP)
    assert end_lingering(p.pid, wait_s=0.3) is True
    assert p.wait(5) == -signal.SIGKILL
    q = subprocess.Popen([sys.executable, "-c", "pass"])
    q.wait()
    assert end_lingering(q.pid, wait_s=0.3) is False


def test_sigterm_interrupts_like_ctrl_c_inside_and_is_restored_after():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), sigterm_as_interrupt():
        signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_pid_counts_only_with_its_start_time_and_is_signalled_only_while_it_matches():
    """A pid the kernel gave to another process since (another start time) is gone for us, and never signalled."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        st = start_time(p.pid)
        assert st is not None and pid_alive(p.pid, st) and not pid_alive(p.pid, st + 1)
        assert kill_if_same(p.pid, st + 1) is False and p.poll() is None
        assert end_lingering(p.pid, wait_s=0.2, start=st + 1) is False and p.poll() is None
        assert kill_if_same(p.pid, st) is True and p.wait(5) == -signal.SIGKILL
    finally:
        p.kill()
        p.wait()
    assert kill_if_same(p.pid, st) is False  # reaped: gone, or its pid is another process's by now

"""One run per output folder: a live holder stops the second run at once (folder, pid, host named); the
lock of a killed run is taken over with a warning; the lock is re-entrant and given back at exit."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distrag import run_lock
from distrag.errors import OutputLockedError

HOLD = "import sys, time; from distrag.run_lock import lock_output_dir; lock_output_dir(sys.argv[1]); " \
       "print('locked', flush=True); time.sleep(60)"


def _holder(folder: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert p.stdout.readline().strip() == "locked"
    return p


@pytest.fixture(autouse=True)
def _forget_locks():
    yield
    run_lock.release_all()


def test_a_second_run_on_a_held_folder_stops_at_once_naming_the_holder(tmp_path):
    p = _holder(tmp_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(OutputLockedError) as e:
            run_lock.lock_output_dir(tmp_path)
        assert time.monotonic() - t0 < 5
        msg = str(e.value)
        assert str(tmp_path.resolve()) in msg and f"pid {p.pid}" in msg and socket.gethostname() in msg
    finally:
        p.kill()
        p.wait()


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    p = _holder(tmp_path)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (tmp_path / run_lock.LOCK_FILE).is_file()  # kill -9: the file stays, the kernel freed the lock
    with caplog.at_level(logging.WARNING, logger="distrag.run_lock"):
        path = run_lock.lock_output_dir(tmp_path)
    assert f"pid {p.pid}" in caplog.text and "no longer running" in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()


def test_the_lock_is_reentrant_and_released_with_its_file(tmp_path):
    path = run_lock.lock_output_dir(tmp_path / "out")
    assert run_lock.lock_output_dir(tmp_path / "out") == path  # a sweep locks its folder once per experiment
    run_lock.release_output_dir(tmp_path / "out")
    assert not path.exists()
    p = _holder(tmp_path / "out")  # free again: another process takes it
    p.kill()
    p.wait()


def test_a_clean_exit_gives_the_lock_back(tmp_path):
    code = "import sys; from distrag.run_lock import lock_output_dir; lock_output_dir(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert not (tmp_path / run_lock.LOCK_FILE).exists()

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


# ----------------------------------------------------------------------------------------------
# issue 19, item 6: the lock file is never followed through a link, and must be the user's own regular file


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    """Before: ``.distrag.lock`` pointing at a victim file made the run truncate and overwrite the victim."""
    from distrag.errors import ConfigError

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / run_lock.LOCK_FILE).symlink_to(victim)
    with pytest.raises(ConfigError, match=rf"output_dir: {out.resolve() / run_lock.LOCK_FILE} is a symbolic link"):
        run_lock.lock_output_dir(out)
    assert victim.read_text() == "precious\n" and (out / run_lock.LOCK_FILE).is_symlink()
    (out / run_lock.LOCK_FILE).unlink()
    (out / run_lock.LOCK_FILE).symlink_to(tmp_path / "nowhere")  # dangling: nothing is created through it
    with pytest.raises(ConfigError, match="symbolic link"):
        run_lock.lock_output_dir(out)
    assert not (tmp_path / "nowhere").exists()


def test_a_lock_file_that_is_not_a_private_regular_file_is_refused(tmp_path):
    from distrag.errors import ConfigError

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    os.link(victim, out / run_lock.LOCK_FILE)  # a second name of a file of the user's: would be truncated
    with pytest.raises(ConfigError, match=r"has 2 links"):
        run_lock.lock_output_dir(out)
    assert victim.read_text() == "precious\n"
    (out / run_lock.LOCK_FILE).unlink()
    os.mkfifo(out / run_lock.LOCK_FILE)
    with pytest.raises(ConfigError, match="not a regular file"):
        run_lock.lock_output_dir(out)
    (out / run_lock.LOCK_FILE).unlink()
    if os.getuid() == 0:  # only root can give a file away
        (out / run_lock.LOCK_FILE).write_text("{}")
        os.chown(out / run_lock.LOCK_FILE, 12345, -1)
        with pytest.raises(ConfigError, match="belongs to another user"):
            run_lock.lock_output_dir(out)

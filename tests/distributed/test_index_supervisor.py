"""The index rank's supervisor: a dead worker is reported and the launcher's process stays up until the
trainers are done; a worker that outlives training (stopped) is killed; the exit code follows the policy."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch

from distrag.distributed.index_supervisor import supervise
from distrag.distributed.refresh_protocol import K_ERROR, K_PID, RefreshChannel, read_record
from distrag.distributed.run_secret import run_secret
from distrag.process_watch import start_time

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def store():
    return torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


@pytest.fixture
def trainer0(store, tmp_path):
    """Trainer 0's end of the protocol for the run in ``tmp_path`` (it starts the job the records are bound to)."""
    return RefreshChannel.for_trainer(store, tmp_path)


def _start(store, worker, tmp_path, **kw) -> tuple[threading.Thread, list]:
    """``supervise`` on a thread; returns it and a box that receives its exit code."""
    box: list = []
    th = threading.Thread(target=lambda: box.append(supervise(store, worker, tmp_path, poll_s=0.05, log=lambda m: None,
                                                                **kw)))
    th.start()
    # until the worker runs and is announced: a blocking get meanwhile would hold the client the thread shares
    deadline = time.monotonic() + 30
    while not (worker.pid is not None and store.check([K_PID])) and time.monotonic() < deadline:
        time.sleep(0.01)
    return th, box


@pytest.mark.parametrize(("policy", "code"), [("continue", 0), ("stop", 1)])
def test_a_killed_worker_is_reported_and_the_supervisor_waits_for_the_trainers(store, trainer0, tmp_path, policy,
                                                                                code):
    worker = SPAWN.Process(target=time.sleep, args=(60,))
    th, box = _start(store, worker, tmp_path, on_failure=policy)
    key, job = run_secret(tmp_path), trainer0.job
    pid_record, _ = read_record(key, job, K_PID, store.get(K_PID))
    assert pid_record["pid"] == worker.pid and pid_record["supervisor"] == os.getpid()
    assert (pid_record["start"], pid_record["supervisor_start"]) == (start_time(worker.pid), start_time(os.getpid()))
    os.kill(worker.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while not store.check([K_ERROR]) and time.monotonic() < deadline:
        time.sleep(0.02)
    error, why = read_record(key, job, K_ERROR, store.get(K_ERROR))
    assert error is not None, why
    assert "killed by SIGKILL" in error["error"] and str(worker.pid) in error["error"]
    time.sleep(0.3)
    assert th.is_alive(), "the supervisor left before the trainers were done: a launcher would end the job"
    trainer0.send_done()
    th.join(10)
    assert box == [code]


def test_a_stopped_worker_is_killed_once_training_ends(store, trainer0, tmp_path):
    worker = SPAWN.Process(target=time.sleep, args=(120,))
    th, box = _start(store, worker, tmp_path, grace_s=0.5)
    os.kill(worker.pid, signal.SIGSTOP)
    trainer0.send_done()
    th.join(15)
    assert not th.is_alive() and box == [0]
    assert worker.exitcode == -signal.SIGKILL
    assert not store.check([K_ERROR])  # a worker ended after training is no failure


def test_a_worker_that_finishes_ends_the_supervisor(store, tmp_path):
    worker = SPAWN.Process(target=time.sleep, args=(0.2,))
    th, box = _start(store, worker, tmp_path)
    th.join(30)
    assert box == [0] and worker.exitcode == 0


def test_the_worker_own_error_record_is_kept(store, trainer0, tmp_path):
    """The worker recorded its exception before dying: the supervisor does not overwrite the reason."""
    from distrag.distributed.refresh_protocol import signed_record

    key, job = run_secret(tmp_path), trainer0.job
    store.set(K_ERROR, signed_record(key, job, K_ERROR, {"error": "ValueError: no corpus"}))
    worker = SPAWN.Process(target=os._exit, args=(1,))
    th, box = _start(store, worker, tmp_path)
    time.sleep(1.0)
    trainer0.send_done()
    th.join(10)
    assert box == [0]
    assert read_record(key, job, K_ERROR, store.get(K_ERROR))[0] == {"error": "ValueError: no corpus"}

"""The preemption path: signal -> agreed checkpoint -> requeue -> resume (the SLURM scripts that send the signal:
tests/test_slurm_scripts.py)."""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch
from _dist_workers import Job, preempt_reference_weights

from distrag.distributed import preemption


def test_handler_only_sets_flag_and_requeue_command(monkeypatch, tmp_path):
    preemption.reset()
    old = preemption.install([signal.SIGUSR1])
    try:
        assert not preemption.preemption_requested()
        signal.raise_signal(signal.SIGUSR1)
        assert preemption.preemption_requested() and preemption.received_signal() == signal.SIGUSR1
    finally:
        signal.signal(signal.SIGUSR1, old[signal.SIGUSR1])
        preemption.reset()
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("DISTRAG_REQUEUE_CMD", raising=False)
    assert preemption.requeue_command() is None
    monkeypatch.setenv("SLURM_JOB_ID", "31")
    assert preemption.requeue_command() == ["scontrol", "requeue", "31"]
    monkeypatch.setenv("DISTRAG_REQUEUE_CMD", "echo requeue {job_id}")
    assert preemption.requeue_command() == ["echo", "requeue", "31"]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_preemption_checkpoint_requeue_resume(tmp_path):
    steps = 40
    requeue_log = tmp_path / "requeue.txt"
    env = {"SLURM_JOB_ID": "4242", "DISTRAG_REQUEUE_CMD": f"sh -c 'echo {{job_id}} >> {requeue_log}'"}
    job = Job("preempt", {"out": str(tmp_path), "steps": steps, "step_sleep": 0.1}, 2, tmp_path / "run1", env=env)
    # Job writes results into args["out"]; logs into run1
    progress = tmp_path / "progress_1"
    deadline = time.monotonic() + 90
    while not (progress.exists() and progress.read_text() and int(progress.read_text()) >= 3):
        assert time.monotonic() < deadline and all(p.poll() is None for p in job.procs), job.output()
        time.sleep(0.05)
    job.procs[1].send_signal(signal.SIGUSR1)  # only trainer 1 is signalled
    assert job.wait(60) == [0, 0], job.output()
    r0 = json.loads((tmp_path / "result_0.json").read_text())
    r1 = json.loads((tmp_path / "result_1.json").read_text())
    s = r0["preempt_step"]
    assert s is not None and s == r1["preempt_step"] and s < steps - 1  # the same step on both ranks
    assert (r0["signalled"], r1["signalled"]) == (False, True)
    assert (r0["requeued"], r1["requeued"]) == (True, False)
    assert requeue_log.read_text().split() == ["4242"]  # trainer 0 only, once
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == f"step_{s:08d}"
    assert {p.name for p in (tmp_path / "ckpt" / f"step_{s:08d}").iterdir()} >= {
        "trainer_state.pt", "rank_00000.pt", "rank_00001.pt", "COMPLETE"}

    # the requeued job: resume=auto continues at s + 1 and ends exactly where an uninterrupted run ends
    job2 = Job("preempt", {"out": str(tmp_path), "steps": steps, "resume": "auto"}, 2, tmp_path / "run2", env=env)
    assert job2.wait(90) == [0, 0], job2.output()
    r0 = json.loads((tmp_path / "result_0.json").read_text())
    r1 = json.loads((tmp_path / "result_1.json").read_text())
    assert r0["start"] == r1["start"] == s + 1 and r0["preempt_step"] is None
    w, b = preempt_reference_weights(steps)
    torch.testing.assert_close(torch.tensor(r0["weight"]), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(r1["bias"]), b, rtol=1e-5, atol=1e-6)

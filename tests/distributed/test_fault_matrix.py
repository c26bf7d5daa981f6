"""The fault matrix (issue 10, deliverable 5): each fault, what it must not lose, and that the next run resumes.

    fault                                         where tested
    kill -9 of a trainer during a checkpoint save  toy trainers (_dist_workers.preempt_scenario)
    kill -9 of a trainer during a step             toy trainers
    kill -9 of the index worker during a publish   toy trainers + the real index supervisor
    SIGSTOP of the index worker / its supervisor   toy trainers + the real index supervisor
    kill -9 of the index worker, `continue`/`stop` launch/train.py under torchrun, tiny models
    SIGINT mid-run, two runs on one output_dir     `distrag train`, tiny models
    a full disk (ENOSPC) during a save / publish   in-process, the atomic writer patched to fail

A launcher ends the whole job when a trainer dies; the tests do the same (``Job.kill``) after the victim.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from _dist_workers import TOY_IN, Job, preempt_reference_weights, toy_corpus, toy_embed, toy_index

from distrag.distributed import roles
from distrag.distributed.checkpoint import CheckpointManager, list_complete
from distrag.distributed.refresh_client import IndexClient
from distrag.distributed.refresh_protocol import K_ERROR, RefreshChannel
from distrag.distributed.refresh_server import IndexServer
from distrag.distributed.world import get_dist_info
from distrag.retrieval import index_store

REPO = Path(__file__).resolve().parents[2]


def _wait_for(path: Path, job: Job | None = None, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, job.output() if job else f"{path} never appeared"
        if job is not None:
            assert all(p.poll() is None for p in job.procs), job.output()
        time.sleep(0.05)
    return path.read_text()


def _kill_victim_then_job(job: Job, marker: Path) -> None:
    """kill -9 the process that wrote ``marker`` (its pid), then end the rest as a launcher would."""
    os.kill(int(_wait_for(marker, job)), signal.SIGKILL)
    time.sleep(1.0)
    job.kill()
    job.wait(30)


def _resume_and_compare(tmp_path: Path, steps: int, expect_start: int) -> None:
    job = Job("preempt", {"out": str(tmp_path), "steps": steps, "resume": "auto"}, 2, tmp_path / "resumed")
    assert job.wait(120) == [0, 0], job.output()
    r0, r1 = (json.loads((tmp_path / f"result_{r}.json").read_text()) for r in (0, 1))
    assert r0["start"] == r1["start"] == expect_start
    w, b = preempt_reference_weights(steps)
    torch.testing.assert_close(torch.tensor(r0["weight"]), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(r1["bias"]), b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("where", ["in_save", "in_step"])
def test_kill_9_of_a_trainer_loses_no_checkpoint_and_the_next_run_resumes_exactly(tmp_path, where):
    """Checkpoints every 3 steps; trainer 1 is killed inside the save of step 5 (after its own file) or in step 7.
    The complete checkpoint of step 2 (in_save) or 5 (in_step) is intact and valid, and resuming from it ends
    exactly where an uninterrupted run ends."""
    steps, fault_step = 12, {"in_save": 5, "in_step": 7}[where]
    args = {"out": str(tmp_path), "steps": steps, "checkpoint_every": 3, where: [1, fault_step]}
    job = Job("preempt", args, 2, tmp_path / "run1")
    _kill_victim_then_job(job, tmp_path / where)
    last = {"in_save": 2, "in_step": 5}[where]
    root = tmp_path / "ckpt"
    assert (root / "latest").read_text().strip() == f"step_{last:08d}"
    assert [p.name for p in list_complete(root)][-1] == f"step_{last:08d}"
    roles.reset_context()
    CheckpointManager(root).validate(root / f"step_{last:08d}")  # every file as saved
    _resume_and_compare(tmp_path, steps, last + 1)


def _refresh_args(tmp_path: Path, **kw) -> dict:
    return {"out": str(tmp_path), "steps": 40, "refresh_every": 2, "timeout": 30.0, "on_failure": "continue",
            "shard_sleep": 0.02, "step_sleep": 0.1, "supervised": True, **kw}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill_9_of_the_index_worker_during_a_publish_leaves_training_running(tmp_path):
    """The index worker is killed while writing version 2: the launcher's index process stays up, the trainers
    train every step on version 1 and leave with 0; no half-written version is ever visible."""
    job = Job("refresh", _refresh_args(tmp_path, hang_in_publish=2), 3, tmp_path)
    os.kill(int(_wait_for(tmp_path / "in_publish", job)), signal.SIGKILL)
    assert job.wait(180) == [0, 0, 0], job.output()
    trainers = [job.result(r) for r in (0, 1)]
    index = job.result(2)
    assert index["worker_exitcode"] == -signal.SIGKILL and index["code"] == 0
    for t in trainers:
        assert t["last_step"] == 39 and t["stop_step"] is None
        # the supervisor's record, or trainer 0 seeing the worker's pid gone first
        assert ("killed by SIGKILL" in t["failed"] or "is gone" in t["failed"]) and t["final_version"] == 1
    assert index_store.latest_version(tmp_path / "index")[0] == 1
    index_store.load(tmp_path / "index" / "v000001")  # complete and readable
    assert list((tmp_path / "index").glob(".v000002.*.tmp"))  # the half-written one stays out of sight


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("victim", ["worker", "supervisor"])
def test_a_stopped_index_rank_does_not_keep_the_job_alive(tmp_path, victim):
    """SIGSTOP of the index worker (the trainers time out on its heartbeat, finish, and its supervisor kills it)
    or of the supervisor itself (trainer 0 kills it after training): every process has left within the bound."""
    job = Job("refresh", _refresh_args(tmp_path, steps=30, timeout=3.0, done_wait=3.0), 3, tmp_path)
    _wait_for(tmp_path / "index" / "LATEST", job)
    supervisor = job.procs[2].pid
    target = supervisor if victim == "supervisor" else _child_of(supervisor, "spawn_main")
    os.kill(target, signal.SIGSTOP)
    t0 = time.monotonic()
    codes = job.wait(120)
    assert time.monotonic() - t0 < 110
    assert codes[:2] == [0, 0], job.output()
    assert codes[2] == (-signal.SIGKILL if victim == "supervisor" else 0), job.output()
    assert job.result(0)["last_step"] == 29


def _child_of(pid: int, needle: str) -> int:
    """The pid of ``pid``'s child whose command line contains ``needle``."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid and needle in cmd:
                return int(proc.name)
        time.sleep(0.1)
    raise AssertionError(f"no child of {pid} running {needle}")


# ----------------------------------------------------------------------------------------------
# a full disk: the atomic writer fails with ENOSPC


def _enospc(real, when):
    def write(path, data, **kw):
        if when(Path(path)):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data, **kw)

    return write


def test_a_full_disk_during_a_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch, clean_env):
    import distrag.distributed.checkpoint as checkpoint

    mgr = CheckpointManager(tmp_path / "ckpt", keep=2)
    mgr.save(1, {"w": torch.ones(3)})
    monkeypatch.setattr(checkpoint, "atomic_write_bytes",
                        _enospc(checkpoint.atomic_write_bytes, lambda p: p.name.startswith("rank_")))
    with pytest.raises(OSError, match="No space left"):
        mgr.save(2, {"w": torch.full((3,), 2.0)})
    assert (mgr.root / "latest").read_text().strip() == "step_00000001"
    assert mgr.resolve("auto") == mgr.root / "step_00000001"
    assert torch.equal(mgr.load(mgr.resolve("auto")).payload["w"], torch.ones(3))
    monkeypatch.undo()  # space again: the next save succeeds and clears the failed one's leftovers
    mgr.save(3, {"w": torch.full((3,), 3.0)})
    assert [p.name for p in list_complete(mgr.root)] == ["step_00000001", "step_00000003"]
    assert not list(mgr.root.glob(".step_*.tmp"))


def test_a_full_disk_during_an_index_publish_is_reported_and_keeps_the_published_versions(tmp_path, clean_env,
                                                                                          monkeypatch):
    """The index rank cannot write version 2: its error reaches the trainers (the signed error record), and
    version 1 stays complete and loadable."""
    import distrag.retrieval.index_store as store_mod

    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = roles.DistContext(get_dist_info(), store=store)
    client = IndexClient(ctx, tmp_path / "weights", index_timeout_s=30)
    corpus = toy_corpus()
    server = IndexServer(store, lambda sd: [toy_embed(sd, corpus)], toy_index, tmp_path / "index",
                         tmp_path / "weights", poll_interval_s=0.01, log=lambda m: None)
    client.submit_weights(0, torch.nn.Linear(TOY_IN, 4).state_dict())
    client.flush()
    raised: list[BaseException] = []

    def serve() -> None:
        try:
            server.run()
        except OSError as e:
            raised.append(e)

    th = threading.Thread(target=serve)
    th.start()
    assert client.wait_for_version(1, step=1, load_fn=index_store.load, timeout_s=30).version == 1
    monkeypatch.setattr(store_mod, "atomic_write_json", _enospc(store_mod.atomic_write_json, lambda p: True))
    client.submit_weights(2, torch.nn.Linear(TOY_IN, 4).state_dict())
    client.flush()
    th.join(30)  # the server's loop raised
    assert [e.errno for e in raised] == [errno.ENOSPC]
    assert store.check([K_ERROR]) and RefreshChannel(store, tmp_path).newest_weights().n == 2
    client.poll(3)
    assert "No space left" in client.failed and client.current.version == 1
    client.channel.send_done()
    assert index_store.latest_version(tmp_path / "index")[0] == 1
    index_store.load(tmp_path / "index" / "v000001")


# ----------------------------------------------------------------------------------------------
# the real entry points, tiny models


def _cfg(root: Path, tiny_encoder_dir, tiny_lm_dir, max_steps: int) -> Path:
    path = root / "cfg.yaml"
    path.write_text(f"""
data: {{format: synthetic, synthetic: {{n_entities: 12, n_single_hop: 24, n_two_hop: 8}}}}
embedder: {{model: {tiny_encoder_dir}, max_length: 64}}
generator: {{model: {tiny_lm_dir}, max_new_tokens: 4, max_passage_chars: 100}}
retrieval: {{top_k: 3}}
train: {{strategy: joint, rag_loss: token, train_k: 2, batch_size: 2, micro_batch_size: 1, max_steps: {max_steps}}}
distributed: {{index_timeout_s: 120}}
tracking: {{experiment: faults, uri: "sqlite:///{root / 'mlflow.db'}"}}
output_dir: {root / 'out'}
""")
    return path


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def _runs(root: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("faults").experiment_id])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigint_mid_run_keeps_the_models_and_a_second_run_on_the_folder_is_refused(tmp_path, tiny_encoder_dir,
                                                                                   tiny_lm_dir):
    cfg = _cfg(tmp_path, tiny_encoder_dir, tiny_lm_dir, max_steps=100_000)  # still training when SIGINT comes
    cmd = [sys.executable, "-m", "distrag.cli", "train", "--config", str(cfg), "--no-progress"]
    # a shell's background job (CI under nohup/&) starts with SIGINT ignored, and children inherit that: give
    # the run the default disposition a terminal's Ctrl-C meets
    first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lock = tmp_path / "out" / ".distrag.lock"
        _wait_for(lock)
        second = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
        assert second.returncode == 2
        assert f"output_dir {tmp_path / 'out'} is in use by another run (pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        deadline = time.monotonic() + 600  # until training has taken a few steps (hang guard, not a timing)
        while not _trained_steps(tmp_path) >= 3:
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        first.send_signal(signal.SIGINT)
        log, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, log[-3000:]
    assert "Traceback" not in log and "interrupted" in log
    partial = next((tmp_path / "out" / "models").glob("joint_token-*-partial"))
    facts = json.loads((partial / "PARTIAL.json").read_text())
    assert facts["interrupted_at_global_step"] >= 3 and str(partial) in log
    assert (partial / "adapter").is_dir() and (partial / "embedder").is_dir()
    (run,) = _runs(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags["distrag.stopped"] == "interrupted"
    assert not lock.exists()  # given back
    # the next run on the folder starts (the lock is free) and the partial models are still there
    rerun = subprocess.run([*cmd, "train.max_steps=2"], env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert (partial / "PARTIAL.json").is_file()


def _trained_steps(root: Path) -> int:
    """Optimizer steps the run in ``root`` has logged so far (its training loss history)."""
    from mlflow.tracking import MlflowClient

    if not (root / "mlflow.db").exists():
        return 0
    try:
        (run,) = _runs(root)
        client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
        keys = [k for k in client.get_run(run.info.run_id).data.metrics if k.startswith("train") and "loss" in k]
        return max((len(client.get_metric_history(run.info.run_id, k)) for k in keys), default=0)
    except Exception:  # noqa: BLE001 - the store or the run is still being created
        return 0


def _launch(root: Path, cfg: Path, *overrides: str) -> subprocess.Popen:
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port", str(port),
           str(REPO / "launch" / "train.py"), "--config", str(cfg), "train.refresh_every=2", *overrides]
    return subprocess.Popen(cmd, cwd=root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _free_port() -> int:
    from _dist_workers import free_port_block

    return free_port_block(3)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("policy", ["continue", "stop"])
def test_kill_9_of_the_index_worker_under_the_launcher_follows_the_policy(tmp_path, tiny_encoder_dir,
                                                                          tiny_lm_dir, policy):
    """``continue``: training goes on to the last step, is evaluated and the MLflow run FINISHED (exit 0).
    ``stop``: one clear message, a checkpoint to resume from, the run FAILED (tag index_failed), exit 1."""
    cfg = _cfg(tmp_path, tiny_encoder_dir, tiny_lm_dir, max_steps=14)
    job = _launch(tmp_path, cfg, f"distributed.on_index_failure={policy}")
    try:
        run_root = tmp_path / "out" / "distributed"
        deadline = time.monotonic() + 300
        while not list(run_root.glob("*/index/v000001")):
            assert job.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        worker = _index_worker(job.pid)
        os.kill(worker, signal.SIGKILL)
        log, _ = job.communicate(timeout=400)
    finally:
        if job.poll() is None:
            job.kill()
    (run,) = _runs(tmp_path)
    history = next(run_root.glob("*/history.json"), None)
    if policy == "continue":
        assert job.returncode == 0, log[-4000:]
        assert run.info.status == "FINISHED" and "test/em" in run.data.metrics
        assert len(json.loads(history.read_text())) == 14
        assert "killed by SIGKILL" in log and "training continues" in log
    else:
        assert job.returncode != 0, log[-4000:]
        assert run.info.status == "FAILED" and run.data.tags["distrag.stopped"] == "index_failed"
        assert history is None and "resume with distributed.resume=auto" in log
        ckpts = list(run_root.glob("*/checkpoints/step_*"))
        assert ckpts and all((c / "COMPLETE").is_file() for c in ckpts)


def _children(pid: int) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(proc.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _index_worker(launcher: int) -> int:
    """The index worker of the job torchrun ``launcher`` started: the spawned child of one of its ranks."""
    for rank in _children(launcher):
        for child in _children(rank):
            try:
                if "spawn_main" in (Path("/proc") / str(child) / "cmdline").read_bytes().decode(errors="replace"):
                    return child
            except OSError:
                continue
    raise AssertionError("no index worker under the launcher")

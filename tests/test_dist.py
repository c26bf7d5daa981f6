"""Roles and the index refresh protocol (unit tests + real 3-process runs on gloo)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _dist_workers import TOY_IN, Job, toy_corpus, toy_embed

from distrag.config import DistributedConfig
from distrag.distributed import roles
from distrag.distributed.index_refresh import (
    K_DONE,
    IndexClient,
    IndexServer,
    make_dir_publisher,
    read_latest,
)

ENV_KEYS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
            "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "DISTRAG_GLOBAL_RANK",
            "DISTRAG_GLOBAL_WORLD_SIZE", "DISTRAG_GLOBAL_MASTER_ADDR", "DISTRAG_GLOBAL_MASTER_PORT"]


@pytest.fixture
def clean_env(monkeypatch):
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    roles.reset_context()
    yield monkeypatch
    roles.reset_context()


def _env(mp, rank, world, local=0):
    mp.setenv("RANK", str(rank))
    mp.setenv("WORLD_SIZE", str(world))
    mp.setenv("LOCAL_RANK", str(local))


def test_single_process_roles(clean_env):
    info = roles.get_dist_info(DistributedConfig())
    assert (info.role, info.rank, info.world_size, info.trainer_rank, info.n_trainers) == ("single", 0, 1, 0, 1)
    assert info.is_rank0 and info.is_trainer and not info.distributed
    ctx = roles.init_roles(DistributedConfig())
    assert ctx.store is None and not ctx.has_group
    assert ctx.broadcast_object_trainers({"a": 1}) == {"a": 1}
    assert ctx.all_reduce_flag(True) is True


@pytest.mark.parametrize("index_rank,rank,expect", [
    (-1, 3, ("index", -1)), (-1, 0, ("trainer", 0)), (-1, 2, ("trainer", 2)),
    (0, 0, ("index", -1)), (0, 1, ("trainer", 0)), (1, 3, ("trainer", 2)), (-2, 2, ("index", -1)),
])
def test_roles_from_env(clean_env, index_rank, rank, expect):
    _env(clean_env, rank, 4)
    info = roles.get_dist_info(DistributedConfig(index_rank=index_rank))
    assert (info.role, info.trainer_rank) == expect
    assert info.n_trainers == 3 and info.index_rank == index_rank % 4


def test_roles_without_index_rank_and_errors(clean_env):
    _env(clean_env, 2, 3)
    info = roles.get_dist_info(DistributedConfig(), with_index_rank=False)
    assert (info.role, info.trainer_rank, info.n_trainers, info.index_rank) == ("trainer", 2, 3, -1)
    with pytest.raises(roles.DistError, match="outside the world"):
        roles.get_dist_info(DistributedConfig(index_rank=5))
    clean_env.setenv("RANK", "7")
    with pytest.raises(roles.DistError, match="inconsistent"):
        roles.get_dist_info()


def test_slurm_fallbacks(clean_env):
    clean_env.setenv("SLURM_PROCID", "5")
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setenv("SLURM_JOB_ID", "123456")
    clean_env.setenv("MASTER_ADDR", "node01")
    info = roles.get_dist_info(DistributedConfig())
    assert (info.rank, info.world_size, info.local_rank, info.role) == (5, 8, 1, "trainer")
    assert info.master_addr == "node01" and info.master_port == 20000 + 123456 % 20000


def test_null_logger_on_other_ranks(clean_env, capsys):
    _env(clean_env, 1, 3)
    roles._CTX = roles.DistContext(roles.get_dist_info(DistributedConfig()))
    roles.print0("hidden")
    roles.get_logger("t_other").warning("hidden too")
    assert "hidden" not in capsys.readouterr().out + capsys.readouterr().err
    assert not roles.is_rank0()


def test_dir_publisher_is_atomic_and_versioned(tmp_path):
    pub = make_dir_publisher(lambda idx, d: np.save(d / "vectors.npy", idx))
    assert read_latest(tmp_path) is None
    p1 = pub(np.ones((3, 2), np.float32), tmp_path, 1, {"weights_step": 0})
    p2 = pub(np.zeros((3, 2), np.float32), tmp_path, 2, {"weights_step": 5})
    assert read_latest(tmp_path) == (2, p2)
    assert json.loads((p1 / "manifest.json").read_text())["version"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_server_skips_to_newest_weights_in_process(tmp_path, clean_env):
    """Three submissions before the index rank looks: it builds only from the newest."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = roles.DistContext(roles.get_dist_info(DistributedConfig()), store=store)
    client = IndexClient(ctx, tmp_path / "w", index_timeout_s=30)
    sds = []
    for step in (0, 10, 20):
        lin = torch.nn.Linear(TOY_IN, 4)
        sds.append(lin.state_dict())
        client.submit_weights(step, lin.state_dict())
    client.flush()  # the last hand-off is written in the background; announce it before the server looks
    corpus = toy_corpus()
    server = IndexServer(store, lambda sd: [toy_embed(sd, corpus)], lambda v: v, tmp_path / "idx", tmp_path / "w",
                         poll_interval_s=0.02, log=lambda m: None)
    th = threading.Thread(target=server.run)
    th.start()
    d = client.wait_for_version(1, step=25, timeout_s=20, interval_s=0.02)
    store.add(K_DONE, 1)
    th.join(10)
    assert not th.is_alive()
    assert (d.version, d.weights_step, d.staleness) == (1, 20, 5)
    assert server.published == 1
    vecs = np.load(Path(d.path) / "vectors.npy")
    np.testing.assert_allclose(vecs, toy_embed(sds[2], corpus), rtol=1e-6)
    # consumed weights files are pruned when the next submission is announced (written in the background)
    client.submit_weights(30, sds[0])
    client.flush()
    assert sorted(p.name for p in (tmp_path / "w").glob("w_*.pt")) == ["w_000003.pt", "w_000004.pt"]


def test_on_index_failure_is_validated(clean_env):
    ctx = roles.DistContext(roles.get_dist_info())
    with pytest.raises(ValueError, match="on_index_failure"):
        IndexClient(ctx, "w", on_index_failure="ignore")


# ----------------------------------------------------------------------------------------------
# real processes: 2 trainers + 1 index rank


def _wait_for(pred, timeout, job):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if any(p.poll() is not None for p in job.procs):
            break
        time.sleep(0.05)
    job.kill()
    raise AssertionError(f"condition not reached within {timeout}s\n{job.output()}")


def _check_published_versions(out: Path, submitted: dict) -> int:
    """Every published version equals a brute-force search with the weights it was built from."""
    import faiss

    corpus = toy_corpus()
    queries = torch.randn(10, TOY_IN, generator=torch.Generator().manual_seed(99))
    n = 0
    for vdir in sorted((out / "index").glob("v*")):
        meta = json.loads((vdir / "manifest.json").read_text())
        w = submitted[str(meta["weights_n"])]
        assert w["step"] == meta["weights_step"]
        sd = {"weight": torch.tensor(w["weight"]), "bias": torch.tensor(w["bias"])}
        pas, qs = toy_embed(sd, corpus), toy_embed(sd, queries)
        index = faiss.read_index(str(vdir / "index.faiss"))
        assert index.ntotal == len(corpus)
        _, ids = index.search(qs, 5)
        brute = np.argsort(-(qs @ pas.T), axis=1, kind="stable")[:, :5]
        np.testing.assert_array_equal(ids, brute)
        n += 1
    return n


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_refresh_protocol_then_index_killed_continue(tmp_path):
    """Versions are published and adopted by both trainers at the same step; then the index rank
    is SIGKILLed and the trainers carry on with the last version."""
    args = {"out": str(tmp_path), "steps": 140, "refresh_every": 15, "timeout": 30, "on_failure": "continue",
            "step_sleep": 0.05}
    job = Job("refresh", args, 3, tmp_path)
    try:
        _wait_for(lambda: (read_latest(tmp_path / "index") or (0,))[0] >= 2, 100, job)
        job.procs[2].send_signal(signal.SIGKILL)
        codes = job.wait(100)
    finally:
        job.kill()
    assert codes[:2] == [0, 0], job.output()
    r0, r1 = job.result(0), job.result(1)
    assert r0["adoptions"] == r1["adoptions"], "trainers adopted at different steps"
    versions = [a["version"] for a in r0["adoptions"]]
    assert versions == sorted(versions) and len(versions) >= 2 and versions[:2] == [1, 2]
    for a in r0["adoptions"]:
        assert a["staleness"] == a["step"] - a["weights_step"] >= 0
    assert r0["loaded"] == r1["loaded"] == [a["path"] for a in r0["adoptions"]]
    # failure detected, same decision everywhere, training went on to the end on the last version
    assert r0["failed"] and r0["failed"] == r1["failed"] and "gone" in r0["failed"]
    assert r0["last_step"] == r1["last_step"] == args["steps"] - 1
    assert r0["stop_step"] is None and r0["final_version"] == versions[-1]
    assert "RuntimeWarning" in (tmp_path / "log_0.txt").read_text()
    assert _check_published_versions(tmp_path, r0["submitted"]) >= 2


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_stalled_index_rank_stop(tmp_path):
    """A stalled index rank (SIGSTOP: alive, no heartbeat) -> every trainer raises IndexRankFailed at
    the same step, within index_timeout_s, instead of hanging."""
    timeout = 2.0
    args = {"out": str(tmp_path), "steps": 2000, "refresh_every": 10, "timeout": timeout, "on_failure": "stop",
            "step_sleep": 0.02}
    job = Job("refresh", args, 3, tmp_path)
    try:
        _wait_for(lambda: read_latest(tmp_path / "index") is not None, 100, job)
        job.procs[2].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        codes = [job.procs[0].wait(60), job.procs[1].wait(60)]
        elapsed = time.monotonic() - t0
    finally:
        job.kill()  # SIGKILL also ends a stopped process
        job.wait(30)
    assert codes == [3, 3], job.output()
    r0, r1 = job.result(0), job.result(1)
    assert r0["stop_step"] is not None and r0["stop_step"] == r1["stop_step"]
    assert r0["stop_step"] < args["steps"] - 1
    assert "heartbeat" in r0["failed"] and r0["failed"] == r1["failed"]
    assert elapsed < timeout + 20
    assert "IndexRankFailed" in (tmp_path / "log_1.txt").read_text() or "stopping" in (
        tmp_path / "log_1.txt").read_text()
    assert os.path.exists(tmp_path / "index" / "v000001" / "manifest.json")

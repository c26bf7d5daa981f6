"""The refresh protocol as the trainers live it: adoption at the same step on every trainer, versions
that increase and equal a brute-force search with the weights they were built from, and the two
failure policies (real 3-process runs on gloo; the index rank publishes ShardedIndex versions), and what the
refresh cost a trainer (RefreshStats)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from _dist_workers import TOY_IN, Job, toy_corpus, toy_embed

from distrag.config import DistributedConfig
from distrag.distributed import refresh_protocol, roles, run_secret
from distrag.distributed.refresh_client import AdoptDecision, IndexClient, RefreshStats
from distrag.distributed.refresh_protocol import K_ERROR, K_PID, K_PUBLICATION, K_WEIGHTS, IndexProcess
from distrag.distributed.world import get_dist_info
from distrag.process_watch import hostname, start_time
from distrag.retrieval import index_store


def test_on_index_failure_is_validated(clean_env):
    ctx = roles.DistContext(get_dist_info())
    with pytest.raises(ValueError, match="on_index_failure"):
        IndexClient(ctx, "w", on_index_failure="ignore")


def test_the_client_runs_on_trainers_only(clean_env):
    for key, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0")):
        clean_env.setenv(key, value)
    ctx = roles.DistContext(get_dist_info(DistributedConfig()))
    assert ctx.info.is_index
    with pytest.raises(ValueError, match="the index rank runs IndexServer"):
        IndexClient(ctx, "w")


def test_without_a_store_nothing_is_submitted_or_adopted_and_the_version_in_use_round_trips(clean_env, tmp_path):
    ctx = roles.DistContext(get_dist_info())
    client = IndexClient(ctx, tmp_path)
    assert client.submit_weights(0, {"w": torch.zeros(2)}) is None and client.poll(0) is None
    assert not list(tmp_path.iterdir()) and client.done() is False
    client.current = AdoptDecision(version=3, path="idx/v000003", weights_step=10, step=12, staleness=2)
    client.history = [AdoptDecision(version=1, path="idx/v000001", weights_step=0, step=4, staleness=4),
                      client.current]
    resumed = IndexClient(ctx, tmp_path)
    resumed.load_state_dict(client.state_dict())
    assert resumed.current == client.current
    assert resumed.history == client.history  # a resumed run's adoptions file starts with the earlier ones
    resumed.load_state_dict(IndexClient(ctx, tmp_path).state_dict())
    assert resumed.current is None


def test_polls_record_staleness_and_blocked_time_which_a_checkpoint_carries(clean_env, tmp_path):
    ctx = roles.DistContext(get_dist_info())
    client = IndexClient(ctx, tmp_path)
    for step in range(3):
        client.poll(step)  # the base encoder's index: it lags by the whole step count
    client.current = AdoptDecision(version=1, path="idx/v000001", weights_step=2, step=3, staleness=1)
    client.poll(3)
    client.poll(3)  # the same step again counts once
    st = client.stats
    assert st.steps == 4 and st.staleness_mean == pytest.approx((0 + 1 + 2 + 1) / 4) and st.blocked_s >= 0.0
    resumed = IndexClient(ctx, tmp_path)
    resumed.load_state_dict(client.state_dict())
    assert resumed.stats.state_dict() == st.state_dict()
    resumed.load_state_dict({"current": None})  # a checkpoint written before the stats existed
    assert resumed.stats.steps == 0


# ----------------------------------------------------------------------------------------------
# what the refresh cost a trainer: blocked time (nested calls counted once) and index staleness


def test_blocked_time_counts_nested_calls_once():
    stats = RefreshStats()
    with stats.blocking():
        time.sleep(0.05)
        with stats.blocking():  # a poll inside wait_for_version
            time.sleep(0.05)
    outer = stats.blocked_s
    assert 0.09 <= outer < 0.5
    time.sleep(0.05)  # training: not blocked
    with stats.blocking():
        pass
    assert stats.blocked_s == pytest.approx(outer, abs=0.01)


def test_staleness_per_step_and_the_summary():
    stats = RefreshStats()
    for step, weights_step in ((0, None), (1, None), (1, None), (2, 0), (3, 2), (4, 2)):
        stats.note_step(step, weights_step)  # step 1 polled twice: counted once
    assert stats.steps == 5
    assert stats.staleness_mean == pytest.approx((0 + 1 + 2 + 1 + 2) / 5) and stats.staleness_max == 2
    stats.blocked_s, stats.n_adopted = 3.0, 2
    s = stats.summary(train_s=60.0)
    assert s == {"blocked_s": 3.0, "blocked_share": 0.05, "staleness_mean": 1.2, "staleness_max": 2.0,
                 "n_adopted": 2.0}
    assert RefreshStats().summary(0.0)["blocked_share"] == 0.0


def test_staleness_and_adoptions_survive_a_resume_blocked_time_does_not():
    stats = RefreshStats(blocked_s=9.0)
    stats.note_step(5, 1)
    stats.n_adopted = 3
    resumed = RefreshStats()
    resumed.load_state_dict(stats.state_dict())
    assert (resumed.steps, resumed.staleness_sum, resumed.staleness_max, resumed.n_adopted) == (1, 4.0, 4, 3)
    assert resumed.blocked_s == 0.0
    resumed.load_state_dict({})  # a checkpoint written before these stats existed
    assert resumed.steps == 0 and resumed.n_adopted == 0


# ----------------------------------------------------------------------------------------------
# trust: only what this run's index rank signed, and only paths inside the run folder


@pytest.fixture
def trainer0(clean_env, tmp_path):
    """Trainer 0 with a coordination store, its client for the run folder ``tmp_path/run``, and a
    foreign client of the same store (anyone who can reach its port)."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = roles.DistContext(get_dist_info(DistributedConfig()), store=store)
    client = IndexClient(ctx, tmp_path / "run" / "weights", index_timeout_s=60)
    foreign = torch.distributed.TCPStore("127.0.0.1", store.port, is_master=False, wait_for_workers=False)
    return client, store, foreign


def _publish(store, record: dict, key: bytes | None, job: str = "", store_key: str = K_PUBLICATION) -> None:
    """What an index rank does: set the publication record (signed under ``key`` for ``job``; plain JSON when None)."""
    value = refresh_protocol.signed_record(key, job, store_key, record) if key is not None else json.dumps(record)
    store.set(K_PUBLICATION, value)
    store.check([K_PUBLICATION])  # a set is not answered: this round trip makes sure it landed before the poll


def _version(version: int, path, weights_step: int, weights_n: int = 1) -> dict:
    """A publication record as the index rank writes it."""
    return {"version": version, "path": str(path), "weights_step": weights_step, "weights_n": weights_n,
            "n_vectors": 64, "build_s": 0.1, "created": 0.0}


def test_records_from_a_foreign_client_are_ignored_and_their_paths_never_opened(trainer0, tmp_path):
    client, store, foreign = trainer0
    run = tmp_path / "run"
    evil = tmp_path / "evil"
    opened: list[str] = []
    job = client.channel.job
    client.submit_weights(3, {"w": torch.zeros(2)})  # hand-off 1, step 3: what a genuine version is built from
    client.flush()
    record = _version(1, evil, 3)
    with pytest.warns(RuntimeWarning, match="not a signed record"):  # no secret at all
        _publish(foreign, record, None)
        assert client.poll(0, load_fn=opened.append) is None
    wrong = run_secret.run_secret(tmp_path / "attacker")  # a secret, but not this run's
    with pytest.warns(RuntimeWarning, match="does not verify"):
        _publish(foreign, _version(2, evil, 3), wrong, job)
        assert client.poll(1, load_fn=opened.append) is None
    key = run_secret.run_secret(run)
    with pytest.warns(RuntimeWarning, match="does not verify"):  # a genuine record replayed under another key
        _publish(foreign, _version(3, run / "v", 3), key, job, store_key=K_WEIGHTS)
        assert client.poll(2, load_fn=opened.append) is None
    with pytest.warns(RuntimeWarning, match="not a signed record"):  # nor can it fake a failure of the index rank
        foreign.set(K_ERROR, "RuntimeError: give up")
        foreign.set(K_PID, f"{hostname()}:999999999")
        foreign.check([K_PID])
        assert client.poll(3, load_fn=opened.append) is None
    assert client.failed is None and opened == []
    good = run / "index" / "v000001"  # the real index rank still gets through
    _publish(store, _version(1, good, 3), key, job)
    d = client.poll(5, load_fn=opened.append)
    assert (d.version, d.path, d.staleness) == (1, str(good), 2) and opened == [str(good)]


def test_a_signed_path_outside_the_run_folder_is_refused(trainer0, tmp_path):
    client, store, _ = trainer0
    run = tmp_path / "run"
    key = run_secret.run_secret(run)
    outside = tmp_path / "elsewhere" / "v000001"
    outside.mkdir(parents=True)
    (run / "index").mkdir(parents=True)
    (run / "index" / "v000002").symlink_to(outside, target_is_directory=True)
    opened: list[str] = []
    paths = [str(outside), str(run / "index" / ".." / ".." / "elsewhere" / "v000001"), str(run / "index" / "v000002")]
    for n, path in enumerate(paths, start=1):
        with pytest.warns(RuntimeWarning, match="outside the run folder"):
            _publish(store, _version(n, path, 0), key, client.channel.job)
            assert client.poll(n, load_fn=opened.append) is None
    assert opened == [] and client.current is None


def test_a_version_not_built_from_one_of_this_jobs_hand_offs_is_not_adopted(trainer0, tmp_path):
    """Even signed for this job, a publication naming a hand-off trainer 0 never made (or with another step) is
    refused with one warning, and a version from weights newer than the step waits for that step."""
    client, store, _ = trainer0
    run = tmp_path / "run"
    key, job = run_secret.run_secret(run), client.channel.job
    client.submit_weights(4, {"w": torch.zeros(2)})  # hand-off 1 at step 4
    client.flush()
    for n, (record, why) in enumerate([(_version(1, run / "index" / "v000001", 4, weights_n=2), "hand-off 2"),
                                       (_version(2, run / "index" / "v000002", 9, weights_n=1), "step 9")]):
        with pytest.warns(RuntimeWarning, match=f"not built from a weights hand-off of this job .*{why}"):
            _publish(store, record, key, job)
            assert client.poll(10 + n) is None and client.poll(20 + n) is None
    _publish(store, _version(3, run / "index" / "v000003", 4), key, job)
    assert client.poll(3) is None  # built from step 4: not before step 4
    d = client.poll(4)
    assert (d.version, d.staleness) == (3, 0)


def _announce(store, client: IndexClient, who: IndexProcess) -> None:
    """A pid record of this job, as the index rank's supervisor sets it."""
    key = run_secret.run_secret(client.run_root)
    store.set(K_PID, refresh_protocol.signed_record(key, client.channel.job, K_PID, asdict(who)))
    store.check([K_PID])


def test_a_lingering_supervisor_is_ended_only_while_its_pid_still_names_the_announced_process(trainer0, tmp_path):
    """After training trainer 0 ends a supervisor that does not leave, on its host, if pid and start time still
    match the announcement; a pid now naming another process (its start time differs) is never signalled."""
    client, store, _ = trainer0
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = start_time(other.pid)
        _announce(store, client, IndexProcess(hostname(), other.pid, start + 1, other.pid, start + 1))
        client.done(wait_s=0.5)
        time.sleep(0.2)
        assert other.poll() is None, "a process whose start time differs from the announced one was signalled"
        again = IndexClient(client.ctx, tmp_path / "run" / "weights", index_timeout_s=60)  # the next job
        _announce(store, again, IndexProcess(hostname(), other.pid, start, other.pid, start))
        with pytest.warns(RuntimeWarning, match="killed it"):
            again.done(wait_s=0.5)
        assert other.wait(5) == -signal.SIGKILL
    finally:
        other.kill()
        other.wait()


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


def _latest_version(out: Path) -> int:
    found = index_store.latest_version(out / "index")
    return found[0] if found else 0


def _check_published_versions(out: Path, submitted: dict) -> int:
    """Versions 1, 2, ... each equal a brute-force search with the weights they were built from."""
    corpus = toy_corpus()
    queries = torch.randn(10, TOY_IN, generator=torch.Generator().manual_seed(99))
    dirs = sorted((out / "index").glob("v*"))
    assert [index_store.read_manifest(d)["version"] for d in dirs] == list(range(1, len(dirs) + 1))
    for vdir in dirs:
        index = index_store.load(vdir)
        w = submitted[str(index.extra["weights_n"])]
        assert w["step"] == index.extra["weights_step"]
        sd = {"weight": torch.tensor(w["weight"]), "bias": torch.tensor(w["bias"])}
        pas, qs = toy_embed(sd, corpus), toy_embed(sd, queries)
        assert len(index) == index.extra["n_vectors"] == len(corpus)
        brute = np.argsort(-(qs @ pas.T), axis=1, kind="stable")[:, :5]
        np.testing.assert_array_equal(index.search(qs, 5).ids, brute)
    return len(dirs)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_refresh_protocol_then_index_killed_continue(tmp_path):
    """Versions are published and adopted by both trainers at the same step; then the index rank
    is SIGKILLed and the trainers carry on with the last version."""
    args = {"out": str(tmp_path), "steps": 140, "refresh_every": 15, "timeout": 30, "on_failure": "continue",
            "step_sleep": 0.05}
    job = Job("refresh", args, 3, tmp_path)
    try:
        # announced (logged after the store's counter), not just on disk: killed between the two, version 2
        # would never be adopted
        _wait_for(lambda: "published version 2" in (tmp_path / "log_2.txt").read_text(), 100, job)
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
        _wait_for(lambda: _latest_version(tmp_path) >= 1, 100, job)
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

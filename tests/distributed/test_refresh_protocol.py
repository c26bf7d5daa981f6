"""The refresh protocol's records: signed, bound to their store key, and refused when anything else arrives; and
what an outsider on the store can do to a run (issue 19): replay records of an earlier job, bump a counter, set a
value that is not a record. Each in one process, with a real TCPStore on loopback, the toy index rank of
_dist_workers and trainer 0's IndexClient."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _dist_workers import TOY_IN, toy_corpus, toy_embed, toy_index

from distrag.config import DistributedConfig
from distrag.distributed import refresh_protocol, roles
from distrag.distributed.refresh_client import IndexClient
from distrag.distributed.refresh_protocol import (
    JOB_FILE,
    K_HEARTBEAT,
    K_PID,
    K_PUBLICATION,
    RefreshChannel,
    read_record,
    signed_record,
)
from distrag.distributed.refresh_server import IndexServer
from distrag.distributed.world import get_dist_info
from distrag.process_watch import start_time
from distrag.retrieval import index_store


def test_signed_records_round_trip_and_anything_else_is_refused():
    key, job = b"k" * 32, "a" * 32
    record = {"version": 2, "path": "/run/index/v000002"}
    raw = signed_record(key, job, "meta/1", record).encode()
    assert read_record(key, job, "meta/1", raw) == (record, "")
    assert read_record(b"x" * 32, job, "meta/1", raw)[0] is None
    assert read_record(key, job, "meta/2", raw)[0] is None  # bound to its key
    assert read_record(key, "b" * 32, "meta/1", raw) == (None, "it was signed for another job of this run")
    assert read_record(key, None, "meta/1", raw)[1] == "it was signed for another job of this run"
    for junk in (b'{"version": 2}', b"\xff", b"not-a-number", b"[" * 100_000, b" " * (1 << 17)):
        assert read_record(key, job, "meta/1", junk) == (None, "not a signed record")
    tampered = raw.replace(b"v000002", b"v000003")
    assert read_record(key, job, "meta/1", tampered)[1] == "its signature does not verify under the run's secret"
    rejobbed = raw.replace(job.encode(), b"b" * 32)  # the job is signed too: it cannot be swapped
    assert read_record(key, "b" * 32, "meta/1", rejobbed)[1] == "its signature does not verify under the run's secret"


# ----------------------------------------------------------------------------------------------
# an outsider on the store (issue 19): replays from an earlier job, counters bumped, garbage set


class Recorder:
    """A client of the store that remembers every value it sets or adds: what anyone on the port can capture."""

    def __init__(self, store):
        self._store = store
        self.log: list[tuple[str, str, object]] = []

    def set(self, key, value):
        self.log.append(("set", key, value))
        return self._store.set(key, value)

    def add(self, key, amount):
        if amount:
            self.log.append(("add", key, amount))
        return self._store.add(key, amount)

    def __getattr__(self, name):
        return getattr(self._store, name)


def _store():
    return torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _outsider(store):
    """A fresh client of ``store`` (a bad ``add`` makes the store drop the connection that sent it)."""
    return torch.distributed.TCPStore("127.0.0.1", store.port, is_master=False, wait_for_workers=False)


def _trainer0(store, run: Path) -> IndexClient:
    return IndexClient(roles.DistContext(get_dist_info(DistributedConfig()), store=store), run / "weights",
                       index_timeout_s=60)


def _server(store, run: Path) -> IndexServer:
    corpus = toy_corpus()
    return IndexServer(store, lambda sd: [toy_embed(sd, corpus)], toy_index, run / "index", run / "weights",
                       poll_interval_s=0.01, log=lambda m: None)


def _start(server: IndexServer) -> tuple[threading.Thread, list]:
    """``server.run`` on a thread; the list receives what it raised."""
    raised: list[BaseException] = []

    def serve() -> None:
        try:
            server.run()
        except BaseException as e:  # noqa: BLE001 - the test asserts on it
            raised.append(e)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    return th, raised


def _replay(log, store) -> None:
    outsider = _outsider(store)
    for op, key, value in log:
        if op == "set":
            outsider.set(key, value)
        else:
            outsider.add(key, value)


def _train(client: IndexClient, server: IndexServer, th: threading.Thread, steps: range, attack=None,
           attack_at: int | None = None, every: int = 2) -> list:
    """Poll every step, hand weights over every ``every`` steps and give each hand-off up to a few seconds to become
    a version; ``attack()`` runs at step ``attack_at``. Returns the adoptions."""
    lin, adopted = torch.nn.Linear(TOY_IN, 4), []
    for step in steps:
        d = client.poll(step, load_fn=index_store.load)
        if d is not None:
            adopted.append(d)
        if step == attack_at:
            attack()
        if step % every == 0:
            before = server.published
            client.submit_weights(step, lin.state_dict())
            client.flush()
            deadline = time.monotonic() + 5
            while server.published == before and th.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
    return adopted


def _protocol_keys() -> list[str]:
    return sorted({v for k, v in vars(refresh_protocol).items() if k.startswith("K_")}
                  | {refresh_protocol.PREFIX + "published", refresh_protocol.PREFIX + "weights"})


def test_a_publication_replayed_from_an_earlier_job_of_the_run_is_ignored(tmp_path, clean_env):
    """Job 1 adopts a version built from step 38; an outsider captured what its index rank set and replays it into
    the next job of the same run folder (a requeue): job 2 adopts nothing of it, then adopts its own versions."""
    run = tmp_path / "run"
    store1 = _store()
    client1 = _trainer0(store1, run)
    eavesdropped = Recorder(store1)
    th, _ = _start(_server(eavesdropped, run))
    client1.submit_weights(38, torch.nn.Linear(TOY_IN, 4).state_dict())
    client1.flush()
    assert client1.wait_for_version(1, step=40, timeout_s=30, interval_s=0.01).weights_step == 38
    client1.done(wait_s=10)
    th.join(10)

    store2 = _store()
    client2 = _trainer0(store2, run)
    _replay(eavesdropped.log, store2)
    for step in range(5):
        assert client2.poll(step, load_fn=index_store.load) is None
    assert client2.current is None and client2.failed is None
    server2 = _server(store2, run)
    th2, raised = _start(server2)
    adopted = _train(client2, server2, th2, range(5, 12))
    client2.done(wait_s=10)
    th2.join(10)
    assert raised == [] and adopted and [d.version for d in adopted] == sorted({d.version for d in adopted})
    assert adopted[0].version >= 2 and all(d.weights_step >= 5 and d.staleness >= 0 for d in adopted)


def test_a_replayed_pid_record_never_gets_an_unrelated_process_signalled(tmp_path, clean_env):
    """A pid record of an earlier job names a process this job did not start (the pid was reused): trainer 0 ends
    training without signalling it."""
    run = tmp_path / "run"
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store1 = _store()
        _trainer0(store1, run)  # job 1
        eavesdropped = Recorder(store1)
        RefreshChannel(eavesdropped, run).announce_process(unrelated.pid, supervisor=unrelated.pid)
        store2 = _store()
        client2 = _trainer0(store2, run)  # job 2, whose index rank already left
        _replay(eavesdropped.log, store2)
        client2.done(wait_s=1.0)
        time.sleep(0.2)
        assert unrelated.poll() is None, "trainer 0 signalled a process its job did not start"
    finally:
        unrelated.kill()
        unrelated.wait()


@pytest.mark.parametrize("key", _protocol_keys(), ids=lambda k: k.rsplit("/", 1)[-1])
@pytest.mark.parametrize("attack", ["add", "garbage"])
def test_an_outsider_writing_to_the_store_neither_freezes_nor_stops_the_run(tmp_path, clean_env, key, attack):
    """``add(key, 1)`` or ``set(key, "not-a-number")`` from outside in the middle of a run: no side raises, the
    index rank stays up, trainers go on adopting newer versions (staleness never negative)."""
    run = tmp_path / "run"
    store = _store()
    client = _trainer0(store, run)
    server = _server(store, run)
    th, raised = _start(server)

    def hit() -> None:
        outsider = _outsider(store)
        if attack == "add":
            with contextlib.suppress(RuntimeError):  # the store drops an outsider whose add meets no number
                outsider.add(key, 1)
        else:
            outsider.set(key, "not-a-number")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # what was ignored is reported; asserted elsewhere
        adopted = _train(client, server, th, range(0, 12), attack=hit, attack_at=3)
    assert th.is_alive() and raised == [] and client.failed is None
    client.done(wait_s=10)
    th.join(10)
    after = [d.version for d in adopted if d.step > 3]
    assert len(after) >= 2 and after == sorted(set(after)), [(d.step, d.version) for d in adopted]
    assert all(d.staleness >= 0 for d in adopted)


def test_an_outside_add_to_the_weights_counter_never_gets_stale_weights_adopted(tmp_path, clean_env):
    """An earlier job left hand-off w_000002.pt (step 99) in the weights folder; an outsider's add(weights, 1) after
    this job's first hand-off must not make the index rank build from it: every adopted version comes from this
    job's own weights."""
    run = tmp_path / "run"
    stale = torch.nn.Linear(TOY_IN, 4)
    (run / "weights").mkdir(parents=True)
    torch.save({"step": 99, "n": 2, "state_dict": stale.state_dict()}, run / "weights" / "w_000002.pt")
    store = _store()
    client = _trainer0(store, run)
    server = _server(store, run)
    th, raised = _start(server)
    genuine = torch.nn.Linear(TOY_IN, 4)
    client.submit_weights(0, genuine.state_dict())
    client.flush()
    first = client.wait_for_version(1, step=1, load_fn=index_store.load, timeout_s=30, interval_s=0.01)
    with contextlib.suppress(RuntimeError):
        _outsider(store).add(refresh_protocol.PREFIX + "weights", 1)
    adopted = [first]
    deadline = time.monotonic() + 3
    step = 2
    while time.monotonic() < deadline:  # time for the index rank to act on the bumped counter
        d = client.poll(step, load_fn=index_store.load)
        adopted += [d] if d is not None else []
        step += 1
        time.sleep(0.01)
    client.done(wait_s=10)
    th.join(10)
    assert raised == []
    built_from = [(d.version, d.weights_step) for d in adopted]
    assert all(d.weights_step == 0 and d.staleness >= 0 for d in adopted), built_from
    want = toy_embed(genuine.state_dict(), toy_corpus())
    np.testing.assert_allclose(index_store.load(client.current.path).reconstruct(np.arange(len(want))), want,
                               rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# the channel: reads that never wait or raise, the job, a version that outlives its job


def test_a_value_that_is_not_a_record_is_reported_once_and_a_missing_key_never_waits(tmp_path, clean_env):
    store = _store()
    trainer = RefreshChannel.for_trainer(store, tmp_path)
    outsider = _outsider(store)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for value in ("not-a-number", "not-a-number", "[" * 100_000, "{}", "x" * (1 << 17)):
            outsider.set(K_PUBLICATION, value)
            outsider.check([K_PUBLICATION])
            assert trainer.latest_publication() is None and trainer.latest_publication() is None
        for i in range(2 * refresh_protocol.MAX_REPORTS_PER_KEY):  # a flood is cut short
            outsider.set(K_HEARTBEAT, f"junk {i}")
            outsider.check([K_HEARTBEAT])
            assert trainer.heartbeat_seq() == 0
    about = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    assert len([m for m in about if "publication" in m]) == 4  # one per distinct value, never a traceback
    assert len([m for m in about if "heartbeat" in m]) == refresh_protocol.MAX_REPORTS_PER_KEY
    outsider.delete_key(K_PUBLICATION)  # the store's timeout is minutes: a read must not wait for the key
    t0 = time.monotonic()
    assert trainer.latest_publication() is None and trainer.index_error() is None
    assert time.monotonic() - t0 < 1.0


def test_the_index_side_follows_the_job_file_and_signs_what_stays_true_again(tmp_path, clean_env):
    """The index rank may start before trainer 0's job (none yet, or an earlier job's file): it signs nothing a
    trainer of another job accepts, and signs its pid again for each new job; a link is never followed."""
    store = _store()
    index = RefreshChannel(store, tmp_path)
    index.announce_process(os.getpid())
    assert index.job is None and not store.check([K_PID])  # no job yet: nothing anyone would accept
    job1 = RefreshChannel.for_trainer(store, tmp_path)
    assert index.sync_job() and index.job == job1.job and not index.sync_job()
    announced = job1.index_process()
    assert announced.pid == os.getpid() and announced.start == start_time(os.getpid())
    job2 = RefreshChannel.for_trainer(store, tmp_path)  # the next job of the run (a requeue)
    assert job2.job != job1.job and job2.index_process() is None  # job 1's record: ignored
    assert index.sync_job() and job2.index_process() == announced and job1.index_process() is None
    decoy = tmp_path / "decoy"
    decoy.write_text("c" * 32 + "\n")
    (tmp_path / JOB_FILE).unlink()
    (tmp_path / JOB_FILE).symlink_to(decoy)
    with pytest.warns(RuntimeWarning, match="ignoring"):
        assert not index.sync_job()
    assert index.job == job2.job and not index.sync_job()  # reported once; the job stays


def test_a_version_begun_for_an_earlier_job_is_abandoned_not_published_for_the_next(tmp_path, clean_env):
    """Job 1 hands weights over; while they are re-embedded job 2 starts: the index rank drops that version
    (signed for job 2 it would look like job 2's), then builds job 2's own."""
    run = tmp_path / "run"
    store = _store()
    client1 = _trainer0(store, run)
    corpus, first_shard, go, calls, logs = toy_corpus(), threading.Event(), threading.Event(), [], []

    def encode(sd):
        calls.append(1)
        yield toy_embed(sd, corpus[:32])
        if len(calls) == 1:
            first_shard.set()
            go.wait(10)
        yield toy_embed(sd, corpus[32:])

    server = IndexServer(store, encode, toy_index, run / "index", run / "weights", poll_interval_s=0.01,
                         log=logs.append)
    th, raised = _start(server)
    client1.submit_weights(1, torch.nn.Linear(TOY_IN, 4).state_dict())
    client1.flush()
    assert first_shard.wait(10)
    client2 = _trainer0(store, run)
    go.set()
    deadline = time.monotonic() + 10
    while not any("abandoning" in m for m in logs) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.published == 0 and any("new job" in m and "abandoning" in m for m in logs), logs
    mine = torch.nn.Linear(TOY_IN, 4)
    client2.submit_weights(7, mine.state_dict())
    client2.flush()
    d = client2.wait_for_version(1, step=8, load_fn=index_store.load, timeout_s=30, interval_s=0.01)
    client2.done(wait_s=10)
    th.join(10)
    assert raised == [] and (d.version, d.weights_step) == (1, 7)
    want = toy_embed(mine.state_dict(), corpus)
    np.testing.assert_allclose(index_store.load(d.path).reconstruct(np.arange(len(want))), want, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# end to end: an outsider on the port of a launched job


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_outsider_on_the_store_of_a_launched_job_neither_stops_it_nor_changes_what_it_adopts(tmp_path):
    """2 trainers + a supervised index rank (real processes, on_index_failure=stop). Once a version is out, an
    outsider on the coordination store's port reads every record, then bumps each key (and the old counters),
    sets "not-a-number" in each, and replays what it read. Every process ends with 0 and no traceback, nobody
    declares the index rank failed, and the trainers go on adopting newer versions of their own weights."""
    from datetime import timedelta

    from _dist_workers import Job

    args = {"out": str(tmp_path), "steps": 90, "refresh_every": 3, "timeout": 30.0, "on_failure": "stop",
            "shard_sleep": 0.01, "step_sleep": 0.05, "supervised": True}
    job = Job("refresh", args, 3, tmp_path)
    try:
        deadline = time.monotonic() + 150
        while index_store.latest_version(tmp_path / "index") is None:
            assert time.monotonic() < deadline and all(p.poll() is None for p in job.procs), job.output()
            time.sleep(0.1)
        port = job.port + roles.STORE_PORT_OFFSET

        def outsider():
            try:
                return torch.distributed.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,
                                                  timeout=timedelta(seconds=30))
            except RuntimeError:  # the store lives in trainer 0: it is gone
                pytest.fail(f"the job went away during the attack\n{job.output()}")

        spy = outsider()
        captured = {k: spy.get(k) for k in _protocol_keys() if spy.check([k])}
        at_attack = index_store.latest_version(tmp_path / "index")[0]
        for key in _protocol_keys():
            with contextlib.suppress(RuntimeError):
                outsider().add(key, 1)
            outsider().set(key, "not-a-number")
        time.sleep(0.5)
        replay = outsider()
        for key, value in captured.items():  # older records of this very job
            replay.set(key, value)
        codes = job.wait(200)
    finally:
        job.kill()
    assert codes == [0, 0, 0], job.output()
    assert "Traceback" not in job.output()
    r0, r1 = job.result(0), job.result(1)
    assert r0["adoptions"] == r1["adoptions"] and r0["failed"] is None and r0["stop_step"] is None
    assert r0["last_step"] == args["steps"] - 1
    versions = [a["version"] for a in r0["adoptions"]]
    assert versions == sorted(set(versions)) and versions[-1] >= at_attack + 2, (at_attack, versions)
    own_steps = {w["step"] for w in r0["submitted"].values()}
    assert all(a["staleness"] >= 0 and a["weights_step"] in own_steps for a in r0["adoptions"])

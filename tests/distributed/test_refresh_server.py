"""The index rank's side of the refresh protocol, in one process: IndexServer builds from the newest
weights, publishes ShardedIndex versions through index_store (versions increase, also across a
restart), and serve_index publishes the index of the real corpus under the handed-off embedder."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import numpy as np
import pytest
import torch
from _dist_workers import TOY_IN, toy_corpus, toy_embed, toy_index

from distrag.config import DistributedConfig, build_config
from distrag.data import load_data
from distrag.distributed import roles
from distrag.distributed.refresh_client import IndexClient
from distrag.distributed.refresh_protocol import (
    K_ERROR,
    K_PID,
    K_PUBLICATION,
    K_WEIGHTS,
    RefreshChannel,
    WeightsHandoff,
    read_record,
)
from distrag.distributed.refresh_server import IndexServer, serve_index
from distrag.distributed.run_secret import run_secret
from distrag.distributed.world import get_dist_info
from distrag.models.embedder import Embedder
from distrag.process_watch import hostname, start_time
from distrag.retrieval import index_store
from distrag.retrieval.corpus_encoding import encode_corpus


@pytest.fixture
def store_ctx(clean_env):
    """A single trainer (trainer 0) with a coordination store, as under a launcher."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    return store, roles.DistContext(get_dist_info(DistributedConfig()), store=store)


def _serve(server: IndexServer, client: IndexClient, version: int, step: int):
    """Run ``server`` on a thread until the client adopted ``version``; then tell it to leave."""
    th = threading.Thread(target=server.run)
    th.start()
    try:
        return client.wait_for_version(version, step=step, timeout_s=60, interval_s=0.02)
    finally:
        client.channel.send_done()
        th.join(30)
        assert not th.is_alive()


def test_server_skips_to_newest_weights_in_process(tmp_path, store_ctx):
    """Three submissions before the index rank looks: it builds only from the newest."""
    store, ctx = store_ctx
    client = IndexClient(ctx, tmp_path / "w", index_timeout_s=30)
    sds = []
    for step in (0, 10, 20):
        lin = torch.nn.Linear(TOY_IN, 4)
        sds.append(lin.state_dict())
        client.submit_weights(step, lin.state_dict())
    client.flush()  # the last hand-off is written in the background; announce it before the server looks
    corpus = toy_corpus()
    server = IndexServer(store, lambda sd: [toy_embed(sd, corpus)], toy_index, tmp_path / "idx", tmp_path / "w",
                         poll_interval_s=0.02, log=lambda m: None)
    d = _serve(server, client, 1, step=25)
    assert (d.version, d.weights_step, d.staleness) == (1, 20, 5)
    assert server.published == 1
    index = index_store.load(d.path)
    want = toy_embed(sds[2], corpus)
    np.testing.assert_allclose(index.reconstruct(np.arange(len(want))), want, rtol=1e-6)
    queries = toy_embed(sds[2], torch.randn(7, TOY_IN, generator=torch.Generator().manual_seed(5)))
    np.testing.assert_array_equal(index.search(queries, 4).ids,
                                  np.argsort(-(queries @ want.T), axis=1, kind="stable")[:, :4])
    # consumed weights files are pruned when the next submission is announced (written in the background)
    client.submit_weights(30, sds[0])
    client.flush()
    assert sorted(p.name for p in (tmp_path / "w").glob("w_*.pt")) == ["w_000003.pt", "w_000004.pt"]


def test_versions_continue_after_those_on_disk_and_carry_their_facts(tmp_path, store_ctx):
    """A restarted index rank publishes the version after the newest on disk, with the weights it was
    built from and the server's ``extra`` in the manifest, and names it in the store."""
    store, ctx = store_ctx
    corpus = toy_corpus()
    first = toy_embed(torch.nn.Linear(TOY_IN, 4).state_dict(), corpus)
    index_store.publish(toy_index(first), tmp_path / "idx", 3)  # left by the previous index rank
    client = IndexClient(ctx, tmp_path / "w", index_timeout_s=30)
    client.submit_weights(40, torch.nn.Linear(TOY_IN, 4).state_dict())
    client.flush()
    chunks = [corpus[:20], corpus[20:]]
    server = IndexServer(store, lambda sd: (toy_embed(sd, c) for c in chunks), toy_index, tmp_path / "idx",
                         tmp_path / "w", extra={"corpus": "f00"}, poll_interval_s=0.02, log=lambda m: None)
    assert server.version == 3
    d = _serve(server, client, 4, step=41)
    assert d.version == 4 and d.path == str(tmp_path / "idx" / "v000004")
    assert index_store.latest_version(tmp_path / "idx") == (4, tmp_path / "idx" / "v000004")
    assert (tmp_path / "idx" / "LATEST").read_text().strip() == "v000004"
    m = index_store.read_manifest(d.path)
    assert m["version"] == 4 and m["count"] == len(corpus)
    assert {k: m["extra"][k] for k in ("weights_step", "weights_n", "n_vectors", "corpus")} == {
        "weights_step": 40, "weights_n": 1, "n_vectors": len(corpus), "corpus": "f00"}
    raw = store.get(K_PUBLICATION)
    key, job = run_secret(tmp_path), client.channel.job
    published, why = read_record(key, job, K_PUBLICATION, raw)
    assert why == "" and (published["version"], published["path"], published["weights_step"]) == (4, d.path, 40)
    assert read_record(key, job, K_WEIGHTS, raw)[0] is None  # bound to its key: no replay elsewhere
    assert read_record(key, "0" * 32, K_PUBLICATION, raw) == (None, "it was signed for another job of this run")


def test_every_record_the_server_sets_is_signed_with_the_run_secret(tmp_path, store_ctx):
    """pid and error records verify under the run folder's secret for the job trainer 0 started (and only so)."""
    store, _ = store_ctx
    trainer0 = RefreshChannel.for_trainer(store, tmp_path)

    def failing_encode(sd):
        raise ValueError("no corpus")
        yield  # makes this a generator, like the real encoder

    server = IndexServer(store, failing_encode, toy_index, tmp_path / "idx", tmp_path / "w", poll_interval_s=0.02,
                         log=lambda m: None)
    (tmp_path / "w").mkdir()
    torch.save({"step": 0, "state_dict": {}}, tmp_path / "w" / "w_000001.pt")
    sha = hashlib.sha256((tmp_path / "w" / "w_000001.pt").read_bytes()).hexdigest()
    trainer0.announce_weights(WeightsHandoff(1, 0, sha))
    with pytest.raises(ValueError, match="no corpus"):
        server.run()
    key, job = run_secret(tmp_path), trainer0.job
    pid, _ = read_record(key, job, K_PID, store.get(K_PID))
    err, _ = read_record(key, job, K_ERROR, store.get(K_ERROR))
    assert pid == {"host": hostname(), "pid": os.getpid(), "start": start_time(os.getpid()), "supervisor": None,
                   "supervisor_start": None}
    assert err == {"error": "ValueError: no corpus"}
    assert read_record(run_secret(tmp_path / "elsewhere"), job, K_PID, store.get(K_PID)) == (
        None, "its signature does not verify under the run's secret")
    assert (tmp_path / ".distrag_secret").stat().st_mode & 0o777 == 0o600


@pytest.mark.timeout(180)
def test_serve_index_publishes_the_corpus_index_of_the_handed_off_embedder(tmp_path, store_ctx, tiny_encoder_dir):
    store, ctx = store_ctx
    cfg = build_config({"embedder": {"model": str(tiny_encoder_dir), "max_length": 32},
                        "data": {"synthetic": {"n_entities": 6, "n_single_hop": 4, "n_two_hop": 2}},
                        "index": {"device": "cpu", "n_shards": 2}, "tracking": {"enabled": False}})
    embedder = Embedder.from_config(cfg.embedder, device="cpu")
    with torch.no_grad():  # the trainers' embedder has moved away from the base weights
        for p in embedder.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    client = IndexClient(ctx, tmp_path / "weights", index_timeout_s=60)
    client.submit_weights(7, embedder.state_dict())
    client.flush()
    th = threading.Thread(target=serve_index, args=(cfg, ctx.store, tmp_path))
    th.start()
    try:
        d = client.wait_for_version(1, step=8, timeout_s=120, interval_s=0.05)
    finally:
        client.channel.send_done()
        th.join(60)
    assert not th.is_alive() and d.weights_step == 7
    corpus = load_data(cfg.data).corpus
    index = index_store.load(tmp_path / "index" / "v000001")
    assert index.n_shards == 2 and index.extra["corpus"] == corpus.fingerprint()
    want = encode_corpus(embedder, corpus)
    np.testing.assert_allclose(index.reconstruct(np.arange(len(corpus))), want, atol=1e-5)


def test_a_30_step_run_keeps_few_index_versions_and_never_the_one_in_use(tmp_path, store_ctx):
    """Refresh every 2 steps for 30 steps: at most keep + the adopted + checkpoint-named versions are ever on
    disk, the version in use is always there, and the version a checkpoint names survives to the end."""
    store, ctx = store_ctx
    corpus = toy_corpus()
    keep, pinned = 3, {2}  # a checkpoint names version 2
    server = IndexServer(store, lambda sd: [toy_embed(sd, corpus)], toy_index, tmp_path / "index", tmp_path / "weights",
                         poll_interval_s=0.01, log=lambda m: None, keep_versions=keep, protected_fn=lambda: pinned)
    client = IndexClient(ctx, tmp_path / "weights", index_timeout_s=60)
    th = threading.Thread(target=server.run)
    th.start()
    lin, most = torch.nn.Linear(TOY_IN, 4), 0
    try:
        for step in range(30):
            client.poll(step, load_fn=index_store.load)
            if step % 2 == 0:
                client.submit_weights(step, lin.state_dict())
                client.flush()
                deadline = time.monotonic() + 30  # let each submission become a version
                while server.published < step // 2 + 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
            on_disk = {v for v, _ in index_store._version_dirs(tmp_path / "index")}
            most = max(most, len(on_disk))
            if client.current is not None:
                assert client.current.version in on_disk
    finally:
        client.channel.send_done()
        th.join(30)
    on_disk = {v for v, _ in index_store._version_dirs(tmp_path / "index")}
    assert server.published == 15 and client.current.version >= 13
    assert most <= keep + 1 + len(pinned) and 2 in on_disk and max(on_disk) == 15


def test_a_hand_off_whose_file_is_not_the_announced_one_is_skipped(tmp_path, store_ctx):
    """The index rank reads a weights file only if its bytes match the checksum trainer 0 signed: a file replaced
    after the announcement is not built from (said in the log), and the next hand-off is."""
    store, ctx = store_ctx
    client = IndexClient(ctx, tmp_path / "w", index_timeout_s=30)
    logs: list[str] = []
    corpus = toy_corpus()
    server = IndexServer(store, lambda sd: [toy_embed(sd, corpus)], toy_index, tmp_path / "idx", tmp_path / "w",
                         poll_interval_s=0.01, log=logs.append)
    client.submit_weights(0, torch.nn.Linear(TOY_IN, 4).state_dict())
    client.flush()  # announced; then the file is replaced before the index rank reads it
    other = {"step": 0, "n": 1, "state_dict": torch.nn.Linear(TOY_IN, 4).state_dict()}
    torch.save(other, tmp_path / "w" / "w_000001.pt")
    fresh = torch.nn.Linear(TOY_IN, 4)
    th = threading.Thread(target=server.run)
    th.start()
    try:
        deadline = time.monotonic() + 30
        while not any("checksum differs" in m for m in logs) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.published == 0 and any("ignoring weights 1" in m for m in logs), logs
        client.submit_weights(2, fresh.state_dict())
        client.flush()
        d = client.wait_for_version(1, step=3, timeout_s=30, interval_s=0.01)
    finally:
        client.channel.send_done()
        th.join(30)
    assert d.weights_step == 2
    want = toy_embed(fresh.state_dict(), corpus)
    np.testing.assert_allclose(index_store.load(d.path).reconstruct(np.arange(len(want))), want, rtol=1e-6)

"""Asynchronous index refresh, index-rank side: :class:`IndexServer` and :func:`serve_index`.

The index rank waits for embedder weights that trainer 0 hands off, re-embeds the corpus shard by shard
(heartbeating between shards, and abandoning a version when the trainers finish), builds a
:class:`~distrag.retrieval.sharded_index.ShardedIndex` and publishes it as the next version with
:func:`distrag.retrieval.index_store.publish`; the trainers adopt it through the store
(:mod:`distrag.distributed.refresh_client`). Everything it tells the trainers goes through the channel of
:mod:`distrag.distributed.refresh_protocol`, which signs it; :meth:`IndexServer.publish_version` fills in
what a published version records (:class:`~distrag.distributed.refresh_protocol.Publication`).
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distrag.data import load_data
from distrag.distributed.refresh_protocol import Publication, RefreshChannel, WeightsHandoff
from distrag.models.embedder import Embedder
from distrag.retrieval import index_store
from distrag.retrieval.corpus_encoding import CorpusEncoder
from distrag.retrieval.sharded_index import ShardedIndex
from distrag.retrieval.streaming_index import OnDiskCorpusIndexer

if TYPE_CHECKING:
    from distrag.config import ExperimentConfig


class IndexServer:
    """Index-rank loop. ``encode_corpus_fn(state_dict)`` yields the corpus embeddings shard by shard
    (float32 arrays) with those embedder weights; ``build_index_fn(embeddings)`` returns a
    :class:`ShardedIndex`, published as ``publish_root/v<version>`` with the version's facts (weights
    step, build time, ...) and ``extra`` in its manifest's ``extra``. Both functions are injectable, so
    tests run the protocol without models. Runs in the launcher-started index process (never a fork:
    faiss). Every record it sets in the store is signed with the secret of ``run_root`` (default: the
    parent of ``weights_dir``), the run folder the trainers trust, for the job trainer 0 started there; it
    builds only from hand-offs of that job whose file matches the signed checksum."""

    def __init__(self, store, encode_corpus_fn: Callable[[dict], Iterable[np.ndarray]],
                 build_index_fn: Callable[[np.ndarray], ShardedIndex], publish_root: str | Path,
                 weights_dir: str | Path, *, extra: dict[str, Any] | None = None, poll_interval_s: float = 0.2,
                 log: Callable[[str], None] | None = None, start_version: int | None = None,
                 run_root: str | Path | None = None, keep_versions: int | None = None,
                 protected_fn: Callable[[], set[int]] | None = None, announce_pid: bool = True):
        self.store = store
        self.encode_corpus_fn = encode_corpus_fn
        self.build_index_fn = build_index_fn
        self.root = Path(publish_root)
        self.weights_dir = Path(weights_dir)
        self.channel = RefreshChannel(store, Path(run_root) if run_root is not None else self.weights_dir.parent)
        self.extra = dict(extra or {})
        self.poll_s = poll_interval_s
        self.log = log or (lambda msg: print(f"[index rank] {msg}", flush=True))
        if start_version is None:  # on resume, versions continue after the ones on disk
            latest = index_store.latest_version(self.root)
            start_version = latest[0] if latest else 0
        self.version = start_version
        self.consumed = 0
        """The newest hand-off of the current job started on."""
        self.published = 0
        self.keep_versions = keep_versions
        self.protected_fn = protected_fn or (lambda: set())
        self.announce_pid = announce_pid

    def heartbeat(self) -> None:
        self.channel.heartbeat()

    def _done(self) -> bool:
        return self.channel.trainers_done()

    def _new_job(self) -> bool:
        """Whether trainer 0 started a new job (the run folder's job file changed): then that job's hand-offs
        count from 1 again."""
        if not self.channel.sync_job():
            return False
        self.log(f"serving job {self.channel.job[:8]} of this run")
        self.consumed = 0
        return True

    def run(self) -> int:
        """Serve until trainer 0 calls ``done()``. Returns the number of versions published."""
        if self.announce_pid:  # a supervisor announces its worker itself (index_supervisor)
            self.channel.announce_process(os.getpid())
        try:
            while True:
                self._new_job()
                self.heartbeat()
                if self._done():
                    self.log(f"trainers are done; {self.published} version(s) published, exiting")
                    self.channel.say_bye()
                    return self.published
                handoff = self.channel.newest_weights()
                if handoff is not None and handoff.n > self.consumed:
                    if handoff.n > self.consumed + 1:
                        self.log(f"skipping weights {self.consumed + 1}..{handoff.n - 1}: newer ones arrived")
                    self.channel.mark_consumed(handoff.n)
                    self.consumed = handoff.n
                    self._refresh(handoff)
                else:
                    time.sleep(self.poll_s)
        except BaseException as e:
            try:
                self.channel.record_error(f"{type(e).__name__}: {e}")
            except (RuntimeError, OSError) as e2:
                self.log(f"could not record the error in the store: {e2!r}")
            raise

    def _load_weights(self, handoff: WeightsHandoff) -> dict | None:
        """The state dict of ``handoff``, read only from a file whose bytes match its signed checksum (a file of an
        earlier job under the same name is never read); None, said once in the log, when there is no such file."""
        path = self.weights_dir / handoff.file_name
        try:
            data = path.read_bytes()
        except OSError as e:
            self.log(f"ignoring weights {handoff.n}: cannot read {path}: {e.strerror}")
            return None
        if hashlib.sha256(data).hexdigest() != handoff.sha256:
            self.log(f"ignoring weights {handoff.n}: {path} is not the file trainer 0 announced (checksum differs)")
            return None
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return blob["state_dict"]

    def _refresh(self, handoff: WeightsHandoff) -> None:
        t0 = time.perf_counter()
        state_dict = self._load_weights(handoff)
        if state_dict is None:
            return
        n, step = handoff.n, handoff.step
        shards = []
        n_rows = 0
        for i, emb in enumerate(self.encode_corpus_fn(state_dict)):
            emb = np.asarray(emb, dtype=np.float32)
            shards.append(emb)
            n_rows += len(emb)
            if self._new_job():  # a version of the job that started it is of no use to another one
                self.log("a new job of this run started during re-embedding; abandoning this version")
                return
            self.heartbeat()
            self.log(f"weights {n} (step {step}): shard {i + 1} embedded, {n_rows} passages")
            if self._done():
                self.log("trainers finished during re-embedding; abandoning this version")
                return
        vectors = np.concatenate(shards) if shards else np.zeros((0, 0), np.float32)
        index = self.build_index_fn(vectors)
        if self._new_job():
            self.log("a new job of this run started while building the index; abandoning this version")
            return
        self.heartbeat()
        pub = self.publish_version(index, weights_step=step, weights_n=n, n_vectors=len(vectors), t0=t0)
        self.log(f"published version {pub.version} from step {pub.weights_step} in {pub.build_s:.2f}s -> {pub.path}")
        self.prune()

    def publish_version(self, index: ShardedIndex, *, weights_step: int, weights_n: int, n_vectors: int,
                        t0: float) -> Publication:
        """Publish ``index`` as the next version (its facts and ``extra`` in its manifest) and announce it to the
        trainers; returns what was announced. What a version records is filled in here."""
        version = self.version + 1
        facts = {"weights_step": weights_step, "weights_n": weights_n, "n_vectors": n_vectors,
                 "build_s": time.perf_counter() - t0, "created": time.time()}
        path = index_store.publish(index, self.root, version, extra={**facts, **self.extra})
        self.version = version
        pub = Publication(version=version, path=str(path), **facts)
        self.channel.publish(pub)
        self.published += 1
        return pub

    def prune(self) -> list[int]:
        """Delete versions beyond the newest ``keep_versions``, except the one trainer 0 adopts (set in the
        store before any trainer loads it) and those ``protected_fn()`` names (checkpoints' versions)."""
        if not self.keep_versions:
            return []
        protect = {self.channel.adopted_version(), *self.protected_fn()}
        gone = index_store.prune_versions(self.root, self.keep_versions, protect)
        if gone:
            self.log(f"pruned index version(s) {gone} (keeping the newest {self.keep_versions} and {sorted(protect)})")
        return gone


def serve_index(cfg: ExperimentConfig, store, run_root: Path, *, announce_pid: bool = True) -> int:
    """The index rank of a run (``store``: the coordination store): re-embed the corpus with each weights
    hand-off under ``run_root/weights`` and publish versions under ``run_root/index`` until the trainers are
    done, keeping ``distributed.keep_index_versions`` of them plus those the run's checkpoints name.
    Returns the number of versions published."""
    from distrag.distributed.checkpoint import referenced_index_versions

    embedder = Embedder.from_config(cfg.embedder)
    embedder.eval()
    if cfg.index.on_disk:  # large corpora: streamed in chunks, embeddings on disk (retrieval/streaming_index.py)
        indexer = OnDiskCorpusIndexer.from_config(embedder, cfg, run_root / "index_work")
        encode, build, extra = indexer.shards, indexer.build, indexer.extra
    else:
        corpus = load_data(cfg.data).corpus
        encoder = CorpusEncoder(embedder, corpus.texts(), n_shards=max(cfg.index.n_shards, 4))

        def build(sorted_vectors: np.ndarray) -> ShardedIndex:
            vectors = encoder.unsort(sorted_vectors)
            return ShardedIndex.from_config(vectors.shape[1], cfg.index).build(vectors)

        encode, extra = encoder.shards, {"corpus": corpus.fingerprint()}

    server = IndexServer(store, encode, build, run_root / "index", run_root / "weights",
                         extra=extra, run_root=run_root,
                         keep_versions=cfg.distributed.keep_index_versions, announce_pid=announce_pid,
                         protected_fn=lambda: referenced_index_versions(run_root / "checkpoints"))
    return server.run()

"""Asynchronous index refresh, index-rank side: :class:`IndexServer` and :func:`serve_index`.

The index rank waits for embedder weights that trainer 0 hands off, re-embeds the corpus shard by shard
(heartbeating between shards, and abandoning a version when the trainers finish), builds a
:class:`~distrag.retrieval.sharded_index.ShardedIndex` and publishes it as the next version with
:func:`distrag.retrieval.index_store.publish`; the trainers adopt it through the store
(:mod:`distrag.distributed.refresh_client`, which also describes the protocol and its keys).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distrag.data import load_data
from distrag.data.disk_corpus import reads_from_disk
from distrag.distributed.process_watch import hostname
from distrag.distributed.refresh_client import (
    K_ADOPTED,
    K_BYE,
    K_CONSUMED,
    K_DONE,
    K_ERROR,
    K_HEARTBEAT,
    K_PID,
    K_PUBLISHED,
    K_WEIGHTS,
    meta_key,
)
from distrag.distributed.run_secret import run_secret, signed_record
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
    parent of ``weights_dir``), the run folder the trainers trust."""

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
        self._key = run_secret(Path(run_root) if run_root is not None else self.weights_dir.parent)
        self.extra = dict(extra or {})
        self.poll_s = poll_interval_s
        self.log = log or (lambda msg: print(f"[index rank] {msg}", flush=True))
        if start_version is None:  # on resume, versions continue after the ones on disk
            latest = index_store.latest_version(self.root)
            start_version = latest[0] if latest else 0
        self.version = start_version
        self.consumed = 0
        self.published = 0
        self.keep_versions = keep_versions
        self.protected_fn = protected_fn or (lambda: set())
        self.announce_pid = announce_pid

    def _set(self, key: str, record: dict) -> None:
        """Set a record in the store, signed: trainer 0 ignores what does not verify."""
        self.store.set(key, signed_record(self._key, key, record))

    def heartbeat(self) -> None:
        self.store.add(K_HEARTBEAT, 1)

    def _done(self) -> bool:
        return self.store.add(K_DONE, 0) > 0

    def run(self) -> int:
        """Serve until trainer 0 calls ``done()``. Returns the number of versions published."""
        if self.announce_pid:  # a supervisor announces its worker itself (index_supervisor)
            self._set(K_PID, {"host": hostname(), "pid": os.getpid()})
        self.consumed = self.store.add(K_CONSUMED, 0)
        try:
            while True:
                self.heartbeat()
                if self._done():
                    self.log(f"trainers are done; {self.published} version(s) published, exiting")
                    self.store.add(K_BYE, 1)
                    return self.published
                newest = self.store.add(K_WEIGHTS, 0)
                if newest > self.consumed:
                    if newest > self.consumed + 1:
                        self.log(f"skipping weights {self.consumed + 1}..{newest - 1}: newer ones arrived")
                    self.store.add(K_CONSUMED, newest - self.consumed)
                    self.consumed = newest
                    self._refresh(newest)
                else:
                    time.sleep(self.poll_s)
        except BaseException as e:
            try:
                self._set(K_ERROR, {"error": f"{type(e).__name__}: {e}"})
            except (RuntimeError, OSError) as e2:
                self.log(f"could not record the error in the store: {e2!r}")
            raise

    def _refresh(self, n: int) -> None:
        t0 = time.perf_counter()
        blob = torch.load(self.weights_dir / f"w_{n:06d}.pt", map_location="cpu", weights_only=True)
        shards = []
        n_rows = 0
        for i, emb in enumerate(self.encode_corpus_fn(blob["state_dict"])):
            emb = np.asarray(emb, dtype=np.float32)
            shards.append(emb)
            n_rows += len(emb)
            self.heartbeat()
            self.log(f"weights {n} (step {blob['step']}): shard {i + 1} embedded, {n_rows} passages")
            if self._done():
                self.log("trainers finished during re-embedding; abandoning this version")
                return
        vectors = np.concatenate(shards) if shards else np.zeros((0, 0), np.float32)
        index = self.build_index_fn(vectors)
        self.heartbeat()
        version = self.version + 1
        build_s = time.perf_counter() - t0
        meta = {"weights_step": int(blob["step"]), "weights_n": n, "n_vectors": len(vectors),
                "build_s": build_s, "created": time.time()}
        path = index_store.publish(index, self.root, version, extra={**meta, **self.extra})
        self.version = version
        self.published += 1
        # details first, then the counter: a reader that sees the count finds the details
        self._set(meta_key(self.published), {**meta, "version": version, "path": str(path)})
        self.store.add(K_PUBLISHED, 1)
        self.log(f"published version {version} from step {blob['step']} in {build_s:.2f}s -> {path}")
        self.prune()

    def prune(self) -> list[int]:
        """Delete versions beyond the newest ``keep_versions``, except the one trainer 0 adopts (set in the
        store before any trainer loads it) and those ``protected_fn()`` names (checkpoints' versions)."""
        if not self.keep_versions:
            return []
        protect = {self.store.add(K_ADOPTED, 0), *self.protected_fn()}
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
    if cfg.index.on_disk or reads_from_disk(cfg.data):
        # large corpora: the file streamed in chunks, embeddings on disk (retrieval/streaming_index.py); the corpus
        # is never loaded here, so this rank needs none of the side files trainer 0 writes
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

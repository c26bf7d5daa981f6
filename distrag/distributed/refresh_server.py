"""Asynchronous index refresh, index-rank side: :class:`IndexServer` and :func:`serve_index`.

The index rank waits for embedder weights that trainer 0 hands off, re-embeds the corpus shard by shard
(heartbeating between shards, and abandoning a version when the trainers finish), builds a
:class:`~distrag.retrieval.sharded_index.ShardedIndex` and publishes it as the next version with
:func:`distrag.retrieval.index_store.publish`; the trainers adopt it through the store
(:mod:`distrag.distributed.refresh_client`). Everything it tells the trainers goes through the channel of
:mod:`distrag.distributed.refresh_protocol`, which signs it; :meth:`IndexServer.publish_version` fills in
what a published version records (:class:`~distrag.distributed.refresh_protocol.Publication`).

A pool of index ranks (``distributed.index_ranks`` = N > 1; :class:`PoolPart`) shares each version: member 0 takes
trainer 0's hand-off as a single index rank does and announces it to the pool as a task; every member encodes the
rows of its part (:func:`~distrag.retrieval.sharded_index.pool_parts`), builds its shards and saves them as a part
folder under ``index_parts/``; members 1..N-1 report theirs; once every part of the task is in, member 0 publishes
them as one version (:func:`~distrag.retrieval.index_store.publish_parts`: the parts' files moved into one folder
with one manifest, atomically) and announces it to the trainers as a single index rank does. A member that cannot
follow (cannot read the hand-off, built other rows than member 0 expects) raises: its failure is the index rank's.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distrag.data import load_data
from distrag.data.disk_corpus import reads_from_disk
from distrag.distributed.refresh_protocol import PartDone, PoolTask, Publication, RefreshChannel, WeightsHandoff
from distrag.models.embedder import Embedder
from distrag.retrieval import index_store
from distrag.retrieval.corpus_encoding import CorpusEncoder
from distrag.retrieval.sharded_index import ShardedIndex, pool_parts
from distrag.retrieval.streaming_index import OnDiskCorpusIndexer

if TYPE_CHECKING:
    from distrag.config import ExperimentConfig


@dataclass(frozen=True)
class PoolPart:
    """This index rank's place in a pool: ``member`` of ``len(ranges)`` members; ``ranges[p]``: rows ``[start,
    stop)`` of member p's part; parts are saved under ``parts_root`` (in the run folder)."""
    member: int
    ranges: list[tuple[int, int]] = field(default_factory=list)
    parts_root: Path = Path("index_parts")

    @property
    def members(self) -> int:
        return len(self.ranges)


class IndexServer:
    """Index-rank loop. ``encode_corpus_fn(state_dict)`` yields the corpus embeddings shard by shard
    (float32 arrays) with those embedder weights; ``build_index_fn(embeddings)`` returns a
    :class:`ShardedIndex`, published as ``publish_root/v<version>`` with the version's facts (weights
    step, build time, ...) and ``extra`` in its manifest's ``extra``. Both functions are injectable, so
    tests run the protocol without models. Runs in the launcher-started index process (never a fork:
    faiss). Every record it sets in the store is signed with the secret of ``run_root`` (default: the
    parent of ``weights_dir``), the run folder the trainers trust, for the job trainer 0 started there; it
    builds only from hand-offs of that job whose file matches the signed checksum.

    ``pool``: this server is one member of a pool of index ranks (module docstring); its functions encode and build
    its own part only (``pool.ranges[pool.member]``)."""

    def __init__(self, store, encode_corpus_fn: Callable[[dict], Iterable[np.ndarray]],
                 build_index_fn: Callable[[np.ndarray], ShardedIndex], publish_root: str | Path,
                 weights_dir: str | Path, *, extra: dict[str, Any] | None = None, poll_interval_s: float = 0.2,
                 log: Callable[[str], None] | None = None, start_version: int | None = None,
                 run_root: str | Path | None = None, keep_versions: int | None = None,
                 protected_fn: Callable[[], set[int]] | None = None, announce_pid: bool = True,
                 pool: PoolPart | None = None):
        self.store = store
        self.pool = pool if pool is not None and pool.members > 1 else None
        member, members = (self.pool.member, self.pool.members) if self.pool is not None else (0, 1)
        self.encode_corpus_fn = encode_corpus_fn
        self.build_index_fn = build_index_fn
        self.root = Path(publish_root)
        self.weights_dir = Path(weights_dir)
        self.channel = RefreshChannel(store, Path(run_root) if run_root is not None else self.weights_dir.parent,
                                      member=member, members=members)
        self.extra = dict(extra or {})
        self.poll_s = poll_interval_s
        who = f"index rank {member}/{members}" if members > 1 else "index rank"
        self.log = log or (lambda msg: print(f"[{who}] {msg}", flush=True))
        if start_version is None:  # on resume, versions continue after the ones on disk
            latest = index_store.latest_version(self.root)
            start_version = latest[0] if latest else 0
        self.version = start_version
        self.consumed = 0
        """The newest hand-off of the current job started on (a pool's member p: the newest task)."""
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
        """Serve until trainer 0 calls ``done()``. Returns the number of versions published (a pool's member p:
        parts built)."""
        if self.announce_pid:  # a supervisor announces its worker itself (index_supervisor)
            self.channel.announce_process(os.getpid())
        try:
            while True:
                self._new_job()
                self.heartbeat()
                if self._done():
                    self.log(f"trainers are done; {self.published} {'part' if self._follows else 'version'}(s) "
                             f"{'built' if self._follows else 'published'}, exiting")
                    self.channel.say_bye()
                    return self.published
                if self._follows:
                    task = self.channel.pool_task()
                    if task is not None and task.n > self.consumed:
                        self.consumed = task.n
                        self._build_part(task)
                        continue
                else:
                    handoff = self.channel.newest_weights()
                    if handoff is not None and handoff.n > self.consumed:
                        if handoff.n > self.consumed + 1:
                            self.log(f"skipping weights {self.consumed + 1}..{handoff.n - 1}: newer ones arrived")
                        self.channel.mark_consumed(handoff.n)
                        self.consumed = handoff.n
                        self._refresh(handoff)
                        continue
                time.sleep(self.poll_s)
        except BaseException as e:
            try:
                self.channel.record_error(f"{type(e).__name__}: {e}")
            except (RuntimeError, OSError) as e2:
                self.log(f"could not record the error in the store: {e2!r}")
            raise

    @property
    def _follows(self) -> bool:
        """A member 1..N-1 of a pool: it builds the parts member 0 asks for."""
        return self.pool is not None and self.pool.member > 0

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

    def _encode(self, state_dict: dict, what: str) -> np.ndarray | None:
        """The vectors of this server's rows under ``state_dict``, shard by shard (heartbeating between shards);
        None when the version is abandoned (a new job, or the trainers are done)."""
        shards = []
        n_rows = 0
        for i, emb in enumerate(self.encode_corpus_fn(state_dict)):
            emb = np.asarray(emb, dtype=np.float32)
            shards.append(emb)
            n_rows += len(emb)
            if self._new_job():  # a version of the job that started it is of no use to another one
                self.log("a new job of this run started during re-embedding; abandoning this version")
                return None
            self.heartbeat()
            self.log(f"{what}: shard {i + 1} embedded, {n_rows} passages")
            if self._done():
                self.log("trainers finished during re-embedding; abandoning this version")
                return None
        return np.concatenate(shards) if shards else np.zeros((0, 0), np.float32)

    def _build(self, state_dict: dict, what: str) -> tuple[ShardedIndex, int] | None:
        """The index of this server's rows (and their count), or None when the version is abandoned."""
        vectors = self._encode(state_dict, what)
        if vectors is None:
            return None
        index = self.build_index_fn(vectors)
        if self._new_job():
            self.log("a new job of this run started while building the index; abandoning this version")
            return None
        self.heartbeat()
        return index, len(vectors)

    def _refresh(self, handoff: WeightsHandoff) -> None:
        t0 = time.perf_counter()
        state_dict = self._load_weights(handoff)
        if state_dict is None:
            return
        n, step = handoff.n, handoff.step
        what = f"weights {n} (step {step})"
        if self.pool is not None:  # member 0 of a pool: every member encodes its part of this hand-off
            self.channel.announce_task(PoolTask(n, step, handoff.sha256, self.version + 1))
        built = self._build(state_dict, what)
        if built is None:
            return
        index, n_vectors = built
        parts = None
        if self.pool is not None:
            own = self._save_part(index, n)
            others = self._wait_for_parts(n, self.version + 1)
            if others is None:
                return
            parts = [own, *others]
            n_vectors = self.pool.ranges[-1][1] - self.pool.ranges[0][0]
        pub = self.publish_version(index, weights_step=step, weights_n=n, n_vectors=n_vectors, t0=t0, parts=parts)
        self.log(f"published version {pub.version} from step {pub.weights_step} in {pub.build_s:.2f}s -> {pub.path}")
        if parts is not None:
            shutil.rmtree(self._task_dir(n), ignore_errors=True)  # the parts' folders, emptied by the publication
        self.prune()

    # -- a pool of index ranks ---------------------------------------------------------------------------
    def _task_dir(self, n: int) -> Path:
        """Where the parts of hand-off ``n`` of the current job are saved."""
        return self.pool.parts_root / f"{self.channel.job[:12]}-w{n:06d}"

    def _save_part(self, index: ShardedIndex, n: int) -> Path:
        """Save this member's part of hand-off ``n`` (atomically), after removing its parts of earlier tasks
        (each member deletes only its own: another member may still be writing its part)."""
        mine = f"part{self.pool.member:03d}"
        folder = self._task_dir(n) / mine
        for old in self.pool.parts_root.glob(f"*/{mine}"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        return index_store.save(index, folder, overwrite=True)

    def _wait_for_parts(self, n: int, version: int) -> list[Path] | None:
        """Member 0: the folders of members 1..N-1's parts of hand-off ``n`` (for ``version``), once every one is
        reported; None when the version is abandoned (a new job, or the trainers are done). A part of other rows
        than this member expects raises (the members do not index the same corpus)."""
        got: dict[int, Path] = {}
        waiting_since = time.monotonic()
        while len(got) < self.pool.members - 1:
            if self._new_job():
                self.log("a new job of this run started while waiting for the pool's parts; abandoning this version")
                return None
            if self._done():
                self.log("trainers finished while waiting for the pool's parts; abandoning this version")
                return None
            self.heartbeat()
            for m in range(1, self.pool.members):
                part = self.channel.part_done(m) if m not in got else None
                if part is None or part.n != n or part.version != version:
                    continue
                if (part.start, part.stop) != tuple(self.pool.ranges[m]):
                    raise RuntimeError(f"index rank {m} built rows [{part.start}, {part.stop}) of the corpus, index "
                                       f"rank 0 expects [{self.pool.ranges[m][0]}, {self.pool.ranges[m][1]}): the "
                                       "index ranks do not read the same corpus and configuration")
                got[m] = Path(part.path)
            if len(got) < self.pool.members - 1:
                time.sleep(self.poll_s)
        self.log(f"every part of weights {n} is in ({time.monotonic() - waiting_since:.2f}s after this one's)")
        return [got[m] for m in range(1, self.pool.members)]

    def _build_part(self, task: PoolTask) -> None:
        """Member p: encode and save its part of ``task``, and report it to member 0."""
        t0 = time.perf_counter()
        state_dict = self._load_weights(task.handoff)
        if state_dict is None:  # member 0 read this file: this member sees another run folder
            raise RuntimeError(f"cannot read the weights of hand-off {task.n} that index rank 0 read: every index "
                               "rank of a pool needs the run folder (a shared filesystem)")
        built = self._build(state_dict, f"weights {task.n} (step {task.step}), part {self.pool.member}")
        if built is None:
            return
        index, _ = built
        path = self._save_part(index, task.n)
        start, stop = self.pool.ranges[self.pool.member]
        self.channel.report_part(PartDone(task.n, task.version, str(path), start, stop, time.perf_counter() - t0))
        self.published += 1
        self.log(f"part {self.pool.member} of version {task.version} (rows {start}..{stop}) saved in "
                 f"{time.perf_counter() - t0:.2f}s")

    def publish_version(self, index: ShardedIndex | None, *, weights_step: int, weights_n: int, n_vectors: int,
                        t0: float, parts: list[Path] | None = None) -> Publication:
        """Publish ``index`` (or the saved ``parts`` of a pool's version, in row order) as the next version (its
        facts and ``extra`` in its manifest) and announce it to the trainers; returns what was announced. What a
        version records is filled in here."""
        version = self.version + 1
        facts = {"weights_step": weights_step, "weights_n": weights_n, "n_vectors": n_vectors,
                 "build_s": time.perf_counter() - t0, "created": time.time()}
        extra = {**facts, **self.extra}
        if parts is not None:
            extra["index_ranks"] = len(parts)
            path = index_store.publish_parts(parts, self.root, version, extra=extra)
        else:
            path = index_store.publish(index, self.root, version, extra=extra)
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


def serve_index(cfg: ExperimentConfig, store, run_root: Path, *, announce_pid: bool = True, member: int = 0,
                members: int = 1) -> int:
    """The index rank of a run (``store``: the coordination store): re-embed the corpus with each weights
    hand-off under ``run_root/weights`` and publish versions under ``run_root/index`` until the trainers are
    done, keeping ``distributed.keep_index_versions`` of them plus those the run's checkpoints name.
    ``member`` of ``members``: this rank's place in a pool of index ranks (it encodes and builds its part of the
    corpus; member 0 publishes). Returns the number of versions published (member p: parts built)."""
    from distrag.distributed.checkpoint import referenced_index_versions

    embedder = Embedder.from_config(cfg.embedder)
    embedder.eval()
    if cfg.index.on_disk or reads_from_disk(cfg.data):
        # large corpora: the file streamed in chunks, embeddings on disk (retrieval/streaming_index.py); the corpus
        # is never loaded here, so this rank needs none of the side files trainer 0 writes
        work = run_root / "index_work" / (f"part{member:03d}" if members > 1 else "")
        indexer = OnDiskCorpusIndexer.from_config(embedder, cfg, work, part=(member, members))
        encode, build, extra, ranges = indexer.shards, indexer.build, indexer.extra, indexer.part_ranges
    else:
        corpus = load_data(cfg.data).corpus
        parts = pool_parts(len(corpus), cfg.index.n_shards, members)
        ranges = [(lo, hi) for lo, hi, _ in parts]
        lo, hi, n_shards = parts[member]
        encoder = CorpusEncoder(embedder, corpus.texts()[lo:hi], n_shards=max(cfg.index.n_shards, 4))
        part_cfg = cfg.index.model_copy(update={"n_shards": n_shards})

        def build(sorted_vectors: np.ndarray) -> ShardedIndex:
            vectors = encoder.unsort(sorted_vectors)
            return ShardedIndex.from_config(vectors.shape[1], part_cfg).build(vectors)

        encode, extra = encoder.shards, {"corpus": corpus.fingerprint()}

    pool = PoolPart(member, ranges, run_root / "index_parts") if members > 1 else None
    server = IndexServer(store, encode, build, run_root / "index", run_root / "weights",
                         extra=extra, run_root=run_root,
                         keep_versions=cfg.distributed.keep_index_versions, announce_pid=announce_pid,
                         protected_fn=lambda: referenced_index_versions(run_root / "checkpoints"), pool=pool)
    return server.run()

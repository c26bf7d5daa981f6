"""The index of a corpus too large for memory: encoded chunk by chunk to disk, indexed shard by shard.

Three steps, each bounded in memory by a chunk, a block or a sample, not by the corpus:

1. :func:`~distrag.retrieval.corpus_encoding.encode_chunks` / :func:`encode_to_store`: passages arrive in chunks
   (:mod:`distrag.data.corpus_stream`, or any corpus' ``chunks``); each chunk is encoded by a
   :class:`~distrag.retrieval.corpus_encoding.CorpusEncoder` (length-sorted batches, its cost charged to the
   accountant chunk by chunk) and appended to a :class:`~distrag.retrieval.vector_store.VectorStoreWriter`
   (shard files of ``shard_rows`` rows on disk).
2. :func:`~distrag.retrieval.vector_store.build_from_store`: a :class:`~distrag.retrieval.sharded_index.ShardedIndex`
   whose shard ``s`` is store shard ``s`` (IVF cells trained on ``train_size`` sampled rows; an exact index over a
   corpus larger than memory is :meth:`VectorStore.search <distrag.retrieval.vector_store.VectorStore.search>`,
   block by block).
3. Publishing is :func:`distrag.retrieval.index_store.publish` (atomic version directories), unchanged.

:class:`OnDiskCorpusIndexer` ties them together for the index rank (``index.on_disk``, or a corpus read from disk:
``data.corpus_on_disk``): the corpus is tokenized once (each chunk's ids kept on disk under ``tokens/``), one store
per weights hand-off under a work folder (the previous one deleted when the next starts), built into a
ShardedIndex of ``index.n_shards`` shards. The trainers' own encodings of an on-disk corpus (the frozen index,
refreshes, re-embedding) take the same steps: :func:`distrag.retrieval.corpus_encoding.build_index`. In a pool of
index ranks each member streams, encodes and builds only its rows (its run of the shards).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distrag.data.corpus_stream import JsonlPassageStream
from distrag.errors import ConfigError
from distrag.retrieval.corpus_encoding import encode_chunks
from distrag.retrieval.sharded_index import ShardedIndex, pool_parts
from distrag.retrieval.vector_store import VectorStore, VectorStoreWriter, build_from_store

if TYPE_CHECKING:
    from distrag.config import ExperimentConfig, IndexConfig
    from distrag.costs.accountant import Accountant
    from distrag.data.records import PassageChunk
    from distrag.models.embedder import Embedder

# encode_chunks and build_from_store live next to what they use (corpus_encoding, vector_store); their names
# stay importable from here
__all__ = ["OnDiskCorpusIndexer", "build_from_store", "encode_chunks", "encode_to_store"]


def encode_to_store(embedder: Embedder, chunks: Iterable[PassageChunk], root: str | Path, *, shard_rows: int,
                    accountant: Accountant | None = None, dtype: str = "float32", total: int | None = None,
                    show_progress: bool = False) -> VectorStore:
    """Every chunk's vectors in a new store at ``root`` (shard files of ``shard_rows`` rows); a progress bar of
    passages encoded (out of ``total`` when given) with ``show_progress``."""
    from tqdm.auto import tqdm

    writer = VectorStoreWriter(root, embedder.dim, shard_rows=shard_rows, dtype=dtype)
    with tqdm(total=total, unit="passage", desc="encode to disk", disable=not show_progress) as bar:
        for count in encode_chunks(embedder, chunks, writer, accountant=accountant):
            bar.update(count - bar.n)
    return writer.close()


class OnDiskCorpusIndexer:
    """The index rank's corpus path for ``index.on_disk``: the corpus JSONL at ``corpus_path`` is streamed in
    chunks of ``cfg.chunk_passages``; ``shards(state_dict)`` encodes it into a fresh store under ``work_dir``
    and yields, per chunk, a ``[rows, 0]`` array (the row count, without the vectors: they are on disk);
    ``build(_)`` then builds the ShardedIndex of ``cfg.n_shards`` shards from that store. ``extra`` names
    the corpus file (its path and SHA-256) for the published manifests."""

    def __init__(self, embedder: Embedder, corpus_path: str | Path, cfg: IndexConfig, work_dir: str | Path, *,
                 accountant: Accountant | None = None, part: tuple[int, int] = (0, 1)):
        """``part``: ``(member, members)`` of a pool of index ranks; this indexer encodes and builds that member's
        rows and shards (:func:`~distrag.retrieval.sharded_index.pool_parts`; ``part_ranges`` holds every
        member's rows), in a ``work_dir`` of its own."""
        self.embedder, self.cfg, self.accountant = embedder, cfg, accountant
        self.stream = JsonlPassageStream(corpus_path, chunk_passages=cfg.chunk_passages)
        self.work_dir = Path(work_dir)
        shutil.rmtree(self.work_dir, ignore_errors=True)  # stores of an earlier process are never reused
        self.work_dir.mkdir(parents=True)
        n_rows = len(self.stream.offsets())
        parts = pool_parts(n_rows, cfg.n_shards, part[1])
        self.part_ranges = [(lo, hi) for lo, hi, _ in parts]
        """Rows ``[start, stop)`` of each member's part (one part, every row, without a pool)."""
        lo, hi, n_shards = parts[part[0]]
        self.rows = (lo, hi)
        self.shard_rows = -(-(hi - lo) // n_shards)
        digest = hashlib.sha256()
        with open(self.stream.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        self.extra = {"corpus_file": str(self.stream.path), "corpus_sha256": digest.hexdigest()[:16],
                      "corpus_rows": n_rows}
        self._runs = 0
        self._store: VectorStore | None = None

    @classmethod
    def from_config(cls, embedder: Embedder, cfg: ExperimentConfig, work_dir: str | Path, *,
                    part: tuple[int, int] = (0, 1)) -> OnDiskCorpusIndexer:
        """The indexer of ``cfg.data.corpus_path`` (required: the corpus file is what is streamed) under
        ``cfg.index``; ``part``: ``(member, members)`` of a pool of index ranks."""
        if not cfg.data.corpus_path:
            raise ConfigError([("index.on_disk", "streams the corpus JSONL: set data.corpus_path (data.format "
                                f"{cfg.data.format!r} builds its corpus in memory)")])
        return cls(embedder, cfg.data.corpus_path, cfg.index, work_dir, part=part)

    def shards(self, state_dict: dict | None = None) -> Iterator[np.ndarray]:
        """Encode the corpus (after loading ``state_dict`` into the embedder) into a new store, chunk by chunk."""
        if state_dict is not None:
            self.embedder.load_state_dict(state_dict)
        if self._store is not None:  # the last version is published (with its own copy of the vectors)
            shutil.rmtree(self._store.root, ignore_errors=True)
            self._store = None
        self._runs += 1
        writer = VectorStoreWriter(self.work_dir / f"store_{self._runs:06d}", self.embedder.dim,
                                   shard_rows=self.shard_rows)
        done = 0
        try:
            for count in encode_chunks(self.embedder, self.stream.chunks(self.rows), writer, accountant=self.accountant,
                                       token_cache=self.work_dir / "tokens"):
                yield np.zeros((count - done, 0), dtype=np.float32)
                done = count
        except GeneratorExit:  # the version was abandoned (trainers done): drop its partial store
            shutil.rmtree(writer.root, ignore_errors=True)
            raise
        self._store = writer.close()

    def build(self, _row_counts: np.ndarray | None = None) -> ShardedIndex:
        """The ShardedIndex of the store the last :meth:`shards` pass wrote."""
        if self._store is None:
            raise RuntimeError("no complete store: run shards() to the end first")
        return build_from_store(self._store, self.cfg)

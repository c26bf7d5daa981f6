"""The index of a corpus too large for memory: encoded chunk by chunk to disk, indexed shard by shard.

Three steps, each bounded in memory by a chunk, a block or a sample, not by the corpus:

1. :func:`encode_chunks` / :func:`encode_to_store`: passages arrive in chunks
   (:mod:`distrag.data.corpus_stream`); each chunk is encoded by a
   :class:`~distrag.retrieval.corpus_encoding.CorpusEncoder` (length-sorted batches, its cost charged to the
   accountant chunk by chunk) and appended to a :class:`~distrag.retrieval.vector_store.VectorStoreWriter`
   (shard files of ``shard_rows`` rows on disk).
2. :func:`build_from_store`: a :class:`~distrag.retrieval.sharded_index.ShardedIndex` whose shard ``s`` is
   store shard ``s``. ``ivf`` / ``ivfpq``: one quantizer (and PQ codebook) trained on ``train_size`` rows
   drawn uniformly from the store, copied to every shard, then each shard's rows added block by block. All
   shards share the cells, so the merged result equals that of one IVF index trained on the same sample with
   every row added. The stored float32 vectors (exact re-scoring, ``return_vectors``) stay memory-mapped on
   disk; what is in memory is faiss' own data: the PQ codes for ``ivfpq`` (``pq_m`` bytes a row), the full
   rows for ``ivf`` and ``flat`` (an exact index over a corpus larger than memory is
   :meth:`VectorStore.search <distrag.retrieval.vector_store.VectorStore.search>`, block by block).
3. Publishing is :func:`distrag.retrieval.index_store.publish` (atomic version directories), unchanged.

:class:`OnDiskCorpusIndexer` ties them together for the index rank (``index.on_disk``): the corpus is tokenized
once (each chunk's ids kept on disk under ``tokens/``), one store per weights hand-off under a work folder (the
previous one deleted when the next starts), built into a ShardedIndex of ``index.n_shards`` shards. In a pool of
index ranks each member streams, encodes and builds only its rows (its run of the shards).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from distrag.data.corpus_stream import JsonlPassageStream
from distrag.errors import ConfigError
from distrag.models.embedder import TOKENIZE_ROWS, TokenizedTexts
from distrag.retrieval.corpus_encoding import CorpusEncoder
from distrag.retrieval.faiss_backend import configure_faiss, new_cpu_shard
from distrag.retrieval.sharded_index import ShardedIndex, pool_parts
from distrag.retrieval.vector_store import VectorStore, VectorStoreWriter

if TYPE_CHECKING:
    from distrag.config import ExperimentConfig, IndexConfig
    from distrag.costs.accountant import Accountant
    from distrag.data.corpus_stream import PassageChunk
    from distrag.models.embedder import Embedder

__all__ = ["OnDiskCorpusIndexer", "build_from_store", "encode_chunks", "encode_to_store"]

log = logging.getLogger(__name__)


def encode_chunks(embedder: Embedder, chunks: Iterable[PassageChunk], writer: VectorStoreWriter, *,
                  accountant: Accountant | None = None, token_cache: str | Path | None = None) -> Iterator[int]:
    """Encode each chunk (charged to ``accountant``) and append its vectors to ``writer``; yields the rows
    written so far after each chunk (the index rank heartbeats there). The caller closes ``writer``.

    ``token_cache``: a folder keeping each chunk's token ids (``<chunk>.npz``, about 4 bytes a token): a chunk
    found there is not tokenized again, so a corpus encoded once per index version is tokenized once."""
    for i, chunk in enumerate(chunks):
        tokens = _cached_tokens(embedder, chunk, Path(token_cache) / f"{i:06d}.npz") if token_cache else None
        # encoder shards of about TOKENIZE_ROWS texts (the index rank heartbeats between shards)
        n_shards = -(-len(chunk.passages) // TOKENIZE_ROWS)
        encoder = (CorpusEncoder(embedder, tokens=tokens, n_shards=n_shards) if tokens is not None
                   else CorpusEncoder(embedder, chunk.texts(), n_shards=n_shards))
        writer.append(encoder.encode_all(accountant=accountant))
        yield writer.count


def _cached_tokens(embedder: Embedder, chunk: PassageChunk, path: Path) -> TokenizedTexts:
    """The chunk's token ids from ``path``, or tokenized and written there (temp file, then rename)."""
    if path.exists():
        with np.load(path) as z:
            tokens = TokenizedTexts(z["input_ids"], z["offsets"], z["token_type_ids"] if "token_type_ids" in z
                                    else None)
        if len(tokens) == len(chunk.passages):
            return tokens
    tokens = embedder.tokenize_unpadded(chunk.texts())
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"input_ids": tokens.input_ids, "offsets": tokens.offsets}
    if tokens.token_type_ids is not None:
        arrays["token_type_ids"] = tokens.token_type_ids
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)
    return tokens


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


def _trained_template(store: VectorStore, cfg: IndexConfig, train_size: int, seed: int
                      ) -> tuple[faiss.Index | None, dict[str, int]]:
    """An empty ``ivf`` / ``ivfpq`` index trained on a sample of the store (None for ``flat``), and its
    capped sizes (``nlist``, ``pq_nbits``: capped by the sample size as for a shard of that many rows)."""
    if cfg.kind == "flat":
        return None, {}
    sample = store.sample(train_size, seed=seed)
    template, info = new_cpu_shard(cfg.kind, store.dim, len(sample), cfg.nlist, cfg.pq_m, cfg.pq_nbits)
    template.train(sample)
    return template, info


def build_from_store(store: VectorStore, cfg: IndexConfig, *, train_size: int | None = None, seed: int = 0,
                     block_rows: int = 65_536) -> ShardedIndex:
    """A :class:`ShardedIndex` of ``cfg.kind`` over ``store``, one index shard per store shard (see the
    module docstring); ``train_size`` defaults to ``cfg.train_size``. The index stays valid while the store's
    files exist (its stored vectors are memory maps of them), so publish it before deleting the store."""
    configure_faiss()
    if store.dtype != "float32" and cfg.kind != "flat":
        raise ValueError(f"kind={cfg.kind!r} keeps the store's vectors for exact re-scoring: a float32 store is "
                         f"needed, this one is {store.dtype}")
    # the configured settings (checked: pq_m divides dim, ...) before any training; one shard per store shard
    settings = {**ShardedIndex.from_config(store.dim, cfg).settings(), "n_shards": store.n_shards}
    template, info = _trained_template(store, cfg, train_size or cfg.train_size, seed)
    shards, vectors, layout = [], [], []
    for s in range(store.n_shards):
        index = faiss.IndexFlatIP(store.dim) if template is None else faiss.clone_index(template)
        for _, block in store.blocks(s, block_rows):
            index.add(block)
        shards.append(index)
        vectors.append(None if template is None else store.shard(s))
        layout.append({"start": int(store.bounds[s]), "stop": int(store.bounds[s + 1]), **info})
    index = ShardedIndex.from_parts(settings, shards, vectors, layout, device=cfg.device)
    log.info("built a %s index over %d vectors in %d shard(s)", cfg.kind, len(store), store.n_shards)
    return index


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
        """The indexer of ``cfg.data.corpus_path`` (``data.format: jsonl`` is required: the corpus file is
        what is streamed) under ``cfg.index``; ``part``: ``(member, members)`` of a pool of index ranks."""
        if cfg.data.format != "jsonl" or not cfg.data.corpus_path:
            raise ConfigError([("index.on_disk", "streams the corpus JSONL: set data.format: jsonl and "
                                f"data.corpus_path (data.format is {cfg.data.format!r})")])
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

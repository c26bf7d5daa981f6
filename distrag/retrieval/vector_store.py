"""Corpus embeddings on disk, one raw row-major file per shard, and exact search over them block by block.

Layout of a store directory::

    store.json          {"format": "distrag.vector_store", "dim", "dtype", "count", "shard_rows",
                         "shards": [{"file", "start", "stop"}]}
    emb_00000.float32   rows [start, stop), C order, no header (float32 or float16), read memory-mapped

:class:`VectorStoreWriter` appends blocks of rows of any size (e.g. one encoded corpus chunk) and cuts them
into shard files of ``shard_rows`` rows (the last holds the rest), so the encoding chunk (what bounds memory
while encoding) and the shard size (the index layout) are independent. It writes ``store.json`` last,
atomically: a store without it is incomplete. :class:`VectorStore` opens one: ``shard(s)`` is a read-only
memory map, ``blocks`` reads it in float32 blocks of ``block_rows`` rows (what bounds memory when building or
searching), ``sample`` draws rows to train IVF quantizers, and :meth:`VectorStore.search` is the exact
inner-product top-k over every block, merged as :class:`~distrag.retrieval.sharded_index.ShardedIndex`
merges its shards (:mod:`distrag.retrieval.topk_merge`: descending score, ties to the lower row).

:func:`build_from_store` builds a :class:`~distrag.retrieval.sharded_index.ShardedIndex` from a store, one index
shard per store shard. ``ivf`` / ``ivfpq``: one quantizer (and PQ codebook) trained on ``train_size`` rows drawn
uniformly from the store, copied to every shard, then each shard's rows added block by block. All shards share the
cells, so the merged result equals that of one IVF index trained on the same sample with every row added. The
stored float32 vectors (exact re-scoring, ``return_vectors``) stay memory-mapped on disk; what is in memory is
faiss' own data: the PQ codes for ``ivfpq`` (``pq_m`` bytes a row), the full rows for ``ivf`` and ``flat``. A
``flat`` shard is allocated once at its final size and its file read straight into it, so building it holds the
index and nothing more (adding blocks one by one grew faiss' buffer by reallocation: up to twice the index while
copying); files are read with plain reads, not through a memory map (mapped pages count in the process's
resident memory until unmapped).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from distrag.atomic_io import atomic_write_json
from distrag.errors import IndexLoadError
from distrag.retrieval.faiss_backend import configure_faiss, new_cpu_shard
from distrag.retrieval.sharded_index import SearchResult, ShardedIndex
from distrag.retrieval.topk_merge import merge_topk, widen_boundary_ties

if TYPE_CHECKING:
    from distrag.config import IndexConfig

__all__ = ["STORE_MANIFEST", "VectorStore", "VectorStoreWriter", "build_from_store"]

log = logging.getLogger(__name__)

FORMAT = "distrag.vector_store"
STORE_MANIFEST = "store.json"
_DTYPES = ("float32", "float16")


class VectorStoreWriter:
    """Write a store under ``root``: ``append(rows)`` adds rows (cut into files of ``shard_rows``);
    ``close()`` writes ``store.json`` and returns the opened :class:`VectorStore`."""

    def __init__(self, root: str | Path, dim: int, *, shard_rows: int, dtype: str = "float32"):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        if (self.root / STORE_MANIFEST).exists():
            raise FileExistsError(f"{self.root} already holds a vector store")
        self.dim, self.dtype, self.shard_rows = int(dim), dtype, int(shard_rows)
        self.shards: list[dict[str, Any]] = []
        self.count = 0

    def append(self, rows: np.ndarray) -> None:
        """Rows ``[count, count + len(rows))``, filling the open shard file then starting new ones."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows must have shape [n, {self.dim}], got {list(rows.shape)}")
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        done = 0
        while done < len(rows):
            if not self.shards or self.shards[-1]["stop"] - self.shards[-1]["start"] == self.shard_rows:
                self.shards.append({"file": f"emb_{len(self.shards):05d}.{self.dtype}", "start": self.count,
                                    "stop": self.count})
                (self.root / self.shards[-1]["file"]).write_bytes(b"")  # truncate a leftover of a crashed run
            entry = self.shards[-1]
            take = min(len(rows) - done, self.shard_rows - (entry["stop"] - entry["start"]))
            with open(self.root / entry["file"], "ab") as f:
                f.write(rows[done:done + take].tobytes())
            entry["stop"] += take
            self.count += take
            done += take

    def close(self) -> VectorStore:
        if not self.shards:
            raise ValueError("an empty vector store cannot be closed: append rows first")
        atomic_write_json(self.root / STORE_MANIFEST, {"format": FORMAT, "dim": self.dim, "dtype": self.dtype,
                                                       "count": self.count, "shard_rows": self.shard_rows,
                                                       "shards": self.shards})
        return VectorStore(self.root)


class VectorStore:
    """A complete store directory (see the module docstring), opened read-only."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / STORE_MANIFEST
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise IndexLoadError(f"{path}: not a complete vector store ({e})") from None
        if m.get("format") != FORMAT:
            raise IndexLoadError(f"{path}: format {m.get('format')!r}, expected {FORMAT!r}")
        self.dim, self.dtype, self.count = int(m["dim"]), m["dtype"], int(m["count"])
        self.layout: list[dict[str, Any]] = m["shards"]
        self.bounds = np.asarray([0] + [e["stop"] for e in self.layout], dtype=np.int64)

    @property
    def n_shards(self) -> int:
        return len(self.layout)

    def __len__(self) -> int:
        return self.count

    def shard(self, s: int) -> np.ndarray:
        """Shard ``s``'s rows as a read-only memory map (stored dtype)."""
        entry = self.layout[s]
        path, rows = self.root / entry["file"], entry["stop"] - entry["start"]
        expected = rows * self.dim * np.dtype(self.dtype).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise IndexLoadError(f"{path}: missing or not {expected} bytes ([{rows}, {self.dim}] {self.dtype})")
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(rows, self.dim))

    def blocks(self, s: int, block_rows: int = 65_536) -> Iterator[tuple[int, np.ndarray]]:
        """``(global first row, float32 rows)`` of shard ``s``, ``block_rows`` at a time (plain reads: the file's
        pages go to the page cache, not into this process' resident memory as a memory map's would)."""
        rows = len(self.shard(s))  # checks the file's size
        with open(self.root / self.layout[s]["file"], "rb") as f:
            for lo in range(0, rows, block_rows):
                n = min(block_rows, rows - lo)
                block = np.fromfile(f, dtype=self.dtype, count=n * self.dim).reshape(n, self.dim)
                yield int(self.bounds[s]) + lo, block.astype(np.float32, copy=False)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``min(n, count)`` distinct rows drawn uniformly (float32, in row order), read shard by shard."""
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(self.count, size=min(n, self.count), replace=False))
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        cuts = np.searchsorted(rows, self.bounds)
        for s in range(self.n_shards):
            lo, hi = cuts[s], cuts[s + 1]
            if hi > lo:
                out[lo:hi] = self.shard(s)[rows[lo:hi] - self.bounds[s]]
        return out

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """float32 vectors of global rows ``ids`` (any shape; ``-1`` gives zeros)."""
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        out = np.zeros((flat.size, self.dim), dtype=np.float32)
        shard_of = np.searchsorted(self.bounds, flat, side="right") - 1
        for s in np.unique(shard_of[flat >= 0]).tolist():
            sel = (flat >= 0) & (shard_of == s)
            out[sel] = self.shard(s)[flat[sel] - self.bounds[s]]
        return out.reshape(*ids.shape, self.dim)

    def search(self, queries: np.ndarray, k: int, *, return_vectors: bool = False,
               block_rows: int = 65_536) -> SearchResult:
        """Exact top-``k`` rows by inner product for each query, ``block_rows`` rows in memory at a time. Same
        ids and order as a ``flat`` :class:`ShardedIndex` over the same rows (ties to the lower row)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape [n, {self.dim}], got {list(q.shape)}")
        units = [(s, lo, min(lo + block_rows, e["stop"] - e["start"]))
                 for s, e in enumerate(self.layout) for lo in range(0, e["stop"] - e["start"], block_rows)]

        def search_unit(u: int, qs: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
            s, lo, hi = units[u]
            block = np.ascontiguousarray(self.shard(s)[lo:hi], dtype=np.float32)
            scores, ids = faiss.knn(qs, block, depth, metric=faiss.METRIC_INNER_PRODUCT)
            found = ids >= 0
            return (np.where(found, scores, -np.inf).astype(np.float32),
                    np.where(found, ids + int(self.bounds[s]) + lo, -1).astype(np.int64))

        sizes = [hi - lo for _, lo, hi in units]
        parts = [search_unit(u, q, min(k + 1, n)) for u, n in enumerate(sizes)]
        widen_boundary_ties(search_unit, q, k, parts, sizes)
        ids, scores, _ = merge_topk(np.concatenate([p[0] for p in parts], axis=1),
                                    np.concatenate([p[1] for p in parts], axis=1), k)
        return SearchResult(ids, scores, self.rows(ids) if return_vectors else None)


# ----------------------------------------------------------------------------------------------
# an index built from a store


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


def _filled_flat(store: VectorStore, s: int, block_rows: int) -> faiss.Index:
    """An ``IndexFlatIP`` of shard ``s``: its buffer sized once, then filled (module docstring): a float32 shard file
    is read straight into it, a float16 one converted block by block."""
    rows, dim = len(store.shard(s)), store.dim  # (shard() checks the file's size)
    index = faiss.IndexFlatIP(dim)
    index.codes.resize(rows * dim * 4)
    index.ntotal = rows
    view = faiss.rev_swig_ptr(index.get_xb(), rows * dim).reshape(rows, dim)
    if store.dtype == "float32":
        with open(store.root / store.layout[s]["file"], "rb") as f:
            if f.readinto(memoryview(view).cast("B")) != view.nbytes:
                raise IndexLoadError(f"{store.root / store.layout[s]['file']}: shorter than {view.nbytes} bytes")
        return index
    for start, block in store.blocks(s, block_rows):
        lo = start - int(store.bounds[s])
        view[lo:lo + len(block)] = block
    return index


def build_from_store(store: VectorStore, cfg: IndexConfig, *, train_size: int | None = None, seed: int = 0,
                     block_rows: int = 65_536) -> ShardedIndex:
    """A :class:`ShardedIndex` of ``cfg.kind`` over ``store``, one index shard per store shard (see the
    module docstring); ``train_size`` defaults to ``cfg.train_size``. An ``ivf`` / ``ivfpq`` index stays valid
    while the store's files exist or stay mapped (its stored vectors are memory maps of them); ``flat`` copies
    the rows into faiss and does not need the store afterwards."""
    configure_faiss()
    if store.dtype != "float32" and cfg.kind != "flat":
        raise ValueError(f"kind={cfg.kind!r} keeps the store's vectors for exact re-scoring: a float32 store is "
                         f"needed, this one is {store.dtype}")
    # the configured settings (checked: pq_m divides dim, ...) before any training; one shard per store shard
    settings = {**ShardedIndex.from_config(store.dim, cfg).settings(), "n_shards": store.n_shards}
    template, info = _trained_template(store, cfg, train_size or cfg.train_size, seed)
    shards, vectors, layout = [], [], []
    for s in range(store.n_shards):
        if template is None:
            index = _filled_flat(store, s, block_rows)
        else:
            index = faiss.clone_index(template)
            for _, block in store.blocks(s, block_rows):
                index.add(block)
        shards.append(index)
        vectors.append(None if template is None else store.shard(s))
        layout.append({"start": int(store.bounds[s]), "stop": int(store.bounds[s + 1]), **info})
    index = ShardedIndex.from_parts(settings, shards, vectors, layout, device=cfg.device)
    log.info("built a %s index over %d vectors in %d shard(s)", cfg.kind, len(store), store.n_shards)
    return index

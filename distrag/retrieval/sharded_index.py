"""Sharded faiss vector index in memory: build, search with a top-k merge, reshard, reconstruct.

Layout
------
The ``N`` vectors are cut into ``n_shards`` *contiguous row ranges* (sizes differ by at most one). Each
range is its own faiss index over inner product: ``flat`` (exact), ``ivf`` (inverted lists, exact scores
inside the visited cells) or ``ivfpq`` (inverted lists + product quantisation; candidates are re-scored
exactly from the stored float32 vectors, so ``scores`` are true inner products for every kind).

A query batch is searched on every shard (faiss batches the queries itself), shard-local ids are offset
to global row positions and the per-shard top-k lists are merged (:mod:`distrag.retrieval.topk_merge`). Ties
are broken by the lower global id, so results are deterministic and independent of the shard count for ``flat``.

Stored vectors
--------------
The float32 vectors are kept next to the faiss indices so that ``search(..., return_vectors=True)`` can
hand the passage vectors to joint RAG training and so that resharding (or reloading at another shard count)
never needs re-embedding. For ``flat`` shards on CPU the faiss index *is* the float32 matrix, so we keep a
read-only view of its storage instead of a second copy (half the memory, and no ``vectors_*.npy`` on disk).

Size caps
---------
Small shards get fewer IVF cells and fewer PQ bits than asked for (see :mod:`distrag.retrieval.faiss_backend`);
the effective values are kept per shard (``shard_layout``). ``pq_m`` must divide ``dim`` (``ValueError``).

Padding
-------
When fewer than ``k`` results exist (``k`` > number of vectors, or an IVF search whose probed cells hold
fewer than ``k`` vectors) the missing slots hold id ``-1``, score ``-inf`` and (with ``return_vectors``)
a zero vector.

GPU
---
With ``device="auto"`` and a faiss build that sees GPUs, shards are cloned to GPUs round robin (shard ``i``
on GPU ``i % n_gpus``, one ``StandardGpuResources`` per GPU) and trained / filled there. ``device="gpu"``
without a visible GPU is an error. faiss GPU indices support ``k`` (per shard, after refinement) up to
2048. This path is guarded but cannot run on CPU-only machines (faiss-cpu has no GPU symbols).

Elsewhere
---------
Saving, loading and publishing versions (``manifest.json``, shard files, ``root/v000001`` + ``LATEST``):
:mod:`distrag.retrieval.index_store`. faiss specifics (one shard's faiss index, GPU cloning, threads, the
flat-search kernel): :mod:`distrag.retrieval.faiss_backend`.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from distrag.retrieval.faiss_backend import (
    GPU_MAX_K,
    KINDS,
    configure_faiss,
    flat_view,
    new_cpu_shard,
    resolve_device,
    set_nprobe,
    to_gpu,
)
from distrag.retrieval.topk_merge import merge_topk, widen_boundary_ties

if TYPE_CHECKING:
    from distrag.config import IndexConfig

__all__ = ["SearchResult", "ShardedIndex", "pool_parts"]


@dataclass
class SearchResult:
    """Top-k results for a batch of ``Q`` queries.

    ``ids``: [Q, k] int64 global row positions, ``-1`` where fewer than k results exist.
    ``scores``: [Q, k] float32 inner products, descending per row (``-inf`` in padded slots).
    ``vectors``: [Q, k, d] float32 stored vectors of ``ids`` (zeros in padded slots) when asked for.
    """

    ids: np.ndarray
    scores: np.ndarray
    vectors: np.ndarray | None = None


def _shard_bounds(n: int, n_shards: int) -> list[int]:
    """Contiguous row ranges whose sizes differ by at most one: shard i holds rows [b[i], b[i+1])."""
    return [(i * n) // n_shards for i in range(n_shards + 1)]


def pool_parts(n: int, n_shards: int, n_parts: int) -> list[tuple[int, int, int]]:
    """``(start, stop, shards)`` of each of ``n_parts`` parts of an index of ``n`` rows built by a pool of index
    ranks: the ``max(n_shards, n_parts)`` contiguous shard ranges :meth:`ShardedIndex.build` would cut, dealt out
    in contiguous runs (part p builds its run of shards over rows ``[start, stop)``). Each part is a contiguous
    row range, so the parts' shards, offset by ``start``, are the shards of one index over every row (flat: the
    same search results whatever the split; ``index_store.publish_parts`` joins them)."""
    if n_parts < 1:
        raise ValueError(f"n_parts must be >= 1, got {n_parts}")
    total = max(n_shards, n_parts)
    if n < total:
        raise ValueError(f"cannot split {n} vectors into {total} non-empty shards for {n_parts} part(s)")
    bounds = _shard_bounds(n, total)
    cuts = [(p * total) // n_parts for p in range(n_parts + 1)]
    return [(bounds[cuts[p]], bounds[cuts[p + 1]], cuts[p + 1] - cuts[p]) for p in range(n_parts)]


# ----------------------------------------------------------------------------------------------
# the index


class ShardedIndex:
    """Inner-product vector index over contiguous row shards, each its own faiss index.

    ``build(vectors)`` assigns id ``i`` to row ``i``; ``search`` returns global ids, exact inner-product
    scores (descending, ties by lower id) and optionally the stored vectors. See the module docstring for
    the caps applied to ``nlist`` / PQ bits on small shards, padding and GPU use; ``index_store`` saves and
    loads it.
    """

    def __init__(self, dim: int, *, kind: str = "flat", n_shards: int = 1, nlist: int = 256, nprobe: int = 16,
                 pq_m: int = 16, device: str = "auto", metric: str = "ip", refine: int = 1, pq_nbits: int = 8):
        """``refine`` (ivfpq only): fetch ``refine * k`` PQ candidates per shard and keep the best k after
        exact re-scoring from the stored vectors (higher = better recall, slower). ``pq_nbits`` (ivfpq): 8, or 4
        for faiss' fast-scan kernels (CPU only: ``device='gpu'`` is an error, ``auto`` stays on the CPU)."""
        problems = []
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            problems.append(f"dim must be a positive integer, got {dim!r}")
        if kind not in KINDS:
            problems.append(f"kind must be one of {KINDS}, got {kind!r}")
        if metric != "ip":
            problems.append(f"metric must be 'ip' (inner product; normalise vectors for cosine), got {metric!r}")
        for name, value in (("n_shards", n_shards), ("nlist", nlist), ("nprobe", nprobe), ("pq_m", pq_m),
                            ("refine", refine)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if pq_nbits not in (4, 8):
            problems.append(f"pq_nbits must be 4 (fast scan) or 8, got {pq_nbits!r}")
        if kind == "ivfpq" and pq_nbits == 4 and device == "gpu":
            problems.append("pq_nbits=4 (fast-scan PQ) has no faiss GPU implementation: use device 'cpu' or "
                            "'auto', or pq_nbits 8 on the GPU")
        if not problems and kind == "ivfpq" and dim % pq_m:
            problems.append(f"pq_m ({pq_m}) must divide dim ({dim}) for kind='ivfpq'; divisors of {dim} "
                            f"up to 64: {[m for m in range(1, min(dim, 64) + 1) if dim % m == 0]}")
        if problems:
            raise ValueError("invalid ShardedIndex settings:\n" + "\n".join(f"  - {p}" for p in problems))
        configure_faiss()
        self._dim = int(dim)
        self._kind = kind
        self._n_shards = int(n_shards)
        self._nlist = int(nlist)
        self._nprobe = int(nprobe)
        self._pq_m = int(pq_m)
        self._pq_nbits = int(pq_nbits)
        self._refine = int(refine)
        self._metric = metric
        self._device_request = device
        self._device = resolve_device(device)
        if kind == "ivfpq" and pq_nbits == 4:
            self._device = "cpu"  # fast-scan PQ is CPU-only in faiss (device 'gpu' was refused above)
        self._gpu_resources: dict[int, Any] = {}
        self._shards: list[faiss.Index] = []
        self._vectors: list[np.ndarray] = []
        self._shard_info: list[dict[str, int]] = []
        self._bounds: list[int] = [0]
        self.version = 0
        """Version number of the last save or load (0 for a fresh build)."""
        self.extra: dict[str, Any] = {}
        """JSON-serialisable facts saved with the index (corpus fingerprint, embedder, build step, ...)."""
        self.created: float | None = None
        """Unix time of the build (None before one)."""

    @classmethod
    def from_config(cls, dim: int, cfg: IndexConfig) -> ShardedIndex:
        return cls(dim, kind=cfg.kind, n_shards=cfg.n_shards, nlist=cfg.nlist, nprobe=cfg.nprobe,
                   pq_m=cfg.pq_m, device=cfg.device, refine=cfg.refine, pq_nbits=cfg.pq_nbits)

    @classmethod
    def from_parts(cls, settings: dict[str, Any], shards: list[faiss.Index], vectors: list[np.ndarray | None],
                   layout: list[dict[str, int]], *, device: str = "auto", version: int = 0,
                   extra: dict[str, Any] | None = None, created: float | None = None) -> ShardedIndex:
        """An index over filled CPU faiss ``shards`` (e.g. read back by ``index_store.load``).

        ``settings``: as :meth:`settings` gives them; ``vectors[s]``: shard ``s``'s float32 rows, or None
        for a ``flat`` shard (its storage is the rows); ``layout[s]``: its row range and capped IVF sizes,
        as :meth:`shard_layout` gives them. On a GPU ``device`` the shards are cloned to GPUs.
        """
        index = cls(**settings, device=device)
        if not len(shards) == len(vectors) == len(layout) == index.n_shards:
            raise ValueError(f"n_shards={index.n_shards} but {len(shards)} shards, {len(vectors)} vector "
                             f"blocks and {len(layout)} layout entries")
        rows = [v if v is not None else flat_view(s) for s, v in zip(shards, vectors)]
        if index._device == "gpu":
            rows = [np.array(v) for v in rows]  # host copies: GPU shards are not host-readable
            shards = [to_gpu(s, i, index._gpu_resources) for i, s in enumerate(shards)]
        for s in shards:
            index._apply_nprobe(s)
        index._shards, index._vectors = list(shards), rows
        index._shard_info = [{key: e[key] for key in ("nlist", "pq_nbits") if key in e} for e in layout]
        index._bounds = [0] + [int(e["stop"]) for e in layout]
        index.version, index.extra, index.created = int(version), dict(extra or {}), created
        return index

    # -- properties ------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def n_shards(self) -> int:
        return self._n_shards

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def device(self) -> str:
        """Resolved device: ``cpu`` or ``gpu``."""
        return self._device

    @property
    def is_built(self) -> bool:
        return bool(self._shards)

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"nprobe must be >= 1, got {value}")
        self._nprobe = int(value)
        for shard in self._shards:
            self._apply_nprobe(shard)

    @property
    def refine(self) -> int:
        """ivfpq: PQ candidates per shard = ``refine * k``, re-scored exactly (a search-time setting)."""
        return self._refine

    @refine.setter
    def refine(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"refine must be >= 1, got {value}")
        self._refine = int(value)

    def __len__(self) -> int:
        return self._bounds[-1]

    def __repr__(self) -> str:
        return (f"ShardedIndex(dim={self._dim}, kind={self._kind!r}, n_shards={self._n_shards}, "
                f"count={len(self)}, device={self._device!r}, version={self.version})")

    def settings(self) -> dict[str, Any]:
        """The constructor settings besides ``device``: ``dim``, ``kind``, ``n_shards``, ``nlist``, ``nprobe``,
        ``pq_m``, ``metric``, ``refine``, ``pq_nbits``."""
        return {"dim": self._dim, "kind": self._kind, "n_shards": self._n_shards, "nlist": self._nlist,
                "nprobe": self._nprobe, "pq_m": self._pq_m, "metric": self._metric, "refine": self._refine,
                "pq_nbits": self._pq_nbits}

    def shard_layout(self) -> list[dict[str, int]]:
        """Per shard: its row range ``start`` / ``stop`` and, for IVF kinds, the capped ``nlist`` and
        ``pq_nbits`` it was built with."""
        return [{"start": self._bounds[i], "stop": self._bounds[i + 1], **info}
                for i, info in enumerate(self._shard_info)]

    def cpu_shard(self, s: int) -> faiss.Index:
        """Shard ``s``'s faiss index on the CPU (a copy for a GPU shard), e.g. for ``faiss.write_index``."""
        index = self._shards[s]
        return faiss.index_gpu_to_cpu(index) if self._device == "gpu" else index

    def shard_vectors(self, s: int) -> np.ndarray:
        """Shard ``s``'s stored float32 rows (read-only view for CPU ``flat`` shards)."""
        return self._vectors[s]

    # -- building --------------------------------------------------------------------------------

    def _check_matrix(self, x: np.ndarray, what: str) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self._dim:
            raise ValueError(f"{what} must have shape [n, {self._dim}], got {list(x.shape)}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        step = max(1, (1 << 24) // self._dim)  # check in ~16M-element blocks: no N x d boolean temporary
        if not all(np.isfinite(x[i:i + step]).all() for i in range(0, len(x), step)):
            raise ValueError(f"{what} contain NaN or infinite values")
        return x

    def _apply_nprobe(self, index: faiss.Index) -> None:
        set_nprobe(index, self._kind, self._nprobe, gpu=self._device == "gpu")

    def _make_shard(self, x: np.ndarray, shard_no: int) -> tuple[faiss.Index, np.ndarray, dict[str, int]]:
        index, info = new_cpu_shard(self._kind, self._dim, len(x), self._nlist, self._pq_m, self._pq_nbits)
        if self._device == "gpu":
            index = to_gpu(index, shard_no, self._gpu_resources)  # train and add on the GPU
        if not index.is_trained:
            index.train(x)
        index.add(x)
        self._apply_nprobe(index)
        vectors = flat_view(index) if (self._kind == "flat" and self._device == "cpu") else x
        return index, vectors, info

    def build(self, vectors: np.ndarray, *, show_progress: bool = False) -> ShardedIndex:
        """Index ``vectors`` [N, d] (row i gets id i), replacing any previous content. Returns ``self``."""
        x = self._check_matrix(vectors, "vectors")
        keeps_x = self._kind != "flat" or self._device == "gpu"  # else the faiss storage is the copy
        if keeps_x and isinstance(vectors, np.ndarray) and np.may_share_memory(x, vectors):
            x = x.copy()  # the stored vectors must not alias the caller's array
        n = len(x)
        if n < self._n_shards:
            raise ValueError(f"cannot split {n} vectors into n_shards={self._n_shards} non-empty shards")
        bounds = _shard_bounds(n, self._n_shards)
        shards, vecs, infos = [], [], []
        steps = range(self._n_shards)
        if show_progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"building {self._kind} index", unit="shard")
        for i in steps:
            index, v, info = self._make_shard(x[bounds[i]:bounds[i + 1]], i)
            shards.append(index)
            vecs.append(v)
            infos.append(info)
        self._shards, self._vectors, self._shard_info, self._bounds = shards, vecs, infos, bounds
        self.created = time.time()
        return self

    def _all_vectors(self) -> np.ndarray:
        """One fresh [N, d] float32 copy of every stored vector."""
        if not self._vectors:
            raise RuntimeError("the index is empty: call build() first")
        return np.concatenate(self._vectors, axis=0) if len(self._vectors) > 1 else self._vectors[0].copy()


    def reshard(self, n_shards: int, *, device: str | None = None) -> ShardedIndex:
        """A new index with the same settings and vectors split into ``n_shards`` (no re-embedding), on
        ``device`` (default: this index's device setting).

        ``flat`` results are identical at any shard count; IVF shards are retrained, so approximate results
        may differ slightly.
        """
        other = ShardedIndex(self._dim, kind=self._kind, n_shards=n_shards, nlist=self._nlist,
                             nprobe=self._nprobe, pq_m=self._pq_m, device=device or self._device_request,
                             metric=self._metric, refine=self._refine, pq_nbits=self._pq_nbits)
        other.build(self._all_vectors())
        other.version, other.extra = self.version, dict(self.extra)
        return other

    # -- searching -------------------------------------------------------------------------------

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors for ``ids`` of any shape -> ``ids.shape + (d,)`` float32; ``-1`` gives zeros."""
        ids = np.asarray(ids)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
        flat = ids.reshape(-1).astype(np.int64, copy=False)
        n = len(self)
        bad = (flat < -1) | (flat >= n)
        if bad.any():
            raise IndexError(f"ids out of range [-1, {n}): e.g. {flat[bad][:5].tolist()}")
        valid = flat >= 0
        if len(self._vectors) == 1 and n:
            # one gather into the result (ivfpq re-scoring: a zeroed buffer + masked copy doubled its cost)
            out = np.asarray(self._vectors[0])[np.where(valid, flat, 0)].astype(np.float32, copy=False)
            if not valid.all():
                out[~valid] = 0.0
            return out.reshape(*ids.shape, self._dim)
        out = np.zeros((flat.size, self._dim), dtype=np.float32)
        if valid.any():
            shard_of = np.searchsorted(self._bounds, flat, side="right") - 1
            for s, vecs in enumerate(self._vectors):
                sel = valid & (shard_of == s)
                if sel.any():
                    out[sel] = vecs[flat[sel] - self._bounds[s]]
        return out.reshape(*ids.shape, self._dim)

    def _search_shard(self, s: int, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard ``s``'s top-k with global ids; padding (faiss: id -1, score -FLT_MAX) -> -1 / -inf."""
        scores, ids = self._shards[s].search(q, k)
        found = ids >= 0
        return np.where(found, scores, -np.inf).astype(np.float32), np.where(found, ids + self._bounds[s], -1)

    def search(self, queries: np.ndarray, k: int, *, return_vectors: bool = False) -> SearchResult:
        """Top-``k`` rows by inner product for each query row of ``queries`` [Q, d].

        Every shard is searched with the whole query batch and the per-shard lists are merged; ties go to
        the lower global id. Slots beyond the available results are padded with id -1 / score -inf.
        """
        if not self._shards:
            raise RuntimeError("the index is empty: call build() or load() before search()")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = self._check_matrix(queries, "queries")
        nq = len(q)
        sizes = [self._bounds[s + 1] - self._bounds[s] for s in range(self._n_shards)]
        needed = k * self._refine if self._kind == "ivfpq" else k
        if self._device == "gpu" and min(needed, max(sizes)) > GPU_MAX_K:
            raise ValueError(f"faiss GPU indices support k <= {GPU_MAX_K} per shard, asked for {needed}")
        # exact kinds fetch one row past k: a shard whose (k+1)-th score ties the merged k-th score may hold
        # more tied rows (re-searched deeper below); otherwise its first k+1 rows settle every tie at once
        per_shard_k = needed if self._kind == "ivfpq" else k + 1
        limits = [min(n, GPU_MAX_K) for n in sizes] if self._device == "gpu" else sizes
        ks = [min(per_shard_k, limit) for limit in limits]
        if nq == 0:
            empty = SearchResult(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32))
            if return_vectors:
                empty.vectors = np.zeros((0, k, self._dim), np.float32)
            return empty

        if self._device == "gpu" and self._n_shards > 1:
            with ThreadPoolExecutor(self._n_shards) as pool:  # shards on different GPUs run concurrently
                parts = list(pool.map(lambda s: self._search_shard(s, q, ks[s]), range(self._n_shards)))
        else:  # on CPU each faiss search already uses every OpenMP thread
            parts = [self._search_shard(s, q, ks[s]) for s in range(self._n_shards)]
        if self._kind != "ivfpq":  # (ivfpq candidates are re-scored below; its cut-off is approximate anyway)
            widen_boundary_ties(self._search_shard, q, k, parts, limits)
        scores = np.concatenate([p[0] for p in parts], axis=1) if len(parts) > 1 else parts[0][0]
        ids = np.concatenate([p[1] for p in parts], axis=1) if len(parts) > 1 else parts[0][1]

        cand_vecs = None
        if self._kind == "ivfpq":  # PQ distances are approximate: re-score exactly from stored vectors
            cand_vecs = self.reconstruct(ids)
            scores = np.matmul(cand_vecs, q[:, :, None])[..., 0]
            scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32, copy=False)

        ids, scores, order = merge_topk(scores, ids, k)
        result = SearchResult(ids=ids, scores=scores)
        if return_vectors:
            if cand_vecs is not None and cand_vecs.shape[1] >= k:
                result.vectors = np.take_along_axis(cand_vecs, order[:, :, None], axis=1)
            else:
                result.vectors = self.reconstruct(result.ids)
        return result

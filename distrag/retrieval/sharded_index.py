"""Sharded faiss vector index: build, search with a top-k merge, reshard, and versioned save/load.

Layout
------
The ``N`` vectors are cut into ``n_shards`` *contiguous row ranges* (sizes differ by at most one). Each
range is its own faiss index over inner product:

* ``flat``  -> ``IndexFlatIP`` (exact),
* ``ivf``   -> ``IndexIVFFlat`` (inverted lists, exact scores inside the visited cells),
* ``ivfpq`` -> ``IndexIVFPQ`` (inverted lists + product quantisation; candidates are re-scored exactly
  from the stored float32 vectors, so ``scores`` are true inner products for every kind).

A query batch is searched on every shard (faiss batches the queries itself), shard-local ids are offset
to global row positions and the per-shard top-k lists are merged. Ties are broken by the lower global id,
so results are deterministic and independent of the shard count for ``flat``.

Stored vectors
--------------
The float32 vectors are kept next to the faiss indices so that ``search(..., return_vectors=True)`` can
hand the passage vectors to joint RAG training and so that resharding (or reloading at another shard count)
never needs re-embedding. For ``flat`` shards on CPU the faiss index *is* the float32 matrix, so we keep a
read-only view of its storage instead of a second copy (half the memory, and no ``vectors_*.npy`` on disk).

Size caps (so training works on small data)
-------------------------------------------
* IVF cells per shard: ``min(nlist, max(1, shard_rows // 39))`` - faiss' k-means wants at least 39
  training points per centroid. The effective value is recorded per shard in the manifest.
* PQ code bits per sub-quantiser: 8, reduced while ``shard_rows < 39 * 2**bits`` (down to 1 bit), for
  the same reason (an 8-bit codebook needs 9,984 training rows). Recorded per shard as ``pq_nbits``.
* ``pq_m`` must divide ``dim`` (``ValueError`` otherwise).

Padding
-------
When fewer than ``k`` results exist (``k`` > number of vectors, or an IVF search whose probed cells hold
fewer than ``k`` vectors) the missing slots hold id ``-1``, score ``-inf`` and (with ``return_vectors``)
a zero vector.

On disk (``save``)
------------------
A directory written through :func:`distrag.atomic_io.atomic_directory` (readers see all of it or nothing)::

    manifest.json          version, dim, count, metric, kind, n_shards, nlist/nprobe/pq_m, created, extra,
                           shards: [{file, vectors, start, stop, nlist, pq_nbits, bytes}]
    shard_00000.faiss      faiss.write_index of a CPU copy of shard 0
    vectors_00000.npy      float32 rows [start, stop) of shard 0 (ivf / ivfpq only; flat stores them
                           in the .faiss file)

:func:`publish` / :func:`latest_version` manage a directory of such versions (``root/v000001``, ...) plus
an atomically replaced ``root/LATEST`` pointer; the index rank publishes, trainers pick the newest.

GPU
---
With ``device="auto"`` and a faiss build that sees GPUs, shards are cloned to GPUs round robin (shard ``i``
on GPU ``i % n_gpus``, one ``StandardGpuResources`` per GPU) and trained / filled there. ``device="gpu"``
without a visible GPU is an error. faiss GPU indices support ``k`` (per shard, after refinement) up to
2048. This path is guarded but cannot run on CPU-only machines (faiss-cpu has no GPU symbols).

Threads
-------
faiss searches with OpenMP threads. If the user has not set ``OMP_NUM_THREADS`` we set faiss' thread count
to the CPUs this process may run on (``os.sched_getaffinity``); an explicit ``OMP_NUM_THREADS`` is left
alone. ``set_faiss_threads`` overrides both. Do not create faiss indices before ``fork()`` (OpenMP can hang
in the child): start index workers with ``spawn``.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from distrag.atomic_io import atomic_directory, atomic_write_json, atomic_write_text
from distrag.errors import IndexLoadError

if TYPE_CHECKING:
    from distrag.config import IndexConfig

__all__ = [
    "IndexLoadError",
    "SearchResult",
    "ShardedIndex",
    "latest_version",
    "num_gpus",
    "publish",
    "set_faiss_threads",
]

KINDS = ("flat", "ivf", "ivfpq")
DEVICES = ("auto", "cpu", "gpu")
FORMAT = "distrag.sharded_index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "LATEST"
MIN_POINTS_PER_CENTROID = 39  # faiss warns below this many training points per k-means centroid
GPU_MAX_K = 2048  # faiss GPU k-selection limit
# faiss' exhaustive (flat) search has two kernels: a per-query SIMD scan that streams the whole database once
# per query (memory bound), and a blocked BLAS GEMM that streams it once per block of queries. faiss 1.15
# picks BLAS only when n_queries * d >= distance_compute_blas_threshold (128,000: 333 queries at d=384),
# which made a 256-query batch over 100k x 384 vectors 5x slower than with BLAS. We lower it to 32 x 384
# (the measured cross-over at d=384) and raise the BLAS database block from 1024 to 4096 rows (about 2x
# faster at 1024 queries x 384 dims for a 64 MiB scratch block; benchmarks/bench_search.py). Each is only
# changed while it still holds the faiss default, so a value set by the user wins.
_BLAS_THRESHOLD = 32 * 384
_BLAS_DATABASE_BS = 4096
_FAISS_DEFAULTS = {"distance_compute_blas_threshold": faiss.cvar.distance_compute_blas_threshold,
                   "distance_compute_blas_database_bs": faiss.cvar.distance_compute_blas_database_bs}

_VERSION_DIR = re.compile(r"^v(\d{6,})$")
_configured = False
_config_lock = threading.Lock()


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


# ----------------------------------------------------------------------------------------------
# process-wide faiss settings


def set_faiss_threads(n: int | None = None) -> int:
    """Set faiss' OpenMP thread count; ``None`` = honour ``OMP_NUM_THREADS`` if set, else usable CPUs.

    On a shared, oversubscribed machine fewer threads can be much faster: OpenMP barriers wait on
    descheduled threads (PQ training ran 10x slower with 2 threads than with 1 on a loaded 2-core box).
    """
    _configure_faiss()
    return _set_threads(n)


def _set_threads(n: int | None) -> int:
    if n is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return faiss.omp_get_max_threads()
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    faiss.omp_set_num_threads(max(1, int(n)))
    return faiss.omp_get_max_threads()


def _configure_faiss() -> None:
    """Once per process: default thread count and flat-search kernel choice (see _BLAS_THRESHOLD)."""
    global _configured
    with _config_lock:
        if _configured:
            return
        _configured = True
        _set_threads(None)
        cvar = faiss.cvar
        if cvar.distance_compute_blas_threshold == _FAISS_DEFAULTS["distance_compute_blas_threshold"]:
            cvar.distance_compute_blas_threshold = min(_BLAS_THRESHOLD, cvar.distance_compute_blas_threshold)
        if cvar.distance_compute_blas_database_bs == _FAISS_DEFAULTS["distance_compute_blas_database_bs"]:
            cvar.distance_compute_blas_database_bs = max(_BLAS_DATABASE_BS, cvar.distance_compute_blas_database_bs)


def num_gpus() -> int:
    """GPUs faiss can use: 0 for faiss-cpu builds (which lack the GPU symbols) or machines without GPUs."""
    get = getattr(faiss, "get_num_gpus", None)
    if get is None or not hasattr(faiss, "index_cpu_to_gpu") or not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(get())
    except RuntimeError:  # a GPU build on a machine without a usable driver
        return 0


def _resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    n = num_gpus()
    if device == "gpu" and n == 0:
        raise RuntimeError(
            "device='gpu' but faiss sees no GPU: this faiss build has no GPU support (faiss-cpu) or no CUDA "
            "device is visible. Install faiss-gpu-cu12 (pip install 'distrag[gpu]') or use device='cpu'/'auto'.")
    return "gpu" if (device == "gpu" or (device == "auto" and n > 0)) else "cpu"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shard_bounds(n: int, n_shards: int) -> list[int]:
    """Contiguous row ranges whose sizes differ by at most one: shard i holds rows [b[i], b[i+1])."""
    return [(i * n) // n_shards for i in range(n_shards + 1)]


def _pq_nbits(rows: int) -> int:
    bits = 8
    while bits > 1 and rows < MIN_POINTS_PER_CENTROID * (1 << bits):
        bits -= 1
    return bits


def _flat_view(index: faiss.Index) -> np.ndarray:
    """Read-only [ntotal, d] view of an ``IndexFlat``'s storage (no copy; valid while the index lives)."""
    n, d = index.ntotal, index.d
    view = faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d)
    view.flags.writeable = False
    return view


# ----------------------------------------------------------------------------------------------
# the index


class ShardedIndex:
    """Inner-product vector index over contiguous row shards, each its own faiss index.

    ``build(vectors)`` assigns id ``i`` to row ``i``; ``search`` returns global ids, exact inner-product
    scores (descending, ties by lower id) and optionally the stored vectors. See the module docstring for
    the caps applied to ``nlist`` / PQ bits on small shards, padding, the on-disk layout and GPU use.
    """

    def __init__(self, dim: int, *, kind: str = "flat", n_shards: int = 1, nlist: int = 256, nprobe: int = 16,
                 pq_m: int = 16, device: str = "auto", metric: str = "ip", refine: int = 1):
        """``refine`` (ivfpq only): fetch ``refine * k`` PQ candidates per shard and keep the best k after
        exact re-scoring from the stored vectors (higher = better recall, slower)."""
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
        if not problems and kind == "ivfpq" and dim % pq_m:
            problems.append(f"pq_m ({pq_m}) must divide dim ({dim}) for kind='ivfpq'; divisors of {dim} "
                            f"up to 64: {[m for m in range(1, min(dim, 64) + 1) if dim % m == 0]}")
        if problems:
            raise ValueError("invalid ShardedIndex settings:\n" + "\n".join(f"  - {p}" for p in problems))
        _configure_faiss()
        self._dim = int(dim)
        self._kind = kind
        self._n_shards = int(n_shards)
        self._nlist = int(nlist)
        self._nprobe = int(nprobe)
        self._pq_m = int(pq_m)
        self._refine = int(refine)
        self._metric = metric
        self._device_request = device
        self._device = _resolve_device(device)
        self._gpu_resources: dict[int, Any] = {}
        self._shards: list[faiss.Index] = []
        self._vectors: list[np.ndarray] = []
        self._shard_info: list[dict[str, int]] = []
        self._bounds: list[int] = [0]
        self._version = 0
        self._extra: dict[str, Any] = {}
        self._created: float | None = None

    @classmethod
    def from_config(cls, dim: int, cfg: IndexConfig) -> ShardedIndex:
        return cls(dim, kind=cfg.kind, n_shards=cfg.n_shards, nlist=cfg.nlist, nprobe=cfg.nprobe,
                   pq_m=cfg.pq_m, device=cfg.device, refine=getattr(cfg, "refine", 1))

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
                f"count={len(self)}, device={self._device!r}, version={self._version})")

    @property
    def manifest(self) -> dict[str, Any]:
        """What ``save`` writes to ``manifest.json`` (version / extra of the last save or load)."""
        shards = []
        for i, info in enumerate(self._shard_info):
            shards.append({"file": f"shard_{i:05d}.faiss",
                           "vectors": None if self._kind == "flat" else f"vectors_{i:05d}.npy",
                           "start": self._bounds[i], "stop": self._bounds[i + 1], **info})
        created = self._created if self._created is not None else time.time()
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "version": self._version,
            "dim": self._dim, "count": len(self), "metric": self._metric, "kind": self._kind,
            "n_shards": self._n_shards, "nlist": self._nlist, "nprobe": self._nprobe, "pq_m": self._pq_m,
            "refine": self._refine, "shards": shards,
            "created": datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="seconds"),
            "created_unix": created, "faiss_version": faiss.__version__, "extra": dict(self._extra),
        }

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

    def _new_cpu_index(self, rows: int) -> tuple[faiss.Index, dict[str, int]]:
        d = self._dim
        if self._kind == "flat":
            return faiss.IndexFlatIP(d), {}
        nlist = max(1, min(self._nlist, rows // MIN_POINTS_PER_CENTROID))
        quantizer = faiss.IndexFlatIP(d)
        if self._kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            info = {"nlist": nlist}
        else:
            if rows < 2:
                raise ValueError(f"kind='ivfpq' needs at least 2 rows per shard, a shard has {rows}; "
                                 "use fewer shards or kind='flat'")
            nbits = _pq_nbits(rows)
            index = faiss.IndexIVFPQ(quantizer, d, nlist, self._pq_m, nbits, faiss.METRIC_INNER_PRODUCT)
            info = {"nlist": nlist, "pq_nbits": nbits}
        return index, info  # the faiss wrapper keeps `quantizer` alive via index.referenced_objects

    def _apply_nprobe(self, index: faiss.Index) -> None:
        if self._kind == "flat":
            return
        if self._device == "gpu":
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", self._nprobe)
        else:
            faiss.extract_index_ivf(index).nprobe = self._nprobe

    def _gpu_for(self, shard_no: int) -> tuple[Any, int]:
        gpu = shard_no % num_gpus()
        if gpu not in self._gpu_resources:
            self._gpu_resources[gpu] = faiss.StandardGpuResources()
        return self._gpu_resources[gpu], gpu

    def _to_gpu(self, index: faiss.Index, shard_no: int) -> faiss.Index:
        res, gpu = self._gpu_for(shard_no)
        opts = faiss.GpuClonerOptions()
        opts.useFloat16 = False
        return faiss.index_cpu_to_gpu(res, gpu, index, opts)

    def _make_shard(self, x: np.ndarray, shard_no: int) -> tuple[faiss.Index, np.ndarray, dict[str, int]]:
        index, info = self._new_cpu_index(len(x))
        if self._device == "gpu":
            index = self._to_gpu(index, shard_no)  # train and add on the GPU
        if not index.is_trained:
            index.train(x)
        index.add(x)
        self._apply_nprobe(index)
        vectors = _flat_view(index) if (self._kind == "flat" and self._device == "cpu") else x
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
        self._created = time.time()
        return self

    def _all_vectors(self) -> np.ndarray:
        """One fresh [N, d] float32 copy of every stored vector."""
        if not self._vectors:
            raise RuntimeError("the index is empty: call build() first")
        return np.concatenate(self._vectors, axis=0) if len(self._vectors) > 1 else self._vectors[0].copy()

    def reshard(self, n_shards: int) -> ShardedIndex:
        """A new index with the same settings and vectors split into ``n_shards`` (no re-embedding).

        ``flat`` results are identical at any shard count; IVF shards are retrained, so approximate results
        may differ slightly.
        """
        other = ShardedIndex(self._dim, kind=self._kind, n_shards=n_shards, nlist=self._nlist,
                             nprobe=self._nprobe, pq_m=self._pq_m, device=self._device_request,
                             metric=self._metric, refine=self._refine)
        other.build(self._all_vectors())
        other._version, other._extra = self._version, dict(self._extra)
        return other

    # -- searching -------------------------------------------------------------------------------

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors for ``ids`` of any shape -> ``ids.shape + (d,)`` float32; ``-1`` gives zeros."""
        ids = np.asarray(ids)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
        flat = ids.reshape(-1).astype(np.int64, copy=False)
        out = np.zeros((flat.size, self._dim), dtype=np.float32)
        n = len(self)
        bad = (flat < -1) | (flat >= n)
        if bad.any():
            raise IndexError(f"ids out of range [-1, {n}): e.g. {flat[bad][:5].tolist()}")
        valid = flat >= 0
        if len(self._vectors) == 1:
            out[valid] = self._vectors[0][flat[valid]]
        elif valid.any():
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

    def _resolve_boundary_ties(self, q: np.ndarray, k: int, parts: list) -> None:
        """Make ties at the k-th place resolve to the lowest global ids, whatever the shard count.

        faiss keeps an arbitrary subset of the vectors tied at a shard's cut-off (in practice the higher
        ids). When a shard's last returned score equals the merged k-th score, the shard may hold more
        vectors with that score than it returned, so those queries are searched again on that shard with
        twice the depth until its last score falls below the cut-off or the shard is exhausted. Exact
        duplicates (e.g. duplicate passages) make this happen; continuous embeddings almost never do.
        """
        sizes = [self._bounds[s + 1] - self._bounds[s] for s in range(self._n_shards)]
        cap = GPU_MAX_K if self._device == "gpu" else None
        while True:
            scores = np.concatenate([p[0] for p in parts], axis=1)
            if scores.shape[1] < k:
                return
            kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]
            changed = False
            for s, (d, i) in enumerate(parts):
                depth = d.shape[1]
                limit = sizes[s] if cap is None else min(sizes[s], cap)
                if depth >= limit:
                    continue
                amb = (i[:, -1] >= 0) & (d[:, -1] == kth) & np.isfinite(kth)
                if not amb.any():
                    continue
                new_depth = min(2 * depth, limit)
                d2, i2 = self._search_shard(s, q[amb], new_depth)
                dn = np.full((len(q), new_depth), -np.inf, dtype=np.float32)
                dn[:, :depth] = d
                dn[amb] = d2
                ids_new = np.full((len(q), new_depth), -1, dtype=np.int64)
                ids_new[:, :depth] = i
                ids_new[amb] = i2
                parts[s] = (dn, ids_new)
                changed = True
            if not changed:
                return

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
        per_shard_k = k * self._refine if self._kind == "ivfpq" else k
        ks = [min(per_shard_k, self._bounds[s + 1] - self._bounds[s]) for s in range(self._n_shards)]
        if self._device == "gpu" and max(ks) > GPU_MAX_K:
            raise ValueError(f"faiss GPU indices support k <= {GPU_MAX_K} per shard, asked for {max(ks)}")
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
            self._resolve_boundary_ties(q, k, parts)
        scores = np.concatenate([p[0] for p in parts], axis=1) if len(parts) > 1 else parts[0][0]
        ids = np.concatenate([p[1] for p in parts], axis=1) if len(parts) > 1 else parts[0][1]

        cand_vecs = None
        if self._kind == "ivfpq":  # PQ distances are approximate: re-score exactly from stored vectors
            cand_vecs = self.reconstruct(ids)
            scores = np.matmul(cand_vecs, q[:, :, None])[..., 0]
            scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32, copy=False)

        # merge: descending score, then ascending id (padding ids sort last among equal -inf scores)
        tie = np.where(ids >= 0, ids, np.iinfo(np.int64).max)
        order = np.lexsort((tie, -scores), axis=1)[:, :k]
        ids = np.take_along_axis(ids, order, axis=1)
        scores = np.take_along_axis(scores, order, axis=1)
        if ids.shape[1] < k:  # fewer candidates than k in total
            pad = k - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        result = SearchResult(ids=np.ascontiguousarray(ids, dtype=np.int64),
                              scores=np.ascontiguousarray(scores, dtype=np.float32))
        if return_vectors:
            if cand_vecs is not None and cand_vecs.shape[1] >= k:
                result.vectors = np.take_along_axis(cand_vecs, order[:, :, None], axis=1)
            else:
                result.vectors = self.reconstruct(result.ids)
        return result

    # -- persistence -----------------------------------------------------------------------------

    def _cpu_shard(self, s: int) -> faiss.Index:
        index = self._shards[s]
        return faiss.index_gpu_to_cpu(index) if self._device == "gpu" else index

    def save(self, path: str | Path, *, version: int = 0, extra: dict | None = None,
             overwrite: bool = False) -> Path:
        """Write the index to directory ``path`` atomically (all of it appears at once, or nothing).

        ``version`` and ``extra`` (JSON-serialisable: corpus fingerprint, embedder id, ...) go into the
        manifest. An existing ``path`` is an error unless ``overwrite``. Returns ``path``.
        """
        if not self._shards:
            raise RuntimeError("the index is empty: call build() before save()")
        path = Path(path)
        prev = (self._version, self._extra)
        self._version = int(version)
        if extra is not None:
            self._extra = dict(extra)
        try:
            manifest = self.manifest
            json.dumps(manifest)  # fail before writing anything if extra is not JSON-serialisable
            with atomic_directory(path, overwrite=overwrite) as tmp:
                for s, entry in enumerate(manifest["shards"]):
                    target = tmp / entry["file"]
                    faiss.write_index(self._cpu_shard(s), str(target))
                    _fsync_file(target)
                    entry["bytes"] = target.stat().st_size
                    if entry["vectors"] is not None:
                        vec_path = tmp / entry["vectors"]
                        with open(vec_path, "wb") as f:
                            np.save(f, np.ascontiguousarray(self._vectors[s]))
                            f.flush()
                            os.fsync(f.fileno())
                        entry["vectors_bytes"] = vec_path.stat().st_size
                atomic_write_json(tmp / MANIFEST, manifest)
        except BaseException:
            self._version, self._extra = prev
            raise
        return path

    @staticmethod
    def read_manifest(path: str | Path) -> dict[str, Any]:
        """Parse and check ``path/manifest.json`` (structure only; files are checked by ``load``)."""
        path = Path(path)
        mpath = path / MANIFEST
        if not path.is_dir():
            raise IndexLoadError(f"{path}: no such index directory")
        if not mpath.is_file():
            raise IndexLoadError(f"{mpath}: missing (not a saved ShardedIndex, or an incomplete copy)")
        try:
            m = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise IndexLoadError(f"{mpath}: unreadable manifest ({e})") from None
        required = ("format", "format_version", "dim", "count", "metric", "kind", "n_shards", "nlist",
                    "nprobe", "pq_m", "shards")
        missing = [key for key in required if key not in m] if isinstance(m, dict) else list(required)
        if missing:
            raise IndexLoadError(f"{mpath}: missing keys {missing}")
        if m["format"] != FORMAT or m["format_version"] > FORMAT_VERSION:
            raise IndexLoadError(f"{mpath}: format {m['format']!r} v{m['format_version']} is not readable by "
                                 f"this version (expects {FORMAT!r} v{FORMAT_VERSION})")
        shards = m["shards"]
        if len(shards) != m["n_shards"]:
            raise IndexLoadError(f"{mpath}: n_shards={m['n_shards']} but {len(shards)} shard entries")
        expect = 0
        for entry in shards:
            if entry["start"] != expect or entry["stop"] < entry["start"]:
                raise IndexLoadError(f"{mpath}: shard {entry['file']} covers rows [{entry['start']}, "
                                     f"{entry['stop']}), expected to start at {expect}")
            expect = entry["stop"]
        if expect != m["count"]:
            raise IndexLoadError(f"{mpath}: shards cover {expect} rows but count={m['count']}")
        return m

    @classmethod
    def load(cls, path: str | Path, *, n_shards: int | None = None, device: str | None = None) -> ShardedIndex:
        """Load a saved index, optionally at another shard count (rebuilt from the stored vectors).

        Raises :class:`IndexLoadError` naming the file when the manifest or a shard / vectors file is
        missing, unreadable, or disagrees with the manifest (row count, dimension, kind).
        """
        path = Path(path)
        target_device = device or "auto"
        _resolve_device(target_device)  # fail before reading gigabytes
        m = cls.read_manifest(path)
        dim, kind = int(m["dim"]), m["kind"]
        saved = cls(dim, kind=kind, n_shards=m["n_shards"], nlist=m["nlist"], nprobe=m["nprobe"],
                    pq_m=m["pq_m"], metric=m["metric"], refine=m.get("refine", 1), device="cpu")
        shards, vecs, infos = [], [], []
        for entry in m["shards"]:
            fpath = path / entry["file"]
            rows = entry["stop"] - entry["start"]
            if not fpath.is_file():
                raise IndexLoadError(f"{fpath}: shard file missing")
            if "bytes" in entry and fpath.stat().st_size != entry["bytes"]:
                raise IndexLoadError(f"{fpath}: {fpath.stat().st_size} bytes, manifest says {entry['bytes']} "
                                     "(truncated or replaced)")
            try:
                index = faiss.read_index(str(fpath))
            except (RuntimeError, MemoryError) as e:  # faiss raises RuntimeError on bad files
                raise IndexLoadError(f"{fpath}: not a readable faiss index ({str(e).strip()[:200]})") from None
            if index.d != dim or index.ntotal != rows:
                raise IndexLoadError(f"{fpath}: holds {index.ntotal} vectors of dim {index.d}, manifest expects "
                                     f"{rows} of dim {dim}")
            if kind == "flat":
                if not isinstance(index, faiss.IndexFlat):
                    raise IndexLoadError(f"{fpath}: {type(index).__name__}, manifest says kind='flat'")
                v = _flat_view(index)
            else:
                if entry.get("vectors") is None:
                    raise IndexLoadError(f"{path / MANIFEST}: shard {entry['file']} has no vectors file")
                vpath = path / entry["vectors"]
                if not vpath.is_file():
                    raise IndexLoadError(f"{vpath}: vectors file missing")
                if "vectors_bytes" in entry and vpath.stat().st_size != entry["vectors_bytes"]:
                    raise IndexLoadError(f"{vpath}: {vpath.stat().st_size} bytes, manifest says "
                                         f"{entry['vectors_bytes']} (truncated or replaced)")
                try:
                    v = np.load(vpath, allow_pickle=False)
                except (ValueError, OSError, EOFError) as e:
                    raise IndexLoadError(f"{vpath}: unreadable ({e})") from None
                if v.shape != (rows, dim) or v.dtype != np.float32:
                    raise IndexLoadError(f"{vpath}: shape {list(v.shape)} {v.dtype}, manifest expects "
                                         f"[{rows}, {dim}] float32")
            shards.append(index)
            vecs.append(v)
            infos.append({key: entry[key] for key in ("nlist", "pq_nbits") if key in entry})
        saved._shards, saved._vectors, saved._shard_info = shards, vecs, infos
        saved._bounds = [0] + [e["stop"] for e in m["shards"]]
        saved._version, saved._extra = int(m.get("version", 0)), dict(m.get("extra") or {})
        saved._created = m.get("created_unix")
        for index in shards:
            saved._apply_nprobe(index)

        if n_shards is not None and n_shards != saved.n_shards:
            out = cls(dim, kind=kind, n_shards=n_shards, nlist=m["nlist"], nprobe=m["nprobe"], pq_m=m["pq_m"],
                      metric=m["metric"], refine=m.get("refine", 1), device=target_device)
            out.build(saved._all_vectors())
            out._version, out._extra = saved._version, saved._extra
            return out
        saved._device_request = target_device
        if _resolve_device(target_device) == "gpu":
            saved._device = "gpu"
            gpu_vecs = [np.array(v) for v in saved._vectors]  # host copies: GPU shards are not host-readable
            saved._shards = [saved._to_gpu(index, s) for s, index in enumerate(saved._shards)]
            saved._vectors = gpu_vecs
            for index in saved._shards:
                saved._apply_nprobe(index)
        return saved


# ----------------------------------------------------------------------------------------------
# a directory of published versions


def _version_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _VERSION_DIR.match(child.name)
        if match and child.is_dir() and (child / MANIFEST).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_version(root: str | Path) -> Path | None:
    """The newest complete version directory under ``root`` (``root/v000007``), or None.

    Complete = named ``v`` + six or more digits and holding ``manifest.json``; temporary directories of
    saves in progress (``.v000008.*.tmp``) never match. The directory scan is authoritative and ``LATEST``
    is a convenience pointer for shell tools, so a crash between publishing a version directory and
    updating ``LATEST`` loses nothing.
    """
    found = _version_dirs(Path(root))
    return found[-1][1] if found else None


def publish(index: ShardedIndex, root: str | Path, version: int, *, extra: dict | None = None) -> Path:
    """Save ``index`` as ``root/v{version:06d}`` atomically, then atomically point ``root/LATEST`` at it.

    Versions must increase: publishing a version not newer than the latest published one is an error.
    Returns the version directory.
    """
    root = Path(root)
    if not isinstance(version, (int, np.integer)) or version < 0:
        raise ValueError(f"version must be a non-negative integer, got {version!r}")
    found = _version_dirs(root)
    if found and found[-1][0] >= version:
        raise ValueError(f"cannot publish version {version} under {root}: version {found[-1][0]} "
                         "already exists (versions must increase)")
    name = f"v{int(version):06d}"
    out = index.save(root / name, version=int(version), extra=extra)
    atomic_write_text(root / LATEST, name + "\n")
    return out

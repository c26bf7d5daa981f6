"""Everything faiss-specific under :class:`~distrag.retrieval.sharded_index.ShardedIndex`: one shard's faiss
index, GPU cloning, and the process-wide settings (OpenMP threads, the flat-search kernel, visible GPUs).

One shard
---------
:func:`new_cpu_shard` makes an empty inner-product index of a ``kind``:

* ``flat``  -> ``IndexFlatIP`` (exact),
* ``ivf``   -> ``IndexIVFFlat`` (inverted lists, exact scores inside the visited cells),
* ``ivfpq`` -> ``IndexIVFPQ`` (inverted lists + product quantisation; with ``pq_nbits=4`` the fast-scan
  ``IndexIVFPQFastScan``, CPU only),

with sizes capped so training works on small data:

* IVF cells per shard: ``min(nlist, max(1, shard_rows // 39))`` - faiss' k-means wants at least 39
  training points per centroid. The effective value is returned (and kept per shard as ``nlist``).
* PQ code bits per sub-quantiser: 8, reduced while ``shard_rows < 39 * 2**bits`` (down to 1 bit), for
  the same reason (an 8-bit codebook needs 9,984 training rows). Kept per shard as ``pq_nbits``.

Threads
-------
faiss searches with OpenMP threads. If the user has not set ``OMP_NUM_THREADS`` we set faiss' thread count
to the CPUs this process may run on (``os.sched_getaffinity``); an explicit ``OMP_NUM_THREADS`` is left
alone. ``set_faiss_threads`` overrides both. Do not create faiss indices before ``fork()`` (OpenMP can hang
in the child): start index workers with ``spawn``.

GPUs
----
:func:`num_gpus` counts the GPUs faiss can use (0 for faiss-cpu builds) and :func:`resolve_device` turns a
``device`` setting (``auto`` / ``cpu`` / ``gpu``) into the device an index runs on.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import faiss
import numpy as np

__all__ = ["DEVICES", "GPU_MAX_K", "KINDS", "configure_faiss", "flat_view", "new_cpu_shard", "num_gpus",
           "resolve_device", "set_faiss_threads", "set_nprobe", "to_gpu"]

KINDS = ("flat", "ivf", "ivfpq")
DEVICES = ("auto", "cpu", "gpu")
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
_configured = False
_config_lock = threading.Lock()


# ----------------------------------------------------------------------------------------------
# one shard


def _pq_nbits(rows: int) -> int:
    bits = 8
    while bits > 1 and rows < MIN_POINTS_PER_CENTROID * (1 << bits):
        bits -= 1
    return bits


def new_cpu_shard(kind: str, dim: int, rows: int, nlist: int, pq_m: int, pq_nbits: int = 8
                  ) -> tuple[faiss.Index, dict[str, int]]:
    """An empty CPU index of ``kind`` for ``rows`` vectors, and the capped sizes it uses (``nlist``,
    ``pq_nbits``; empty for ``flat``). ``pq_nbits=4``: a fast-scan ``IndexIVFPQFastScan`` (a shard too small
    to train 4-bit codes gets a plain ``IndexIVFPQ`` with fewer bits, as for 8)."""
    if kind == "flat":
        return faiss.IndexFlatIP(dim), {}
    nlist = max(1, min(nlist, rows // MIN_POINTS_PER_CENTROID))
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        info = {"nlist": nlist}
    else:
        if rows < 2:
            raise ValueError(f"kind='ivfpq' needs at least 2 rows per shard, a shard has {rows}; "
                             "use fewer shards or kind='flat'")
        nbits = min(pq_nbits, _pq_nbits(rows))
        if nbits == 4 == pq_nbits:
            index = faiss.IndexIVFPQFastScan(quantizer, dim, nlist, pq_m, 4, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, nbits, faiss.METRIC_INNER_PRODUCT)
        info = {"nlist": nlist, "pq_nbits": nbits}
    return index, info  # the faiss wrapper keeps `quantizer` alive via index.referenced_objects


def set_nprobe(index: faiss.Index, kind: str, nprobe: int, *, gpu: bool) -> None:
    """Cells an IVF shard visits per query (nothing to set for ``flat``)."""
    if kind == "flat":
        return
    if gpu:
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    else:
        faiss.extract_index_ivf(index).nprobe = nprobe


def to_gpu(index: faiss.Index, shard_no: int, resources: dict[int, Any]) -> faiss.Index:
    """A float32 GPU clone of shard ``shard_no`` on GPU ``shard_no % num_gpus()`` (round robin);
    ``resources`` caches one ``StandardGpuResources`` per GPU."""
    gpu = shard_no % num_gpus()
    if gpu not in resources:
        resources[gpu] = faiss.StandardGpuResources()
    opts = faiss.GpuClonerOptions()
    opts.useFloat16 = False
    return faiss.index_cpu_to_gpu(resources[gpu], gpu, index, opts)


def flat_view(index: faiss.Index) -> np.ndarray:
    """Read-only [ntotal, d] view of an ``IndexFlat``'s storage (no copy; valid while the index lives)."""
    n, d = index.ntotal, index.d
    view = faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d)
    view.flags.writeable = False
    return view


# ----------------------------------------------------------------------------------------------
# process-wide settings


def set_faiss_threads(n: int | None = None) -> int:
    """Set faiss' OpenMP thread count; ``None`` = honour ``OMP_NUM_THREADS`` if set, else usable CPUs.

    On a shared, oversubscribed machine fewer threads can be much faster: OpenMP barriers wait on
    descheduled threads (PQ training ran 10x slower with 2 threads than with 1 on a loaded 2-core box).
    """
    configure_faiss()
    return _set_threads(n)


def _set_threads(n: int | None) -> int:
    if n is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return faiss.omp_get_max_threads()
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    faiss.omp_set_num_threads(max(1, int(n)))
    return faiss.omp_get_max_threads()


def configure_faiss() -> None:
    """Once per process (every index calls it): default thread count and flat-search kernel (_BLAS_THRESHOLD)."""
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


def resolve_device(device: str) -> str:
    """``cpu`` or ``gpu`` for a ``device`` setting; ``gpu`` without a GPU faiss can use is an error."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    n = num_gpus()
    if device == "gpu" and n == 0:
        raise RuntimeError(
            "device='gpu' but faiss sees no GPU: this faiss build has no GPU support (faiss-cpu) or no CUDA "
            "device is visible. Install faiss-gpu-cu12 (pip install 'distrag[gpu]') or use device='cpu'/'auto'.")
    return "gpu" if (device == "gpu" or (device == "auto" and n > 0)) else "cpu"

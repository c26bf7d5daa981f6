"""faiss_backend: one shard's faiss index and its size caps, thread settings, GPU resolution."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from distrag.retrieval.faiss_backend import new_cpu_shard, num_gpus, resolve_device, set_faiss_threads, set_nprobe
from distrag.retrieval.sharded_index import ShardedIndex


@pytest.mark.parametrize("rows,nlist,expect", [
    (150, 256, {"nlist": 150 // 39, "pq_nbits": 1}),   # 150 rows < 39 * 2**2
    (300, 256, {"nlist": 300 // 39, "pq_nbits": 2}),   # 39 * 4 <= 300 < 39 * 8
    (3000, 32, {"nlist": 32, "pq_nbits": 6}),          # 39 * 64 <= 3000 < 39 * 128
    (20, 8, {"nlist": 1, "pq_nbits": 1}),              # fewer rows than one cell wants: one cell
])
def test_ivfpq_shards_cap_cells_and_code_bits_on_small_data(rows, nlist, expect):
    index, info = new_cpu_shard("ivfpq", 8, rows, nlist, 4)
    assert info == expect
    assert isinstance(index, faiss.IndexIVFPQ) and index.nlist == expect["nlist"] and index.pq.nbits == info["pq_nbits"]


def test_flat_and_ivf_shards():
    flat, info = new_cpu_shard("flat", 8, 10, 256, 4)
    assert isinstance(flat, faiss.IndexFlatIP) and info == {}
    set_nprobe(flat, "flat", 3, gpu=False)  # nothing to set, no error
    ivf, info = new_cpu_shard("ivf", 8, 1000, 16, 4)
    assert isinstance(ivf, faiss.IndexIVFFlat) and info == {"nlist": 16}
    set_nprobe(ivf, "ivf", 5, gpu=False)
    assert ivf.nprobe == 5
    with pytest.raises(ValueError, match="at least 2 rows per shard"):
        new_cpu_shard("ivfpq", 8, 1, 4, 4)


def test_set_faiss_threads_sets_and_reports_the_count(monkeypatch):
    before = faiss.omp_get_max_threads()
    try:
        assert set_faiss_threads(1) == 1 == faiss.omp_get_max_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        faiss.omp_set_num_threads(1)
        assert set_faiss_threads() == 1  # an explicit OMP_NUM_THREADS is left alone
    finally:
        faiss.omp_set_num_threads(before)


def test_unknown_device_is_an_error():
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")


@pytest.mark.skipif(num_gpus() > 0, reason="needs a machine without GPUs")
def test_device_gpu_without_gpu_is_a_clear_error(monkeypatch):
    with pytest.raises(RuntimeError, match="device='gpu' but faiss sees no GPU"):
        ShardedIndex(8, device="gpu")
    assert resolve_device("auto") == "cpu" and ShardedIndex(8, device="auto").device == "cpu"
    monkeypatch.delattr(faiss, "get_num_gpus", raising=False)  # a faiss build without GPU symbols
    assert num_gpus() == 0 and ShardedIndex(8).device == "cpu"
    x = np.zeros((4, 8), np.float32)
    assert ShardedIndex(8).build(x).search(x, 1).ids.shape == (4, 1)

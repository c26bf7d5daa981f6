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


# ----------------------------------------------------------------------------------------------
# the GPU path, reached on a CPU machine through a fake faiss GPU API (the CPU indices stand in for GPU ones)


class _FakeGpuFaiss:
    """What faiss-gpu adds to the module, recording every clone: ``clones`` holds (resources object, GPU
    number, float16 option) per ``index_cpu_to_gpu`` call; ``nprobe`` the GpuParameterSpace settings."""

    def __init__(self, monkeypatch, n_gpus: int):
        self.clones: list[tuple[object, int, bool]] = []
        self.nprobe: list[int] = []
        self.resources: list[object] = []
        fake = self

        class StandardGpuResources:
            def __init__(self):
                fake.resources.append(self)

        class GpuClonerOptions:
            useFloat16 = True  # faiss' default for some index types; ours must turn it off

        class GpuParameterSpace:
            def set_index_parameter(self, index, name, value):
                assert name == "nprobe"
                faiss.extract_index_ivf(index).nprobe = value
                fake.nprobe.append(value)

        def index_cpu_to_gpu(res, device, index, opts=None):
            assert isinstance(res, StandardGpuResources)
            fake.clones.append((res, device, bool(opts.useFloat16) if opts is not None else True))
            return index

        for name, value in {"get_num_gpus": lambda: n_gpus, "StandardGpuResources": StandardGpuResources,
                            "GpuClonerOptions": GpuClonerOptions, "GpuParameterSpace": GpuParameterSpace,
                            "index_cpu_to_gpu": index_cpu_to_gpu, "index_gpu_to_cpu": lambda index: index}.items():
            monkeypatch.setattr(faiss, name, value, raising=False)


def test_gpu_shards_are_cloned_round_robin_in_float32_and_search_like_cpu(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    q = rng.standard_normal((7, 16)).astype(np.float32)
    cpu = ShardedIndex(16, n_shards=3, device="cpu").build(x).search(q, 5)
    fake = _FakeGpuFaiss(monkeypatch, n_gpus=2)
    assert num_gpus() == 2 and resolve_device("auto") == "gpu" and resolve_device("gpu") == "gpu"
    assert resolve_device("cpu") == "cpu"  # an explicit cpu is honoured on a GPU machine
    index = ShardedIndex(16, n_shards=3, device="auto").build(x)
    assert index.device == "gpu"
    assert [d for _, d, _ in fake.clones] == [0, 1, 0]  # shard i on GPU i % n_gpus
    assert len(fake.resources) == 2 and fake.clones[0][0] is fake.clones[2][0]  # one resources object per GPU
    assert not any(f16 for _, _, f16 in fake.clones)  # exact float32 copies, no float16 storage
    got = index.search(q, 5)
    np.testing.assert_array_equal(got.ids, cpu.ids)
    np.testing.assert_allclose(got.scores, cpu.scores, rtol=1e-5)
    big = ShardedIndex(4, n_shards=2).build(rng.standard_normal((4200, 4)).astype(np.float32))
    assert big.search(q[:, :4], 2048).ids.shape == (7, 2048)
    with pytest.raises(ValueError, match="k <= 2048"):  # faiss GPU k-selection limit, per shard
        big.search(q[:, :4], 2049)


def test_gpu_ivf_sets_nprobe_through_the_gpu_parameter_space(monkeypatch):
    x = np.random.default_rng(1).standard_normal((400, 8)).astype(np.float32)
    fake = _FakeGpuFaiss(monkeypatch, n_gpus=1)
    ShardedIndex(8, kind="ivf", n_shards=2, nlist=4, nprobe=3).build(x)
    assert [d for _, d, _ in fake.clones] == [0, 0] and fake.nprobe == [3, 3]


def test_gpu_build_without_a_usable_driver_falls_back_to_cpu(monkeypatch):
    def no_driver():
        raise RuntimeError("CUDA driver version is insufficient")

    _FakeGpuFaiss(monkeypatch, n_gpus=1)
    monkeypatch.setattr(faiss, "get_num_gpus", no_driver)
    assert num_gpus() == 0 and ShardedIndex(8).device == "cpu"
    with pytest.raises(RuntimeError, match="faiss-gpu"):
        ShardedIndex(8, device="gpu")

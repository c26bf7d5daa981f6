"""ShardedIndex: exactness against brute force, merging across shards, approximate recall, persistence."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from distrag.config import IndexConfig
from distrag.retrieval.sharded_index import (
    IndexLoadError,
    ShardedIndex,
    latest_version,
    num_gpus,
    publish,
    set_faiss_threads,
)

# ----------------------------------------------------------------------------------------------
# helpers


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference top-k: descending inner product, ties to the lower id, padded with -1 / -inf."""
    s = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(len(x)), s.shape), -s), axis=1)[:, :k]
    ids = order.astype(np.int64)
    scores = np.take_along_axis(s, order, axis=1).astype(np.float32)
    if k > len(x):
        ids = np.pad(ids, ((0, 0), (0, k - len(x))), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, k - len(x))), constant_values=-np.inf)
    return ids, scores


def int_data(n=203, d=8, nq=40, seed=0):
    """Small-integer vectors: inner products are exact in float32 and ties are everywhere."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-2, 3, (n, d)).astype(np.float32), rng.integers(-2, 3, (nq, d)).astype(np.float32))


def clustered(n, d, n_clusters=50, nq=300, seed=0, spread=0.35):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d)).astype(np.float32)

    def sample(m):
        v = centers[rng.integers(0, n_clusters, m)] + spread * rng.standard_normal((m, d)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return sample(n), sample(nq)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """One faiss thread here: OpenMP barriers on a shared, oversubscribed CI box made PQ training 10x
    slower with 2 threads than with 1. These tests check behaviour, not speed."""
    before = faiss.omp_get_max_threads()
    set_faiss_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def clustered_data():
    return clustered(20_000, 32)


@pytest.fixture(scope="module")
def exact_truth(clustered_data):
    x, q = clustered_data
    return ShardedIndex(32, kind="flat").build(x).search(q, 10).ids


# ----------------------------------------------------------------------------------------------
# exact search


@pytest.mark.parametrize("n_shards", [1, 2, 3, 7])
@pytest.mark.parametrize("k", [1, 5, 40, 203, 210])  # 40 > shard size for 7 shards; 210 > N
def test_flat_equals_brute_force_ids_and_scores(n_shards, k):
    x, q = int_data()
    res = ShardedIndex(8, n_shards=n_shards).build(x).search(q, k)
    ids, scores = brute_force(x, q, k)
    assert res.ids.shape == (len(q), k) and res.ids.dtype == np.int64
    assert res.scores.shape == (len(q), k) and res.scores.dtype == np.float32
    np.testing.assert_array_equal(res.ids, ids)
    np.testing.assert_array_equal(res.scores, scores)


def test_k_larger_than_corpus_pads_with_minus_one_and_minus_inf():
    x, q = int_data(n=10)
    res = ShardedIndex(8, n_shards=3).build(x).search(q, 15, return_vectors=True)
    assert (res.ids[:, 10:] == -1).all() and np.isneginf(res.scores[:, 10:]).all()
    assert (res.vectors[:, 10:] == 0).all()
    assert sorted(res.ids[0, :10].tolist()) == list(range(10))
    assert np.isfinite(res.scores[:, :10]).all()


@pytest.mark.parametrize("n_shards", [1, 2, 4, 5])
def test_exact_ties_go_to_the_lowest_ids_at_any_shard_count(n_shards):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((100, 16)).astype(np.float32) * 0.01
    dup = np.ones(16, dtype=np.float32)
    positions = np.sort(rng.choice(100, size=30, replace=False))  # 30 exact duplicates spread over shards
    x[positions] = dup
    res = ShardedIndex(16, n_shards=n_shards).build(x).search(np.stack([dup, dup]), 5)
    np.testing.assert_array_equal(res.ids, np.stack([positions[:5]] * 2))
    assert (res.scores == 16.0).all()


def test_float_flat_matches_numpy_and_scores_descend():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3000, 48)).astype(np.float32)
    q = rng.standard_normal((64, 48)).astype(np.float32)
    res = ShardedIndex(48, n_shards=4).build(x).search(q, 10)
    ids, scores = brute_force(x, q, 10)
    np.testing.assert_array_equal(res.ids, ids)
    np.testing.assert_allclose(res.scores, scores, rtol=1e-5, atol=1e-4)
    assert (np.diff(res.scores, axis=1) <= 0).all()


def test_return_vectors_and_reconstruct_give_input_rows():
    x, q = int_data()
    for kind in ("flat", "ivf", "ivfpq"):
        index = ShardedIndex(8, kind=kind, n_shards=3, nlist=4, pq_m=4).build(x)
        res = index.search(q, 6, return_vectors=True)
        assert res.vectors.shape == (len(q), 6, 8) and res.vectors.dtype == np.float32
        np.testing.assert_array_equal(res.vectors, x[res.ids])
        ids = np.array([[0, 202, -1], [67, 68, 135]])
        rec = index.reconstruct(ids)
        assert rec.shape == (2, 3, 8)
        np.testing.assert_array_equal(rec[ids >= 0], x[ids[ids >= 0]])
        assert (rec[0, 2] == 0).all()
    with pytest.raises(IndexError, match="out of range"):
        index.reconstruct(np.array([203]))


def test_stored_vectors_do_not_alias_the_callers_array():
    x, q = int_data()
    for kind in ("flat", "ivf"):
        index = ShardedIndex(8, kind=kind, nlist=2).build(x)
        before = index.search(q, 5, return_vectors=True)
        x_mut = x  # the very array passed to build
        x_mut += 100.0
        after = index.search(q, 5, return_vectors=True)
        np.testing.assert_array_equal(before.vectors, after.vectors)
        x_mut -= 100.0


def test_search_does_not_loop_per_query_and_handles_empty_batch():
    x, _ = int_data()
    index = ShardedIndex(8, n_shards=2).build(x)
    res = index.search(np.zeros((0, 8), np.float32), 3, return_vectors=True)
    assert res.ids.shape == (0, 3) and res.vectors.shape == (0, 3, 8)


# ----------------------------------------------------------------------------------------------
# approximate search


def test_ivf_recall_at_10(clustered_data, exact_truth):
    x, q = clustered_data
    index = ShardedIndex(32, kind="ivf", n_shards=2, nlist=64, nprobe=8).build(x)
    res = index.search(q, 10)
    rec = recall_at(res.ids, exact_truth)
    assert rec >= 0.9, f"IVF recall@10 = {rec:.3f}"
    # IVF scores are exact inner products of the returned rows
    np.testing.assert_allclose(res.scores, np.einsum("qd,qkd->qk", q, x[res.ids]), rtol=1e-5, atol=1e-5)
    index.nprobe = 64  # every cell: exact
    assert recall_at(index.search(q, 10).ids, exact_truth) >= 0.999


def test_ivfpq_recall_and_exact_rescoring():
    # PQ training dominates the cost, so a smaller set than the IVF test: 3,000 rows -> 6-bit codebooks
    x, q = clustered(3000, 16, n_clusters=20)
    truth = brute_force(x, q, 10)[0]
    index = ShardedIndex(16, kind="ivfpq", nlist=32, nprobe=8, pq_m=8).build(x)
    assert index.manifest["shards"][0]["pq_nbits"] == 6
    res = index.search(q, 10, return_vectors=True)
    rec = recall_at(res.ids, truth)
    print(f"IVFPQ recall@10 (pq_m=8, 6-bit codes, refine=1): {rec:.3f}")
    assert rec >= 0.5, f"IVFPQ recall@10 = {rec:.3f}"  # measured 0.62
    # candidates are re-scored from the stored float32 vectors: true inner products, descending
    np.testing.assert_allclose(res.scores, np.einsum("qd,qkd->qk", q, x[res.ids]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(res.vectors, x[res.ids])
    assert (np.diff(res.scores, axis=1) <= 0).all()
    index.refine = 4  # 40 PQ candidates per query, best 10 by exact score
    rec4 = recall_at(index.search(q, 10).ids, truth)
    print(f"IVFPQ recall@10 (refine=4): {rec4:.3f}")
    assert rec4 >= 0.9 and rec4 > rec  # measured 0.98


def test_nlist_and_pq_bits_are_capped_on_small_shards():
    x, q = int_data(n=300)
    index = ShardedIndex(8, kind="ivfpq", n_shards=2, nlist=256, pq_m=4).build(x)
    shards = index.manifest["shards"]
    assert [s["nlist"] for s in shards] == [150 // 39] * 2
    assert [s["pq_nbits"] for s in shards] == [1, 1]  # 150 rows < 39 * 4
    assert index.search(q, 3).ids.shape == (len(q), 3)


# ----------------------------------------------------------------------------------------------
# settings and errors


def test_invalid_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"pq_m \(16\) must divide dim \(24\)"):
        ShardedIndex(24, kind="ivfpq", pq_m=16)
    with pytest.raises(ValueError, match="kind must be one of"):
        ShardedIndex(8, kind="hnsw")
    with pytest.raises(ValueError, match="metric must be 'ip'"):
        ShardedIndex(8, metric="l2")
    x, q = int_data(n=3)
    with pytest.raises(ValueError, match="n_shards=4"):
        ShardedIndex(8, n_shards=4).build(x)
    index = ShardedIndex(8).build(x)
    with pytest.raises(ValueError, match=r"shape \[n, 8\]"):
        index.search(np.zeros((2, 7), np.float32), 1)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, 8), np.nan, np.float32), 1)
    with pytest.raises(RuntimeError, match="build"):
        ShardedIndex(8).search(q, 1)


def test_from_config():
    cfg = IndexConfig(kind="ivf", n_shards=3, nlist=7, nprobe=2, pq_m=4, device="cpu")
    index = ShardedIndex.from_config(16, cfg)
    assert (index.dim, index.kind, index.n_shards, index.nprobe, index.device) == (16, "ivf", 3, 2, "cpu")
    assert index.manifest["nlist"] == 7


@pytest.mark.skipif(num_gpus() > 0, reason="needs a machine without GPUs")
def test_device_gpu_without_gpu_is_a_clear_error(monkeypatch, tmp_path):
    with pytest.raises(RuntimeError, match="device='gpu' but faiss sees no GPU"):
        ShardedIndex(8, device="gpu")
    assert ShardedIndex(8, device="auto").device == "cpu"
    x, _ = int_data()
    ShardedIndex(8).build(x).save(tmp_path / "i")
    with pytest.raises(RuntimeError, match="no GPU"):
        ShardedIndex.load(tmp_path / "i", device="gpu")
    monkeypatch.delattr(faiss, "get_num_gpus", raising=False)  # a faiss build without GPU symbols
    assert num_gpus() == 0 and ShardedIndex(8).device == "cpu"


# ----------------------------------------------------------------------------------------------
# persistence


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_save_load_round_trip_gives_identical_results(tmp_path, kind):
    x, q = clustered(2000, 16, nq=50)
    index = ShardedIndex(16, kind=kind, n_shards=2, nlist=16, nprobe=4, pq_m=4).build(x)
    before = index.search(q, 10, return_vectors=True)
    path = index.save(tmp_path / "idx", version=3, extra={"corpus": "abc123", "embedder": "tiny"})
    loaded = ShardedIndex.load(path)
    after = loaded.search(q, 10, return_vectors=True)
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.vectors, after.vectors)
    assert (len(loaded), loaded.dim, loaded.kind, loaded.n_shards, loaded.nprobe) == (2000, 16, kind, 2, 4)
    assert loaded.manifest["version"] == 3 and loaded.manifest["extra"]["corpus"] == "abc123"
    expected = {"manifest.json", "shard_00000.faiss", "shard_00001.faiss"}
    if kind != "flat":
        expected |= {"vectors_00000.npy", "vectors_00001.npy"}
    assert {p.name for p in path.iterdir()} == expected


def test_manifest_contents(tmp_path):
    x, _ = int_data(n=1000)
    index = ShardedIndex(8, kind="ivf", n_shards=3, nlist=10, nprobe=3).build(x)
    path = index.save(tmp_path / "v", version=5, extra={"embedder": "tiny-bert", "corpus_sha": "f00"})
    m = json.loads((path / "manifest.json").read_text())
    assert m == ShardedIndex.read_manifest(path)
    assert {k: m[k] for k in ("version", "dim", "count", "metric", "kind", "n_shards", "nlist", "nprobe",
                              "pq_m")} == {"version": 5, "dim": 8, "count": 1000, "metric": "ip",
                                           "kind": "ivf", "n_shards": 3, "nlist": 10, "nprobe": 3,
                                           "pq_m": 16}
    assert m["extra"] == {"embedder": "tiny-bert", "corpus_sha": "f00"}
    assert [(s["file"], s["vectors"], s["start"], s["stop"], s["nlist"]) for s in m["shards"]] == [
        ("shard_00000.faiss", "vectors_00000.npy", 0, 333, 8),  # 333 // 39 = 8 cells < nlist=10
        ("shard_00001.faiss", "vectors_00001.npy", 333, 666, 8),
        ("shard_00002.faiss", "vectors_00002.npy", 666, 1000, 8),
    ]
    assert all(s["bytes"] == (path / s["file"]).stat().st_size for s in m["shards"])
    assert m["created"].endswith("+00:00") and m["faiss_version"] == faiss.__version__
    with pytest.raises(FileExistsError):
        index.save(path)
    index.save(path, version=6, overwrite=True)
    assert ShardedIndex.read_manifest(path)["version"] == 6


def test_load_at_other_shard_counts_gives_identical_exact_results(tmp_path):
    x, q = int_data(n=500)
    ref = brute_force(x, q, 12)
    one = ShardedIndex(8, n_shards=1).build(x)
    one.save(tmp_path / "s1", extra={"e": 1})
    three = ShardedIndex.load(tmp_path / "s1", n_shards=3)
    assert three.n_shards == 3 and [s["stop"] for s in three.manifest["shards"]] == [166, 333, 500]
    three.save(tmp_path / "s3")
    two = ShardedIndex.load(tmp_path / "s3", n_shards=2)
    assert two.n_shards == 2 and two.manifest["extra"] == {"e": 1}
    for index in (one, three, two, one.reshard(4)):
        res = index.search(q, 12, return_vectors=True)
        np.testing.assert_array_equal(res.ids, ref[0])
        np.testing.assert_array_equal(res.scores, ref[1])
        np.testing.assert_array_equal(res.vectors, x[res.ids])


def test_ivf_reshard_keeps_vectors_and_recall(tmp_path, clustered_data, exact_truth):
    x, q = clustered_data
    index = ShardedIndex(32, kind="ivf", n_shards=1, nlist=64, nprobe=8).build(x)
    index.save(tmp_path / "ivf")
    three = ShardedIndex.load(tmp_path / "ivf", n_shards=3)
    res = three.search(q, 10, return_vectors=True)
    assert recall_at(res.ids, exact_truth) >= 0.9
    np.testing.assert_array_equal(res.vectors, x[res.ids])


def _saved(tmp_path, kind="ivf"):
    x, _ = int_data(n=400)
    return ShardedIndex(8, kind=kind, n_shards=2, nlist=4).build(x).save(tmp_path / "idx")


def test_missing_shard_file_is_a_clear_error(tmp_path):
    path = _saved(tmp_path)
    (path / "shard_00001.faiss").unlink()
    with pytest.raises(IndexLoadError, match=r"shard_00001\.faiss: shard file missing"):
        ShardedIndex.load(path)


def test_corrupted_shard_file_is_a_clear_error(tmp_path):
    path = _saved(tmp_path, kind="flat")
    target = path / "shard_00000.faiss"
    size = target.stat().st_size
    target.write_bytes(b"\x00garbage" * (size // 8) + b"\x00" * (size % 8))  # same size, bad content
    with pytest.raises(IndexLoadError, match=r"shard_00000\.faiss: not a readable faiss index"):
        ShardedIndex.load(path)
    target.write_bytes(b"short")
    with pytest.raises(IndexLoadError, match=r"shard_00000\.faiss: 5 bytes"):
        ShardedIndex.load(path)


def test_missing_or_mismatched_vectors_and_manifest_are_clear_errors(tmp_path):
    path = _saved(tmp_path)
    m = json.loads((path / "manifest.json").read_text())
    good = (path / "vectors_00000.npy").read_bytes()
    np.save(path / "vectors_00000.npy", np.zeros((5, 8), np.float32))
    with pytest.raises(IndexLoadError, match=r"vectors_00000\.npy: \d+ bytes, manifest says"):
        ShardedIndex.load(path)
    del m["shards"][0]["vectors_bytes"]
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexLoadError, match=r"vectors_00000\.npy: shape \[5, 8\]"):
        ShardedIndex.load(path)
    (path / "vectors_00000.npy").unlink()
    with pytest.raises(IndexLoadError, match=r"vectors_00000\.npy: vectors file missing"):
        ShardedIndex.load(path)
    (path / "vectors_00000.npy").write_bytes(good)
    assert len(ShardedIndex.load(path)) == 400
    m["count"] = 401
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexLoadError, match=r"manifest\.json: shards cover 400 rows but count=401"):
        ShardedIndex.load(path)
    m["count"], m["shards"][1]["stop"] = 401, 401
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexLoadError, match=r"shard_00001\.faiss: holds 200 vectors of dim 8, manifest "
                                             r"expects 201"):
        ShardedIndex.load(path)
    (path / "manifest.json").unlink()
    with pytest.raises(IndexLoadError, match=r"manifest\.json: missing"):
        ShardedIndex.load(path)
    with pytest.raises(IndexLoadError, match="no such index directory"):
        ShardedIndex.load(tmp_path / "nope")


def test_failed_save_leaves_nothing_behind(tmp_path):
    x, _ = int_data()
    index = ShardedIndex(8).build(x)
    with pytest.raises(TypeError):
        index.save(tmp_path / "bad", extra={"not json": object()})
    assert list(tmp_path.iterdir()) == []
    assert index.manifest["extra"] == {}


def test_publish_and_latest_version(tmp_path):
    root = tmp_path / "index"
    assert latest_version(root) is None
    x, q = int_data()
    a = ShardedIndex(8).build(x)
    b = ShardedIndex(8).build(x * 2)
    p1 = publish(a, root, 1, extra={"step": 100})
    assert latest_version(root) == p1 == root / "v000001"
    p2 = publish(b, root, 2)
    assert (root / "LATEST").read_text().strip() == "v000002"
    # a save in progress (temporary sibling) and a directory without a manifest are ignored
    (root / ".v000003.abcd.tmp").mkdir()
    (root / ".v000003.abcd.tmp" / "shard_00000.faiss").write_bytes(b"partial")
    (root / "v000004").mkdir()
    assert latest_version(root) == p2
    loaded = ShardedIndex.load(latest_version(root))
    np.testing.assert_array_equal(loaded.search(q, 3).scores, b.search(q, 3).scores)
    assert loaded.manifest["version"] == 2
    with pytest.raises(ValueError, match="versions must increase"):
        publish(a, root, 2)
    # LATEST lags (crash between the version rename and the pointer update): the scan still finds v5
    a.save(root / "v000005", version=5)
    assert latest_version(root) == root / "v000005"

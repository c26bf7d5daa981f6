"""index_store: save / load round trips, the manifest, load errors, resharding on load, published versions."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from _index_test_data import brute_force, clustered, int_data, recall_at

from distrag.errors import IndexLoadError
from distrag.retrieval import index_store
from distrag.retrieval.faiss_backend import num_gpus
from distrag.retrieval.index_store import latest_version
from distrag.retrieval.sharded_index import ShardedIndex

# ----------------------------------------------------------------------------------------------
# one saved index


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_save_load_round_trip_gives_identical_results(tmp_path, kind):
    x, q = clustered(2000, 16, nq=50)
    index = ShardedIndex(16, kind=kind, n_shards=2, nlist=16, nprobe=4, pq_m=4).build(x)
    before = index.search(q, 10, return_vectors=True)
    path = index_store.save(index, tmp_path / "idx", version=3, extra={"corpus": "abc123", "embedder": "tiny"})
    loaded = index_store.load(path)
    after = loaded.search(q, 10, return_vectors=True)
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.vectors, after.vectors)
    assert (len(loaded), loaded.dim, loaded.kind, loaded.n_shards, loaded.nprobe) == (2000, 16, kind, 2, 4)
    assert loaded.version == 3 and loaded.extra["corpus"] == "abc123"
    assert index_store.manifest(loaded)["extra"]["corpus"] == "abc123"
    expected = {"manifest.json", "shard_00000.faiss", "shard_00001.faiss"}
    if kind != "flat":
        expected |= {"vectors_00000.npy", "vectors_00001.npy"}
    assert {p.name for p in path.iterdir()} == expected


def test_manifest_contents(tmp_path):
    x, _ = int_data(n=1000)
    index = ShardedIndex(8, kind="ivf", n_shards=3, nlist=10, nprobe=3).build(x)
    path = index_store.save(index, tmp_path / "v", version=5, extra={"embedder": "tiny-bert", "corpus_sha": "f00"})
    m = json.loads((path / "manifest.json").read_text())
    assert m == index_store.read_manifest(path)
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
        index_store.save(index, path)
    index_store.save(index, path, version=6, overwrite=True)
    assert index_store.read_manifest(path)["version"] == 6


def test_load_at_other_shard_counts_gives_identical_exact_results(tmp_path):
    x, q = int_data(n=500)
    ref = brute_force(x, q, 12)
    one = ShardedIndex(8, n_shards=1).build(x)
    index_store.save(one, tmp_path / "s1", extra={"e": 1})
    three = index_store.load(tmp_path / "s1", n_shards=3)
    assert three.n_shards == 3 and [s["stop"] for s in index_store.manifest(three)["shards"]] == [166, 333, 500]
    index_store.save(three, tmp_path / "s3")
    two = index_store.load(tmp_path / "s3", n_shards=2)
    assert two.n_shards == 2 and two.extra == {"e": 1}
    for index in (one, three, two, one.reshard(4)):
        res = index.search(q, 12, return_vectors=True)
        np.testing.assert_array_equal(res.ids, ref[0])
        np.testing.assert_array_equal(res.scores, ref[1])
        np.testing.assert_array_equal(res.vectors, x[res.ids])


def test_ivf_reshard_keeps_vectors_and_recall(tmp_path, clustered_data, exact_truth):
    x, q = clustered_data
    index = ShardedIndex(32, kind="ivf", n_shards=1, nlist=64, nprobe=8).build(x)
    index_store.save(index, tmp_path / "ivf")
    three = index_store.load(tmp_path / "ivf", n_shards=3)
    res = three.search(q, 10, return_vectors=True)
    assert recall_at(res.ids, exact_truth) >= 0.9
    np.testing.assert_array_equal(res.vectors, x[res.ids])


def _saved(tmp_path, kind="ivf"):
    x, _ = int_data(n=400)
    return index_store.save(ShardedIndex(8, kind=kind, n_shards=2, nlist=4).build(x), tmp_path / "idx")


def test_missing_shard_file_is_a_clear_error(tmp_path):
    path = _saved(tmp_path)
    (path / "shard_00001.faiss").unlink()
    with pytest.raises(IndexLoadError, match=r"shard_00001\.faiss: shard file missing"):
        index_store.load(path)


def test_corrupted_shard_file_is_a_clear_error(tmp_path):
    path = _saved(tmp_path, kind="flat")
    target = path / "shard_00000.faiss"
    size = target.stat().st_size
    target.write_bytes(b"\x00garbage" * (size // 8) + b"\x00" * (size % 8))  # same size, bad content
    with pytest.raises(IndexLoadError, match=r"shard_00000\.faiss: not a readable faiss index"):
        index_store.load(path)
    target.write_bytes(b"short")
    with pytest.raises(IndexLoadError, match=r"shard_00000\.faiss: 5 bytes"):
        index_store.load(path)


def test_missing_or_mismatched_vectors_and_manifest_are_clear_errors(tmp_path):
    path = _saved(tmp_path)
    m = json.loads((path / "manifest.json").read_text())
    good = (path / "vectors_00000.npy").read_bytes()
    np.save(path / "vectors_00000.npy", np.zeros((5, 8), np.float32))
    with pytest.raises(IndexLoadError, match=r"vectors_00000\.npy: \d+ bytes, manifest says"):
        index_store.load(path)
    del m["shards"][0]["vectors_bytes"]
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexLoadError, match=r"vectors_00000\.npy: shape \[5, 8\]"):
        index_store.load(path)
    (path / "vectors_00000.npy").unlink()
    with pytest.raises(IndexLoadError, match=r"vectors_00000\.npy: vectors file missing"):
        index_store.load(path)
    (path / "vectors_00000.npy").write_bytes(good)
    assert len(index_store.load(path)) == 400
    m["count"] = 401
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexLoadError, match=r"manifest\.json: shards cover 400 rows but count=401"):
        index_store.load(path)
    m["count"], m["shards"][1]["stop"] = 401, 401
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexLoadError, match=r"shard_00001\.faiss: holds 200 vectors of dim 8, manifest "
                                             r"expects 201"):
        index_store.load(path)
    (path / "manifest.json").unlink()
    with pytest.raises(IndexLoadError, match=r"manifest\.json: missing"):
        index_store.load(path)
    with pytest.raises(IndexLoadError, match="no such index directory"):
        index_store.load(tmp_path / "nope")


def test_failed_save_leaves_nothing_behind(tmp_path):
    x, _ = int_data()
    index = ShardedIndex(8).build(x)
    with pytest.raises(TypeError):
        index_store.save(index, tmp_path / "bad", extra={"not json": object()})
    assert list(tmp_path.iterdir()) == []
    assert index.extra == {} and index.version == 0


# ----------------------------------------------------------------------------------------------
# published versions


def test_publish_and_latest_version(tmp_path):
    root = tmp_path / "index"
    assert latest_version(root) is None
    x, q = int_data()
    a = ShardedIndex(8).build(x)
    b = ShardedIndex(8).build(x * 2)
    p1 = index_store.publish(a, root, 1, extra={"step": 100})
    assert latest_version(root) == (1, p1) and p1 == root / "v000001"
    p2 = index_store.publish(b, root, 2)
    assert (root / "LATEST").read_text().strip() == "v000002"
    # a save in progress (temporary sibling) and a directory without a manifest are ignored
    (root / ".v000003.abcd.tmp").mkdir()
    (root / ".v000003.abcd.tmp" / "shard_00000.faiss").write_bytes(b"partial")
    (root / "v000004").mkdir()
    assert latest_version(root) == (2, p2)
    loaded = index_store.load(latest_version(root)[1])
    np.testing.assert_array_equal(loaded.search(q, 3).scores, b.search(q, 3).scores)
    assert loaded.version == 2 and index_store.read_manifest(p1)["extra"] == {"step": 100}
    with pytest.raises(ValueError, match="versions must increase"):
        index_store.publish(a, root, 2)
    # LATEST lags (crash between the version rename and the pointer update): the scan still finds v5
    index_store.save(a, root / "v000005", version=5)
    assert latest_version(root) == (5, root / "v000005")


def test_prune_versions_keeps_the_newest_and_the_protected(tmp_path):
    root = tmp_path / "index"
    x, _ = int_data()
    for v in range(1, 8):
        index_store.publish(ShardedIndex(8).build(x), root, v)
    (root / ".v000002.pruned").mkdir()  # left by a pruner that crashed half-way
    assert index_store.prune_versions(root, 3, protect={2, 4}) == [1, 3]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["v000002", "v000004", "v000005", "v000006",
                                                                     "v000007"]
    assert latest_version(root)[0] == 7 and index_store.prune_versions(root, 3, protect={2, 4}) == []
    with pytest.raises(ValueError, match="keep"):
        index_store.prune_versions(root, 0)


@pytest.mark.skipif(num_gpus() > 0, reason="needs a machine without GPUs")
def test_loading_onto_a_missing_gpu_is_a_clear_error(tmp_path):
    x, _ = int_data()
    index_store.save(ShardedIndex(8).build(x), tmp_path / "i")
    with pytest.raises(RuntimeError, match="no GPU"):
        index_store.load(tmp_path / "i", device="gpu")


# ----------------------------------------------------------------------------------------------
# issue 19, item 5: checksums in the manifest (format v2) catch a file rewritten at the same size


def _reversed_rows_same_size(path, entry_file):
    """Rewrite one flat shard with its rows reversed: a valid faiss file of exactly the same size."""
    target = path / entry_file
    shard = faiss.read_index(str(target))
    rows = shard.reconstruct_n(0, shard.ntotal)[::-1].copy()
    flipped = faiss.IndexFlatIP(shard.d)
    flipped.add(rows)
    size = target.stat().st_size
    faiss.write_index(flipped, str(target))
    assert target.stat().st_size == size


def test_a_shard_rewritten_at_the_same_size_is_refused(tmp_path):
    """Before: rows reversed in place passed every size and shape check and were searched (Recall@3 75 -> 0)."""
    path = _saved(tmp_path, kind="flat")
    _reversed_rows_same_size(path, "shard_00001.faiss")
    with pytest.raises(IndexLoadError, match=r"shard_00001\.faiss: does not match its sha256 in the manifest"):
        index_store.load(path)


def test_a_vectors_file_rewritten_at_the_same_size_is_refused(tmp_path):
    path = _saved(tmp_path, kind="ivf")
    target = path / "vectors_00000.npy"
    np.save(target, np.load(target)[::-1].copy())
    with pytest.raises(IndexLoadError, match=r"vectors_00000\.npy: does not match its sha256 in the manifest"):
        index_store.load(path)


def test_an_index_without_checksums_is_refused_even_when_its_manifest_says_version_1(tmp_path):
    """A v1 manifest (no checksums) is refused with what to do: accepting it would let anyone who rewrites a
    shard also downgrade the manifest and skip the check."""
    path = _saved(tmp_path, kind="flat")
    m = json.loads((path / "manifest.json").read_text())
    assert m["format_version"] == 2 and all(len(s["sha256"]) == 64 for s in m["shards"])
    _reversed_rows_same_size(path, "shard_00000.faiss")
    m["format_version"] = 1
    for s in m["shards"]:
        s.pop("sha256")
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexLoadError, match=r"manifest\.json: format v1 has no checksums.*rebuild"):
        index_store.load(path)
    m["format_version"] = 2  # a v2 manifest that lost a checksum
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexLoadError, match=r"shard_00000\.faiss: no sha256 in the manifest"):
        index_store.load(path)


def test_an_untouched_index_is_verified_by_stat_and_a_touched_one_is_hashed(tmp_path, monkeypatch):
    """The writer's hash stands while a file's inode and ctime are the ones it recorded (no hashing on the
    trainers' adoption path); a file whose stat moved (copied, chmod, rewritten) is hashed again."""
    import os
    import shutil

    path = _saved(tmp_path, kind="ivf")
    hashed = []
    real = index_store._sha256
    monkeypatch.setattr(index_store, "_sha256", lambda p: hashed.append(p.name) or real(p))
    assert len(index_store.load(path)) == 400 and hashed == []
    os.chmod(path / "vectors_00001.npy", 0o644)  # metadata only: same bytes, so it verifies
    assert len(index_store.load(path)) == 400 and hashed == ["vectors_00001.npy"]
    copy = shutil.copytree(path, tmp_path / "copy")
    hashed.clear()
    assert len(index_store.load(copy)) == 400 and len(hashed) == 4

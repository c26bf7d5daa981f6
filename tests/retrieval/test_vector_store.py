"""vector_store: rows written in blocks come back from shard files of the asked size, exact search over
the memory-mapped shards equals brute force (ties to the lower row, across shard and block edges), and an
incomplete or damaged store is refused."""

from __future__ import annotations

import numpy as np
import pytest
from _index_test_data import brute_force, int_data

from distrag.errors import IndexLoadError
from distrag.retrieval.sharded_index import ShardedIndex
from distrag.retrieval.vector_store import STORE_MANIFEST, VectorStore, VectorStoreWriter


def _store(root, x, shard_rows, block=7, dtype="float32") -> VectorStore:
    writer = VectorStoreWriter(root, x.shape[1], shard_rows=shard_rows, dtype=dtype)
    for lo in range(0, len(x), block):
        writer.append(x[lo:lo + block])
    return writer.close()


def test_blocks_are_cut_into_shards_of_shard_rows(tmp_path):
    x = np.arange(23 * 3, dtype=np.float32).reshape(23, 3)
    store = _store(tmp_path / "s", x, shard_rows=10)
    assert store.n_shards == 3 and len(store) == 23
    assert [(e["start"], e["stop"]) for e in store.layout] == [(0, 10), (10, 20), (20, 23)]
    assert np.array_equal(np.concatenate([store.shard(s) for s in range(3)]), x)
    assert np.array_equal(np.concatenate([b for s in range(3) for _, b in store.blocks(s, 4)]), x)
    assert [start for _, (start, _) in zip(range(3), store.blocks(1, 4))] == [10, 14, 18]
    assert np.array_equal(store.rows(np.array([[22, -1], [0, 10]])),
                          np.stack([np.stack([x[22], np.zeros(3)]), np.stack([x[0], x[10]])]))
    sample = store.sample(9, seed=1)
    assert len({tuple(r) for r in sample}) == 9 and all((x == r).all(1).any() for r in sample)
    assert len(store.sample(100)) == 23


@pytest.mark.parametrize(("shard_rows", "block_rows"), [(203, 1000), (50, 1000), (50, 16)])
def test_search_over_memmapped_shards_equals_brute_force(tmp_path, shard_rows, block_rows):
    x, q = int_data()  # small integers: ties everywhere, so the tie rule is tested too
    store = _store(tmp_path / "s", x, shard_rows=shard_rows)
    for k in (1, 5, 30):
        res = store.search(q, k, block_rows=block_rows, return_vectors=True)
        ids, scores = brute_force(x, q, k)
        assert np.array_equal(res.ids, ids)
        assert np.array_equal(res.scores, scores)
        assert np.array_equal(res.vectors, x[res.ids])
    flat = ShardedIndex(x.shape[1], kind="flat", n_shards=3, device="cpu").build(x)
    assert np.array_equal(store.search(q, 10, block_rows=block_rows).ids, flat.search(q, 10).ids)


def test_k_beyond_the_rows_pads_and_float16_stores_search_in_float32(tmp_path):
    x, q = int_data(n=12)
    store = _store(tmp_path / "s", x, shard_rows=5, dtype="float16")
    assert store.shard(0).dtype == np.float16
    res = store.search(q, 15)
    ids, scores = brute_force(x, q, 15)
    assert np.array_equal(res.ids, ids) and np.array_equal(res.scores, scores)
    assert (res.ids[:, 12:] == -1).all()


def test_incomplete_or_damaged_stores_are_refused(tmp_path):
    x, _ = int_data(n=20)
    writer = VectorStoreWriter(tmp_path / "s", x.shape[1], shard_rows=8)
    writer.append(x)
    with pytest.raises(IndexLoadError, match="not a complete vector store"):
        VectorStore(tmp_path / "s")  # no store.json until close()
    store = writer.close()
    with pytest.raises(FileExistsError):
        VectorStoreWriter(tmp_path / "s", x.shape[1], shard_rows=8)
    path = store.root / store.layout[1]["file"]
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(IndexLoadError, match="emb_00001"):
        store.shard(1)
    (store.root / STORE_MANIFEST).write_text('{"format": "other"}')
    with pytest.raises(IndexLoadError, match="format"):
        VectorStore(store.root)
    with pytest.raises(ValueError, match="shape"):
        VectorStoreWriter(tmp_path / "t", 3, shard_rows=4).append(np.zeros((2, 4)))


def test_a_flat_index_from_a_store_holds_the_index_and_one_block_not_more(tmp_path):
    # the buffer is sized once and the rows are read with file reads: adding block by block reallocated faiss'
    # buffer (old + new copy at once) and reading through the memory map kept the file's pages resident
    from distrag.config import IndexConfig
    from distrag.costs.memory import PROCESS_MEMORY, rss_bytes
    from distrag.retrieval.vector_store import build_from_store

    x = np.random.default_rng(0).standard_normal((300_000, 32)).astype(np.float32)
    store = _store(tmp_path / "s", x, shard_rows=300_000, block=100_000)
    q = x[:50] + 0.01
    want = ShardedIndex(32, device="cpu").build(x).search(q, 5)
    del x
    before, watch = rss_bytes(), PROCESS_MEMORY.start()
    index = build_from_store(store, IndexConfig(device="cpu"), block_rows=8_192)
    grown = PROCESS_MEMORY.stop(watch).rss - before
    index_bytes = 300_000 * 32 * 4
    assert grown < 1.25 * index_bytes, f"building a {index_bytes}-byte flat index took {grown} bytes more"
    got = index.search(q, 5)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)
    small = _store(tmp_path / "f16", q.astype(np.float16), shard_rows=20, dtype="float16")  # converted per block
    np.testing.assert_array_equal(build_from_store(small, IndexConfig(device="cpu"), block_rows=7).reconstruct(
        np.arange(50)), q.astype(np.float16).astype(np.float32))

"""streaming_index: chunked encoding equals encoding the whole list (and is charged chunk by chunk), IVF
trained on a sample with rows added shard by shard finds what one faiss IVF built in one go finds, and the
on-disk index publishes atomically and loads back; the index rank's on-disk indexer streams a JSONL."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from distrag.config import build_config
from distrag.costs.accountant import Accountant
from distrag.costs.ledger import CostLedger
from distrag.data.corpus_stream import JsonlPassageStream
from distrag.data.large_corpus import write_large_corpus
from distrag.errors import ConfigError
from distrag.models.embedder import Embedder
from distrag.retrieval import index_store
from distrag.retrieval.corpus_encoding import CorpusEncoder
from distrag.retrieval.streaming_index import OnDiskCorpusIndexer, build_from_store, encode_to_store
from distrag.retrieval.vector_store import VectorStoreWriter

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def clustered_store(tmp_path_factory, clustered_data):
    x, _ = clustered_data
    writer = VectorStoreWriter(tmp_path_factory.mktemp("store") / "s", x.shape[1], shard_rows=6_000)
    for lo in range(0, len(x), 2_500):
        writer.append(x[lo:lo + 2_500])
    return writer.close()


def _cfg(**index):
    return build_config({"index": {"device": "cpu", **index}, "tracking": {"enabled": False}}).index


def test_ivf_from_a_sample_added_shard_by_shard_equals_one_faiss_ivf(clustered_store, clustered_data):
    x, q = clustered_data
    cfg = _cfg(kind="ivf", nlist=64, nprobe=4, train_size=4_000)
    index = build_from_store(clustered_store, cfg, seed=3)
    assert index.n_shards == 4 and len(index) == len(x)
    assert {e["nlist"] for e in index.shard_layout()} == {64}
    one = faiss.IndexIVFFlat(faiss.IndexFlatIP(32), 32, 64, faiss.METRIC_INNER_PRODUCT)
    one.train(clustered_store.sample(4_000, seed=3))
    one.add(x)
    one.nprobe = 4
    scores, ids = one.search(q, 10)
    res = index.search(q, 10)
    assert np.array_equal(res.ids, ids)
    assert np.allclose(res.scores, scores, atol=1e-5)


def test_ivfpq_and_flat_from_a_store(clustered_store, clustered_data, exact_truth):
    x, q = clustered_data
    flat = build_from_store(clustered_store, _cfg(kind="flat"))
    assert np.array_equal(flat.search(q, 10).ids, exact_truth)
    assert np.array_equal(flat.search(q, 10).ids, clustered_store.search(q, 10).ids)
    pq = build_from_store(clustered_store, _cfg(kind="ivfpq", nlist=64, nprobe=8, pq_m=8, train_size=10_000))
    assert isinstance(pq.shard_vectors(0), np.memmap)  # the stored rows stay on disk
    pq.refine = 8  # 80 PQ candidates per shard, re-scored exactly from the memory-mapped rows
    res = pq.search(q, 10, return_vectors=True)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res.ids, exact_truth)])
    assert recall > 0.9, recall
    assert np.allclose(res.scores, np.einsum("qkd,qd->qk", res.vectors, q), atol=1e-5)  # exact re-scores
    with pytest.raises(ValueError, match="pq_m"):
        build_from_store(clustered_store, _cfg(kind="ivfpq", pq_m=7))


def test_fast_scan_ivfpq_from_a_store_refines_and_loads_back(clustered_store, clustered_data, exact_truth, tmp_path):
    # index.pq_nbits: 4 -> faiss' IndexIVFPQFastScan in every shard; refine re-scores from the stored rows
    x, q = clustered_data
    cfg = _cfg(kind="ivfpq", nlist=64, nprobe=8, pq_m=16, pq_nbits=4, refine=8, train_size=10_000)
    fast = build_from_store(clustered_store, cfg)
    assert all(isinstance(fast.cpu_shard(s), faiss.IndexIVFPQFastScan) for s in range(fast.n_shards))
    assert {e["pq_nbits"] for e in fast.shard_layout()} == {4} and fast.refine == 8
    res = fast.search(q, 10, return_vectors=True)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res.ids, exact_truth)])
    assert recall > 0.9, recall
    assert np.allclose(res.scores, np.einsum("qkd,qd->qk", res.vectors, q), atol=1e-5)
    loaded = index_store.load(index_store.publish(fast, tmp_path / "v", 1), device="cpu")
    assert loaded.settings() == fast.settings()
    again = loaded.search(q, 10)
    assert np.array_equal(again.ids, res.ids) and np.allclose(again.scores, res.scores)


def test_the_on_disk_index_publishes_atomically_and_loads_back(clustered_store, clustered_data, tmp_path,
                                                               monkeypatch):
    _, q = clustered_data
    index = build_from_store(clustered_store, _cfg(kind="ivf", nlist=32, nprobe=32, train_size=3_000))
    real_write = faiss.write_index
    calls = []

    def failing_write(shard, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real_write(shard, path)

    monkeypatch.setattr(faiss, "write_index", failing_write)
    with pytest.raises(OSError, match="disk full"):
        index_store.publish(index, tmp_path / "versions", 1)
    assert index_store.latest_version(tmp_path / "versions") is None
    assert not any(p.name.startswith("v0") for p in (tmp_path / "versions").iterdir())
    monkeypatch.setattr(faiss, "write_index", real_write)
    path = index_store.publish(index, tmp_path / "versions", 1, extra={"corpus_rows": len(index)})
    loaded = index_store.load(path, device="cpu")
    assert loaded.n_shards == 4 and loaded.extra["corpus_rows"] == 20_000
    a, b = loaded.search(q, 10), index.search(q, 10)
    assert np.array_equal(a.ids, b.ids) and np.allclose(a.scores, b.scores)


@pytest.fixture(scope="module")
def tiny_embedder(tiny_encoder_dir):
    cfg = build_config({"embedder": {"model": str(tiny_encoder_dir), "max_length": 24, "batch_size": 16},
                        "tracking": {"enabled": False}})
    embedder = Embedder.from_config(cfg.embedder, device="cpu")
    embedder.eval()
    return embedder


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    return write_large_corpus(tmp_path_factory.mktemp("corpus") / "c.jsonl", 230, seed=2, median_words=15,
                              n_words=500)


def test_chunked_encoding_equals_the_whole_list_and_charges_each_chunk(tiny_embedder, small_corpus, tmp_path):
    texts = [t for c in JsonlPassageStream(small_corpus).chunks() for t in c.texts()]
    ledger = CostLedger()
    store = encode_to_store(tiny_embedder, JsonlPassageStream(small_corpus, chunk_passages=100).chunks(),
                            tmp_path / "s", shard_rows=64, accountant=Accountant(ledger))
    assert store.n_shards == 4 and len(store) == 230
    whole = CorpusEncoder(tiny_embedder, texts).encode_all()
    assert np.allclose(np.concatenate([store.shard(s) for s in range(4)]), whole, atol=1e-5)
    chunk_cost = [CorpusEncoder(tiny_embedder, texts[i:i + 100]).cost for i in (0, 100, 200)]
    assert ledger.flops("encode_passages") == pytest.approx(sum(c.flops for c in chunk_cost))
    assert ledger.passages == 230 and ledger.tokens == sum(c.tokens for c in chunk_cost)


def test_the_index_rank_indexer_streams_and_replaces_its_store(tiny_embedder, small_corpus, tmp_path,
                                                                monkeypatch):
    cfg = build_config({"data": {"format": "jsonl", "path": str(small_corpus), "corpus_path": str(small_corpus)},
                        "index": {"device": "cpu", "n_shards": 2, "chunk_passages": 100},
                        "tracking": {"enabled": False}})
    indexer = OnDiskCorpusIndexer.from_config(tiny_embedder, cfg, tmp_path / "work")
    assert indexer.extra["corpus_rows"] == 230 and indexer.shard_rows == 115
    counts = [len(a) for a in indexer.shards(tiny_embedder.state_dict())]  # as trainer 0 hands weights over
    assert counts == [100, 100, 30]
    index = indexer.build(np.zeros((230, 0), np.float32))
    assert index.n_shards == 2 and len(index) == 230
    stores = lambda: {p.name for p in (tmp_path / "work").glob("store_*")}  # noqa: E731
    first = stores()
    calls = []
    real = type(tiny_embedder).tokenize_unpadded
    monkeypatch.setattr(type(tiny_embedder), "tokenize_unpadded",
                        lambda self, texts: calls.append(len(texts)) or real(self, texts))
    again = indexer.shards()
    list(again)  # the next version: the corpus' token ids come from the cache, not the tokenizer
    assert calls == [] and len(list((tmp_path / "work" / "tokens").iterdir())) == 3
    assert stores() != first and len(first) == 1
    rows = np.arange(230)
    np.testing.assert_allclose(indexer.build().reconstruct(rows), index.reconstruct(rows), atol=1e-6)
    gen = indexer.shards()
    next(gen)
    gen.close()  # an abandoned version leaves no partial store behind
    assert stores() == set()
    with pytest.raises(RuntimeError, match="no complete store"):
        indexer.build()
    with pytest.raises(ConfigError, match="index.on_disk"):
        OnDiskCorpusIndexer.from_config(tiny_embedder, build_config({"tracking": {"enabled": False}}), tmp_path)


def test_a_pool_member_streams_encodes_and_indexes_its_rows_only(tiny_embedder, small_corpus, tmp_path):
    """Member 1 of 2 (index.on_disk): its rows are the second run of the index's shards, encoded as the whole
    corpus' rows are, in a work folder of its own; member 0's and 1's parts together cover every row."""
    cfg = build_config({"data": {"format": "jsonl", "path": str(small_corpus), "corpus_path": str(small_corpus)},
                        "index": {"device": "cpu", "n_shards": 3, "chunk_passages": 50},
                        "tracking": {"enabled": False}})
    whole = OnDiskCorpusIndexer.from_config(tiny_embedder, cfg, tmp_path / "all")
    list(whole.shards())
    one = OnDiskCorpusIndexer.from_config(tiny_embedder, cfg, tmp_path / "p1", part=(1, 2))
    assert one.part_ranges == [(0, 76), (76, 230)] and one.rows == (76, 230)  # shards 0 | 1, 2 of 3
    assert sum(len(a) for a in one.shards()) == 154
    part = one.build()
    assert part.n_shards == 2 and len(part) == 154
    np.testing.assert_allclose(part.reconstruct(np.arange(154)), whole.build().reconstruct(np.arange(76, 230)),
                               atol=1e-5)

"""corpus_encoding: the length-sorted sharded encoding equals a plain encode, its charge equals the
accountant's, the cache signature tracks exactly what an index depends on, and a cached index is
reused (same vectors, same charge)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from distrag.config import SyntheticConfig, build_config
from distrag.costs.accountant import Accountant
from distrag.costs.ledger import CostLedger
from distrag.data.records import Corpus, Passage
from distrag.data.synthetic import make_synthetic
from distrag.models.embedder import Embedder
from distrag.retrieval import index_store
from distrag.retrieval.corpus_encoding import (
    CorpusEncoder,
    encode_corpus,
    index_cache_dir,
    index_signature,
    load_or_build_index,
    weights_digest,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def world(tiny_encoder_dir):
    cfg = build_config({"embedder": {"model": str(tiny_encoder_dir), "max_length": 24, "batch_size": 8},
                        "index": {"device": "cpu"}, "tracking": {"enabled": False}})
    embedder = Embedder.from_config(cfg.embedder, device="cpu")
    embedder.model.set_attn_implementation("eager")  # attention as matmuls, which FlopCounterMode counts
    embedder.eval()
    corpus = make_synthetic(SyntheticConfig(n_entities=10, n_single_hop=2, n_two_hop=1)).corpus
    return {"cfg": cfg, "embedder": embedder, "corpus": corpus}


def _charged(fn) -> CostLedger:
    ledger = CostLedger()
    fn(Accountant(ledger))
    return ledger


# ----------------------------------------------------------------------------------------------
# one corpus encoding


@pytest.mark.parametrize("n_shards", [1, 3, 100])
def test_sorted_sharded_encoding_equals_a_plain_encode(world, n_shards):
    texts = world["corpus"].texts()
    encoder = CorpusEncoder(world["embedder"], texts, n_shards=n_shards)
    assert sorted(encoder.lengths, reverse=True) == [encoder.lengths[i] for i in encoder.order]  # longest first
    shards = list(encoder.shards())
    # shards are runs of whole encode batches (8 passages), at most n_shards of them
    n_batches = -(-len(texts) // 8)
    assert len(shards) == min(n_shards, n_batches) and sum(len(s) for s in shards) == len(texts)
    assert all(len(s) % 8 == 0 for s in shards[:-1])
    np.testing.assert_allclose(encoder.unsort(np.concatenate(shards)), world["embedder"].encode(texts), atol=1e-5)
    np.testing.assert_allclose(encoder.encode_all(), world["embedder"].encode(texts), atol=1e-5)


def test_handed_off_weights_are_loaded_before_encoding(world):
    embedder = copy.deepcopy(world["embedder"])
    moved = copy.deepcopy(embedder)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05)
    texts = world["corpus"].texts()
    vectors = CorpusEncoder(embedder, texts, n_shards=4).encode_all(moved.state_dict())
    np.testing.assert_allclose(vectors, moved.encode(texts), atol=1e-5)
    assert not np.allclose(vectors, world["embedder"].encode(texts), atol=1e-3)


def test_the_corpus_is_tokenized_once_for_every_encoding_pass(world, monkeypatch):
    # the index rank encodes the same corpus once per version: tokenizing is done at construction only
    embedder = copy.deepcopy(world["embedder"])
    texts = world["corpus"].texts()
    calls = []
    real = embedder.tokenizer.__call__
    monkeypatch.setattr(type(embedder.tokenizer), "__call__",
                        lambda self, *a, **kw: calls.append(len(a[0])) or real(*a, **kw))
    encoder = CorpusEncoder(embedder, texts, n_shards=3)
    assert sum(calls) == len(texts)
    first, second = encoder.encode_all(), encoder.encode_all()
    assert sum(calls) == len(texts)  # no re-tokenizing
    monkeypatch.undo()
    np.testing.assert_allclose(first, world["embedder"].encode(texts), atol=1e-5)
    np.testing.assert_array_equal(first, second)


def test_charged_cost_equals_the_accountants_for_the_same_texts(world):
    embedder, corpus = world["embedder"], world["corpus"]
    texts = corpus.texts() + ["a much longer passage " * 20]  # one truncated at max_length
    want = _charged(lambda acc: acc.encode_texts(embedder, texts, category="encode_passages"))
    encoder = CorpusEncoder(embedder, texts, n_shards=3)
    with FlopCounterMode(display=False) as counter:
        got = _charged(lambda acc: encoder.encode_all(accountant=acc))
    assert got.to_metrics() == want.to_metrics()
    # what the shards really ran (attention as matmuls the counter sees, BERT's unused pooler aside)
    assert encoder.cost.flops == pytest.approx(counter.get_total_flops(), rel=0.02)
    # the same pass whatever the shard count (shards are whole batches)
    assert CorpusEncoder(embedder, texts, n_shards=1).cost == CorpusEncoder(embedder, texts, n_shards=5).cost \
        == encoder.cost
    assert (encoder.cost.flops, encoder.cost.tokens, encoder.cost.passages) == (
        want.flops("encode_passages"), sum(encoder.lengths), len(texts))
    assert max(encoder.lengths) == embedder.max_length
    # encode_corpus: one pass of the corpus, charged once
    via_corpus = _charged(lambda acc: encode_corpus(embedder, corpus, acc))
    assert via_corpus.to_metrics() == _charged(
        lambda acc: acc.encode_texts(embedder, corpus.texts(), category="encode_passages")).to_metrics()
    assert _charged(lambda acc: CorpusEncoder(embedder, []).encode_all(accountant=acc)).total_flops == 0


# ----------------------------------------------------------------------------------------------
# the cache


def test_signature_changes_with_the_corpus_the_embedder_and_the_index_settings_only(world):
    cfg, corpus = world["cfg"], world["corpus"]
    base = index_signature(corpus, cfg.embedder, cfg.index, "w" * 64)

    def sig(corpus=corpus, weights="w" * 64, **over):
        c = build_config({**cfg.model_dump(mode="json"), **over})
        return index_signature(corpus, c.embedder, c.index, weights)

    assert sig() == base
    other_corpus = Corpus([*corpus.passages[:-1], Passage(corpus[-1].id, corpus[-1].title, "changed")])
    changed = [sig(corpus=other_corpus), sig(weights="v" * 64),
               sig(embedder={**cfg.embedder.model_dump(), "model": "other-encoder"}),
               sig(embedder={**cfg.embedder.model_dump(), "max_length": 16}),
               sig(embedder={**cfg.embedder.model_dump(), "pooling": "cls"}),
               sig(index={**cfg.index.model_dump(), "kind": "ivf"}),
               sig(index={**cfg.index.model_dump(), "n_shards": 2}),
               sig(index={**cfg.index.model_dump(), "kind": "ivf", "nlist": 3}),
               sig(index={**cfg.index.model_dump(), "kind": "ivfpq", "pq_m": 4}),
               sig(index={**cfg.index.model_dump(), "kind": "ivfpq", "pq_nbits": 4})]
    assert all(s != base for s in changed) and len({repr(s) for s in changed}) == len(changed)
    same = [sig(embedder={**cfg.embedder.model_dump(), "batch_size": 3}),
            sig(retrieval={"top_k": 9}), sig(train={"strategy": "joint", "lr_embedder": 1e-3}),
            sig(generator={**cfg.generator.model_dump(), "max_new_tokens": 3}), sig(output_dir="elsewhere"),
            # search-time and unrelated index settings: applied to the reused index, never a re-encoding
            sig(index={**cfg.index.model_dump(), "nprobe": 3, "refine": 2, "reembed_after_training": False}),
            sig(index={**cfg.index.model_dump(), "nlist": 3, "pq_m": 4, "train_size": 10})]  # (kind flat)
    assert all(s == base for s in same)
    folder = index_cache_dir("out/index", base)
    assert folder.parent.as_posix() == "out/index" and len(folder.name) == 12 and int(folder.name, 16) >= 0
    assert index_cache_dir("out/index", dict(reversed(base.items()))) == folder  # key order does not matter
    assert index_cache_dir("out/index", changed[0]) != folder


def test_a_cached_index_is_reused_with_the_same_vectors_and_charged_the_same(world, tmp_path):
    cfg, corpus, embedder = world["cfg"], world["corpus"], world["embedder"]
    root = tmp_path / "index"
    built_ledger, reused_ledger = CostLedger(), CostLedger()
    built = load_or_build_index(root, corpus, embedder, cfg, Accountant(built_ledger), show_progress=False)
    folder = index_cache_dir(root, index_signature(corpus, cfg.embedder, cfg.index, weights_digest(embedder)))
    assert [p.name for p in root.iterdir()] == [folder.name]
    assert index_store.read_manifest(folder)["extra"] == {"signature": index_signature(
        corpus, cfg.embedder, cfg.index, weights_digest(embedder))}
    np.testing.assert_allclose(built.reconstruct(np.arange(len(corpus))), embedder.encode(corpus.texts()), atol=1e-5)
    marker = (folder / "manifest.json").stat().st_mtime_ns
    reused = load_or_build_index(root, corpus, embedder, cfg, Accountant(reused_ledger), show_progress=False)
    assert (folder / "manifest.json").stat().st_mtime_ns == marker  # read, not rebuilt
    ids = np.arange(len(corpus))
    np.testing.assert_array_equal(reused.reconstruct(ids), built.reconstruct(ids))
    assert reused_ledger.to_metrics() == built_ledger.to_metrics()
    assert built_ledger.flops("encode_passages") > 0
    # an ivf index reused under a new nprobe searches with the new nprobe (the cache is not rebuilt)
    ivf_cfg = build_config({**cfg.model_dump(mode="json"), "index": {**cfg.index.model_dump(), "kind": "ivf",
                                                                      "nlist": 2, "nprobe": 1}})
    first = load_or_build_index(root, corpus, embedder, ivf_cfg, show_progress=False)
    ivf_folder = index_cache_dir(root, index_signature(corpus, ivf_cfg.embedder, ivf_cfg.index,
                                                       weights_digest(embedder)))
    marker = (ivf_folder / "manifest.json").stat().st_mtime_ns
    wider = build_config({**ivf_cfg.model_dump(mode="json"), "index": {**ivf_cfg.index.model_dump(), "nprobe": 2}})
    again = load_or_build_index(root, corpus, embedder, wider, show_progress=False)
    assert (ivf_folder / "manifest.json").stat().st_mtime_ns == marker and (first.nprobe, again.nprobe) == (1, 2)


def test_an_index_saved_for_another_signature_is_rebuilt_and_no_cache_means_no_files(world, tmp_path):
    cfg, corpus, embedder = world["cfg"], world["corpus"], world["embedder"]
    root = tmp_path / "index"
    folder = index_cache_dir(root, index_signature(corpus, cfg.embedder, cfg.index, weights_digest(embedder)))
    stale = load_or_build_index(None, corpus, embedder, cfg, show_progress=False)
    index_store.save(stale, folder, extra={"signature": {"corpus": "something else"}})
    ledger = CostLedger()
    load_or_build_index(root, corpus, embedder, cfg, Accountant(ledger), show_progress=False)
    assert index_store.read_manifest(folder)["extra"]["signature"]["corpus"] == corpus.fingerprint()
    assert ledger.flops("encode_passages") > 0
    load_or_build_index(None, corpus, embedder, cfg, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


@pytest.mark.parametrize("damage", ["random_bytes", "empty_manifest"])
def test_a_corrupted_cached_index_is_rebuilt_with_a_warning(world, tmp_path, caplog, damage):
    cfg, corpus, embedder = world["cfg"], world["corpus"], world["embedder"]
    root = tmp_path / "index"
    built = load_or_build_index(root, corpus, embedder, cfg, show_progress=False)
    folder = index_cache_dir(root, index_signature(corpus, cfg.embedder, cfg.index, weights_digest(embedder)))
    if damage == "random_bytes":
        shard = next(p for p in folder.iterdir() if p.suffix == ".faiss")
        shard.write_bytes(np.random.default_rng(0).bytes(7))
    else:
        (folder / index_store.MANIFEST).write_text("")
    with caplog.at_level("WARNING", logger="distrag.retrieval.corpus_encoding"):
        rebuilt = load_or_build_index(root, corpus, embedder, cfg, show_progress=False)
    assert "cached index unusable, rebuilding it" in caplog.text
    ids = np.arange(len(corpus))
    np.testing.assert_allclose(rebuilt.reconstruct(ids), built.reconstruct(ids), atol=1e-6)
    index_store.load(folder)  # the cache is whole again


def test_new_weights_under_the_same_model_path_rebuild_the_cache(world, tmp_path):
    """Before: the cache was keyed on ``embedder.model`` (a path), so new weights in the same folder reused the
    old vectors (Recall 25 vs 50 rebuilt, issue 19 item 5); now it is keyed on the weights' content hash."""
    cfg, corpus, embedder = world["cfg"], world["corpus"], world["embedder"]
    root = tmp_path / "index"
    load_or_build_index(root, corpus, embedder, cfg, show_progress=False)
    retrained = copy.deepcopy(embedder)
    with torch.no_grad():
        for p in retrained.model.parameters():
            p.add_(torch.randn_like(p) * 0.05, alpha=1.0)
    assert weights_digest(retrained) != weights_digest(embedder)
    index = load_or_build_index(root, corpus, retrained, cfg, show_progress=False)
    ids = np.arange(len(corpus))
    np.testing.assert_allclose(index.reconstruct(ids), retrained.encode(corpus.texts()), atol=1e-5)
    assert len(list(root.iterdir())) == 2  # one cached index per set of weights
    assert weights_digest(copy.deepcopy(embedder)) == weights_digest(embedder)  # content, not identity


def test_a_cached_index_rewritten_at_the_same_size_is_rebuilt(world, tmp_path, caplog):
    cfg, corpus, embedder = world["cfg"], world["corpus"], world["embedder"]
    root = tmp_path / "index"
    built = load_or_build_index(root, corpus, embedder, cfg, show_progress=False)
    (folder,) = root.iterdir()
    shard = folder / "shard_00000.faiss"
    import faiss

    index = faiss.read_index(str(shard))
    flipped = faiss.IndexFlatIP(index.d)
    flipped.add(index.reconstruct_n(0, index.ntotal)[::-1].copy())
    faiss.write_index(flipped, str(shard))
    with caplog.at_level("WARNING", logger="distrag.retrieval.corpus_encoding"):
        again = load_or_build_index(root, corpus, embedder, cfg, show_progress=False)
    assert "cached index unusable, rebuilding it" in caplog.text and "sha256" in caplog.text
    ids = np.arange(len(corpus))
    np.testing.assert_allclose(again.reconstruct(ids), built.reconstruct(ids), atol=1e-6)

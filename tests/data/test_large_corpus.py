"""large_corpus: the same file for the same seed, Wikipedia-paragraph-like lengths, topic words shared
within a topic, and a file the corpus loader reads."""

from __future__ import annotations

import numpy as np
import pytest

from distrag.data.large_corpus import pseudo_words, word_counts, write_large_corpus
from distrag.data.parsing import load_corpus_jsonl


def test_same_seed_same_file_other_seed_other_file(tmp_path):
    a = write_large_corpus(tmp_path / "a.jsonl", 300, seed=5, n_words=1_000, chunk_passages=64)
    b = write_large_corpus(tmp_path / "b.jsonl", 300, seed=5, n_words=1_000, chunk_passages=64)
    c = write_large_corpus(tmp_path / "c.jsonl", 300, seed=6, n_words=1_000, chunk_passages=64)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))


def test_lengths_follow_the_lognormal_and_are_clipped():
    lengths = word_counts(np.random.default_rng(0), 20_000, median_words=80, sigma=0.6, min_words=10,
                          max_words=300)
    assert abs(np.median(lengths) - 80) <= 4
    assert lengths.min() == 10 and lengths.max() == 300
    assert 85 < lengths.mean() < 105  # a lognormal's mean sits above its median: exp(sigma^2 / 2) ~ 1.2


def test_records_load_as_a_corpus_with_the_asked_lengths(tmp_path):
    path = write_large_corpus(tmp_path / "c.jsonl", 1_000, seed=0, median_words=60, n_topics=10, n_words=2_000)
    corpus = load_corpus_jsonl(path)
    assert [p.id for p in corpus.passages[:3]] == ["p0", "p1", "p2"]
    words = np.array([len(p.text.split()) for p in corpus.passages])
    assert 50 <= np.median(words) <= 70
    assert all(p.text.endswith(".") and p.text[0].isupper() for p in corpus.passages)
    # passages of one topic share its words: the title's first two words are topic words
    by_title = {}
    for p in corpus.passages:
        by_title.setdefault(" ".join(p.title.split()[:2]), []).append(set(p.text.lower().split()))
    assert len(by_title) <= 10
    group = next(g for g in by_title.values() if len(g) > 20)
    shared = set.intersection(*group[:2])
    assert shared


def test_pseudo_words_are_distinct_and_deterministic():
    words = pseudo_words(500, seed=1)
    assert len(set(words)) == 500 and words == pseudo_words(500, seed=1)
    assert all(w.isalpha() and w.islower() for w in words)
    with pytest.raises(ValueError, match="n_passages"):
        write_large_corpus("unused.jsonl", 0)

"""Fixtures of the retrieval tests: one faiss thread, and a clustered data set with its exact top-10."""

from __future__ import annotations

import faiss
import pytest
from _index_test_data import clustered

from distrag.retrieval.faiss_backend import set_faiss_threads
from distrag.retrieval.sharded_index import ShardedIndex


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
    """20,000 unit vectors in 50 clusters (d=32) and 300 queries drawn the same way."""
    return clustered(20_000, 32)


@pytest.fixture(scope="module")
def exact_truth(clustered_data):
    """The exact top-10 ids of ``clustered_data``'s queries."""
    x, q = clustered_data
    return ShardedIndex(32, kind="flat").build(x).search(q, 10).ids

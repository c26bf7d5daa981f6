"""Vectors and reference answers shared by the index tests (test_sharded_index, test_index_store, ...)."""

from __future__ import annotations

import numpy as np


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

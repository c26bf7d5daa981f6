"""The exact top-k merge of per-shard search results (what :meth:`ShardedIndex.search` runs after faiss).

Every shard answers the whole query batch with its own top list: ``scores`` [Q, depth] float32 (``-inf``
in padded slots) and *global* ``ids`` [Q, depth] int64 (``-1`` in padded slots). The merged top-k is
ordered by descending score, then ascending id, so results do not depend on the shard count:

* :func:`widen_boundary_ties` re-searches, deeper, the shards whose last returned score ties the merged
  k-th score (faiss keeps an arbitrary subset of the vectors tied at a shard's cut-off). Shards are first
  searched ``k + 1`` deep, so a shard is re-searched only when its (k+1)-th score ties the k-th: an exact
  tie across the cut-off, not every query (searching exactly ``k`` deep made a one-shard search run faiss
  twice: the shard's k-th score *is* the merged k-th score);
* :func:`merge_topk` sorts the concatenated candidates, keeps ``k`` and pads with ``-1`` / ``-inf``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["ShardSearch", "merge_topk", "widen_boundary_ties"]

ShardSearch = Callable[[int, np.ndarray, int], tuple[np.ndarray, np.ndarray]]
"""``search_shard(s, queries, depth) -> (scores, global ids)``: shard ``s``'s top ``depth`` for ``queries``."""


def widen_boundary_ties(search_shard: ShardSearch, q: np.ndarray, k: int,
                        parts: list[tuple[np.ndarray, np.ndarray]], limits: list[int]) -> None:
    """Make ties at the k-th place resolve to the lowest global ids, whatever the shard count.

    ``parts[s]`` is shard ``s``'s ``(scores, ids)`` for queries ``q``, replaced in place by deeper ones;
    ``limits[s]`` is the deepest search shard ``s`` allows (its row count, capped on GPUs). faiss keeps an
    arbitrary subset of the vectors tied at a shard's cut-off (in practice the higher ids). When a shard's
    last returned score equals the merged k-th score, the shard may hold more vectors with that score than
    it returned, so those queries are searched again on that shard with twice the depth until its last
    score falls below the cut-off or the shard is exhausted. Exact duplicates (e.g. duplicate passages)
    make this happen; continuous embeddings almost never do.
    """
    while True:
        scores = np.concatenate([p[0] for p in parts], axis=1)
        if scores.shape[1] < k:
            return
        kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]
        changed = False
        for s, (d, i) in enumerate(parts):
            depth = d.shape[1]
            limit = limits[s]
            if depth >= limit:
                continue
            amb = (i[:, -1] >= 0) & (d[:, -1] == kth) & np.isfinite(kth)
            if not amb.any():
                continue
            new_depth = min(2 * depth, limit)
            d2, i2 = search_shard(s, q[amb], new_depth)
            dn = np.full((len(q), new_depth), -np.inf, dtype=np.float32)
            dn[:, :depth] = d
            dn[amb] = d2
            ids_new = np.full((len(q), new_depth), -1, dtype=np.int64)
            ids_new[:, :depth] = i
            ids_new[amb] = i2
            parts[s] = (dn, ids_new)
            changed = True
        if not changed:
            return


def merge_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best ``k`` of candidate ``scores`` / ``ids`` [Q, C]: descending score, then ascending id.

    Returns ``(ids, scores, order)``: contiguous [Q, k] int64 ids and float32 scores (padded with ``-1`` /
    ``-inf`` when ``C < k``) and ``order`` [Q, min(k, C)], the candidate columns kept.
    """
    tie = np.where(ids >= 0, ids, np.iinfo(np.int64).max)  # padding ids sort last among equal -inf scores
    order = np.lexsort((tie, -scores), axis=1)[:, :k]
    ids = np.take_along_axis(ids, order, axis=1)
    scores = np.take_along_axis(scores, order, axis=1)
    if ids.shape[1] < k:  # fewer candidates than k in total
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return (np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(scores, dtype=np.float32), order)

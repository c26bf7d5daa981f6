"""topk_merge: the merged order (score, then id), padding, and deeper searches on tied cut-offs."""

from __future__ import annotations

import numpy as np

from distrag.retrieval.topk_merge import merge_topk, widen_boundary_ties


def test_merge_orders_by_score_then_id_and_pads():
    scores = np.array([[3.0, 1.0, 3.0, -np.inf]], np.float32)
    ids = np.array([[7, 2, 4, -1]], np.int64)
    out_ids, out_scores, order = merge_topk(scores, ids, 3)
    assert out_ids.tolist() == [[4, 7, 2]] and out_scores.tolist() == [[3.0, 3.0, 1.0]]
    assert order.tolist() == [[2, 0, 1]]
    out_ids, out_scores, order = merge_topk(scores, ids, 6)
    assert out_ids.tolist() == [[4, 7, 2, -1, -1, -1]] and order.shape == (1, 4)
    assert np.isneginf(out_scores[0, 3:]).all() and out_ids.dtype == np.int64 and out_scores.dtype == np.float32


def test_tied_cut_off_is_searched_deeper_until_the_lowest_ids_are_in():
    # shard 0 holds rows 0..7, all scoring 1.0; shard 1 holds rows 8..9 scoring 1.0 and 0.5.
    shard_scores = [np.ones(8, np.float32), np.array([1.0, 0.5], np.float32)]
    offsets = [0, 8]
    calls = []

    def search_shard(s, q, depth):  # a faiss-like shard that returns the HIGHEST ids among ties
        calls.append((s, depth))
        sc = shard_scores[s]
        order = np.lexsort((-np.arange(len(sc)), -sc))[:depth]
        return (np.tile(sc[order], (len(q), 1)), np.tile(order + offsets[s], (len(q), 1)))

    q = np.zeros((1, 2), np.float32)
    parts = [search_shard(0, q, 2), search_shard(1, q, 2)]
    assert sorted(parts[0][1][0].tolist()) == [6, 7]  # the shard kept the higher tied ids
    widen_boundary_ties(search_shard, q, 2, parts, [8, 2])
    merged = merge_topk(np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1), 2)
    assert merged[0].tolist() == [[0, 1]]
    assert (0, 4) in calls and (0, 8) in calls and all(s == 0 for s, _ in calls[2:])

"""Exact top-k search: distrag's sharded faiss index vs brute-force torch (matmul + topk), same data.

For each corpus size N (default 100k and 1M vectors x 384 dims, L2-normalised, 1024 queries, k=10):

* torch: ``torch.topk(Q @ X.T, k)`` with the queries cut into chunks so the score block stays under
  ``--torch-block-gib`` (1M x 1024 float32 scores would be 4 GiB);
* faiss: ``ShardedIndex(kind="flat", n_shards=S)`` for each S in ``--shards`` (default 1 and 2);
* raw faiss: one ``faiss.IndexFlatIP`` over the same vectors, searched directly: the peer of the wrapper.
  ``wrapper / raw`` (ShardedIndex search time over raw faiss time, the two timed in alternation in the same
  run) is the wrapper's overhead
  (goal <= 1.10; it was 2x before the top-k merge stopped re-searching every query's k-th tie).

Prints search time (median of ``--repeats``), queries/s, the ratio torch_time / faiss_time, and whether
both return the same ids (exactly, and up to float ties: a differing id must have a score within 1e-5 of
the other side's at that rank). Corpus + one flat index peak at about 2 x N x d x 4 bytes (3 GiB at 1M).

    .venv/bin/python benchmarks/bench_search.py             # 100k and 1M (about 6 min on 2 busy cores)
    .venv/bin/python benchmarks/bench_search.py --quick     # 100k, 256 queries, 2 repeats
    .venv/bin/python benchmarks/bench_search.py --sizes 200000 --queries 4096 --shards 1 2 4 --ivf

``--ivf`` adds an approximate IVF row per size (nlist = 4 sqrt(N), nprobe 32) with its recall@k. It is a
speed reference only: the synthetic vectors are isotropic Gaussians with no cluster structure, so IVF recall
is low (0.13-0.21 measured), and training 4,000 cells on 1M x 384 takes about 10 minutes on 2 loaded cores.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distrag.retrieval.faiss_backend import set_faiss_threads
from distrag.retrieval.sharded_index import ShardedIndex


def normalised(rng: np.random.Generator, n: int, d: int, chunk: int = 1 << 17) -> np.ndarray:
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - s), d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[s:s + len(block)] = block
    return x


def make_queries(rng: np.random.Generator, x: np.ndarray, nq: int, noise: float = 1.0) -> np.ndarray:
    """Noisy copies of random corpus rows (a query lies near its passage), L2-normalised."""
    q = x[rng.integers(0, len(x), nq)] + noise * rng.standard_normal((nq, x.shape[1]), dtype=np.float32) \
        / np.sqrt(x.shape[1])
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def torch_topk(xt: torch.Tensor, qt: torch.Tensor, k: int, block_gib: float) -> tuple[np.ndarray, np.ndarray]:
    rows = max(1, int(block_gib * 2**30 // (4 * xt.shape[0])))
    scores, ids = [], []
    with torch.inference_mode():
        for s in range(0, len(qt), rows):
            v, i = torch.topk(qt[s:s + rows] @ xt.T, k, dim=1)
            scores.append(v)
            ids.append(i)
    return torch.cat(scores).numpy(), torch.cat(ids).numpy()


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def timed_pair(fn_a, fn_b, repeats: int):
    """Median times of ``fn_a`` and ``fn_b`` run alternately (load drift hits both) and ``fn_a``'s output."""
    times_a, times_b, out = [], [], None
    for i in range(repeats):
        order = ((fn_a, times_a), (fn_b, times_b)) if i % 2 == 0 else ((fn_b, times_b), (fn_a, times_a))
        for fn, times in order:
            t0 = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t0)
            if fn is fn_a:
                out = result
    return statistics.median(times_a), statistics.median(times_b), out


def agreement(ids_a, scores_a, ids_b, scores_b, tol: float = 1e-5) -> tuple[float, bool]:
    same = ids_a == ids_b
    return float(same.mean()), bool(np.all(same | (np.abs(scores_a - scores_b) <= tol)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="corpus sizes N")
    ap.add_argument("--queries", type=int, default=1024, help="queries per search batch")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2], help="faiss shard counts to time")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    ap.add_argument("--threads", type=int, default=None,
                    help="faiss and torch threads (default: OMP_NUM_THREADS, else usable CPUs)")
    ap.add_argument("--torch-block-gib", type=float, default=1.0, help="max torch score block size")
    ap.add_argument("--ivf", action="store_true",
                    help="also time an approximate IVF index (slow to train at 1M; low recall on this random data)")
    ap.add_argument("--quick", action="store_true", help="100k vectors, 256 queries, 2 repeats")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.queries, args.repeats = [100_000], 256, 2

    threads = set_faiss_threads(args.threads)
    torch.set_num_threads(threads)
    console = Console(width=max(Console().width, 130))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    console.print(f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads, BLAS database block "
                  f"{faiss.cvar.distance_compute_blas_database_bs}, BLAS from n_queries x d >= "
                  f"{faiss.cvar.distance_compute_blas_threshold}) | torch {torch.__version__} "
                  f"({torch.get_num_threads()} threads) | {os.cpu_count()} CPUs, load average {load:.1f} | "
                  f"{args.queries} queries x {args.dim} dims, k={args.k}, median of {args.repeats}")

    table = Table(title="Exact top-k search: faiss ShardedIndex vs torch matmul + topk")
    for col in ("N", "method", "build s", "search s", "queries/s", "torch / faiss", "wrapper / raw", "same ids",
                "same up to ties"):
        table.add_column(col, justify="right")
    ratios = []
    overheads = []
    ok = True
    rng = np.random.default_rng(args.seed)
    for n in args.sizes:
        x = normalised(rng, n, args.dim)
        q = make_queries(rng, x, args.queries)
        xt, qt = torch.from_numpy(x), torch.from_numpy(q)
        torch_topk(xt, qt, args.k, args.torch_block_gib)  # warm-up (same shapes as timed)
        t_torch, (ts, ti) = timed(functools.partial(torch_topk, xt, qt, args.k, args.torch_block_gib),
                                  args.repeats)
        console.print(f"  N={n:,} torch matmul+topk: {t_torch:.3f} s")
        table.add_row(f"{n:,}", "torch matmul+topk", "-", f"{t_torch:.3f}", f"{args.queries / t_torch:,.0f}",
                      "1.00", "-", "-", "-")
        raw = faiss.IndexFlatIP(args.dim)
        raw.add(x)
        raw.search(q, args.k)  # warm-up
        t_raw, (rs, ri) = timed(functools.partial(raw.search, q, args.k), args.repeats)
        frac, _ = agreement(ri, rs, ti, ts)
        console.print(f"  N={n:,} raw faiss IndexFlatIP: {t_raw:.3f} s")
        table.add_row(f"{n:,}", "raw faiss IndexFlatIP", "-", f"{t_raw:.3f}", f"{args.queries / t_raw:,.0f}",
                      f"{t_torch / t_raw:.2f}", "1.00", f"{frac:.4f}", "-")
        for s in args.shards:
            t0 = time.perf_counter()
            index = ShardedIndex(args.dim, kind="flat", n_shards=s, device="cpu").build(x)
            t_build = time.perf_counter() - t0
            index.search(q, args.k)  # warm-up (same shapes as timed)
            t_faiss, t_raw_s, res = timed_pair(functools.partial(index.search, q, args.k),
                                               functools.partial(raw.search, q, args.k), args.repeats)
            frac, tie_ok = agreement(res.ids, res.scores, ti, ts)
            ok &= tie_ok
            ratios.append((n, s, t_torch / t_faiss))
            if s == 1:
                overheads.append(t_faiss / t_raw_s)
            console.print(f"  N={n:,} faiss flat x{s}: {t_faiss:.3f} s (torch/faiss {t_torch / t_faiss:.2f}, "
                          f"wrapper/raw {t_faiss / t_raw_s:.2f}: raw {t_raw_s:.3f} s in alternation)")
            table.add_row(f"{n:,}", f"ShardedIndex flat, {s} shard{'s' if s > 1 else ''}", f"{t_build:.2f}",
                          f"{t_faiss:.3f}", f"{args.queries / t_faiss:,.0f}", f"{t_torch / t_faiss:.2f}",
                          f"{t_faiss / t_raw_s:.2f}", f"{frac:.4f}", "yes" if tie_ok else "NO")
            del index
            gc.collect()
        del raw
        if args.ivf:
            nlist = int(4 * np.sqrt(n))
            t0 = time.perf_counter()
            index = ShardedIndex(args.dim, kind="ivf", nlist=nlist, nprobe=32, device="cpu").build(x)
            t_build = time.perf_counter() - t0
            t_ivf, res = timed(functools.partial(index.search, q, args.k), args.repeats)
            recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(res.ids, ti)])
            table.add_row(f"{n:,}", f"faiss ivf (nlist {nlist}, nprobe 32)", f"{t_build:.2f}", f"{t_ivf:.3f}",
                          f"{args.queries / t_ivf:,.0f}", f"{t_torch / t_ivf:.2f}", "-", f"recall {recall:.3f}",
                          "(approx.)")
            del index
        del x, xt, q, qt
        gc.collect()
    console.print(table)
    best = max(r for _, _, r in ratios)
    console.print(f"goal torch/faiss >= 5x on exact search: {'met' if best >= 5 else 'NOT met'} "
                  f"(best {best:.2f}x); ids agree up to float ties: {'yes' if ok else 'NO'}")
    if overheads:
        worst = max(overheads)
        console.print(f"goal ShardedIndex (1 shard) within 10 % of raw faiss: {'met' if worst <= 1.10 else 'NOT met'} "
                      f"(wrapper / raw {', '.join(f'{r:.3f}' for r in overheads)})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

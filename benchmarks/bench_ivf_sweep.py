"""Which faiss index reaches recall@10 >= 0.95 of flat, and how fast: a sweep on stored real embeddings.

Reads a vector store written by ``bench_scale.py --keep-store DIR`` (or by
``distrag.retrieval.streaming_index.encode_to_store``) and the corpus JSONL it was encoded from, encodes
``--queries`` queries (the first 12 words of random passages) with the same embedder, and for each faiss
factory string (``--specs``) and nprobe prints queries/s, speed over exact search (``IndexFlatIP``, timed in
the same run) and recall@10 against it. Raw faiss, no distrag wrapper: this chooses settings; ``bench_search.py``
measures the wrapper's overhead (within 10 %). Two more rows go through distrag's own index
(``build_from_store``, as the index rank builds it): ``ivf`` and ``ivfpq`` with ``pq_nbits: 4`` (fast scan),
``pq_m`` = dim / 2 and ``refine`` = ``--k-factor``.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_scale.py --no-tiny --keep-store /tmp/minilm_store
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_ivf_sweep.py \\
        --store /tmp/minilm_store/store_corpus_docstrings_50000_0 \\
        --corpus /tmp/distrag_bench_scale/corpus_docstrings_50000_0.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import faiss
import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import load_avg
from distrag.retrieval.faiss_backend import set_faiss_threads
from distrag.retrieval.vector_store import VectorStore

SPECS = ["IVF224,Flat", "IVF448,Flat", "IVF894,Flat", "IVF1800,Flat", "IVF448,SQ8", "IVF448,PQ96x4fs,RFlat",
         "IVF448,PQ192x4fs,RFlat", "IVF894,PQ96x4fs,RFlat"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True, help="vector store folder")
    ap.add_argument("--corpus", required=True, help="the corpus JSONL the store was encoded from")
    ap.add_argument("--embedder", default="all-MiniLM-L6-v2")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--specs", nargs="+", default=SPECS, help="faiss index_factory strings")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--k-factor", type=int, default=4, help="RFlat: candidates re-scored exactly = k-factor x k")
    ap.add_argument("--repeats", type=int, default=3, help="best of")
    ap.add_argument("--distrag-nlist", type=int, default=448, help="nlist of the rows through distrag's index")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from distrag.config import EmbedderConfig, IndexConfig
    from distrag.models.embedder import Embedder
    from distrag.retrieval.streaming_index import build_from_store

    threads = set_faiss_threads(None)
    console = Console(width=max(Console().width, 120))
    store = VectorStore(args.store)
    x = np.ascontiguousarray(np.concatenate([store.shard(s) for s in range(store.n_shards)]), dtype=np.float32)
    with open(args.corpus, encoding="utf-8") as f:
        lines = f.readlines()
    if len(lines) != len(x):
        raise SystemExit(f"error: {args.corpus} has {len(lines)} passages, the store {len(x)} vectors")
    rows = np.random.default_rng(args.seed).choice(len(lines), min(args.queries, len(lines)), replace=False)
    embedder = Embedder.from_config(EmbedderConfig(model=args.embedder, max_length=args.max_length), device="cpu")
    q = embedder.encode([" ".join(json.loads(lines[r])["text"].split()[:12]) for r in rows])
    k = args.k

    def timed(search):
        """Best of ``--repeats`` seconds of ``search()`` (which returns the ids), and the ids."""
        best, ids = float("inf"), None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ids = search()
            best = min(best, time.perf_counter() - t0)
        return best, ids

    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    t_flat, truth = timed(lambda: flat.search(q, k)[1])
    console.print(f"{len(x):,} vectors d={x.shape[1]}, {len(q)} queries, faiss threads {threads}, load {load_avg()}; "
                  f"flat {len(q) / t_flat:,.0f} queries/s")
    table = Table(title=f"recall@{k} vs flat and speed vs flat ({len(x):,} x {x.shape[1]}, load {load_avg()})")
    for col in ("index", "build s", "nprobe", "queries/s", "speed vs flat", f"recall@{k}"):
        table.add_column(col, justify="right")
    best = None
    for spec in args.specs:
        index = faiss.index_factory(x.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        index.train(x)
        index.add(x)
        t_build = time.perf_counter() - t0
        ivf = faiss.extract_index_ivf(index)
        if isinstance(index, faiss.IndexRefine):
            index.k_factor = args.k_factor
        for nprobe in args.nprobe:
            ivf.nprobe = nprobe
            t, ids = timed(lambda: index.search(q, k)[1])  # noqa: B023 (called at once)
            rec = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, truth)]))
            speed = t_flat / t
            table.add_row(spec, f"{t_build:.1f}" if nprobe == args.nprobe[0] else "", str(nprobe),
                          f"{len(q) / t:,.0f}", f"{speed:.2f}", f"{rec:.3f}")
            if rec >= 0.95 and (best is None or speed > best[2]):
                best = (spec, nprobe, speed, rec)
    # the same kinds through distrag's own index (build_from_store: the index rank's on-disk path)
    for kind, extra in (("ivf", {}), ("ivfpq", {"pq_m": x.shape[1] // 2, "pq_nbits": 4, "refine": args.k_factor})):
        cfg = IndexConfig(kind=kind, nlist=args.distrag_nlist, device="cpu", train_size=len(x), **extra)
        t0 = time.perf_counter()
        index = build_from_store(store, cfg)
        t_build = time.perf_counter() - t0
        name = f"distrag {kind} nlist {args.distrag_nlist}" + (
            f" pq_m {extra['pq_m']} fast-scan refine {args.k_factor}" if extra else "")
        for nprobe in args.nprobe:
            index.nprobe = nprobe
            best_t, ids = timed(lambda: index.search(q, k).ids)  # noqa: B023 (called at once)
            rec = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, truth)]))
            table.add_row(name, f"{t_build:.1f}" if nprobe == args.nprobe[0] else "", str(nprobe),
                          f"{len(q) / best_t:,.0f}", f"{t_flat / best_t:.2f}", f"{rec:.3f}")
    console.print(table)
    console.print("fastest setting with recall >= 0.95: " + (f"{best[0]} nprobe {best[1]}: {best[2]:.1f}x flat, "
                                                             f"recall {best[3]:.3f}" if best else "none"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A corpus at scale through the index rank's on-disk path: stream, encode to disk, build, search.

Two runs, each end to end on this machine, with ``index.on_disk``'s code (``data/corpus_stream.py``,
``retrieval/vector_store.py``, ``retrieval/streaming_index.py``):

1. mechanics at 1M passages (``--passages``) with a small random BERT (``--hidden`` 64, 2 layers,
   ``--max-length`` 64): a synthetic corpus JSONL (``data/large_corpus.py``: lognormal lengths, median 70
   words, topic words) streamed in chunks of ``--chunk`` passages and encoded to a vector store on disk;
2. the same path with all-MiniLM-L6-v2 (offline) on as many passages as fit ``--minilm-budget-s`` of
   encoding (the rate is measured on a subsample first; at most ``--minilm-passages``): IVF / IVF-PQ judged
   on real embeddings, which have the cluster structure random vectors lack. ``--minilm-text docstrings``
   (default; ``--quick`` uses ``words``): real English, the prose paragraphs of the installed packages' docstrings
   (``benchmarks/_real_text.py``, ~90k available); ``words``: the synthetic generator over MiniLM's
   vocabulary (topic-structured word salad).

For each: passages/s encoded, seconds to build each index (flat, IVF trained on ``--train-size`` sampled
rows, IVF-PQ), peak RSS of each phase (the kernel's high-water mark, reset per phase; next to the corpus
and store sizes on disk), search queries/s for ``--queries`` queries (the first 12 words of random passages)
with flat (in memory), flat searched block by block from the memory-mapped store, IVF at several nprobe and
IVF-PQ (with exact re-scoring of ``refine`` x k candidates), and IVF recall@10 against flat, with speed-up over
flat.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_scale.py            # 1M tiny + MiniLM 50k (~35 min)
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_scale.py --quick    # 20k tiny + 300 MiniLM, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import load_avg
from benchmarks._real_text import write_docstring_corpus
from distrag.config import EmbedderConfig, IndexConfig
from distrag.costs.memory import PROCESS_MEMORY, rss_bytes
from distrag.data.corpus_stream import JsonlPassageStream, PassageLookup, write_offsets
from distrag.data.large_corpus import write_large_corpus
from distrag.models.embedder import Embedder
from distrag.retrieval.faiss_backend import set_faiss_threads
from distrag.retrieval.streaming_index import build_from_store, encode_to_store

MB = 1 << 20


class PhasePeaks:
    """Peak resident memory of each phase: the kernel's high-water mark, reset per phase
    (``distrag.costs.memory.PROCESS_MEMORY``, what the run ledger's ``cost/phase.<p>.peak_rss_gb`` reads)."""

    def __init__(self):
        self.rows: list[tuple[str, float, float, float]] = []

    def run(self, name: str, fn):
        """``fn()``, recording (name, seconds, RSS before, peak RSS during) in MiB."""
        start = rss_bytes()
        watch = PROCESS_MEMORY.start()
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        peak = PROCESS_MEMORY.stop(watch).rss
        self.rows.append((name, seconds, start / MB, peak / MB))
        print(f"  [{name}] {seconds:.1f} s, RSS {start / MB:,.0f} MiB before, peak {peak / MB:,.0f} MiB", flush=True)
        return out, seconds


def corpus_file(work: Path, n: int, seed: int, words: list[str] | None, tag: str) -> Path:
    """The synthetic corpus, reused across runs with the same arguments (generation is ~1.5 min per 1M)."""
    path = work / f"corpus_{tag}_{n}_{seed}.jsonl"
    if not path.exists():
        t0 = time.perf_counter()
        write_large_corpus(path, n, seed=seed, words=words)
        print(f"  wrote {n:,} passages to {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def query_texts(path: Path, offsets: Path, n: int, seed: int) -> list[str]:
    """The first 12 words of ``n`` random passages (a question-sized probe near its passage)."""
    with PassageLookup(path, offsets) as lookup:
        rows = np.random.default_rng(seed).choice(len(lookup), size=min(n, len(lookup)), replace=False)
        return [" ".join(p.text.split()[:12]) for p in lookup.get(rows)]


def timed_search(search, q: np.ndarray, k: int, repeats: int):
    best, res = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = search(q, k)
        best = min(best, time.perf_counter() - t0)
    return best, res


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(ids, truth)]))


def run_scale(label: str, embedder: Embedder, path: Path, work: Path, args, peaks: PhasePeaks,
              console: Console) -> list[tuple]:
    """Encode ``path`` to a store, build flat / IVF / IVF-PQ, search; returns the table rows."""
    n_rows = len(JsonlPassageStream(path).offsets())
    offsets = write_offsets(JsonlPassageStream(path), work / f"{path.stem}.offsets.npy")
    store_dir = work / f"store_{path.stem}"
    shutil.rmtree(store_dir, ignore_errors=True)
    chunks = JsonlPassageStream(path, chunk_passages=args.chunk).chunks()
    shard_rows = -(-n_rows // args.shards)
    store, t_enc = peaks.run(f"{label}: encode to disk", lambda: encode_to_store(
        embedder, chunks, store_dir, shard_rows=shard_rows, total=n_rows, show_progress=True))
    disk = sum(f.stat().st_size for f in store_dir.iterdir()) / MB
    console.print(f"  {label}: {n_rows:,} passages encoded in {t_enc:.1f} s ({n_rows / t_enc:,.0f} passages/s); "
                  f"corpus {path.stat().st_size / MB:,.0f} MiB, store {disk:,.0f} MiB on disk")
    q = embedder.encode(query_texts(path, offsets, args.queries, args.seed))
    k, rows = args.k, []
    nlist = max(1, min(args.nlist or int(4 * np.sqrt(n_rows)), args.train_size // 39))

    flat, t_build = peaks.run(f"{label}: build flat", lambda: build_from_store(store, IndexConfig(device="cpu")))
    t_flat, truth = timed_search(flat.search, q, k, args.repeats)
    rows.append((label, "flat (in memory)", f"{t_build:.1f}", f"{len(q) / t_flat:,.0f}", "1.00", "1.000"))
    del flat
    (t_mm, res_mm), _ = peaks.run(f"{label}: search flat from memmap",
                                  lambda: timed_search(store.search, q, k, 1))
    rows.append((label, "flat (memmap, block by block)", "-", f"{len(q) / t_mm:,.0f}", f"{t_flat / t_mm:.2f}",
                 f"{recall(res_mm.ids, truth.ids):.3f}"))
    for kind, settings in (("ivf", {}), ("ivfpq", {"pq_m": args.pq_m})):
        cfg = IndexConfig(kind=kind, nlist=nlist, device="cpu", train_size=args.train_size, **settings)
        index, t_build = peaks.run(f"{label}: build {kind} (nlist {nlist})", lambda: build_from_store(store, cfg))
        if kind == "ivfpq":
            index.refine = args.refine
        for nprobe in args.nprobe:
            index.nprobe = nprobe
            t, res = timed_search(index.search, q, k, args.repeats)
            r = recall(res.ids, truth.ids)
            name = f"{kind} nlist {nlist} nprobe {nprobe}" + (f" pq_m {args.pq_m} refine {args.refine}"
                                                              if kind == "ivfpq" else "")
            rows.append((label, name, f"{t_build:.1f}" if nprobe == args.nprobe[0] else "", f"{len(q) / t:,.0f}",
                         f"{t_flat / t:.2f}", f"{r:.3f}"))
            console.print(f"  {label}: {name}: {len(q) / t:,.0f} q/s, {t_flat / t:.1f}x flat, recall@{k} {r:.3f}")
        del index
    rows.append((label, f"(encode: {n_rows / t_enc:,.0f} passages/s)", "-", "-", "-", "-"))
    if args.keep_store:  # for bench_ivf_sweep.py
        keep = Path(args.keep_store) / store_dir.name
        shutil.rmtree(keep, ignore_errors=True)
        shutil.move(str(store_dir), keep)
        console.print(f"  kept the vector store at {keep} (corpus {path})")
    shutil.rmtree(store_dir, ignore_errors=True)
    return rows


def docstring_corpus(work: Path, seed: int) -> Path:
    """All docstring paragraphs, shuffled, as one JSONL (cached in ``work``: finding them takes minutes)."""
    path = work / f"corpus_docstrings_all_{seed}.jsonl"
    if not path.exists():
        t0 = time.perf_counter()
        n = write_docstring_corpus(path, 10**9, seed=seed)
        print(f"  wrote {n:,} docstring paragraphs to {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def minilm_corpus(embedder: Embedder, work: Path, args, console: Console) -> Path:
    """The MiniLM corpus: as many passages as MiniLM encodes within ``--minilm-budget-s`` at the rate measured
    on ``--minilm-probe`` other passages (at most ``--minilm-passages``)."""
    if args.minilm_text == "docstrings":
        full = docstring_corpus(work, args.seed)
        with open(full, encoding="utf-8") as f:
            lines = f.readlines()
        texts = [json.loads(line)["text"] for line in lines[-args.minilm_probe:]]  # the probe: the file's tail
        available = len(lines) - args.minilm_probe
    else:
        words = sorted(w for w in embedder.tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) >= 3)
        probe = corpus_file(work, args.minilm_probe, args.seed + 1, words, "minilm_probe")
        texts = [t for c in JsonlPassageStream(probe) for t in c.texts()]
        available = args.minilm_passages
    embedder.encode(texts[:32])  # warm-up
    t0 = time.perf_counter()
    embedder.encode(texts)
    rate = len(texts) / (time.perf_counter() - t0)
    n = max(200, int(min(args.minilm_passages, available, rate * args.minilm_budget_s)))
    console.print(f"  MiniLM: {rate:.1f} passages/s on a {len(texts)}-passage probe (load {load_avg()}) -> "
                  f"{n:,} {args.minilm_text} passages fit {args.minilm_budget_s:.0f} s (asked for "
                  f"{args.minilm_passages:,}, {available:,} available)")
    if args.minilm_text != "docstrings":
        return corpus_file(work, n, args.seed, words, "minilm")
    path = work / f"corpus_docstrings_{n}_{args.seed}.jsonl"
    path.write_text("".join(lines[:n]), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passages", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=50_000, help="passages read and encoded per chunk")
    ap.add_argument("--shards", type=int, default=4, help="index shards (store shard files)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nlist", type=int, default=None, help="IVF cells (default 4 sqrt(N), capped at train/39)")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--train-size", type=int, default=200_000)
    ap.add_argument("--pq-m", type=int, default=16)
    ap.add_argument("--refine", type=int, default=8, help="ivfpq: candidates re-scored exactly = refine x k")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--minilm-passages", type=int, default=50_000)
    ap.add_argument("--minilm-budget-s", type=float, default=1200.0, help="encoding time allowed for MiniLM")
    ap.add_argument("--minilm-probe", type=int, default=512, help="passages the MiniLM rate is measured on")
    ap.add_argument("--minilm-text", choices=("docstrings", "words"), default=None,
                    help="MiniLM corpus: real docstring prose (default; finding it takes minutes the first time), "
                         "or synthetic text over MiniLM's vocabulary (the --quick default)")
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--no-tiny", action="store_true", help="only the MiniLM run")
    ap.add_argument("--keep-store", default=None, help="keep each vector store under this folder (for "
                    "bench_ivf_sweep.py)")
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "distrag_bench_scale"))
    ap.add_argument("--quick", action="store_true", help="20k tiny passages, MiniLM on 300")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.passages, args.chunk, args.queries, args.train_size, args.repeats = 20_000, 5_000, 200, 20_000, 1
        args.minilm_passages, args.minilm_probe, args.nprobe = 300, 64, [8, 32]
    args.minilm_text = args.minilm_text or ("words" if args.quick else "docstrings")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    threads = set_faiss_threads(None)
    console = Console(width=max(Console().width, 130))
    peaks = PhasePeaks()
    console.print(f"{os.cpu_count()} CPUs, faiss threads {threads}, load {load_avg()}; work dir {work}")

    from distrag.models.tiny import make_tiny_encoder

    rows, path = [], None
    if not args.no_tiny:
        path = corpus_file(work, args.passages, args.seed, None, "tiny")
        tiny_dir = work / f"tiny_bert_h{args.hidden}"
        if not (tiny_dir / "config.json").exists():
            sample = [t for _, t in zip(range(2_000), (t for c in JsonlPassageStream(path) for t in c.texts()))]
            make_tiny_encoder(tiny_dir, texts=sample, hidden=args.hidden, layers=2, vocab_size=2_000)
        tiny = Embedder.from_config(EmbedderConfig(model=str(tiny_dir), max_length=args.max_length,
                                                   batch_size=256), device="cpu")
        tiny.eval()
        rows = run_scale(f"tiny BERT h{args.hidden}, {args.passages:,}", tiny, path, work, args, peaks, console)

    if not args.no_minilm:
        minilm = Embedder.from_config(EmbedderConfig(model="all-MiniLM-L6-v2", max_length=128), device="cpu")
        minilm.eval()
        mpath = minilm_corpus(minilm, work, args, console)
        n = len(JsonlPassageStream(mpath).offsets())
        margs = argparse.Namespace(**{**vars(args), "chunk": min(args.chunk, 10_000), "shards": 1,
                                      "train_size": n, "pq_m": 16})
        rows += run_scale(f"MiniLM-L6, {n:,} {args.minilm_text}", minilm, mpath, work, margs, peaks, console)

    table = Table(title=f"On-disk index path: {args.queries} queries, k={args.k} (load {load_avg()})")
    for col in ("run", "index", "build s", "queries/s", "speed vs flat", f"recall@{args.k} vs flat"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    mem = Table(title="Peak RSS by phase (MiB; high-water mark reset per phase)")
    for col in ("phase", "seconds", "RSS before", "peak RSS", "peak - before"):
        mem.add_column(col, justify="right")
    for name, seconds, before, peak in peaks.rows:
        mem.add_row(name, f"{seconds:.1f}", f"{before:,.0f}", f"{peak:,.0f}", f"{peak - before:,.0f}")
    console.print(mem)
    if path is not None:
        console.print(f"corpus on disk: {path.stat().st_size / MB:,.0f} MiB for {args.passages:,} passages; "
                      f"chunk {args.chunk:,} passages")
    # (getrusage's ru_maxrss is reset with the high-water mark: the largest phase peak is the process'.)
    console.print(f"largest phase peak RSS {max((r[3] for r in peaks.rows), default=0):,.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

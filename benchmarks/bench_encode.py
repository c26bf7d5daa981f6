"""Corpus encoding throughput: ``distrag.Embedder.encode`` vs ``SentenceTransformer.encode``.

Same model folder, same passages (synthetic sentences of varied lengths), same batch size and token
limit, both warmed up, runs alternated (ours first on even rounds, theirs first on odd) so that drift in
machine load hits both. Prints times, passages/s, the throughput ratio ours/theirs (goal >= 0.95x) and
the largest absolute difference between the two sets of vectors.

    python benchmarks/bench_encode.py                      # offline all-MiniLM-L6-v2, 2000 passages
    python benchmarks/bench_encode.py --quick              # tiny random encoder, 400 passages
    python benchmarks/bench_encode.py --model /path/to/st-folder --n 5000 --batch-size 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

WORDS = [
    "the", "of", "in", "is", "was", "born", "founded", "works", "at", "lives", "capital", "city", "company",
    "person", "river", "question", "answer", "passage", "context", "title", "quick", "brown", "fox", "jumps",
    "over", "lazy", "dog", "museum", "bridge", "mountain", "university", "president", "novel", "century",
    "war", "treaty", "island", "festival", "language", "railway", "station", "symphony", "painter",
    "engineer", "election",
]


def synthetic_passages(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences with lengths spread from 3 to ~200 words (a long tail, as real corpora have)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=3.3, sigma=0.8, size=n).astype(int), 3, 200)
    out = []
    for i, k in enumerate(lengths):
        words = rng.choice(WORDS, size=k)
        out.append(f"Passage {i}: " + " ".join(words).capitalize() + ".")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all-MiniLM-L6-v2",
                    help="encoder: offline alias, sentence-transformers folder or cached hub id")
    ap.add_argument("--quick", action="store_true", help="tiny random encoder and 400 passages (seconds)")
    ap.add_argument("--n", type=int, default=None, help="passages (default 2000, 400 with --quick)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=128, help="token limit for both")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs of each (alternated)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table
    from sentence_transformers import SentenceTransformer

    from distrag.config import EmbedderConfig
    from distrag.errors import ModelNotFoundError
    from distrag.models.embedder import Embedder
    from distrag.models.sources import resolve_model

    console = Console()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    if args.quick:
        from distrag.models.tiny import make_tiny_encoder

        tmp = tempfile.TemporaryDirectory(prefix="bench_encode_")
        spec = str(make_tiny_encoder(tmp.name, texts=WORDS, hidden=64, layers=2))
        label = "tiny random BERT (--quick)"
    else:
        spec, label = args.model, args.model
    n = args.n or (400 if args.quick else 2000)
    try:
        folder = resolve_model(spec).path_or_id
    except ModelNotFoundError as e:
        console.print(f"[red]{e}[/red]\nTry --quick for a tiny local model.")
        return 2

    passages = synthetic_passages(n, args.seed)
    ours = Embedder.from_config(EmbedderConfig(model=spec, batch_size=args.batch_size,
                                               max_length=args.max_length), device="cpu")
    theirs = SentenceTransformer(folder, device="cpu")
    theirs.max_seq_length = ours.max_length

    def run_ours():
        return ours.encode(passages, batch_size=args.batch_size)

    def run_theirs():
        return theirs.encode(passages, batch_size=args.batch_size, normalize_embeddings=True,
                             convert_to_numpy=True, show_progress_bar=False)

    console.print(f"model: {label}  passages: {n}  batch: {args.batch_size}  max_length: {ours.max_length}  "
                  f"torch threads: {torch.get_num_threads()}")
    warm = passages[: min(n, 2 * args.batch_size)]
    ours.encode(warm, batch_size=args.batch_size)
    theirs.encode(warm, batch_size=args.batch_size, normalize_embeddings=True, show_progress_bar=False)

    times: dict[str, list[float]] = {"distrag Embedder.encode": [], "SentenceTransformer.encode": []}
    vecs: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        order = [("distrag Embedder.encode", run_ours), ("SentenceTransformer.encode", run_theirs)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            vecs[name] = fn()
            times[name].append(time.perf_counter() - t)

    a, b = vecs["distrag Embedder.encode"], vecs["SentenceTransformer.encode"]
    max_diff = float(np.abs(a - b).max())
    med = {k: statistics.median(v) for k, v in times.items()}
    table = Table(title=f"Corpus encoding, {n} passages ({args.rounds} alternated rounds, median)")
    table.add_column("encoder")
    table.add_column("median s", justify="right")
    table.add_column("all runs s", justify="right")
    table.add_column("passages/s", justify="right")
    for k, v in times.items():
        table.add_row(k, f"{med[k]:.2f}", " ".join(f"{x:.2f}" for x in v), f"{n / med[k]:.0f}")
    console.print(table)
    ratio = med["SentenceTransformer.encode"] / med["distrag Embedder.encode"]
    ok = ratio >= 0.95 and max_diff <= 1e-4
    console.print(f"throughput ratio ours/theirs: [bold]{ratio:.2f}x[/bold] (goal >= 0.95x)   "
                  f"max |diff| of vectors: {max_diff:.2e}   "
                  + ("[green]OK[/green]" if ok else "[yellow]below goal[/yellow]"))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

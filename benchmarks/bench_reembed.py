"""Corpus re-embedding on the index rank vs one ``Embedder.encode`` of the whole corpus.

The index rank (``distrag.distributed.refresh_server.serve_index``) re-embeds the corpus for each weights
hand-off with a generator: ``embedder.load_state_dict(new_weights)``, then the corpus (sorted by token length
once) cut into ``max(index.n_shards, 4)`` shards, each encoded by ``Embedder.encode`` (so the server can
heartbeat and abandon a version between shards). This script runs that code
(``distrag.retrieval.corpus_encoding.CorpusEncoder``) and times, in one process, with the same embedder and
passages:

* **single** -- ``Embedder.encode(all passages)`` (one length sort over the whole corpus);
* **index rank** -- the shard generator, including ``load_state_dict`` of a weights hand-off;
* **index rank, shards only** -- the same without ``load_state_dict`` (isolates the sharding cost).

Warmed up, rounds alternated, medians; passages/s and the ratio to the single encode (goal: >= 0.95x);
vectors are checked equal.

    python benchmarks/bench_reembed.py                    # all-MiniLM-L6-v2, 2000 passages
    python benchmarks/bench_reembed.py --quick            # tiny random encoder, 400 passages
    python benchmarks/bench_reembed.py --n 5000 --n-shards 8 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import load_avg  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--quick", action="store_true", help="tiny random encoder, 400 passages")
    ap.add_argument("--n", type=int, default=None, help="passages (default 2000, 400 with --quick)")
    ap.add_argument("--n-shards", type=int, default=1, help="index.n_shards (the rank uses max(n_shards, 4))")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from bench_encode import WORDS, synthetic_passages
    from rich.console import Console
    from rich.table import Table

    from distrag.config import EmbedderConfig
    from distrag.models.embedder import Embedder
    from distrag.retrieval.corpus_encoding import CorpusEncoder

    console = Console(width=max(Console().width, 130))
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    if args.quick:
        from distrag.models.tiny import make_tiny_encoder

        tmp = tempfile.TemporaryDirectory(prefix="bench_reembed_")
        spec = str(make_tiny_encoder(tmp.name, texts=WORDS, hidden=64, layers=2))
        label = "tiny random BERT (--quick)"
    else:
        spec, label = args.model, args.model
    n = args.n or (400 if args.quick else 2000)
    texts = synthetic_passages(n, args.seed)
    embedder = Embedder.from_config(EmbedderConfig(model=spec), device="cpu")
    embedder.eval()
    # a weights hand-off as the index rank receives it (torch.load of trainer 0's state_dict, on CPU)
    handoff = {k: v.detach().clone() for k, v in embedder.state_dict().items()}
    # the index rank's own re-encoder (distrag.distributed.refresh_server.serve_index uses exactly this object)
    reencoder = CorpusEncoder(embedder, texts, n_shards=max(args.n_shards, 4))
    shard = reencoder.shard_size

    contenders = [("single Embedder.encode(corpus)", lambda: embedder.encode(texts)),
                  ("index rank (load_state_dict + shards)", lambda: reencoder.encode_all(handoff)),
                  ("index rank, shards only", lambda: reencoder.encode_all())]
    console.print(f"model: {label}  passages: {n}  shards: {-(-n // shard)} x {shard}  "
                  f"batch: {embedder.batch_size}  "
                  f"torch threads: {torch.get_num_threads()}  load avg: {load_avg()}")
    warm = texts[: 2 * embedder.batch_size]
    embedder.encode(warm)
    embedder.load_state_dict(handoff)
    times: dict[str, list[float]] = {name: [] for name, _ in contenders}
    vecs = {}
    for r in range(args.rounds):
        for name, fn in (contenders if r % 2 == 0 else contenders[::-1]):
            t0 = time.perf_counter()
            vecs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = contenders[0][0]
    diff = max(float(np.abs(v - vecs[ref]).max()) for v in vecs.values())
    table = Table(title=f"Re-embedding {n} passages ({args.rounds} alternated rounds, median)")
    for col in ("path", "median s", "rounds s", "passages/s", "vs single"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for k, v in times.items():
        table.add_row(k, f"{med[k]:.2f}", " ".join(f"{x:.2f}" for x in v), f"{n / med[k]:.0f}",
                      f"{med[ref] / med[k]:.2f}x")
    console.print(table)
    ratio = med[ref] / med[contenders[1][0]]
    console.print(f"throughput index rank / single encode: [bold]{ratio:.2f}x[/bold] (goal >= 0.95x)   "
                  f"max |diff| of vectors: {diff:.1e}   load avg after: {load_avg()}   "
                  + ("[green]OK[/green]" if ratio >= 0.95 else "[yellow]below goal[/yellow]"))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Seconds per index version with a pool of index ranks (``distributed.index_ranks``) against one, and the
staleness that results, in one run.

Each configuration is a real job of the refresh protocol on loopback: one trainer process (trainer 0's
``IndexClient``) and N index-rank processes, each the launcher-started supervisor with its spawned index worker
running :func:`~distrag.distributed.refresh_server.serve_index` (the same code as ``launch/train.py``'s index
ranks), one thread per process (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``, one faiss thread). The
corpus is ``--passages`` synthetic passages of :mod:`distrag.data.large_corpus` (JSONL, default 200,000), the
encoder a tiny random BERT (``--hidden``, ``--layers``, ``--max-length``), the index ``flat`` with one shard (a
pool builds one shard per index rank).

The trainer waits for a first version (the index ranks load and tokenize their part of the corpus first: not
timed), then trains ``--steps`` steps of ``--step-s`` seconds (a sleep: the trainers' devices are not the index
ranks'), handing its weights over every ``--refresh-every`` steps and polling every step, as
``DistributedTrainer`` does. Measured per configuration: each version's seconds from member 0 reading the weights
to the published version (``Publication.build_s``, what MLflow logs as ``index/build_s``; for a pool: every part
encoded, saved, and moved into one version), and the library's own staleness account (``RefreshStats``: the mean
and largest lag in steps of the index in use, what MLflow logs as ``index/staleness_mean`` / ``_max``).
Configurations alternate over ``--rounds`` (1, 2, then 2, 1, ...); medians are reported, with the ratio of seconds
per version of 1 index rank to N (goal >= 1.7x with 2).

N index ranks can only go N times faster if the machine gives N processes N times the CPU of one. So the same run
measures that ceiling too: the work N concurrent one-thread processes (a float32 matmul loop, ``--ceiling-s``
seconds) get done against one, before the jobs and after them; the pool's speed-up is read against it. (On this
project's shared 2-core box other jobs hold the cores: the load average is printed.) The per-version time also holds
what a pool adds: member 0 waits for the slowest part and moves the parts' files into one folder.

    python benchmarks/bench_index_pool.py                       # 200,000 passages, 1 vs 2 index ranks
    python benchmarks/bench_index_pool.py --quick               # 20,000 passages, a smoke run
    python benchmarks/bench_index_pool.py --ranks 1 2 3 --rounds 2 --keep /tmp/bip
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import free_port, load_avg  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# the job's processes


def worker(config: str, out: str, args: dict) -> int:
    import torch

    from distrag.config import load_config
    from distrag.distributed import roles
    from distrag.distributed.runner import run_index_rank

    torch.set_num_threads(1)
    cfg = load_config(config, [])
    ctx = roles.init_roles(cfg.distributed)
    if ctx.info.is_index:  # the supervisor; its spawned worker runs serve_index (one thread: OMP_NUM_THREADS=1)
        roles.finish(run_index_rank(cfg, ctx), ctx=ctx)
    code = 1
    try:
        code = trainer(cfg, ctx, Path(out), args)
    finally:
        roles.finish(code, ctx=ctx)
    return code  # not reached


def trainer(cfg, ctx, out: Path, args: dict) -> int:
    """Trainer 0: hand weights over every ``refresh_every`` steps of ``step_s`` seconds, poll every step."""
    import torch

    from distrag import metric_names as mn
    from distrag.distributed.refresh_client import IndexClient, RefreshStats
    from distrag.distributed.runner import run_dir
    from distrag.models.embedder import Embedder

    embedder = Embedder.from_config(cfg.embedder, device="cpu")
    built: list[tuple[int, float]] = []  # (version, build_s) of every adoption
    client = IndexClient(ctx, run_dir(cfg) / "weights", index_timeout_s=cfg.distributed.index_timeout_s,
                         index_ranks=cfg.distributed.index_ranks,
                         log_fn=lambda m, step: built.append((int(m[mn.INDEX_VERSION]), float(m[mn.INDEX_BUILD_S]))))

    def weights(step: int) -> dict:
        with torch.no_grad():  # the encoder moves a little between hand-offs, as it trains
            for p in embedder.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        return embedder.state_dict()

    t0 = time.perf_counter()
    client.submit_weights(0, weights(0))
    client.wait_for_version(1, step=0, timeout_s=cfg.distributed.index_timeout_s, interval_s=0.05)
    warm_s = time.perf_counter() - t0
    client.stats = RefreshStats()  # staleness from the first trained step on
    for step in range(1, args["steps"] + 1):
        client.poll(step)
        if step % args["refresh_every"] == 0:
            client.submit_weights(step, weights(step))
        time.sleep(args["step_s"])
    client.done()
    s = client.stats
    (out / "trainer.json").write_text(json.dumps({
        "warm_s": warm_s, "built": built, "staleness_mean": s.staleness_mean, "staleness_max": s.staleness_max,
        "adoptions": [[d.version, d.weights_step, d.step] for d in client.history]}))
    return 0


# ----------------------------------------------------------------------------------------------
# launcher


SPIN = """
import time, numpy as np
a = np.random.rand(200, 200).astype(np.float32)
n, t = 0, time.perf_counter()
while time.perf_counter() - t < {s}:
    a @ a
    n += 1
print(n)
"""


def cpu_ceiling(n: int, seconds: float) -> float:
    """Work ``n`` concurrent one-thread processes get done in ``seconds`` over what one gets done alone: the largest
    speed-up ``n`` index ranks can have on this machine now."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run(k: int) -> int:
        procs = [subprocess.Popen([sys.executable, "-c", SPIN.format(s=seconds)], env=env, stdout=subprocess.PIPE,
                                  text=True) for _ in range(k)]
        return sum(int(p.communicate()[0]) for p in procs)

    return run(n) / run(1)


def prepare(tmp: Path, args) -> Path:
    """The corpus JSONL (reused when present), a questions file, the tiny encoder; returns the folder."""
    from distrag.data.large_corpus import write_large_corpus
    from distrag.models.tiny import make_tiny_encoder

    data = tmp / "data"
    data.mkdir(parents=True, exist_ok=True)
    corpus = data / "corpus.jsonl"
    if not corpus.exists() or sum(1 for _ in corpus.open()) != args.passages:
        write_large_corpus(corpus, args.passages, seed=0, median_words=args.median_words)
    with corpus.open() as f:
        head = [json.loads(next(f)) for _ in range(4)]
    (data / "questions.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "question": r["title"], "answers": [r["title"].split()[0]],
                    "gold_passage_ids": [r["id"]]}) + "\n" for i, r in enumerate(head)))
    if not (tmp / "enc" / "config.json").exists():
        with corpus.open() as f:
            texts = [json.loads(line)["text"] for _, line in zip(range(2000), f)]
        make_tiny_encoder(tmp / "enc", texts=texts, hidden=args.hidden, layers=args.layers, vocab_size=2000)
    return data


def write_config(tmp: Path, data: Path, n_ranks: int, args) -> Path:
    import yaml

    cfg = {
        "data": {"format": "jsonl", "path": str(data / "questions.jsonl"), "corpus_path": str(data / "corpus.jsonl"),
                 "dev_fraction": 0.0, "test_fraction": 0.0},
        "embedder": {"model": str(tmp / "enc"), "max_length": args.max_length, "batch_size": 256},
        "index": {"kind": "flat", "n_shards": 1, "device": "cpu", "on_disk": args.on_disk,
                  "chunk_passages": 50_000},
        "train": {"strategy": "embed_ft", "refresh_every": args.refresh_every},
        "distributed": {"index_ranks": n_ranks, "index_timeout_s": 3600, "keep_index_versions": 2},
        "tracking": {"enabled": False},
        "output_dir": str(tmp / f"runs_{n_ranks}"),
    }
    path = tmp / f"pool_{n_ranks}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config: Path, out: Path, n_ranks: int, args) -> tuple[float, dict]:
    out.mkdir(parents=True, exist_ok=True)
    port, world = free_port(3), 1 + n_ranks
    job = {"steps": args.steps, "step_s": args.step_s, "refresh_every": args.refresh_every}
    procs, logs = [], []
    t0 = time.perf_counter()
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        log = open(out / f"log_{rank}.txt", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(config), str(out),
                                       json.dumps(job)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    try:
        codes = [p.wait(timeout=args.timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    if codes != [0] * world:
        raise RuntimeError(f"exit codes {codes}; see {out}/log_*.txt:\n" + (out / "log_0.txt").read_text()[-3000:])
    return time.perf_counter() - t0, json.loads((out / "trainer.json").read_text())


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="pool sizes compared (the first: the peer)")
    ap.add_argument("--passages", type=int, default=200_000)
    ap.add_argument("--median-words", type=float, default=40.0)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=150, help="trainer steps after the first version")
    ap.add_argument("--step-s", type=float, default=1.0, help="seconds per trainer step")
    ap.add_argument("--refresh-every", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="alternated rounds of every configuration")
    ap.add_argument("--on-disk", action="store_true", help="index.on_disk: the corpus streamed, vectors on disk")
    ap.add_argument("--ceiling-s", type=float, default=10.0, help="seconds of each CPU ceiling measurement")
    ap.add_argument("--quick", action="store_true", help="20,000 passages, 30 steps of 0.5 s")
    ap.add_argument("--keep", default=None, help="keep the corpus, encoder and run folders here")
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args(argv)
    if args.quick:
        args.passages, args.steps, args.step_s = 20_000, 30, 0.5

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 140))
    tmpobj = None if args.keep else tempfile.TemporaryDirectory(prefix="bench_index_pool_")
    tmp = Path(args.keep or tmpobj.name)
    data = prepare(tmp, args)
    console.print(f"{args.passages:,} passages (median {args.median_words:.0f} words), tiny BERT hidden {args.hidden} "
                  f"x {args.layers} layer(s), max_length {args.max_length}, flat index, "
                  f"{'on disk' if args.on_disk else 'in memory'}; trainer step {args.step_s}s, hand-off every "
                  f"{args.refresh_every} step(s), {args.steps} steps; one thread per process; load avg: {load_avg()}")
    ceiling = {n: [cpu_ceiling(n, args.ceiling_s)] for n in args.ranks if n > 1}
    console.print("CPU ceiling before the jobs: " + ", ".join(f"{n} processes do {c[0]:.2f}x the work of one"
                                                             for n, c in ceiling.items()))
    results: dict[int, list[dict]] = {n: [] for n in args.ranks}
    for r in range(args.rounds):
        for n in (args.ranks if r % 2 == 0 else list(reversed(args.ranks))):
            wall, rec = launch(write_config(tmp, data, n, args), tmp / f"job_{n}_{r}", n, args)
            rec["wall"] = wall
            results[n].append(rec)
            secs = [b for v, b in rec["built"] if v > 1]
            console.print(f"  {n} index rank(s), round {r + 1}: {len(secs)} version(s) after the first, median "
                          f"{statistics.median(secs) if secs else float('nan'):.1f}s each; first version after "
                          f"{rec['warm_s']:.0f}s; job {wall:.0f}s; load avg: {load_avg()}")

    for n in ceiling:
        ceiling[n].append(cpu_ceiling(n, args.ceiling_s))
    table = Table(title="Seconds per index version and the staleness that results (trainer 0's account)")
    for col in ("index ranks", "versions timed", "s / version (median)", "min - max", "speed-up vs "
                f"{args.ranks[0]}", "CPU ceiling (before / after)", "staleness mean (steps)", "staleness max (steps)",
                f"= s at {args.step_s}s/step"):
        table.add_column(col, justify="right")
    base = None
    for n in args.ranks:
        secs = [b for rec in results[n] for v, b in rec["built"] if v > 1]
        med = statistics.median(secs) if secs else float("nan")
        base = med if base is None else base
        stale = statistics.fmean(rec["staleness_mean"] for rec in results[n])
        worst = max(rec["staleness_max"] for rec in results[n])
        cap = " / ".join(f"{c:.2f}x" for c in ceiling[n]) if n in ceiling else "-"
        table.add_row(str(n), str(len(secs)), f"{med:.1f}", f"{min(secs):.1f} - {max(secs):.1f}" if secs else "-",
                      f"{base / med:.2f}x", cap, f"{stale:.1f}", str(worst), f"{stale * args.step_s:.0f}")
    console.print(table)
    if len(args.ranks) > 1 and args.ranks[0] == 1 and 2 in args.ranks:
        two = [b for rec in results[2] for v, b in rec["built"] if v > 1]
        one = [b for rec in results[1] for v, b in rec["built"] if v > 1]
        ratio = statistics.median(one) / statistics.median(two)
        cap = min(ceiling[2])
        console.print(f"2 index ranks: [bold]{ratio:.2f}x[/bold] faster per version than 1 (goal >= 1.7x)  "
                      + ("[green]OK[/green]" if ratio >= 1.7 else "[yellow]below goal[/yellow]")
                      + f"; the machine allowed 2 processes {cap:.2f}x-{max(ceiling[2]):.2f}x the work of one: the "
                      f"pool reached {ratio / cap:.0%} of the lower   load avg: {load_avg()}")
    if tmpobj is not None:
        tmpobj.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

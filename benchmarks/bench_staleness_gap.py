"""What index staleness costs in retrieval, against ``train.refresh_every``, on real models and real questions.

Runs the real distributed runner (``torchrun launch/train.py``: 2 trainers + 1 index rank on gloo, one thread per
process) once per ``refresh_every`` (default 2, 8, 32): joint RAG-Token training of MiniLM (all-MiniLM-L6-v2) +
SmolLM2-135M (LoRA) on the shared HotPotQA sample (``/work/shared/data/hotpotqa``, read in place; its distractor
paragraphs are the corpus). At each index adoption trainer 0 scores the staleness probe
(``train.staleness_probe`` dev questions; :mod:`distrag.retrieval.staleness_probe`) and MLflow records, per
adoption, the gap of the adopted version (``index/staleness_recall_gap``, at ``index/staleness_steps``) and of the
version it replaced (``index/retiring_recall_gap``, at ``index/retiring_staleness_steps``). This script reads
those back from MLflow (SQLite in the run folder) and prints, per ``refresh_every``, the staleness and the gaps
(mean and largest, in points of Recall@k), the probe's recall as published and re-encoded, and the seconds the
probes took. Every run shares one frozen-index cache (``output_dir/index``) and nothing else.

The peer of each row is the fresh ranking of the same candidates under the same encoder at the same step: the
gap is a difference measured inside one run, not a time.

    python benchmarks/bench_staleness_gap.py                                  # 2, 8, 32; 24, 24, 46 steps
    python benchmarks/bench_staleness_gap.py --refresh-every 2 8 --steps 20 --keep /tmp/bsg
    python benchmarks/bench_staleness_gap.py --quick                          # tiny models, synthetic data
"""

from __future__ import annotations

import argparse
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
HOTPOT = Path("/work/shared/data/hotpotqa/hotpot_train_sample100.json")
SERIES = ("index/staleness_recall_gap", "index/staleness_steps", "index/retiring_recall_gap",
          "index/retiring_staleness_steps", "index/staleness_recall_stale", "index/staleness_recall_fresh",
          "index/staleness_probe_s")


def write_config(tmp: Path, args) -> Path:
    import yaml

    if args.quick:
        from distrag.config import SyntheticConfig
        from distrag.data.synthetic import make_synthetic
        from distrag.models.tiny import make_tiny_causal_lm, make_tiny_encoder

        syn = {"n_entities": 40, "n_single_hop": 80, "n_two_hop": 40}
        texts = make_synthetic(SyntheticConfig(**syn)).corpus.texts()
        data = {"format": "synthetic", "synthetic": syn}
        enc = str(make_tiny_encoder(tmp / "enc", texts=texts, hidden=64, layers=2))
        lm = str(make_tiny_causal_lm(tmp / "lm", texts=texts, hidden=64, layers=2))
    else:
        data, enc, lm = {"format": "hotpotqa", "path": str(args.data)}, args.embedder, args.generator
    cfg = {
        "data": data,
        "embedder": {"model": enc},
        "generator": {"model": lm, "max_new_tokens": 8, "max_passage_chars": args.max_passage_chars,
                      "dtype": "float32"},
        "retrieval": {"top_k": args.k},
        "index": {"reembed_after_training": False, "device": "cpu"},
        "train": {"strategy": "joint", "rag_loss": "token", "train_k": args.k, "batch_size": args.batch,
                  "micro_batch_size": args.batch, "lr_embedder": args.lr_embedder,
                  "lr_generator": args.lr_generator, "staleness_probe": args.probe},
        "distributed": {"zero_stage": 2, "index_rank": -1, "on_index_failure": "stop", "index_timeout_s": 3600,
                        "checkpoint_every": 0},
        "tracking": {"enabled": True, "uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "bench_staleness"},
        "max_eval_questions": 2,
        "output_dir": str(tmp / "runs"),
    }
    path = tmp / "bench_staleness.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config: Path, tmp: Path, refresh_every: int, steps: int, timeout: float) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    torchrun = Path(sys.executable).with_name("torchrun")
    log = tmp / f"log_R{refresh_every}.txt"
    cmd = [str(torchrun), "--nproc_per_node", "3", "--master_port", str(free_port(3)), str(ROOT / "launch/train.py"),
           "--config", str(config), f"train.refresh_every={refresh_every}", f"train.max_steps={steps}",
           f"tracking.run_name=R{refresh_every}"]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"torchrun exited {p.returncode}; see {log}:\n" + log.read_text()[-3000:])
    return time.perf_counter() - t0


def read_run(tmp: Path, name: str) -> tuple[dict[str, float], dict[str, list[tuple[int, float]]]]:
    """The run's last metric values and the per-adoption series of :data:`SERIES` (step, value)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bench_staleness")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    series = {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in SERIES}
    return dict(run.data.metrics), series


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--refresh-every", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--steps", type=int, default=None,
                    help="optimizer steps of each run (default: refresh_every + 14, at least 24: a few adoptions each)")
    ap.add_argument("--batch", type=int, default=1, help="questions per trainer per step")
    ap.add_argument("--k", type=int, default=3, help="retrieval.top_k = train.train_k (Recall@k of the probe)")
    ap.add_argument("--probe", type=int, default=32, help="train.staleness_probe (dev questions)")
    ap.add_argument("--lr-embedder", type=float, default=1e-4)
    ap.add_argument("--lr-generator", type=float, default=2e-4)
    ap.add_argument("--max-passage-chars", type=int, default=300)
    ap.add_argument("--data", type=Path, default=HOTPOT, help="HotPotQA JSON (read in place)")
    ap.add_argument("--embedder", default="all-MiniLM-L6-v2")
    ap.add_argument("--generator", default="SmolLM2-135M-Instruct-GGUF")
    ap.add_argument("--quick", action="store_true", help="tiny random models on the synthetic world")
    ap.add_argument("--keep", default=None, help="keep the run folders (and MLflow) here")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    tmpobj = None if args.keep else tempfile.TemporaryDirectory(prefix="bench_staleness_")
    tmp = Path(args.keep or tmpobj.name)
    tmp.mkdir(parents=True, exist_ok=True)
    config = write_config(tmp, args)
    label = "tiny random models, synthetic" if args.quick else f"{args.embedder} + {args.generator}, {args.data.name}"
    console.print(f"{label}: joint RAG-Token k={args.k}, 2 trainers x {args.batch} question(s) + 1 index rank, "
                  f"{args.steps or 'refresh_every + 14 (>= 24)'} steps, lr_embedder {args.lr_embedder}, "
                  f"probe {args.probe} dev questions, "
                  f"OMP_NUM_THREADS=1; load avg: {load_avg()}")
    rows = []
    for r in args.refresh_every:
        steps = args.steps or max(24, r + 14)
        wall = launch(config, tmp, r, steps, args.timeout)
        metrics, series = read_run(tmp, f"R{r}")
        rows.append((r, wall, metrics, series))
        console.print(f"  refresh_every={r}: {steps} steps, {wall:.0f}s, {len(series[SERIES[0]])} adoption(s) probed; "
                      f"load avg: {load_avg()}")

    table = Table(title="What staleness costs: Recall@k gap (fresh - stale, points) at each index adoption")
    for col in ("refresh_every", "adoptions", "staleness at adoption (steps)", "gap of adopted (pts) mean / max",
                "replaced index: staleness (steps)", "gap of replaced (pts) mean / max",
                "probe recall stale -> fresh (adopted, mean)", "index/staleness_mean", "probe s (mean)", "run s"):
        table.add_column(col, justify="right")
    for r, wall, m, s in rows:
        gaps = [100 * v for _, v in s["index/staleness_recall_gap"]]
        old = [100 * v for _, v in s["index/retiring_recall_gap"]]

        def mean(k, s=s):
            return statistics.fmean(v for _, v in s[k]) if s[k] else float("nan")

        table.add_row(str(r), str(len(gaps)), f"{mean('index/staleness_steps'):.1f}",
                      f"{statistics.fmean(gaps):.1f} / {max(gaps):.1f}" if gaps else "-",
                      f"{mean('index/retiring_staleness_steps'):.1f}",
                      f"{statistics.fmean(old):.1f} / {max(old):.1f}" if old else "-",
                      f"{100 * mean('index/staleness_recall_stale'):.1f} -> "
                      f"{100 * mean('index/staleness_recall_fresh'):.1f}",
                      f"{m.get('index/staleness_mean', float('nan')):.1f}", f"{mean('index/staleness_probe_s'):.1f}",
                      f"{wall:.0f}")
    console.print(table)
    for r, _, _, s in rows:
        pairs = " ".join(f"{st:.0f}:{100 * g:+.1f}" for (_, st), (_, g) in
                         zip(s["index/retiring_staleness_steps"], s["index/retiring_recall_gap"]))
        console.print(f"refresh_every={r}, replaced index (staleness steps: gap pts): {pairs or '-'}")
    if tmpobj is not None:
        tmpobj.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

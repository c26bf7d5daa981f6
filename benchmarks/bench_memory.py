"""Peak host memory of training the generator: Ft-Gen and RAG-Seq against the No-FT evaluation, before and
after the memory levers (gradient checkpointing, checkpointed pair chunks), at equal questions per step.

Every configuration runs in its own subprocess (peaks never mix) through the production path: an
``Experiment`` (data, MiniLM + SmolLM2-135M, the frozen index, cached and shared by the runs), then
``Experiment.train`` for a training row or ``Experiment.run`` with strategy ``none`` for No-FT, so the
numbers are the ledger's own per-phase peaks (``cost/phase.<phase>.peak_rss_gb``, distrag.costs.memory),
and the run's peak over all its phases (model loading and index included; not ``ru_maxrss``: resetting the
high-water mark per phase resets that counter too). Settings compared:

* **before**: ``generator.gradient_checkpointing=false train.pair_micro_batch=0`` (the previous release);
* **ckpt**: gradient checkpointing of the LoRA generator's blocks (the default);
* **ckpt+pairs**: plus (question, passage) pairs in checkpointed chunks of ``--pairs`` (RAG losses only).

The same runs calibrate the plan's MFU (``distrag plan``): the ledger's training FLOPs over the training
phase's wall-clock, against this machine's float32 matmul peak measured here (``--threads`` threads).

    OMP_NUM_THREADS=2 python benchmarks/bench_memory.py                # HotPotQA sample, real models
    python benchmarks/bench_memory.py --quick                          # tiny random models, synthetic data
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import load_avg  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

ROOT = Path(__file__).resolve().parent.parent
HOTPOT = ROOT.parent / "shared" / "data" / "hotpotqa" / "hotpot_train_sample100.json"
SETTINGS = {"before": ["generator.gradient_checkpointing=false", "train.pair_micro_batch=0"],
            "ckpt": ["generator.gradient_checkpointing=true", "train.pair_micro_batch=0"],
            "ckpt+pairs": ["generator.gradient_checkpointing=true"]}
CASES = {"No-FT eval": ("none", "eval_test"), "Ft-Gen": ("gen_ft", "gen_ft"),
         "RAG-Seq": ("joint", "joint_sequence")}


def _overrides(a: argparse.Namespace, case: str, setting: str, out_dir: str) -> list[str]:
    strategy = CASES[case][0]
    o = [f"output_dir={out_dir}", "tracking.enabled=false", f"train.strategy={strategy}", "train.rag_loss=sequence",
         f"retrieval.top_k={a.k}", f"train.train_k={a.k}", f"train.batch_size={a.questions}",
         f"train.micro_batch_size={a.questions}", f"train.max_steps={a.steps}", f"max_eval_questions={a.questions}",
         f"generator.max_passage_chars={a.max_passage_chars}", "generator.dtype=float32",
         *SETTINGS[setting]]
    if setting == "ckpt+pairs":
        o.append(f"train.pair_micro_batch={a.pairs}")
    if a.quick:
        o += [f"embedder.model={a.tiny[0]}", f"generator.model={a.tiny[1]}"]
    else:
        o += [f"embedder.model={a.embedder}", f"generator.model={a.generator}"]
        o += ["data.format=hotpotqa", f"data.path={HOTPOT}"] if HOTPOT.is_file() else []
    return o


def worker(a: argparse.Namespace) -> None:
    """One configuration; prints one JSON line with the ledger's peaks, FLOPs and wall-clock."""
    import torch

    torch.set_num_threads(a.threads)
    from distrag.config import build_config
    from distrag.costs.memory import rss_bytes
    from distrag.training.experiment import Experiment

    cfg = build_config({}, json.loads(a.overrides))
    exp = Experiment(cfg, show_progress=False).setup()
    strategy, phase = CASES[a.case]
    if strategy == "none":
        res, _ = exp.run(cfg)
        costs = res.costs
    else:
        models = exp.train(cfg)
        costs = models.ledger.to_metrics()
    get = lambda what: costs.get(f"cost/phase.{phase}.{what}")  # noqa: E731
    print("RESULT " + json.dumps({
        "peak_gb": get("peak_rss_gb"), "flops": get("flops"), "wall_s": get("wall_s"),
        "load_and_index_gb": costs.get("cost/phase.index_build.peak_rss_gb"),
        "run_gb": costs.get("cost/peak_rss_gb"), "rss_after_gb": rss_bytes() / 1e9}))


def matmul_peak(threads: int, n: int = 1024, reps: int = 20) -> float:
    """float32 GEMM FLOP/s of this machine at ``threads`` threads (best of ``reps``)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random models on the synthetic world")
    ap.add_argument("--embedder", default="all-MiniLM-L6-v2")
    ap.add_argument("--generator", default="SmolLM2-135M-Instruct-GGUF")
    ap.add_argument("--questions", type=int, default=8, help="questions per optimizer step")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps (the first one reaches the peak)")
    ap.add_argument("--pairs", type=int, default=4, help="pairs per checkpointed chunk (ckpt+pairs)")
    ap.add_argument("--max-passage-chars", type=int, default=600)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--settings", default="before,ckpt,ckpt+pairs")
    ap.add_argument("--cases", default="No-FT eval,Ft-Gen,RAG-Seq", help="configurations to run (comma-separated)")
    ap.add_argument("--workdir", help="keep the runs (and the cached index) here instead of a temporary folder")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return 0

    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    tmp = tempfile.TemporaryDirectory(prefix="bench_memory_")
    a.tiny = None
    if a.quick:
        sys.path.insert(0, str(ROOT))
        from distrag.config import SyntheticConfig
        from distrag.data.synthetic import make_synthetic
        from distrag.models.tiny import make_tiny_causal_lm, make_tiny_encoder

        texts = make_synthetic(SyntheticConfig()).corpus.texts()[:300]
        a.tiny = (str(make_tiny_encoder(f"{tmp.name}/enc", texts=texts, hidden=64, layers=2)),
                  str(make_tiny_causal_lm(f"{tmp.name}/lm", texts=texts, hidden=64, layers=2)))
    peak = matmul_peak(a.threads)
    data = "synthetic" if a.quick or not HOTPOT.is_file() else HOTPOT.name
    console.print(f"data: {data}; {a.questions} questions/step, k = {a.k}, {a.steps} steps; threads: {a.threads}; "
                  f"matmul peak {peak / 1e9:.1f} GFLOP/s; load average: {load_avg()}")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(ROOT)}
    cases = a.cases.split(",")
    runs = [("No-FT eval", "before")] if "No-FT eval" in cases else []
    for s in a.settings.split(","):  # both training rows per setting (Ft-Gen has no pairs to chunk)
        runs += [r for r in (("Ft-Gen", "ckpt" if s == "ckpt+pairs" else s), ("RAG-Seq", s))
                 if r not in runs and r[0] in cases]
    work = a.workdir or tmp.name
    results: dict[tuple[str, str], dict] = {}
    for case, setting in runs:
        cmd = [sys.executable, __file__, "--worker", "--case", case, "--threads", str(a.threads),
               "--overrides", json.dumps(_overrides(a, case, setting, f"{work}/runs"))]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp.name)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            console.print(f"[red]{case} / {setting} failed[/red]\n{proc.stderr[-3000:]}")
            return 1
        results[case, setting] = r = json.loads(line[len("RESULT "):])
        console.print(f"  {case:10s} {setting:10s} phase peak {r['peak_gb']:.2f} GB, run {r['run_gb']:.2f} GB "
                      f"({time.perf_counter() - t0:.0f} s)")

    t = Table(title=f"Peak host RSS per phase (GB), {a.questions} questions x {a.k} passages per step")
    for col in ("configuration", "setting", "phase peak RSS", "vs Ft-Gen (same setting)", "vs No-FT eval",
                "run peak (all phases)", "train GFLOP/s", "MFU"):
        t.add_column(col, justify="left" if col in ("configuration", "setting") else "right")
    eval_peak = results.get(("No-FT eval", "before"), {}).get("peak_gb")
    for (case, setting), r in results.items():
        ft = results.get(("Ft-Gen", "ckpt" if setting == "ckpt+pairs" else setting))
        rate = r["flops"] / r["wall_s"] if case != "No-FT eval" and r["wall_s"] else None
        t.add_row(case, setting if case != "No-FT eval" else "-", f"{r['peak_gb']:.2f}",
                  f"{r['peak_gb'] / ft['peak_gb']:.2f}x" if ft and case != "No-FT eval" else "-",
                  f"{r['peak_gb'] / eval_peak:.2f}x" if eval_peak else "-", f"{r['run_gb']:.2f}",
                  f"{rate / 1e9:.2f}" if rate else "-", f"{rate / peak:.3f}" if rate else "-")
    console.print(t)
    console.print("MFU = the ledger's training FLOPs (model FLOPs: checkpointing's recompute is not counted) / "
                  "training wall-clock / matmul peak.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

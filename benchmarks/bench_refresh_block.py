"""Time the trainers spend blocked on asynchronous index refresh, as a share of their step time.

Runs the real distributed runner (``launch/train.py``'s ``distrag.distributed.run``) twice under
``torchrun`` on CPU (gloo), joint RAG-Token training with tiny random models on the synthetic task:

* **refresh** -- 3 processes: 2 trainers + 1 index rank, ``train.refresh_every=2`` (trainer 0 hands the
  question encoder's weights to the index rank every 2 steps; new versions are adopted when published);
* **frozen**  -- 2 processes: 2 trainers, ``train.refresh_every=0`` (no index rank, frozen index).

Each trainer is instrumented from this script (no library change): wall time of every optimizer step
(from one ``on_step_start`` to the next), time inside ``IndexClient.poll`` (the per-step decision
broadcast, including the swap ``load_fn`` when a version is adopted), inside ``_load_index`` (the swap alone,
what MLflow records as ``index/swap_s``) and inside ``IndexClient.submit_weights`` (trainer 0 serialises
the encoder's weights and writes them atomically). Blocked = poll + submit. Goal: blocked / step < 1 %.

Only trainer 0 writes the hand-off; trainer 1 waits for it in the next trainer collective (the
preemption flag all-reduce at the end of ``on_step_end``, or the next step's poll), which is not timed here,
so trainer 0's share is the one to read. The step-time ratio refresh / frozen is printed too.
Each trainer also reports the library's own account (``IndexClient.stats``, what MLflow records as
``index/blocked_s``, ``index/blocked_share``, ``index/staleness_mean`` / ``_max``): staleness is, at every
step, how many optimizer steps the index in use lags behind the encoder that trains.

``--real`` is the real-model run: MiniLM (all-MiniLM-L6-v2) question encoder, SmolLM2-135M generator
(offline alias ``SmolLM2-135M-Instruct-GGUF``, LoRA), joint RAG-Token at k = 3 on a generated corpus of
``--passages`` (default 20,000) passages written as the jsonl loader's pair of files: the synthetic
world's questions and passages plus filler passages built from the world's sentences (log-normal
lengths, median 30 words, 8-120, like the world's own passages: median 37). MLflow is on (SQLite in the run
folder) and the metrics it recorded are read back and printed. ``--keep DIR`` keeps the frozen-index
cache, so a second run skips the first corpus encoding.
On a GPU cluster the index rank has its own device;
on this CPU box it competes with the trainers for the same cores, so that ratio mixes CPU contention in
with the protocol's cost -- the blocked share is the protocol's own number.

    python benchmarks/bench_refresh_block.py --quick           # tiny models, 20 steps
    python benchmarks/bench_refresh_block.py                    # tiny models, 40 steps
    python benchmarks/bench_refresh_block.py --real-embedder    # MiniLM question encoder (90 MB hand-offs)
    python benchmarks/bench_refresh_block.py --real --steps 80 --peer-steps 30 --refresh-every 4 --keep /tmp/brr
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

from _common import load_avg  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# worker: one process of the torchrun job


def worker(config: str, out: str, overrides: list[str]) -> int:
    from distrag.config import load_config
    from distrag.distributed import roles
    from distrag.distributed.deepspeed_trainer import DistributedTrainer
    from distrag.distributed.refresh_client import IndexClient
    from distrag.distributed.runner import run, run_dir

    rec = {"step_start": [], "poll_s": [], "swap_s": [], "submit_s": [], "adopted_at": []}

    def timed(cls, name, key):
        orig = getattr(cls, name)

        def wrapper(self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return orig(self, *a, **kw)
            finally:
                rec[key].append(time.perf_counter() - t0)
        setattr(cls, name, wrapper)

    orig_start = DistributedTrainer.on_step_start

    def on_step_start(self, phase):
        rec["step_start"].append(time.perf_counter())
        v0 = self.state.index_version
        orig_start(self, phase)
        if self.state.index_version != v0:
            rec["adopted_at"].append(self.state.global_step)

    orig_train = DistributedTrainer.train

    def train(self):
        st = orig_train(self)
        rec["step_start"].append(time.perf_counter())  # end of the last step
        info = self.ctx.info
        lib = None
        if self.client is not None:  # the library's own account (what MLflow records)
            s = self.client.stats
            lib = {"blocked_s": s.blocked_s, "staleness_mean": s.staleness_mean,
                   "staleness_max": s.staleness_max, "n_adopted": s.n_adopted,
                   "adoptions": [[d.version, d.weights_step, d.step] for d in self.client.history]}
        Path(out, f"trainer_{info.trainer_rank}.json").write_text(json.dumps(
            {**rec, "trainer_rank": info.trainer_rank, "n_trainers": info.n_trainers,
             "index_version": self.state.index_version, "lib": lib, "run_dir": str(run_dir(self.cfg))}))
        return st

    DistributedTrainer.on_step_start = on_step_start
    DistributedTrainer.train = train
    timed(IndexClient, "poll", "poll_s")
    timed(IndexClient, "submit_weights", "submit_s")
    timed(DistributedTrainer, "_load_index", "swap_s")
    cfg = load_config(config, overrides)
    rc = run(cfg)
    roles.finish(rc)
    return rc  # not reached


# ----------------------------------------------------------------------------------------------
# launcher


def write_config(tmp: Path, steps: int, real_embedder: bool) -> Path:
    from distrag.config import SyntheticConfig
    from distrag.data.synthetic import make_synthetic
    from distrag.models.tiny import make_tiny_causal_lm, make_tiny_encoder

    syn = {"n_entities": 40, "n_single_hop": 80, "n_two_hop": 40}
    texts = make_synthetic(SyntheticConfig(**syn)).corpus.texts()
    enc = "all-MiniLM-L6-v2" if real_embedder else str(make_tiny_encoder(tmp / "enc", texts=texts, hidden=64,
                                                                          layers=2))
    lm = str(make_tiny_causal_lm(tmp / "lm", texts=texts, hidden=64, layers=2))
    cfg = {
        "data": {"format": "synthetic", "synthetic": syn},
        "embedder": {"model": enc},
        "generator": {"model": lm, "max_new_tokens": 4, "max_passage_chars": 300, "dtype": "float32"},
        "retrieval": {"top_k": 3},
        "train": {"strategy": "joint", "rag_loss": "token", "train_k": 3, "batch_size": 4,
                  "micro_batch_size": 2,
                  "max_steps": steps, "lr_embedder": 5e-5, "lr_generator": 1e-3},
        "distributed": {"zero_stage": 2, "index_rank": -1, "on_index_failure": "continue",
                        "index_timeout_s": 300, "checkpoint_every": 0},
        "tracking": {"enabled": False},
        "max_eval_questions": 4,
        "output_dir": str(tmp / "runs"),
    }
    return _dump(tmp / "bench_refresh.yaml", cfg)


def _dump(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def write_corpus(folder: Path, n_passages: int, seed: int = 0) -> tuple[Path, Path, dict]:
    """The real run's data as the jsonl loader's pair (questions.jsonl, corpus.jsonl) under ``folder``:
    the synthetic world (its questions, with gold ids, and its passages) plus filler passages up to
    ``n_passages``. A filler passage is a title and sentences drawn from the world's passages (so it
    shares its names, cities and employers: hard negatives), cut to a log-normal word count (median 30,
    8-120 words; the world's own passages have a median of 37). Returns the two paths and the corpus's
    word-length statistics. Reused when present."""
    import random
    import statistics

    from distrag.config import SyntheticConfig
    from distrag.data.synthetic import make_synthetic

    qpath, cpath = folder / "questions.jsonl", folder / "corpus.jsonl"
    if qpath.exists() and cpath.exists() and sum(1 for _ in cpath.open()) == n_passages:
        lengths = [len(json.loads(line)["text"].split()) for line in cpath.open()]
    else:
        folder.mkdir(parents=True, exist_ok=True)
        data = make_synthetic(SyntheticConfig(n_entities=400, n_single_hop=200, n_two_hop=100, seed=seed))
        rng = random.Random(seed)
        sentences = [x.strip() + "." for p in data.corpus.passages for x in p.text.split(". ") if x.strip()]
        titles = [p.title for p in data.corpus.passages if p.title]
        rows = [{"id": p.id, "title": p.title, "text": p.text} for p in data.corpus.passages]
        while len(rows) < n_passages:
            want = min(120, max(8, round(rng.lognormvariate(3.4, 0.5))))  # median e^3.4 ~ 30 words
            words: list[str] = []
            while len(words) < want:
                words += rng.choice(sentences).split()
            rows.append({"id": f"filler-{len(rows):07d}", "title": f"{rng.choice(titles)} ({len(rows)})",
                         "text": " ".join(words[:want]).rstrip(".") + "."})
        rows = rows[:n_passages]
        with cpath.open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with qpath.open("w") as f:
            f.writelines(json.dumps({"id": q.id, "question": q.text, "answers": list(q.answers),
                                     "gold_passage_ids": list(q.gold_passage_ids or [])}) + "\n"
                         for q in data.questions)
        lengths = [len(r["text"].split()) for r in rows]
    stats = {"passages": len(lengths), "median_words": statistics.median(lengths),
             "mean_words": statistics.fmean(lengths), "max_words": max(lengths)}
    return qpath, cpath, stats


def write_real_config(tmp: Path, steps: int, n_passages: int) -> tuple[Path, dict]:
    """The real-model run: MiniLM + SmolLM2-135M (LoRA), joint RAG-Token k = 3, batch 2 per trainer, on the
    generated jsonl corpus; MLflow on (SQLite in ``tmp``); the corpus re-embedding after training is off
    (it is not part of the trainers' steps and would cost one more corpus pass)."""
    qpath, cpath, stats = write_corpus(tmp / "data", n_passages)
    cfg = {
        "data": {"format": "jsonl", "path": str(qpath), "corpus_path": str(cpath)},
        "embedder": {"model": "all-MiniLM-L6-v2"},
        "generator": {"model": "SmolLM2-135M-Instruct-GGUF", "max_new_tokens": 8, "max_passage_chars": 300,
                      "dtype": "float32"},
        "retrieval": {"top_k": 3},
        "index": {"reembed_after_training": False},
        "train": {"strategy": "joint", "rag_loss": "token", "train_k": 3, "batch_size": 2,
                  "micro_batch_size": 2, "max_steps": steps, "lr_embedder": 2e-5, "lr_generator": 2e-4},
        "distributed": {"zero_stage": 2, "index_rank": -1, "on_index_failure": "continue",
                        "index_timeout_s": 3600, "checkpoint_every": 0},
        "tracking": {"enabled": True, "uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "bench_refresh"},
        "max_eval_questions": 4,
        "output_dir": str(tmp / "runs"),
    }
    return _dump(tmp / "bench_refresh_real.yaml", cfg), stats


def warm_index_cache(config: Path) -> float:
    """Build the frozen index of ``config``'s corpus into its cache (``output_dir/index``) before the timed
    runs, as trainer 0's setup would (the other trainer would wait for it at a barrier); returns seconds."""
    from distrag.config import load_config
    from distrag.data import load_data
    from distrag.models.embedder import Embedder
    from distrag.retrieval.corpus_encoding import load_or_build_index

    cfg = load_config(str(config), [])
    t0 = time.perf_counter()
    splits = load_data(cfg.data).split(cfg.data.dev_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    embedder = Embedder.from_config(cfg.embedder)
    embedder.eval()
    load_or_build_index(Path(cfg.output_dir) / "index", splits.corpus, embedder, cfg, show_progress=False)
    return time.perf_counter() - t0


def mlflow_metrics(tmp: Path, run_name: str) -> dict[str, float]:
    """The metrics MLflow recorded for the run named ``run_name`` (their last values)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bench_refresh")
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return dict(runs[0].data.metrics) if runs else {}


def launch(config: Path, out: Path, nproc: int, overrides: list[str], timeout: float) -> float:
    import socket

    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    port = min(port, 60000)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", str(nproc), "--master_port", str(port),
           str(Path(__file__).resolve()),
           "--worker", "--config", str(config), "--out", str(out), *overrides]
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        p = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"torchrun exited {p.returncode}; see {out / 'log.txt'}:\n"
                           + (out / "log.txt").read_text()[-3000:])
    return wall


def summarise(out: Path, skip: int) -> list[dict]:
    rows = []
    for f in sorted(out.glob("trainer_*.json")):
        r = json.loads(f.read_text())
        starts = r["step_start"]
        steps = [b - a for a, b in zip(starts, starts[1:])][skip:]
        polls = r["poll_s"][skip:] if r["poll_s"] else []
        # submit_weights is called in on_step_end of the step it belongs to; count those after warm-up
        submit = sum(r["submit_s"][skip // 2:]) if r["submit_s"] else 0.0
        total = sum(steps)
        blocked = sum(polls) + submit
        rows.append({"trainer": r["trainer_rank"], "steps": len(steps), "step_med": statistics.median(steps),
                     "step_total": total, "poll": sum(polls), "poll_max": max(polls) if polls else 0.0,
                     "swap": sum(r["swap_s"]), "n_swaps": len(r["swap_s"]), "submit": submit,
                     "n_submit": len(r["submit_s"]), "blocked": blocked,
                     "share": blocked / total if total else 0.0,
                     "versions": r["index_version"], "adopted_at": r["adopted_at"], "lib": r.get("lib"),
                     "published": _published(r.get("run_dir"))})
    return rows


def _published(folder: str | None) -> int:
    """Index versions the index rank published in the run folder ``folder``."""
    from distrag.retrieval import index_store

    latest = index_store.latest_version(Path(folder) / "index") if folder else None
    return latest[0] if latest else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 steps")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 40, 20 with --quick)")
    ap.add_argument("--refresh-every", type=int, default=2)
    ap.add_argument("--skip", type=int, default=2, help="first steps left out (engine warm-up)")
    ap.add_argument("--real-embedder", action="store_true", help="MiniLM question encoder")
    ap.add_argument("--real", action="store_true",
                    help="MiniLM + SmolLM2-135M on a generated corpus of --passages passages, MLflow on")
    ap.add_argument("--passages", type=int, default=20_000, help="corpus size of --real")
    ap.add_argument("--peer-steps", type=int, default=None, help="steps of the frozen-index run (default --steps)")
    ap.add_argument("--keep", default=None, help="keep the run folders here")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.worker:
        return worker(args.config, args.out, rest)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 130))
    steps = args.steps or (20 if args.quick else 40)
    tmpobj = None
    if args.keep:
        tmp = Path(args.keep)
        tmp.mkdir(parents=True, exist_ok=True)
    else:
        tmpobj = tempfile.TemporaryDirectory(prefix="bench_refresh_")
        tmp = Path(tmpobj.name)
    corpus_note = ""
    if args.real:
        config, cstats = write_real_config(tmp, steps, args.passages)
        label = "MiniLM + SmolLM2-135M (LoRA), joint RAG-Token k=3, batch 2 (micro 2) per trainer"
        corpus_note = (f"corpus {cstats['passages']} passages (median {cstats['median_words']:.0f} words, mean "
                       f"{cstats['mean_words']:.1f}, max {cstats['max_words']})")
    else:
        config = write_config(tmp, steps, args.real_embedder)
        label = "MiniLM question encoder + " if args.real_embedder else "tiny BERT + "
        label += "tiny Llama, joint RAG-Token, batch 4 (micro 2) per trainer"
    peer_steps = args.peer_steps or steps
    if args.real:
        console.print(f"frozen index of the corpus (cached in --keep): {warm_index_cache(config):.0f}s  "
                      f"load avg: {load_avg()}")
    console.print(f"{label}, {steps} steps ({peer_steps} frozen), ZeRO-2, gloo, OMP_NUM_THREADS=1 {corpus_note}  "
                  f"load avg: {load_avg()}")
    walls = {}
    results = {}
    for name, nproc, rf, n in (("refresh", 3, args.refresh_every, steps), ("frozen", 2, 0, peer_steps)):
        over = [f"train.refresh_every={rf}", f"train.max_steps={n}"]
        if args.real:
            over.append(f"tracking.run_name={name}")
        walls[name] = launch(config, tmp / name, nproc, over, args.timeout)
        results[name] = summarise(tmp / name, args.skip)
        console.print(f"  {name}: {nproc} processes, wall {walls[name]:.1f}s  load avg: {load_avg()}")

    table = Table(title=f"Trainer time blocked on index refresh (steps {args.skip + 1}..{steps}; "
                        f"refresh every "
                        f"{args.refresh_every} steps vs frozen index)")
    for col in ("run", "trainer", "median step ms", "poll ms (sum)", "max poll ms", "swap ms (n)",
                "submit ms (n)", "blocked / step time", "last version"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, rows in results.items():
        for r in rows:
            table.add_row(name, str(r["trainer"]), f"{1e3 * r['step_med']:.1f}", f"{1e3 * r['poll']:.1f}",
                          f"{1e3 * r['poll_max']:.1f}", f"{1e3 * r['swap']:.1f} ({r['n_swaps']})",
                          f"{1e3 * r['submit']:.1f} ({r['n_submit']})", f"{100 * r['share']:.2f} %",
                          str(r["versions"] if name == "refresh" else "-"))
    console.print(table)
    share = max(r["share"] for r in results["refresh"])
    ratio = statistics.median(r["step_med"] for r in results["refresh"]) / \
        statistics.median(r["step_med"] for r in results["frozen"])
    console.print(f"worst trainer blocked share: [bold]{100 * share:.2f} %[/bold] (goal < 1 %)   "
                  f"median step time "
                  f"refresh / frozen: {ratio:.2f}x (includes the index rank's CPU contention on this box)   "
                  + ("[green]OK[/green]" if share < 0.01 else "[yellow]above goal[/yellow]"))
    lib = Table(title="The library's account (IndexClient.stats, whole training incl. warm-up; logged to MLflow)")
    for col in ("trainer", "blocked s", "versions published", "adopted", "adopted at step (version, weights step)",
                "staleness mean", "staleness max"):
        lib.add_column(col, justify="right")
    for r in results["refresh"]:
        st = r["lib"] or {}
        lib.add_row(str(r["trainer"]), f"{st.get('blocked_s', 0.0):.2f}", str(r["published"]),
                    str(st.get("n_adopted", 0)),
                    " ".join(f"{s}(v{v},w{w})" for v, w, s in st.get("adoptions", [])) or "-",
                    f"{st.get('staleness_mean', 0.0):.2f}", str(st.get("staleness_max", 0)))
    console.print(lib)
    if args.real:
        m = mlflow_metrics(tmp, "refresh")
        keys = sorted(k for k in m if k.startswith(("index/", "dist/")))
        console.print("MLflow run 'refresh': " + ("  ".join(f"{k}={m[k]:.4g}" for k in keys) or "no metrics found"))
    if tmpobj is not None:
        tmpobj.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

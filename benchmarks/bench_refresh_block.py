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
On a GPU cluster the index rank has its own device;
on this CPU box it competes with the trainers for the same cores, so that ratio mixes CPU contention in
with the protocol's cost -- the blocked share is the protocol's own number.

    python benchmarks/bench_refresh_block.py --quick           # tiny models, 20 steps
    python benchmarks/bench_refresh_block.py                    # tiny models, 40 steps
    python benchmarks/bench_refresh_block.py --real-embedder    # MiniLM question encoder (90 MB hand-offs)
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
    from distrag.distributed.runner import run

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
        Path(out, f"trainer_{info.trainer_rank}.json").write_text(json.dumps(
            {**rec, "trainer_rank": info.trainer_rank, "n_trainers": info.n_trainers,
             "index_version": self.state.index_version}))
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
    import yaml

    path = tmp / "bench_refresh.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


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
                     "versions": r["index_version"], "adopted_at": r["adopted_at"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 steps")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 40, 20 with --quick)")
    ap.add_argument("--refresh-every", type=int, default=2)
    ap.add_argument("--skip", type=int, default=2, help="first steps left out (engine warm-up)")
    ap.add_argument("--real-embedder", action="store_true", help="MiniLM question encoder")
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
    config = write_config(tmp, steps, args.real_embedder)
    label = "MiniLM question encoder + " if args.real_embedder else "tiny BERT + "
    label += "tiny Llama, joint RAG-Token"
    console.print(f"{label}, {steps} steps, batch 4 (micro 2) per trainer, ZeRO-2, gloo, OMP_NUM_THREADS=1  "
                  f"load avg: {load_avg()}")
    walls = {}
    results = {}
    for name, nproc, rf in (("refresh", 3, args.refresh_every), ("frozen", 2, 0)):
        walls[name] = launch(config, tmp / name, nproc, [f"train.refresh_every={rf}"], args.timeout)
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
    if tmpobj is not None:
        tmpobj.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Host memory of a trainer and of `distrag eval` against corpus size: does it grow by more than the index?

Issue 17: a trainer (and evaluation) held the corpus as ``Passage`` objects, about 1 KB a passage per process. With
``data.corpus_on_disk`` the passages are read by row from the corpus file (``distrag/data/disk_corpus.py``) and every
encoding streams it chunk by chunk, so what should grow with the corpus is the index the process searches
(``N x d x 4`` bytes for ``flat``) and nothing else. Goal: growth from the small to the large corpus at most the
growth of the index's bytes plus 10 % (ratio <= 1.10).

Each run is its own process, through the production path, with tiny random models (BERT and Llama, hidden
``--hidden``), a flat index, ``data.format: jsonl`` over a synthetic corpus of ``distrag/data/large_corpus.py``:

* **trainer**: ``Experiment.setup`` (the corpus' side files, the frozen index: encoded in chunks of ``--chunk``
  passages to a vector store, built, saved) and ``--steps`` Ft-Gen steps (retrieval, passages by row into prompts);
  a fresh output folder, so nothing comes from a cache;
* **eval**: the ``distrag eval`` command (``distrag.cli.main`` in a subprocess) on the trainer's output folder: the
  side files and the index from the cache (``--cold-eval``: a fresh folder, everything built again);
* **peer** (``--no-peer`` to skip): the trainer with ``data.corpus_on_disk: false``, every passage in memory (index
  from the cache: only the corpus differs), the way trainers held the corpus before.

Peak RSS is the kernel's high-water mark over the whole process, read through ``distrag.costs.memory``'s
``PROCESS_MEMORY`` watch that stays open around everything (the ledger resets the mark per phase, and with it
``getrusage``'s ``ru_maxrss``, which is printed too for comparison: it only covers the time since the last
reset). The chunk size is the same at every corpus size: it bounds the encoding's own memory, not the corpus'.

    OMP_NUM_THREADS=2 python benchmarks/bench_corpus_memory.py                      # 10k and 1M passages
    OMP_NUM_THREADS=2 python benchmarks/bench_corpus_memory.py --quick              # 2k and 20k, a minute
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._common import load_avg  # noqa: E402

MB = 1 << 20
LIMIT = 1.10
EVAL_WRAPPER = """
import json, sys
from distrag.costs.memory import PROCESS_MEMORY, rss_bytes
watch = PROCESS_MEMORY.start()
from distrag.cli import main
rc = main(sys.argv[2:])
import resource
json.dump({"rc": rc, "peak_rss": PROCESS_MEMORY.stop(watch).rss, "end_rss": rss_bytes(),
           "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, open(sys.argv[1], "w"))
sys.exit(rc)
"""


# ----------------------------------------------------------------------------------------------
# the worker (one trainer process)


def trainer_worker(config: str, overrides: list[str], result: str) -> int:
    from distrag.costs.memory import PROCESS_MEMORY, rss_bytes

    whole = PROCESS_MEMORY.start()
    from distrag.config import load_config
    from distrag.strategies import BY_KEY
    from distrag.training.experiment import Experiment

    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    setup = PROCESS_MEMORY.start()
    exp = Experiment(cfg, show_progress=False).setup()
    setup_peak, setup_s, after_setup = PROCESS_MEMORY.stop(setup).rss, time.perf_counter() - t0, rss_bytes()
    t1 = time.perf_counter()
    train = PROCESS_MEMORY.start()
    models = exp.train(BY_KEY["gen_ft"].apply(cfg))
    train_peak, train_s = PROCESS_MEMORY.stop(train).rss, time.perf_counter() - t1
    status = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in
              Path("/proc/self/status").read_text().splitlines()) if k in ("RssAnon", "RssFile")}
    out = {"peak_rss": PROCESS_MEMORY.stop(whole).rss, "setup_peak": setup_peak, "train_peak": train_peak,
           "after_setup": after_setup, "end_rss": rss_bytes(), **status, "setup_s": setup_s, "train_s": train_s,
           "index_bytes": len(exp.index) * exp.index.dim * 4, "n_passages": len(exp.splits.corpus),
           "on_disk": exp.splits.corpus.on_disk, "losses": [h["loss"] for h in models.history],
           "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    Path(result).write_text(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------------------------
# the parent


def corpus_file(work: Path, n: int, seed: int) -> Path:
    from distrag.data.large_corpus import write_large_corpus

    path = work / f"corpus_{n}_{seed}.jsonl"
    if not path.exists():
        t0 = time.perf_counter()
        write_large_corpus(path, n, seed=seed)
        print(f"  wrote {n:,} passages ({path.stat().st_size / MB:,.0f} MiB) in {time.perf_counter() - t0:.0f} s",
              flush=True)
    return path


def questions_file(work: Path, corpus: Path, n_questions: int) -> Path:
    """``n_questions`` questions on the corpus' first passages: the first words of a passage, its title's first word
    as the answer, the passage as the gold one (the same questions at every corpus size)."""
    path = work / f"questions_{n_questions}.jsonl"
    lines = []
    with open(corpus, encoding="utf-8") as f:
        for i, line in zip(range(n_questions), f):
            rec = json.loads(line)
            lines.append(json.dumps({"id": f"q{i}", "question": " ".join(rec["text"].split()[:10]) + "?",
                                     "answers": [rec["title"].split()[0]], "gold_passage_ids": [rec["id"]]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_models(work: Path, sample: Path, hidden: int) -> tuple[Path, Path]:
    from distrag.models.tiny import make_tiny_causal_lm, make_tiny_encoder

    enc, lm = work / f"tiny_bert_h{hidden}", work / f"tiny_llama_h{hidden}"
    if not (enc / "config.json").exists() or not (lm / "config.json").exists():
        with open(sample, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for _, line in zip(range(2_000), f)]
        make_tiny_encoder(enc, texts=texts, hidden=hidden, layers=2, vocab_size=2_000)
        make_tiny_causal_lm(lm, texts=texts, hidden=hidden, layers=2, vocab_size=2_000)
    return enc, lm


def overrides(a, corpus: Path, questions: Path, models: tuple[Path, Path], out: Path, on_disk: bool) -> list[str]:
    return ["data.format=jsonl", f"data.path={questions}", f"data.corpus_path={corpus}",
            f"data.corpus_on_disk={'true' if on_disk else 'false'}", "data.dev_fraction=0.2", "data.test_fraction=0.2",
            f"embedder.model={models[0]}", f"embedder.max_length={a.max_length}", "embedder.batch_size=256",
            f"generator.model={models[1]}", "generator.max_new_tokens=4", "generator.max_passage_chars=200",
            "generator.dtype=float32", "index.kind=flat", "index.device=cpu", f"index.chunk_passages={a.chunk}",
            "retrieval.top_k=3", f"train.max_steps={a.steps}", "train.batch_size=2", "train.micro_batch_size=2",
            f"max_eval_questions={a.eval_questions}", "tracking.enabled=false", f"output_dir={out}"]


def run_trainer(o: list[str], label: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--worker", result, "--", *o]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{label} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(Path(result).read_text())
    out["wall_s"] = time.perf_counter() - t0
    print(f"  [{label}] peak {out['peak_rss'] / MB:,.0f} MiB (setup {out['setup_peak'] / MB:,.0f}, train "
          f"{out['train_peak'] / MB:,.0f}, ru_maxrss {out['ru_maxrss'] / MB:,.0f}); index "
          f"{out['index_bytes'] / MB:,.0f} MiB; setup {out['setup_s']:.0f} s, {out['wall_s']:.0f} s in all; load "
          f"{load_avg()}", flush=True)
    return out


def run_eval(o: list[str], label: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    t0 = time.perf_counter()
    cmd = [sys.executable, "-c", EVAL_WRAPPER, result, "eval", "--no-progress", "--quiet", *o]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{label} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}")
    out = json.loads(Path(result).read_text())
    out["wall_s"] = time.perf_counter() - t0
    print(f"  [{label}] peak {out['peak_rss'] / MB:,.0f} MiB (getrusage's ru_maxrss at exit, reset by the ledger's "
          f"phases: {out['ru_maxrss'] / MB:,.0f} MiB); {out['wall_s']:.0f} s; load {load_avg()}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return trainer_worker(None, argv[3:], argv[1])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[10_000, 1_000_000], help="small and large corpus")
    ap.add_argument("--chunk", type=int, default=10_000, help="index.chunk_passages, the same at both sizes")
    ap.add_argument("--hidden", type=int, default=64, help="tiny models' width = the index dimension")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--steps", type=int, default=2, help="Ft-Gen steps of the trainer")
    ap.add_argument("--eval-questions", type=int, default=4)
    ap.add_argument("--cold-eval", action="store_true", help="eval in a fresh folder (side files, index rebuilt)")
    ap.add_argument("--no-peer", action="store_true", help="skip the in-memory corpus runs")
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "distrag_bench_corpus"))
    ap.add_argument("--keep", action="store_true", help="keep the runs' output folders")
    ap.add_argument("--quick", action="store_true", help="2,000 and 20,000 passages, chunks of 1,000")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.quick:
        a.sizes, a.chunk = [2_000, 20_000], 1_000
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load {load_avg()}; "
          f"work dir {work}", flush=True)
    corpora = {n: corpus_file(work, n, a.seed) for n in a.sizes}
    questions = questions_file(work, corpora[a.sizes[0]], a.questions)
    models = tiny_models(work, corpora[a.sizes[0]], a.hidden)
    rows: dict[tuple[str, int], dict] = {}
    for n in a.sizes:
        out = work / f"run_{n}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"{n:,} passages ({corpora[n].stat().st_size / MB:,.0f} MiB of JSONL):", flush=True)
        rows["trainer", n] = run_trainer(overrides(a, corpora[n], questions, models, out, True), f"trainer {n:,}")
        eval_out = work / f"run_{n}_eval" if a.cold_eval else out
        shutil.rmtree(work / f"run_{n}_eval", ignore_errors=True)
        rows["eval", n] = run_eval(overrides(a, corpora[n], questions, models, eval_out, True), f"eval {n:,}")
        if not a.no_peer:
            rows["peer", n] = run_trainer(overrides(a, corpora[n], questions, models, out, False),
                                          f"trainer, corpus in memory {n:,}")
        if not a.keep:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(work / f"run_{n}_eval", ignore_errors=True)
    small, large = a.sizes
    d = a.hidden
    index_growth = (large - small) * d * 4
    print(f"\nGrowth from {small:,} to {large:,} passages (flat index, d = {d}: index +{index_growth / MB:,.1f} MiB); "
          f"goal: growth / index growth <= {LIMIT}; load {load_avg()}")
    header = ("process", f"peak RSS {small:,} (MiB)", f"peak RSS {large:,} (MiB)", "growth (MiB)",
              "index growth (MiB)", "growth / index growth", "verdict")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for kind, key, name in (
            ("trainer", "peak_rss", "trainer (set-up + Ft-Gen steps), corpus on disk: whole process"),
            ("trainer", "train_peak", "  the same, training phase (the index in memory)"),
            ("eval", "peak_rss", "`distrag eval`, corpus on disk" + (" (cold)" if a.cold_eval else " (cached index)")),
            ("peer", "peak_rss", "trainer, corpus in memory (index cached): whole process")):
        if (kind, small) not in rows:
            continue
        lo, hi = rows[kind, small][key], rows[kind, large][key]
        ratio = (hi - lo) / index_growth
        verdict = "-" if kind == "peer" or key != "peak_rss" else ("met" if ratio <= LIMIT else "NOT met")
        print(f"| {name} | {lo / MB:,.0f} | {hi / MB:,.0f} | {(hi - lo) / MB:,.0f} | {index_growth / MB:,.0f} | "
              f"{ratio:.2f} | {verdict} |")
    tl, ts = rows["trainer", large], rows["trainer", small]
    print(f"\ntrainer at {large:,}: setup {tl['setup_s']:.0f} s, train {tl['train_s']:.0f} s; at the end RssAnon "
          f"{tl.get('RssAnon', 0) / MB:,.0f} MiB, RssFile {tl.get('RssFile', 0) / MB:,.0f} MiB (at {small:,}: "
          f"{ts.get('RssAnon', 0) / MB:,.0f} and {ts.get('RssFile', 0) / MB:,.0f})")
    if ("peer", large) in rows:
        peer = rows["peer", large]["losses"]
        same = len(peer) == len(tl["losses"]) and all(abs(x - y) <= 1e-5 * max(abs(x), abs(y))
                                                      for x, y in zip(peer, tl["losses"]))
        print(f"Ft-Gen losses, corpus on disk vs in memory at {large:,}: {tl['losses']} vs "
              f"{rows['peer', large]['losses']} ({'equal' if same else 'DIFFERENT'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

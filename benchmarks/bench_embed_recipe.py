"""Ft-Embed's recipe on real HotPotQA: both sides of the shared encoder against the question side only.

Issue 18 (item 1): training the question side alone against frozen passage vectors, then re-embedding the corpus
with the trained encoder, gives back the gain (and more) once the passages are re-encoded; sentence-transformers'
MNRL trains the shared encoder on both sides. This script measures that on the shared samples with distrag's own
code: the loader (both HotPotQA samples: training questions from ``hotpot_train_sample100.json``, test questions
from ``hotpot_sample100.json``, the corpus their paragraphs de-duplicated by title), ``Trainer`` with an
``embed_ft`` phase (``train.embed_sides`` = ``both`` or ``question``, the same seed, steps, batch and learning
rate), the corpus re-embedded with the trained encoder (``build_index``, as ``index.reembed_after_training``
deploys it) and ``RAGPipeline.evaluate_retrieval``'s per-question Recall@5 / Recall@10 (share of each question's
gold passages in its top k). Retrieval only: no generator is loaded.

Rows: No-FT (the base encoder), each recipe against the re-embedded corpus (how it is deployed), and, for
reference, against the base encoder's frozen vectors. Each row's difference to No-FT is the mean of the
per-question differences with a 95 % paired bootstrap interval (questions resampled, seeded, 10,000 resamples:
``distrag.reporting.paired.paired_bootstrap``); ``--seeds`` > 1 trains each recipe once per seed and scores each
question by its mean over the seeds. Costs are the ledger's (training FLOPs; the re-embedding pass), the mean of a
training run over the seeds. The last lines compare the two recipes as deployed (re-embedded), paired.

    python benchmarks/bench_embed_recipe.py                       # MiniLM, 40 steps x 8 pairs, lr 1e-4, seed 0
    python benchmarks/bench_embed_recipe.py --seeds 0 1 2 --json out.json
    python benchmarks/bench_embed_recipe.py --quick               # tiny random encoder, 2 steps (a smoke run)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import load_avg  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hotpotqa"
RECIPES = {"both": "Ft-Embed, both sides", "question": "Ft-Embed, question side"}


def load_samples(train_path: Path, test_path: Path):
    """(corpus, training questions, test questions): each file through distrag's HotPotQA loader; the corpus is
    both files' paragraphs, de-duplicated by passage id (the title; the loader gives a title with two texts two
    ids), the first file's copy kept."""
    from distrag.data.hotpotqa import load_hotpotqa
    from distrag.data.records import Corpus

    train, test = load_hotpotqa(str(train_path)), load_hotpotqa(str(test_path))
    passages = {p.id: p for p in test.corpus}
    passages.update({p.id: p for p in train.corpus})
    order = list(dict.fromkeys([p.id for p in train.corpus] + [p.id for p in test.corpus]))
    return Corpus([passages[i] for i in order], source=f"{train_path.name} + {test_path.name}"), \
        train.questions, test.questions


def recall_rows(cfg, corpus, embedder, index, questions) -> dict[str, dict[str, float]]:
    """``{question id: {"r5": ..., "r10": ...}}`` with distrag's retrieval evaluation (no generator)."""
    from distrag.retrieval.pipeline import RAGPipeline

    pipe = RAGPipeline(cfg, corpus, embedder, None, index)
    out: dict[str, dict[str, float]] = {q.id: {} for q in questions}
    for k in (5, 10):
        res = pipe.evaluate_retrieval(questions, k=k, show_progress=False)
        for q, o in zip(questions, res.per_question):
            out[q.id][f"r{k}"] = float(o["recall"])
    return out


def train_recipe(cfg, corpus, train_qs, base, index, sides: str, seed: int):
    """The encoder Ft-Embed trains with ``train.embed_sides=sides`` (a copy of ``base``), its ledger and seconds."""
    from distrag.costs.accountant import Accountant
    from distrag.costs.ledger import CostLedger
    from distrag.training.trainer import Trainer

    c = cfg.model_copy(deep=True)
    c.train.embed_sides, c.train.seed = sides, seed
    ledger = CostLedger(memory=None)
    embedder = copy.deepcopy(base)
    t0 = time.perf_counter()
    Trainer(c, corpus, train_qs, embedder, None, index, Accountant(ledger), show_progress=False).train()
    return embedder.eval(), ledger, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-data", type=Path, default=DATA / "hotpot_train_sample100.json")
    ap.add_argument("--test-data", type=Path, default=DATA / "hotpot_sample100.json")
    ap.add_argument("--model", default="all-MiniLM-L6-v2", help="encoder (offline alias, folder, hub id)")
    ap.add_argument("--quick", action="store_true", help="tiny random encoder, 2 steps (checks the script)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8, help="(question, gold passage) pairs per step")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--hard-negatives", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=128, help="embedder.max_length (distrag's default)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, help="write every per-question result and the table here")
    ap.add_argument("--per-question", action="store_true", help="print each test question's recalls")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from distrag.config import build_config
    from distrag.costs.accountant import Accountant
    from distrag.costs.ledger import CostLedger
    from distrag.models.embedder import Embedder
    from distrag.reporting.paired import N_RESAMPLES, paired_bootstrap
    from distrag.retrieval.corpus_encoding import build_index

    if args.threads:
        torch.set_num_threads(args.threads)
    corpus, train_qs, test_qs = load_samples(args.train_data, args.test_data)
    tmp = tempfile.TemporaryDirectory(prefix="bench_embed_recipe_")
    model, steps = args.model, args.steps
    if args.quick:
        from distrag.models.tiny import make_tiny_encoder

        model, steps = str(make_tiny_encoder(f"{tmp.name}/enc", texts=corpus.texts()[:300])), 2
    cfg = build_config({"embedder": {"model": model, "max_length": args.max_length}, "index": {"device": "cpu"},
                        "tracking": {"enabled": False}, "retrieval": {"top_k": 10},
                        "train": {"strategy": "embed_ft", "max_steps": steps, "batch_size": args.batch,
                                  "micro_batch_size": args.batch, "lr_embedder": args.lr,
                                  "hard_negatives": args.hard_negatives}})
    print(f"data: {len(corpus)} passages, {len(train_qs)} training questions ({args.train_data.name}), "
          f"{len(test_qs)} test questions ({args.test_data.name}); encoder {model} (max_length {args.max_length}); "
          f"{steps} steps x {args.batch} pairs, lr {args.lr}, hard negatives {args.hard_negatives}, "
          f"seeds {args.seeds}; threads {torch.get_num_threads()}, load {load_avg()}", flush=True)

    base = Embedder.from_config(cfg.embedder, device="cpu").eval()
    base_ledger = CostLedger(memory=None)
    t0 = time.perf_counter()
    base_index = build_index(base, corpus, cfg.index, Accountant(base_ledger))
    reembed_s = time.perf_counter() - t0
    rows = {"No-FT": recall_rows(cfg, corpus, base, base_index, test_qs)}
    costs = {"No-FT": {"train_flops": 0.0, "reembed_flops": 0.0, "train_s": 0.0}}
    print(f"base index: {base_ledger.flops('encode_passages'):.3g} FLOPs, {reembed_s:.0f}s", flush=True)
    per_seed: dict[str, list[dict]] = {}
    runs_cost: dict[str, list[tuple[float, float, float]]] = {}
    for sides, label in RECIPES.items():
        for seed in args.seeds:
            emb, ledger, secs = train_recipe(cfg, corpus, train_qs, base, base_index, sides, seed)
            reembedded = build_index(emb, corpus, cfg.index, Accountant(ledger))
            for name, index in ((f"{label}, re-embedded", reembedded), (f"{label}, frozen vectors", base_index)):
                per_seed.setdefault(name, []).append(recall_rows(cfg, corpus, emb, index, test_qs))
            runs_cost.setdefault(label, []).append((ledger.flops("train"), ledger.flops("encode_passages"), secs))
            r = per_seed[f"{label}, re-embedded"][-1]
            print(f"  {label}, seed {seed}: trained in {secs:.0f}s ({ledger.flops('train'):.3g} FLOPs); "
                  f"re-embedded R@5 {100 * np.mean([v['r5'] for v in r.values()]):.1f}", flush=True)
    for label, runs in runs_cost.items():  # a training run's cost: the mean over the seeds
        flops, reembed, secs = (float(np.mean(x)) for x in zip(*runs))
        costs[f"{label}, re-embedded"] = {"train_flops": flops, "reembed_flops": reembed, "train_s": secs}
        costs[f"{label}, frozen vectors"] = {"train_flops": flops, "reembed_flops": 0.0, "train_s": secs}
    for name, runs in per_seed.items():  # each question's recall: its mean over the seeds
        rows[name] = {q: {m: float(np.mean([run[q][m] for run in runs])) for m in ("r5", "r10")} for q in runs[0]}

    ids = [q.id for q in test_qs]
    table = []
    for name, res in rows.items():
        line = {"row": name, **costs[name]}
        for m in ("r5", "r10"):
            a = np.array([rows["No-FT"][q][m] for q in ids])
            b = np.array([res[q][m] for q in ids])
            iv = paired_bootstrap(a, b, n_resamples=N_RESAMPLES, seed=0)
            line[m] = 100 * float(b.mean())
            line[f"{m}_diff"], line[f"{m}_low"], line[f"{m}_high"] = 100 * iv.mean, 100 * iv.low, 100 * iv.high
        table.append(line)

    if args.per_question:
        names = list(rows)
        print("\nper question (Recall@5 / Recall@10):\nquestion id\t" + "\t".join(names))
        for q in ids:
            print(q + "\t" + "\t".join(f"{rows[n][q]['r5']:.2f}/{rows[n][q]['r10']:.2f}" for n in names))
    print(f"\n{len(ids)} test questions; differences to No-FT with 95 % paired bootstrap intervals "
          f"({N_RESAMPLES} resamples, seed 0); load {load_avg()}\n")
    print("| Row | Recall@5 | vs No-FT (95% CI) | Recall@10 | vs No-FT (95% CI) | Train FLOPs | Re-embed FLOPs "
          "| Train s |")
    print("|---|---|---|---|---|---|---|---|")
    for t in table:
        diff = {m: "-" if t["row"] == "No-FT" else f"{t[f'{m}_diff']:+.1f} ({t[f'{m}_low']:+.1f} to "
                f"{t[f'{m}_high']:+.1f})" for m in ("r5", "r10")}
        print(f"| {t['row']} | {t['r5']:.1f} | {diff['r5']} | {t['r10']:.1f} | {diff['r10']} | "
              f"{t['train_flops']:.3g} | {t['reembed_flops']:.3g} | {t['train_s']:.0f} |")
    both, question = (f"{RECIPES[k]}, re-embedded" for k in ("both", "question"))
    for m, k in (("r5", 5), ("r10", 10)):
        iv = paired_bootstrap(np.array([rows[question][q][m] for q in ids]), np.array([rows[both][q][m] for q in ids]),
                              n_resamples=N_RESAMPLES, seed=0)
        print(f"{both} - {question}: Recall@{k} {100 * iv.mean:+.1f} ({100 * iv.low:+.1f} to {100 * iv.high:+.1f})")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "table": table,
                                         "per_question": rows}, indent=1))
        print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

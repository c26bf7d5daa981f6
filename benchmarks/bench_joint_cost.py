"""Cost of a joint RAG step (RAG-Sequence, RAG-Token) relative to an Ft-Gen step, for k retrieved passages.

For each k (default 1, 3, 5) three optimizer steps are timed on the SAME batch of questions, with the same
models (shared; each variant has its own optimizer):

* **Ft-Gen** (``gen_ft``: answer NLL) -- ONE prompt per question holding all k passages; retriever frozen;
* **RAG-Sequence** and **RAG-Token** (``joint``) -- k prompts per question, ONE passage each; the LoRA
  generator AND the question encoder train (the marginal over p(z|q) reaches the encoder).

Each reports the median seconds per step and the ledger's FLOPs per step (``distrag.costs.Accountant``:
the question encoder's forward/backward plus the generator's LoRA training FLOPs at the padded shapes run),
both as ratios to Ft-Gen at the same k, plus the padded generator tokens per step. Rounds alternate the
order of the three variants; every variant is warmed up at every k.

Why RAG is not k-fold: the k RAG prompts each repeat the fixed part (system prompt, template, question,
answer) but hold one passage, while Ft-Gen's single prompt holds k passages; the token ratio is
k (F + p) / (F + k p) for fixed part F and passage length p, below k whenever F is small against k p,
and attention (quadratic in sequence length) is cheaper on the k short prompts than on the one long one.

    python benchmarks/bench_joint_cost.py                 # SmolLM2-135M-Instruct + MiniLM, batch 4
    python benchmarks/bench_joint_cost.py --quick         # tiny random models
    python benchmarks/bench_joint_cost.py --ks 1 3 5 10 --batch 8 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import build_rag_world, load_avg  # noqa: E402  (benchmarks/ is on sys.path when a script runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", default="SmolLM2-135M-Instruct-GGUF")
    ap.add_argument("--embedder", default="all-MiniLM-L6-v2")
    ap.add_argument("--quick", action="store_true", help="tiny random models (seconds)")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--batch", type=int, default=4, help="questions per step")
    ap.add_argument("--rounds", type=int, default=None, help="alternated rounds (default 2, 5 with --quick)")
    ap.add_argument("--max-passage-chars", type=int, default=600)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from distrag.config import (
        ExperimentConfig,
        TrainConfig,
    )
    from distrag.costs.accountant import Accountant
    from distrag.costs.ledger import CostLedger
    from distrag.strategies import Phase
    from distrag.training.trainer import Trainer, set_embedder_trainable, set_generator_trainable

    console = Console(width=max(Console().width, 130))
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (5 if args.quick else 2)
    world = build_rag_world(args, "bench_joint_cost_")
    data, corpus, embedder, generator, index = world.data, world.corpus, world.embedder, world.generator, world.index
    ecfg, gcfg, label, tmp = world.ecfg, world.gcfg, world.label, world.tmp
    questions = data.questions[: args.batch]  # the same questions for every variant and k

    variants = [("Ft-Gen (1 prompt, k passages)", Phase("gen_ft", False, True, "nll")),
                ("RAG-Seq joint (k prompts)", Phase("joint_sequence", True, True, "rag_sequence")),
                ("RAG-Tok joint (k prompts)", Phase("joint_token", True, True, "rag_token"))]
    runners = {}
    for k in args.ks:
        for name, phase in variants:
            cfg = ExperimentConfig(embedder=ecfg, generator=gcfg, train=TrainConfig(
                strategy="joint", batch_size=args.batch, micro_batch_size=args.batch, train_k=k,
                rag_loss="token" if phase.loss == "rag_token" else "sequence"))
            tr = Trainer(cfg, corpus, data.questions, embedder, generator, index, Accountant(CostLedger()),
                         show_progress=False, phases=[phase])
            tr.make_optimizers(phase, 10_000)
            runners[(k, name)] = (tr, phase, [], [], [])  # trainer, phase, seconds, flops, padded tokens

    def one_step(k: int, name: str) -> None:
        tr, phase, secs, flops, toks = runners[(k, name)]
        set_embedder_trainable(embedder, phase.train_embedder)
        set_generator_trainable(generator, phase.train_generator)
        f0, n0 = tr.acc.ledger.total_flops, tr.acc.ledger.tokens
        t0 = time.perf_counter()
        loss, _ = tr.compute_loss(phase, questions, tr.step_rng())
        tr.backward(loss)
        tr.optimizer_step()
        secs.append(time.perf_counter() - t0)
        flops.append(tr.acc.ledger.total_flops - f0)
        toks.append(tr.acc.ledger.tokens - n0)

    console.print(f"models: {label}  batch: {args.batch} questions  ks: {args.ks}  rounds: {rounds}  "
                  f"torch threads: {torch.get_num_threads()}  load avg: {load_avg()}")
    for k in args.ks:  # warm-up (also allocates every optimizer's state)
        for name, _ in variants:
            one_step(k, name)
    for key in runners:
        for lst in runners[key][2:]:
            lst.clear()
    for r in range(rounds):
        for k in args.ks:
            for name, _ in (variants if r % 2 == 0 else variants[::-1]):
                one_step(k, name)

    table = Table(title=f"Joint RAG step vs Ft-Gen step, {args.batch} questions ({rounds} alternated rounds, "
                        "median)")
    for col in ("k", "step", "median s", "time vs Ft-Gen", "GFLOPs (ledger)", "FLOPs vs Ft-Gen",
                "tokens enc+gen", "tokens vs Ft-Gen"):
        table.add_column(col, justify="left" if col == "step" else "right")
    verdict = []
    for k in args.ks:
        base = runners[(k, variants[0][0])]
        b_s, b_f, b_t = statistics.median(base[2]), statistics.median(base[3]), statistics.median(base[4])
        for name, _ in variants:
            _, _, secs, flops, toks = runners[(k, name)]
            s, f, n = statistics.median(secs), statistics.median(flops), statistics.median(toks)
            table.add_row(str(k), name, f"{s:.3f}", f"{s / b_s:.2f}x", f"{f / 1e9:.1f}", f"{f / b_f:.2f}x",
                          f"{n:.0f}", f"{n / b_t:.2f}x")
            if name.startswith("RAG-Seq"):
                verdict.append(f"k={k}: {s / b_s:.2f}x time, {f / b_f:.2f}x FLOPs")
        table.add_section()
    console.print(table)
    console.print("RAG-Sequence vs Ft-Gen: " + "; ".join(verdict) + "  (a naive guess is k-fold; RAG prompts "
                  "hold one passage each, Ft-Gen's holds k, so the ratio is k(F+p)/(F+kp) in tokens)   "
                  f"load avg after: {load_avg()}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

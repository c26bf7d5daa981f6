"""Ft-Embed training step: ``Trainer`` (MNRL, both sides) vs sentence-transformers.

One step = tokenise + forward + ``MultipleNegativesRankingLoss`` + backward + gradient clipping (1.0) +
AdamW step, on the same encoder weights (copies of the same folder), the same batch of (question,
gold passage) pairs and the same learning rate:

* **ours** -- ``Trainer.compute_loss`` on an ``embed_ft`` phase with the default ``train.embed_sides=both``
  (questions and gold passages encoded with grad: the same work as sentence-transformers),
  ``Trainer.backward``, ``Trainer.optimizer_step`` (clip + AdamW + scheduler);
* **theirs** -- ``SentenceTransformer`` + ``losses.MultipleNegativesRankingLoss``: both columns encoded with
  grad (what sentence-transformers' trainer does), backward, clip, ``torch.optim.AdamW.step``;
* **ours, question side** -- the same ``Trainer`` with ``train.embed_sides=question`` (the gold passages' vectors
  read from the frozen index, ``ShardedIndex.reconstruct``): what the cheaper, weaker recipe saves per step.

Both warmed up; rounds alternate the order (ours first on even rounds); each round runs ``--steps`` steps
of each; medians of the rounds' seconds per step. Goal: steps/s ours / theirs >= 1.0x.

    python benchmarks/bench_embed_step.py                  # all-MiniLM-L6-v2, batch 8
    python benchmarks/bench_embed_step.py --quick          # tiny random BERT
    python benchmarks/bench_embed_step.py --batch 32 --rounds 5 --steps 4 --threads 1
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

from _common import load_avg  # noqa: E402  (benchmarks/ is on sys.path when a script runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all-MiniLM-L6-v2", help="encoder (offline alias, folder, hub id)")
    ap.add_argument("--quick", action="store_true", help="tiny random encoder (seconds)")
    ap.add_argument("--batch", type=int, default=8, help="(question, passage) pairs per step")
    ap.add_argument("--steps", type=int, default=None, help="steps per round (default 5, 10 with --quick)")
    ap.add_argument("--rounds", type=int, default=5, help="alternated rounds")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-question-side", action="store_true", help="skip the question-side-only variant")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table
    from sentence_transformers import SentenceTransformer, losses

    from distrag.config import EmbedderConfig, ExperimentConfig, IndexConfig, SyntheticConfig, TrainConfig
    from distrag.costs.accountant import Accountant
    from distrag.costs.ledger import CostLedger
    from distrag.data.synthetic import make_synthetic
    from distrag.models.embedder import Embedder
    from distrag.models.sources import resolve_model
    from distrag.retrieval.sharded_index import ShardedIndex
    from distrag.strategies import Phase
    from distrag.training.trainer import Trainer

    console = Console(width=max(Console().width, 130))
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (10 if args.quick else 5)
    data = make_synthetic(SyntheticConfig(n_entities=120, n_single_hop=240, n_two_hop=0))
    corpus = data.corpus
    questions = [q for q in data.questions if q.gold_passage_ids and len(q.gold_passage_ids) == 1]
    tmp = None
    if args.quick:
        from distrag.models.tiny import make_tiny_encoder

        tmp = tempfile.TemporaryDirectory(prefix="bench_embed_step_")
        spec = str(make_tiny_encoder(tmp.name, texts=corpus.texts()[:200], hidden=64, layers=2))
        label = "tiny random BERT (--quick)"
    else:
        spec, label = args.model, args.model
    folder = resolve_model(spec).path_or_id

    ecfg = EmbedderConfig(model=spec, max_length=args.max_length)
    ours = Embedder.from_config(ecfg, device="cpu")
    index = ShardedIndex.from_config(ours.dim, IndexConfig()).build(ours.encode(corpus.texts()))
    phase = Phase("embed_ft", True, False, "mnrl")

    def make_trainer(embedder: Embedder, sides: str) -> Trainer:
        """A Trainer of one embed_ft phase at a constant learning rate (no generator: embed_ft never runs one)."""
        cfg = ExperimentConfig(embedder=ecfg, train=TrainConfig(
            strategy="embed_ft", batch_size=args.batch, micro_batch_size=args.batch, lr_embedder=args.lr,
            embed_sides=sides))
        tr = Trainer(cfg, corpus, questions, embedder, None, index, Accountant(CostLedger()), show_progress=False,
                     phases=[phase])
        tr.make_optimizers(phase, 10_000)
        tr.scheduler = torch.optim.lr_scheduler.LambdaLR(tr.optimizer, lambda s: 1.0)
        return tr

    trainer = make_trainer(ours, "both")
    cfg = trainer.cfg
    q_side = None if args.no_question_side else make_trainer(Embedder.from_config(ecfg, device="cpu"), "question")

    st = SentenceTransformer(folder, device="cpu")
    st.max_seq_length = ours.max_length
    st.train()
    st_loss = losses.MultipleNegativesRankingLoss(st, scale=cfg.train.mnrl_scale)
    st_prep = getattr(st, "preprocess", None) or st.tokenize  # sentence-transformers >= 6: preprocess
    st_params = [p for p in st.parameters() if p.requires_grad]
    st_opt = torch.optim.AdamW(st_params, lr=args.lr, weight_decay=0.0)

    n_batches = len(questions) // args.batch
    batches = [questions[i * args.batch:(i + 1) * args.batch] for i in range(n_batches)]
    cursor = {"ours": 0, "theirs": 0, "question": 0}

    def next_batch(who: str):
        b = batches[cursor[who] % n_batches]
        cursor[who] += 1
        return b

    def step_ours():
        qs = next_batch("ours")
        loss, _ = trainer.compute_loss(phase, qs, trainer.step_rng())
        trainer.backward(loss)
        trainer.optimizer_step()

    def step_question_side():
        qs = next_batch("question")
        loss, _ = q_side.compute_loss(phase, qs, q_side.step_rng())
        q_side.backward(loss)
        q_side.optimizer_step()

    def step_theirs():
        qs = next_batch("theirs")
        feats = [st_prep([q.text for q in qs]),
                 st_prep([corpus[corpus.position(q.gold_passage_ids[0])].as_text() for q in qs])]
        feats = [{k: v.to(st.device) if torch.is_tensor(v) else v for k, v in f.items()} for f in feats]
        loss = st_loss(feats, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(st_params, 1.0)
        st_opt.step()
        st_opt.zero_grad(set_to_none=True)

    contenders = [("ours: Trainer embed_ft (both sides)", step_ours),
                  ("sentence-transformers MNRL (both sides)", step_theirs)]
    if q_side is not None:
        contenders.append(("ours: Trainer embed_ft (question side, frozen vecs)", step_question_side))
    console.print(f"model: {label}  batch: {args.batch} pairs  max_length: {ours.max_length}  "
                  f"steps/round: {steps}  rounds: {args.rounds}  torch threads: {torch.get_num_threads()}  "
                  f"load avg: {load_avg()}")
    for _, fn in contenders:  # warm-up
        fn()
        fn()

    times: dict[str, list[float]] = {name: [] for name, _ in contenders}
    for r in range(args.rounds):
        order = contenders if r % 2 == 0 else contenders[::-1]
        for name, fn in order:
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - t) / steps)

    med = {k: statistics.median(v) for k, v in times.items()}
    theirs_name = contenders[1][0]
    table = Table(title=f"Ft-Embed training step, {args.batch} pairs ({args.rounds} alternated rounds x "
                        f"{steps} "
                        f"steps, median)")
    table.add_column("step")
    table.add_column("median ms/step", justify="right")
    table.add_column("rounds ms/step", justify="right")
    table.add_column("steps/s", justify="right")
    table.add_column("vs sentence-transformers", justify="right")
    for k, v in times.items():
        table.add_row(k, f"{1e3 * med[k]:.1f}", " ".join(f"{1e3 * x:.0f}" for x in v), f"{1 / med[k]:.2f}",
                      f"{med[theirs_name] / med[k]:.2f}x")
    console.print(table)
    ratio = med[theirs_name] / med[contenders[0][0]]
    line = f"steps/s ratio ours/theirs: [bold]{ratio:.2f}x[/bold] (goal >= 1.0x)"
    if q_side is not None:
        line += f"   question side only: {med[theirs_name] / med[contenders[2][0]]:.2f}x"
    line += f"   load avg after: {load_avg()}   "
    line += "[green]OK[/green]" if ratio >= 1.0 else "[yellow]below goal[/yellow]"
    console.print(line)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

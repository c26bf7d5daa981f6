"""Ft-Gen LoRA training step: ``Trainer`` (answer NLL with retrieval) vs a plain peft + torch loop.

Same base weights (a deep copy taken before either adapter is added), the same LoRA config and seed, the same
prompts (the real chat prompt with the top-k retrieved synthetic passages) and answers, AdamW with the same
learning rate, gradient clipping at 1.0 in both:

* **ours** -- one ``Trainer`` step on a ``gen_ft`` phase: ``compute_loss`` (question encoding + faiss search
  + prompt building + ``Generator.answer_logprobs`` + ``nll_loss``), ``backward``, ``optimizer_step``;
* **peer** -- the textbook loop: tokenise prompt + answer + eos, right-pad, labels -100 on the prompt and
  the padding, ``model(**batch, labels=labels).loss``, ``backward``, clip, ``AdamW.step``. Its prompts are
  built once, before timing (retrieval is free for the peer).

Warmed up, rounds alternated, medians of seconds per step. Goal: steps/s ours / peer >= 1.0x.

    python benchmarks/bench_gen_step.py                  # SmolLM2-135M-Instruct + MiniLM, batch 8, k=5
    python benchmarks/bench_gen_step.py --quick          # tiny random Llama + BERT
    python benchmarks/bench_gen_step.py --batch 4 --k 3 --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import copy
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
    ap.add_argument("--batch", type=int, default=8, help="questions per step")
    ap.add_argument("--k", type=int, default=5, help="retrieved passages in each prompt")
    ap.add_argument("--rounds", type=int, default=None, help="alternated rounds (default 3, 5 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="steps per round (default 1, 5 with --quick)")
    ap.add_argument("--max-passage-chars", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from rich.console import Console
    from rich.table import Table

    from distrag.config import (
        ExperimentConfig,
        TrainConfig,
    )
    from distrag.costs.accountant import Accountant
    from distrag.costs.ledger import CostLedger
    from distrag.strategies import Phase
    from distrag.training.trainer import Trainer

    console = Console(width=max(Console().width, 130))
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (5 if args.quick else 3)
    steps = args.steps or (5 if args.quick else 1)
    world = build_rag_world(args, "bench_gen_step_")
    data, corpus, embedder, generator, index = world.data, world.corpus, world.embedder, world.generator, world.index
    ecfg, gcfg, label, tmp = world.ecfg, world.gcfg, world.label, world.tmp
    questions = data.questions
    cfg = ExperimentConfig(embedder=ecfg, generator=gcfg, train=TrainConfig(
        strategy="gen_ft", batch_size=args.batch, micro_batch_size=args.batch, train_k=args.k,
        lr_generator=args.lr))
    t = cfg.train

    # the peer: same base weights, same LoRA config, same adapter init
    peer = copy.deepcopy(generator.model)
    lcfg = cfg.generator.lora
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        peer = get_peft_model(peer, LoraConfig(task_type="CAUSAL_LM", r=lcfg.r, lora_alpha=lcfg.alpha,
                                               lora_dropout=lcfg.dropout,
                                               target_modules=list(lcfg.target_modules)))
    peer.train()
    peer_params = [p for p in peer.parameters() if p.requires_grad]
    peer_opt = torch.optim.AdamW(peer_params, lr=args.lr, weight_decay=0.0)

    phase = Phase("gen_ft", False, True, "nll")
    trainer = Trainer(cfg, corpus, questions, embedder, generator, index, Accountant(CostLedger()),
                      show_progress=False, phases=[phase])
    trainer.make_optimizers(phase, 10_000)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: 1.0)

    n_batches = len(questions) // args.batch
    batches = [questions[i * args.batch:(i + 1) * args.batch] for i in range(n_batches)]
    # the peer's prompts: exactly the ones our step builds (retrieval with the frozen retriever)
    peer_batches = []
    for qs in batches[: max(1, 2 + rounds * steps)]:
        qv = embedder.encode([q.text for q in qs])
        res = index.search(qv, args.k)
        prompts = [generator.build_prompt(q.text, [corpus[int(i)] for i in row if i >= 0])
                   for q, row in zip(qs, res.ids)]
        peer_batches.append((prompts, [q.answers[0] for q in qs]))
    tok = generator.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    cursor = {"ours": 0, "peer": 0}
    shapes = {"ours": [], "peer": []}

    def step_ours():
        qs = batches[cursor["ours"] % len(peer_batches)]
        cursor["ours"] += 1
        loss, _ = trainer.compute_loss(phase, qs, trainer.step_rng())
        trainer.backward(loss)
        trainer.optimizer_step()

    def step_peer():
        prompts, answers = peer_batches[cursor["peer"] % len(peer_batches)]
        cursor["peer"] += 1
        p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        a_ids = tok([a.strip() for a in answers], add_special_tokens=False)["input_ids"]
        rows = [p + a + [eos] for p, a in zip(p_ids, a_ids)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (r, p) in enumerate(zip(rows, p_ids)):
            ids[i, :len(r)] = torch.tensor(r)
            attn[i, :len(r)] = 1
            labels[i, len(p):len(r)] = ids[i, len(p):len(r)]
        shapes["peer"].append(tuple(ids.shape))
        loss = peer(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer_params, 1.0)
        peer_opt.step()
        peer_opt.zero_grad(set_to_none=True)

    contenders = [("ours: Trainer gen_ft step (incl. retrieval)", step_ours),
                  ("peft + torch loop (labels=-100 on prompt)", step_peer)]
    console.print(f"models: {label}  batch: {args.batch}  k: {args.k}  rounds: {rounds} x {steps} step(s)  "
                  f"torch threads: {torch.get_num_threads()}  load avg: {load_avg()}")
    for _, fn in contenders:
        fn()
    times: dict[str, list[float]] = {name: [] for name, _ in contenders}
    for r in range(rounds):
        for name, fn in (contenders if r % 2 == 0 else contenders[::-1]):
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - t0) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    peer_name = contenders[1][0]
    table = Table(title=f"Ft-Gen LoRA step, batch {args.batch}, k={args.k} passages per prompt "
                        f"({rounds} alternated rounds x {steps}, median)")
    for col, j in (("step", "left"), ("median s/step", "right"), ("rounds s/step", "right"),
                   ("steps/s", "right"), ("vs peer", "right")):
        table.add_column(col, justify=j)
    for k, v in times.items():
        table.add_row(k, f"{med[k]:.3f}", " ".join(f"{x:.3f}" for x in v), f"{1 / med[k]:.3f}",
                      f"{med[peer_name] / med[k]:.2f}x")
    console.print(table)
    mean_shape = [sum(s[i] for s in shapes["peer"]) / len(shapes["peer"]) for i in (0, 1)]
    console.print(f"peer padded batch: {mean_shape[0]:.0f} x {mean_shape[1]:.0f} tokens (mean); "
                  f"our LM-head columns per row: answer tokens + 1 (logits_to_keep)")
    ratio = med[peer_name] / med[contenders[0][0]]
    console.print(f"steps/s ratio ours/peer: [bold]{ratio:.2f}x[/bold] (goal >= 1.0x)   "
                  f"load avg after: {load_avg()}   "
                  + ("[green]OK[/green]" if ratio >= 1.0 else "[yellow]below goal[/yellow]"))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

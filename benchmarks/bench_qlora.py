"""QLoRA: the generator's base weights in NF4 / int8 (``generator.quantization``) against full precision, on
the same model in the same run: the base weights' bytes, a LoRA step's time and the step's peak RSS.

Each variant runs in a fresh process (a process's resident high-water mark would otherwise carry the previous
model's heap): load the generator, measure its base weights (``distrag.models.quantization.base_weight_bytes``:
quantised codes, their scales, what stays unquantised) and the RSS the load added, then run LoRA steps as a
Ft-Gen phase does (answer NLL over chat prompts holding k synthetic passages, adapters only, gradient
checkpointing on, AdamW), timed after one warm-up step, peak RSS from the cost ledger's phase (what
``cost/peak_rss_gb`` records). Variants run in alternated order over rounds (none, nf4, int8, then reversed);
medians. Ratios are against ``none`` (full precision, ``generator.dtype``).

    python benchmarks/bench_qlora.py                     # SmolLM2-135M-Instruct (GGUF alias), float32 rest
    python benchmarks/bench_qlora.py --quick             # tiny random Llama
    python benchmarks/bench_qlora.py --variants none nf4 --rounds 3 --steps 3 --batch 4 --k 3
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import load_avg  # noqa: E402  (benchmarks/ is on sys.path when a script runs)


def worker(args) -> dict:
    """One variant in this process: load, measure the weights, run the LoRA steps."""
    import torch

    from distrag.config import GeneratorConfig, LoRAConfig, SyntheticConfig
    from distrag.costs.ledger import CostLedger
    from distrag.costs.memory import rss_bytes
    from distrag.data.synthetic import make_synthetic
    from distrag.models.generator import Generator
    from distrag.models.quantization import base_weight_bytes
    from distrag.training.trainer import set_generator_trainable

    if args.threads:
        torch.set_num_threads(args.threads)
    data = make_synthetic(SyntheticConfig(n_entities=40, n_single_hop=40, n_two_hop=0))
    before = rss_bytes()
    t0 = time.perf_counter()
    g = Generator.from_config(GeneratorConfig(model=args.model, dtype=args.dtype, quantization=args.worker),
                              device="cpu")
    load_s = time.perf_counter() - t0
    loaded = rss_bytes() - before
    weights = base_weight_bytes(g.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        g.add_lora(LoRAConfig(r=8, alpha=16))
    set_generator_trainable(g, True)
    opt = torch.optim.AdamW(g.trainable_parameters(), lr=3e-4)
    questions = data.questions
    corpus = list(data.corpus)
    batches = []
    for s in range(args.steps + 1):
        qs = questions[s * args.batch:(s + 1) * args.batch]
        prompts = [g.build_prompt(q.text, corpus[(i * 7) % len(corpus):(i * 7) % len(corpus) + args.k])
                   for i, q in enumerate(qs, s * args.batch)]
        batches.append((prompts, [q.answers[0] for q in qs]))

    def step(prompts, answers) -> float:
        loss = g.sequence_nll(prompts, answers).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(g.trainable_parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step(*batches[0])  # warm-up
    ledger, times, losses = CostLedger(), [], []
    with ledger.phase("lora_steps"):
        for prompts, answers in batches[1:]:
            t0 = time.perf_counter()
            losses.append(step(prompts, answers))
            times.append(time.perf_counter() - t0)
    tokens = sum(len(g.tokenizer(p).input_ids) for p in batches[1][0])
    return {"variant": args.worker, "weights": weights.__dict__, "weights_total": weights.total, "load_s": load_s,
            "loaded_rss": loaded, "step_s": statistics.median(times), "steps": times, "losses": losses,
            "peak_rss": ledger.peak_rss, "prompt_tokens": tokens, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct-GGUF")
    ap.add_argument("--quick", action="store_true", help="tiny random Llama (seconds)")
    ap.add_argument("--variants", nargs="+", default=["none", "nf4", "int8"], choices=["none", "nf4", "int8"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="generator.dtype: the full-precision weights and what stays unquantised")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed LoRA steps per process (after 1 warm-up)")
    ap.add_argument("--batch", type=int, default=2, help="questions per step")
    ap.add_argument("--k", type=int, default=3, help="passages in each prompt")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        with open(args.out, "w") as f:
            json.dump(worker(args), f)
        return 0

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    tmp = tempfile.TemporaryDirectory(prefix="bench_qlora_")
    model = args.model
    if args.quick:
        from distrag.models.tiny import make_tiny_causal_lm

        model = str(make_tiny_causal_lm(f"{tmp.name}/lm", hidden=128, layers=2))
    console.print(f"model: {'tiny random Llama (--quick)' if args.quick else model}  dtype: {args.dtype}  "
                  f"batch: {args.batch} x k={args.k}  rounds: {args.rounds} x {args.steps} step(s)  "
                  f"load avg: {load_avg()}")
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        for v in (args.variants if r % 2 == 0 else args.variants[::-1]):
            out = f"{tmp.name}/{v}_{r}.json"
            cmd = [sys.executable, __file__, "--worker", v, "--out", out, "--model", model, "--dtype", args.dtype,
                   "--steps", str(args.steps), "--batch", str(args.batch), "--k", str(args.k)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with open(out) as f:
                results[v].append(json.load(f))
            console.print(f"  round {r + 1} {v}: {results[v][-1]['step_s']:.2f} s/step  load avg {load_avg()}")
    med = {v: {k: statistics.median(x[k] for x in rs) for k in ("step_s", "peak_rss", "loaded_rss", "load_s")}
           for v, rs in results.items()}
    ref = "none" if "none" in results else args.variants[0]
    table = Table(title=f"base weights and a LoRA step per generator.quantization (medians of {args.rounds} "
                        f"processes; ratios vs {ref})")
    for col in ("quantization", "base weights MB", "codes / scales / rest MB", "vs none", "RSS of load MB",
                "step s", "rounds s", "vs none", "peak RSS GB", "vs none"):
        table.add_column(col, justify="left" if col == "quantization" else "right")
    for v, rs in results.items():
        w = rs[0]["weights"]
        total = rs[0]["weights_total"]
        table.add_row(v, f"{total / 1e6:.1f}",
                      f"{w['quantized'] / 1e6:.1f} / {w['quant_state'] / 1e6:.2f} / {w['unquantized'] / 1e6:.1f}",
                      f"{total / results[ref][0]['weights_total']:.2f}x", f"{med[v]['loaded_rss'] / 1e6:.0f}",
                      f"{med[v]['step_s']:.2f}", " ".join(f"{x['step_s']:.2f}" for x in rs),
                      f"{med[v]['step_s'] / med[ref]['step_s']:.2f}x", f"{med[v]['peak_rss'] / 1e9:.2f}",
                      f"{med[v]['peak_rss'] / med[ref]['peak_rss']:.2f}x")
    console.print(table)
    console.print(f"prompt tokens per step: {results[ref][0]['prompt_tokens']}; torch threads: "
                  f"{results[ref][0]['threads']}; load avg after: {load_avg()}. Step time on the CPU pays "
                  "bitsandbytes' dequantisation of every quantised weight in the forward, the recomputed forward "
                  "and the backward; on a GPU its fused kernels do it.")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

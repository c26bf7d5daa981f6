"""Per-rank memory of a DeepSpeed ZeRO-3 engine over a causal LM: 2 trainers vs 1.

Each configuration runs as its own ``torchrun`` job on CPU (gloo). The model is a random Llama built inside
``deepspeed.zero.Init`` (so ZeRO-3 partitions it at construction, as ``from_pretrained`` does under our
``HfDeepSpeedConfig``); the DeepSpeed config comes from
``distrag.distributed.deepspeed_setup.build_ds_config`` (ZeRO-3, fp32) and the optimizer from
``distrag.distributed.deepspeed_setup.engine_kwargs`` (torch AdamW), exactly as the distributed runner builds them.
After one optimizer step (so AdamW's state exists) every rank counts the bytes it actually holds:

* **params** -- each parameter's local partition (``p.ds_tensor``; the full tensor if not partitioned);
* **optimizer** -- ZeRO-3's fp32 master partitions plus every tensor in the AdamW state (``exp_avg``,
  ``exp_avg_sq``), deduplicated by storage;
* **RSS** -- the process's resident memory (context only: it includes torch, DeepSpeed, gloo buffers...).

Two trainings: **LoRA** (peft adapters on q/k/v/o; only the adapters have optimizer state, so partitioning the
frozen base weights is what matters) and **full** (every weight trains). Goal: per-rank params + optimizer
with 2 trainers <= 0.6x of 1 trainer.

    python benchmarks/bench_zero_memory.py                     # hidden 512, 8 layers, vocab 32000
    python benchmarks/bench_zero_memory.py --quick             # hidden 128, 2 layers
    python benchmarks/bench_zero_memory.py --hidden 1024 --layers 12 --modes full
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


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(a: argparse.Namespace) -> int:
    import torch

    from distrag.config import DistributedConfig, TrainConfig
    from distrag.distributed import roles

    ctx = roles.init_roles(DistributedConfig(zero_stage=3), with_index_rank=False)
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from distrag.distributed.deepspeed_setup import attach_deepspeed, build_ds_config, engine_kwargs

    attach_deepspeed(ctx)
    n = ctx.info.n_trainers
    ds_cfg = build_ds_config(TrainConfig(batch_size=1, micro_batch_size=1), DistributedConfig(zero_stage=3),
                             n,
                             bf16=False)
    hf_ds = HfDeepSpeedConfig(ds_cfg)  # noqa: F841 - must stay alive
    lcfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=int(a.hidden * 2.6875),
                       num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 64),
                       num_key_value_heads=max(1, a.hidden // 64), max_position_embeddings=512,
                       tie_word_embeddings=False)
    torch.manual_seed(0)
    rss0 = rss_bytes()
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
        model = LlamaForCausalLM(lcfg)
    full_numel = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    if a.mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    engine, *_ = deepspeed.initialize(**engine_kwargs(model, ds_cfg, lr=1e-4))
    engine.train()
    g = torch.Generator().manual_seed(ctx.info.trainer_rank)
    for _ in range(ds_cfg["gradient_accumulation_steps"]):
        ids = torch.randint(0, a.vocab, (1, a.seq), generator=g)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()

    def nbytes(t) -> int:
        return t.numel() * t.element_size()

    params = 0
    for p in engine.module.parameters():
        params += nbytes(p.ds_tensor) if hasattr(p, "ds_tensor") else nbytes(p)
    seen: set[int] = set()
    opt_bytes = 0
    zopt = engine.optimizer
    tensors = list(getattr(zopt, "fp32_partitioned_groups_flat", []) or [])
    inner = getattr(zopt, "optimizer", zopt)
    for st in inner.state.values():
        tensors += [v for v in st.values() if torch.is_tensor(v)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if t.numel() and key not in seen:
            seen.add(key)
            opt_bytes += t.untyped_storage().nbytes()
    res = {"rank": ctx.info.trainer_rank, "n": n, "mode": a.mode, "params": params, "optimizer": opt_bytes,
           "rss": rss_bytes(), "rss_model": rss_bytes() - rss0, "full_numel": full_numel,
           "trainable": trainable,
           "loss": float(loss.item())}
    Path(a.out, f"rank_{ctx.info.trainer_rank}.json").write_text(json.dumps(res))
    roles.finish(0)
    return 0


def launch(nproc: int, mode: str, a: argparse.Namespace, out: Path) -> list[dict]:
    import socket

    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = min(s.getsockname()[1], 60000)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(nproc),
           "--master_port", str(port), str(Path(__file__).resolve()), "--worker", "--mode", mode,
           "--out", str(out), "--hidden", str(a.hidden),
           "--layers", str(a.layers), "--vocab", str(a.vocab), "--seq", str(a.seq)]
    with open(out / "log.txt", "w") as log:
        p = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=a.timeout, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"torchrun exited {p.returncode}:\n" + (out / "log.txt").read_text()[-3000:])
    return [json.loads(f.read_text()) for f in sorted(out.glob("rank_*.json"))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="hidden 128, 2 layers, vocab 4000")
    ap.add_argument("--hidden", type=int, default=None, help="default 512 (128 with --quick)")
    ap.add_argument("--layers", type=int, default=None, help="default 8 (2 with --quick)")
    ap.add_argument("--vocab", type=int, default=None, help="default 32000 (4000 with --quick)")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="lora", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.hidden = a.hidden or (128 if a.quick else 512)
    a.layers = a.layers or (2 if a.quick else 8)
    a.vocab = a.vocab or (4000 if a.quick else 32000)
    if a.worker:
        return worker(a)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 130))
    console.print(f"random Llama: hidden {a.hidden}, {a.layers} layers, vocab {a.vocab} (untied head), fp32, "
                  f"ZeRO-3 (distrag.ds.build_ds_config), torch AdamW, gloo on CPU  load avg: {load_avg()}")
    mib = 1 / 2**20
    table = Table(title="ZeRO-3 per-rank memory after one optimizer step (MiB; max over ranks)")
    for col in ("training", "trainers", "params held", "optimizer state", "params + optimizer",
                "vs 1 trainer",
                "RSS", "trainable / total params"):
        table.add_column(col, justify="left" if col == "training" else "right")
    verdict = []
    with tempfile.TemporaryDirectory(prefix="bench_zero_mem_") as tmp:
        for mode in a.modes:
            base = None
            for n in (1, 2):
                t0 = time.perf_counter()
                rows = launch(n, mode, a, Path(tmp) / f"{mode}_{n}")
                p = max(r["params"] for r in rows)
                o = max(r["optimizer"] for r in rows)
                tot = max(r["params"] + r["optimizer"] for r in rows)
                rss = max(r["rss"] for r in rows)
                base = tot if n == 1 else base
                table.add_row(mode, str(n), f"{p * mib:.1f}", f"{o * mib:.1f}", f"{tot * mib:.1f}",
                              f"{tot / base:.2f}x", f"{rss * mib:.0f}",
                              f"{rows[0]['trainable'] / 1e6:.2f}M / {rows[0]['full_numel'] / 1e6:.1f}M")
                if n == 2:
                    verdict.append(f"{mode}: {tot / base:.2f}x")
                console.print(f"  {mode}, {n} trainer(s): {time.perf_counter() - t0:.0f}s  "
                              f"load avg: {load_avg()}")
            table.add_section()
    console.print(table)
    ok = all(float(v.split(": ")[1][:-1]) <= 0.6 for v in verdict)
    console.print("params + optimizer per rank, 2 trainers vs 1: " + ", ".join(verdict) + " (goal <= 0.6x)   "
                  + ("[green]OK[/green]" if ok else "[yellow]above goal[/yellow]"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Check distrag's GPU path on a machine with one (or more) NVIDIA GPUs, in a few minutes.

    python benchmarks/gpu_check.py                  # all checks
    python benchmarks/gpu_check.py --skip-refresh   # without the torchrun run

Checks, each reported PASS / FAIL (with why) in one table:

1. **faiss-gpu**: a 2-shard exact ``ShardedIndex`` on the GPU (``index.device: gpu``; shards cloned with
   ``faiss.index_cpu_to_gpu``) returns the same top-10 ids (and scores within 1e-4) as faiss on the CPU
   for 50,000 x 128 random vectors and 200 queries.
2. **nccl**: ``distributed.backend: auto`` resolves to nccl, and an ``all_reduce`` in a 1-process NCCL
   group on the GPU gives the expected sum.
3. **bf16 LoRA**: a tiny random Llama loaded with ``generator.dtype: auto`` is bfloat16 on this GPU (else
   the GPU lacks bf16 and the check says so), the DeepSpeed config built for it enables bf16, and one
   LoRA step gives a finite loss and moves every LoRA B matrix.
4. **refresh run**: ``torchrun launch/train.py`` with a tiny joint RAG-Token config, 1 trainer per GPU
   (NCCL allows one rank per GPU; at most 2) + the index rank, ``train.refresh_every=2``: exits 0 and
   the trainers adopt at least one published index version (on the GPU when faiss-gpu is installed).

Exit codes: 0 all passed, 1 a check failed, 2 no GPU (torch sees no CUDA device: nothing to check).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def expect(ok: bool, why: str) -> None:
    """A check's expectation: AssertionError(``why``) when it does not hold (reported as the FAIL's detail)."""
    if not ok:
        raise AssertionError(why)


def check_faiss_gpu(tmp: Path) -> str:
    import numpy as np

    from distrag.retrieval.faiss_backend import num_gpus
    from distrag.retrieval.sharded_index import ShardedIndex

    expect(num_gpus() > 0, "faiss sees no GPU: this faiss build has no GPU support; pip install faiss-gpu-cu12")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50_000, 128)).astype(np.float32)
    q = rng.standard_normal((200, 128)).astype(np.float32)
    t0 = time.perf_counter()
    gpu = ShardedIndex(128, n_shards=2, device="gpu").build(x)
    expect(gpu.device == "gpu", f"index device is {gpu.device!r}")
    got = gpu.search(q, 10)
    dt = time.perf_counter() - t0
    ref = ShardedIndex(128, n_shards=1, device="cpu").build(x).search(q, 10)
    same = float((got.ids == ref.ids).mean())
    expect(same == 1.0, f"top-10 ids differ from CPU faiss: {100 * same:.2f} % equal")
    err = float(np.abs(got.scores - ref.scores).max())
    expect(err < 1e-4, f"scores differ from CPU faiss by up to {err:.2e}")
    return f"{num_gpus()} GPU(s); 50k x 128, 2 shards: ids equal to CPU, max score diff {err:.1e}; {dt:.2f}s"


def check_nccl(tmp: Path) -> str:
    import torch
    import torch.distributed as tdist

    from distrag.config import DistributedConfig
    from distrag.distributed import roles

    backend = roles._choose_backend(DistributedConfig())
    expect(backend == "nccl", f"distributed.backend=auto chose {backend!r}, not nccl")
    expect(tdist.is_nccl_available(), "this torch build has no NCCL")
    store = tdist.FileStore(str(tmp / "nccl_store"), 1)
    tdist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        t = torch.arange(4, dtype=torch.float32, device="cuda")
        tdist.all_reduce(t)
        torch.cuda.synchronize()
        expect(t.tolist() == [0.0, 1.0, 2.0, 3.0], f"all_reduce gave {t.tolist()}")
    finally:
        tdist.destroy_process_group()
    return f"backend auto -> nccl; all_reduce on {torch.cuda.get_device_name(0)} ok"


def check_bf16_lora(tmp: Path) -> str:
    import torch

    from distrag.config import DistributedConfig, GeneratorConfig, LoRAConfig, TrainConfig
    from distrag.data.records import Passage
    from distrag.distributed.deepspeed_setup import build_ds_config, uses_bf16
    from distrag.models.generator import Generator
    from distrag.models.tiny import make_tiny_causal_lm

    expect(torch.cuda.is_bf16_supported(), f"{torch.cuda.get_device_name(0)} has no bf16: dtype auto is float32 "
                                           "there (the fp32 path is what runs)")
    lm = make_tiny_causal_lm(tmp / "lm", hidden=64, layers=2)
    g = Generator.from_config(GeneratorConfig(model=str(lm), dtype="auto"), device="cuda")
    expect(uses_bf16(g.model), "generator.dtype=auto did not load bfloat16 weights on this GPU")
    ds = build_ds_config(TrainConfig(batch_size=2, micro_batch_size=2), DistributedConfig(), 1,
                         bf16=uses_bf16(g.model))
    expect(ds["bf16"]["enabled"] is True, "the DeepSpeed config does not enable bf16")
    g.add_lora(LoRAConfig(r=4, alpha=8))
    lora_b = [p for n, p in g.model.named_parameters() if "lora_B" in n]
    opt = torch.optim.AdamW(g.trainable_parameters(), lr=1e-2)
    g.model.train()
    passage = Passage("p1", "Fox Company", "The quick brown fox founded the company in the capital city.")
    prompts = [g.build_prompt("Who founded the company?", [passage]), g.build_prompt("Which city?", [passage])]
    loss = g.sequence_nll(prompts, ["the fox", "the capital"]).mean()
    expect(bool(torch.isfinite(loss)), f"loss is {loss.item()}")
    loss.backward()
    opt.step()
    expect(bool(lora_b) and all(bool((p != 0).any()) for p in lora_b), "a LoRA B matrix did not move")
    return f"weights bfloat16, ds bf16 on, loss {loss.item():.3f} finite, {len(lora_b)} LoRA B matrices moved"


def check_refresh_run(tmp: Path, timeout: float) -> str:
    import torch
    import yaml

    from distrag.models.tiny import make_tiny_causal_lm, make_tiny_encoder

    trainers = min(torch.cuda.device_count(), 2)
    cfg = {
        "data": {"format": "synthetic", "synthetic": {"n_entities": 40, "n_single_hop": 80, "n_two_hop": 40}},
        "embedder": {"model": str(make_tiny_encoder(tmp / "enc", hidden=64, layers=2))},
        "generator": {"model": str(make_tiny_causal_lm(tmp / "lm2", hidden=64, layers=2)), "max_new_tokens": 4},
        "retrieval": {"top_k": 3},
        "train": {"strategy": "joint", "rag_loss": "token", "train_k": 3, "batch_size": 4, "micro_batch_size": 2,
                  "max_steps": 12, "refresh_every": 2},
        "distributed": {"zero_stage": 2, "index_timeout_s": 120},
        "tracking": {"enabled": False},
        "max_eval_questions": 4,
        "output_dir": str(tmp / "runs"),
    }
    path = tmp / "refresh.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = min(s.getsockname()[1], 60000)
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(trainers + 1),
           "--master_port", str(port), str(ROOT / "launch" / "train.py"), "--config", str(path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = tmp / "refresh_log.txt"
    with log.open("w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT).returncode
    expect(rc == 0, f"torchrun exited {rc}; log: {log}\n{log.read_text()[-2000:]}")
    found = list((tmp / "runs").rglob("adoptions_trainer0.json"))
    expect(bool(found), "no adoptions_trainer0.json written")
    adopted = json.loads(found[0].read_text())
    expect(len(adopted) >= 1, "the trainers adopted no index version")
    return f"{trainers} trainer(s) + index rank, 12 steps: {len(adopted)} version(s) adopted"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-refresh", action="store_true", help="leave out the torchrun refresh run")
    ap.add_argument("--timeout", type=float, default=300, help="seconds the torchrun run may take")
    ap.add_argument("--keep", default=None, help="keep the scratch folder (models, run, logs) here")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(f"error: gpu_check needs a CUDA GPU, and torch sees none (torch {torch.__version__}, built with "
              f"CUDA {torch.version.cuda}). Run it on a GPU machine; the GPU decisions are unit-tested on CPU "
              "(tests/retrieval/test_faiss_backend.py, tests/distributed/test_roles.py, "
              "tests/distributed/test_deepspeed_setup.py, tests/models/test_sources.py).", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    scratch = tempfile.TemporaryDirectory(prefix="distrag_gpu_check_") if args.keep is None else None
    tmp = Path(args.keep or scratch.name)
    tmp.mkdir(parents=True, exist_ok=True)
    checks: list[tuple[str, Callable[[Path], str]]] = [
        ("faiss-gpu search = CPU", check_faiss_gpu), ("NCCL all_reduce", check_nccl),
        ("bf16 LoRA step", check_bf16_lora)]
    if not args.skip_refresh:
        checks.append(("torchrun refresh run", lambda t: check_refresh_run(t, args.timeout)))
    table = Table(title=f"distrag GPU check: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, "
                        f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    for col in ("check", "result", "seconds", "detail"):
        table.add_column(col)
    failed = 0
    for name, fn in checks:
        t0 = time.perf_counter()
        try:
            detail, ok = fn(tmp), True
        except AssertionError as e:
            detail, ok = str(e), False
        except Exception as e:  # noqa: BLE001 - any crash is a FAIL with its traceback's last line
            detail, ok = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}", False
        failed += not ok
        table.add_row(name, "[green]PASS[/green]" if ok else "[red]FAIL[/red]", f"{time.perf_counter() - t0:.1f}",
                      detail)
    Console(width=140).print(table)
    if scratch is not None:
        scratch.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

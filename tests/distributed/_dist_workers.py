"""Worker processes for the multi-process tests (launched by the tests with RANK/WORLD_SIZE/... env).

    python tests/distributed/_dist_workers.py <scenario> <json args>

Each process writes ``<out>/result_<global rank>.json`` and leaves with ``roles.finish``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from distrag.atomic_io import atomic_write_json
from distrag.config import DistributedConfig, TrainConfig
from distrag.distributed import preemption, roles

# ----------------------------------------------------------------------------------------------
# toy retrieval world shared by the refresh scenario and the test that checks it

TOY_IN, TOY_OUT, TOY_CORPUS, TOY_SHARD = 8, 4, 64, 16


def toy_corpus() -> torch.Tensor:
    return torch.randn(TOY_CORPUS, TOY_IN, generator=torch.Generator().manual_seed(1234))


def toy_embed(state_dict: dict, x: torch.Tensor) -> np.ndarray:
    lin = torch.nn.Linear(TOY_IN, TOY_OUT)
    lin.load_state_dict(state_dict)
    with torch.no_grad():
        return lin(x).numpy().astype(np.float32)


def toy_index(vectors: np.ndarray):
    """The index the toy index rank publishes: a real (tiny, exact, CPU) ShardedIndex."""
    from distrag.retrieval.sharded_index import ShardedIndex

    return ShardedIndex(vectors.shape[1], n_shards=2, device="cpu").build(vectors)


def _result(out: Path, obj: dict) -> None:
    atomic_write_json(out / f"result_{roles.current().info.rank}.json", obj)


# ----------------------------------------------------------------------------------------------
# refresh protocol: 2 trainers + 1 index rank


def toy_encoder(args: dict):
    """The toy index rank's corpus encoder: shard by shard, ``shard_sleep`` seconds each."""

    def encode(sd):
        corpus = toy_corpus()
        for i in range(0, TOY_CORPUS, TOY_SHARD):
            time.sleep(args.get("shard_sleep", 0.05))
            yield toy_embed(sd, corpus[i:i + TOY_SHARD])

    return encode


def toy_index_worker(args: dict, info) -> None:
    """The supervised toy index worker (a spawned child of the index rank). ``hang_in_publish``: stop for good
    inside the publication of that version, after its first shard file is written (marker ``in_publish``)."""
    from datetime import timedelta

    import distrag.retrieval.index_store as index_store
    from distrag.distributed.refresh_server import IndexServer
    from distrag.distributed.stores import open_store

    out = Path(args["out"])
    store = open_store(info, info.master_port + roles.STORE_PORT_OFFSET, timedelta(seconds=60), client=True)
    hang_at = args.get("hang_in_publish")
    if hang_at is not None:
        real = index_store.faiss.write_index

        class SlowFaiss:  # index_store's faiss, but its write hangs while publishing version hang_at
            def __getattr__(self, name):
                return getattr(index_store.__dict__["_real_faiss"], name)

            @staticmethod
            def write_index(index, path):
                real(index, path)
                if f".v{hang_at:06d}." in path:
                    (out / "in_publish").write_text(str(os.getpid()))
                    time.sleep(600)

        index_store._real_faiss = index_store.faiss
        index_store.faiss = SlowFaiss()
    server = IndexServer(store, toy_encoder(args), toy_index, out / "index", out / "weights", poll_interval_s=0.05,
                         announce_pid=False, keep_versions=args.get("keep_versions"))
    server.run()


def refresh(args: dict) -> int:
    from distrag.distributed.refresh_client import IndexClient
    from distrag.distributed.refresh_server import IndexServer
    from distrag.errors import IndexRankFailed

    out = Path(args["out"])
    cfg = DistributedConfig(index_timeout_s=args["timeout"], on_index_failure=args["on_failure"])
    t0 = time.time()
    ctx = roles.init_roles(cfg)
    print(f"init_roles took {time.time() - t0:.2f}s", file=sys.stderr, flush=True)
    weights_dir, publish_root = out / "weights", out / "index"
    if ctx.info.is_index and args.get("supervised"):  # as under a launcher: the work runs in a child process
        import multiprocessing

        from distrag.distributed.index_supervisor import supervise

        worker = multiprocessing.get_context("spawn").Process(target=toy_index_worker, args=(args, ctx.info))
        code = supervise(ctx.store, worker, out, on_failure=cfg.on_index_failure, grace_s=1.0, poll_s=0.05)
        _result(out, {"role": "index", "worker_exitcode": worker.exitcode, "code": code})
        return code
    if ctx.info.is_index:
        server = IndexServer(ctx.store, toy_encoder(args), toy_index, publish_root, weights_dir, poll_interval_s=0.05)
        n = server.run()
        _result(out, {"role": "index", "published": n})
        return 0

    torch.manual_seed(0)
    lin = torch.nn.Linear(TOY_IN, TOY_OUT)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + ctx.info.trainer_rank)
    loaded: list[str] = []
    client = IndexClient(ctx, weights_dir, index_timeout_s=cfg.index_timeout_s,
                         on_index_failure=cfg.on_index_failure)
    submitted = {}
    adoptions = []
    stop_step = None
    step = 0
    try:
        for step in range(args["steps"]):
            d = client.poll(step, load_fn=loaded.append)
            if d is not None:
                adoptions.append({"step": d.step, "version": d.version, "path": d.path,
                                  "weights_step": d.weights_step, "staleness": d.staleness})
            x = torch.randn(16, TOY_IN, generator=gen)
            loss = ((lin(x) - x[:, :TOY_OUT]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            for p in lin.parameters():  # plain data parallel: identical weights on both trainers
                torch.distributed.all_reduce(p.grad)
                p.grad /= ctx.info.n_trainers
            opt.step()
            if step % args["refresh_every"] == 0:
                sd = {k: v.clone() for k, v in lin.state_dict().items()}
                n = client.submit_weights(step, sd)
                if n is not None:
                    submitted[n] = {"step": step, "weight": sd["weight"].tolist(), "bias": sd["bias"].tolist()}
            time.sleep(args.get("step_sleep", 0.05))
    except IndexRankFailed as e:
        stop_step = step
        print(f"trainer {ctx.info.trainer_rank}: {e}", file=sys.stderr, flush=True)
    client.done(wait_s=args.get("done_wait", 60.0))
    _result(out, {"role": "trainer", "trainer_rank": ctx.info.trainer_rank, "adoptions": adoptions,
                  "loaded": loaded, "failed": client.failed, "stop_step": stop_step, "last_step": step,
                  "submitted": submitted,
                  "final_version": client.current.version if client.current else None})
    return 3 if stop_step is not None else 0


# ----------------------------------------------------------------------------------------------
# preemption: 2 trainers, no index rank; checkpoint at the agreed step, requeue, resume


def preempt_reference_weights(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What _dist_workers.preempt_scenario computes on 2 trainers without interruption."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.05)
    states = []
    for r in range(2):
        torch.manual_seed(10 + r)
        states.append(torch.get_rng_state())
    for _ in range(steps):
        grads = []
        for r in range(2):
            torch.set_rng_state(states[r])
            x = torch.randn(8, 6)
            noise = torch.rand(1).item()
            states[r] = torch.get_rng_state()
            lin.zero_grad()
            ((lin(x) - x[:, :3] * noise) ** 2).mean().backward()
            grads.append([p.grad.clone() for p in lin.parameters()])
        for p, g0, g1 in zip(lin.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        opt.step()
    return lin.weight.detach(), lin.bias.detach()


def preempt_scenario(args: dict) -> int:
    from distrag.distributed.checkpoint import CheckpointManager

    out = Path(args["out"])
    preemption.install()
    ctx = roles.init_roles(DistributedConfig(), with_index_rank=False)
    r = ctx.info.trainer_rank
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.05)
    torch.manual_seed(10 + r)  # per-rank data stream from the global RNG: resume must restore it
    ckpt = CheckpointManager(out / "ckpt", keep=2, ctx=ctx)
    start = 0
    found = ckpt.resolve(args.get("resume"))
    if found is not None:
        st = ckpt.load(found)
        lin.load_state_dict(st.payload["model"])
        opt.load_state_dict(st.payload["optim"])
        start = st.step + 1
    preempt_step = None
    requeued = None
    for step in range(start, args["steps"]):
        x = torch.randn(8, 6)
        noise = torch.rand(1).item()
        loss = ((lin(x) - x[:, :3] * noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        for p in lin.parameters():
            torch.distributed.all_reduce(p.grad)
            p.grad /= ctx.info.n_trainers
        opt.step()
        (out / f"progress_{r}").write_text(str(step))
        time.sleep(args.get("step_sleep", 0.0))
        _maybe_hang(args, "in_step", r, step, out)
        every = args.get("checkpoint_every")
        if every and step % every == every - 1:
            _maybe_hang(args, "in_save", r, step, out)
            ckpt.save(step, {"model": lin.state_dict(), "optim": opt.state_dict()}, rank_payload={"rank": r})
        if preemption.agreed(ctx):
            ckpt.save(step, {"model": lin.state_dict(), "optim": opt.state_dict()}, rank_payload={"rank": r})
            preempt_step = step
            requeued = preemption.requeue(ctx)
            break
    _result(out, {"trainer_rank": r, "start": start, "preempt_step": preempt_step, "requeued": requeued,
                  "signalled": preemption.preemption_requested(),
                  "weight": lin.weight.tolist(), "bias": lin.bias.tolist()})
    return preemption.EXIT_REQUEUED


def _maybe_hang(args: dict, where: str, rank: int, step: int, out: Path) -> None:
    """Fault injection: ``args[where] = [rank, step]`` makes that trainer stop there for good (the test kills it):
    ``in_step`` right away, ``in_save`` inside the checkpoint save, after its own state file is written."""
    if args.get(where) != [rank, step]:
        return

    def hang() -> None:
        (out / where).write_text(str(os.getpid()))
        time.sleep(600)

    if where == "in_step":
        hang()
    import distrag.distributed.checkpoint as checkpoint

    real = checkpoint.atomic_write_bytes

    def write_then_hang(path, data, **kw):
        real(path, data, **kw)
        if Path(path).name.startswith("rank_"):
            hang()

    checkpoint.atomic_write_bytes = write_then_hang


# ----------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2/3 over the 2 trainers while a 3rd process is the index rank


def deepspeed_engine(args: dict) -> int:
    from distrag.distributed.refresh_client import IndexClient
    from distrag.distributed.refresh_server import IndexServer

    out = Path(args["out"])
    stage = args["stage"]
    dcfg = DistributedConfig(zero_stage=stage, index_timeout_s=120)
    ctx = roles.init_roles(dcfg)
    if ctx.info.is_index:
        server = IndexServer(ctx.store, lambda sd: iter(()), lambda v: v, out / "index", out / "weights",
                             poll_interval_s=0.1)
        server.run()
        _result(out, {"role": "index"})
        return 0

    import deepspeed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from distrag.distributed.checkpoint import CheckpointManager
    from distrag.distributed.deepspeed_setup import (
        attach_deepspeed,
        build_ds_config,
        check_ds_batch,
        engine_kwargs,
        is_partitioned,
        needs_synced_gpus,
        outside_zero3_init,
        save_lora_adapter,
    )

    r = ctx.info.trainer_rank
    attach_deepspeed(ctx)
    tcfg = TrainConfig(batch_size=2, micro_batch_size=1, max_grad_norm=1.0)
    ds_cfg = build_ds_config(tcfg, dcfg, ctx.info.n_trainers, bf16=False)
    check_ds_batch(ds_cfg, torch.distributed.get_world_size())
    hf_ds = HfDeepSpeedConfig(ds_cfg) if stage == 3 else None  # noqa: F841 - must stay alive (weakref)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(args["lm"], dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0))
    engine, *_ = deepspeed.initialize(**engine_kwargs(model, ds_cfg, lr=0.05))
    client = IndexClient(ctx, out / "weights", index_timeout_s=120)
    gen = torch.Generator().manual_seed(7 + r)
    losses = []
    engine.train()
    for _micro in range(2 * ds_cfg["gradient_accumulation_steps"]):  # two optimizer steps
        client.poll(engine.global_steps)
        ids = torch.randint(5, 200, (1, 12), generator=gen)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    engine.eval()
    probe = torch.arange(5, 17).unsqueeze(0)
    with torch.no_grad():
        logits = engine(input_ids=probe).logits
        gen_ids = engine.module.generate(input_ids=probe, max_new_tokens=3, do_sample=False,
                                         synced_gpus=needs_synced_gpus(engine))
    if ctx.info.is_rank0:
        np.save(out / "logits.npy", logits.float().numpy())
    save_lora_adapter(engine, out / "adapter", is_writer=ctx.info.is_rank0)
    # engine checkpoint round trip (collective)
    ckpt = CheckpointManager(out / "ckpt", ctx=ctx)
    path = ckpt.save(int(engine.global_steps), {"losses": losses}, engine=engine)
    st = ckpt.load(path, engine=engine)
    # the embedder: a second model built after the ZeRO-3 engine must keep full-size parameters
    with outside_zero3_init():
        emb = AutoModel.from_pretrained(args["encoder"])
    emb_shapes_ok = all(p.shape == p.data.shape and p.numel() > 0 for p in emb.parameters())
    emb_info = {"partitioned": is_partitioned(emb), "full_shapes": emb_shapes_ok,
                "word_emb": list(emb.embeddings.word_embeddings.weight.shape)}
    naive = None
    if stage == 3:  # without the guard transformers partitions it (collective: every trainer loads it)
        naive = is_partitioned(AutoModel.from_pretrained(args["encoder"]))
    client.done()
    _result(out, {"role": "trainer", "trainer_rank": r, "losses": losses, "global_steps": int(engine.global_steps),
                  "zero_stage": engine.zero_optimization_stage(), "synced": needs_synced_gpus(engine),
                  "gen_len": int(gen_ids.shape[1]), "ckpt_step": st.step, "ckpt_losses": st.payload["losses"],
                  "ds_world": torch.distributed.get_world_size(), "embedder": emb_info,
                  "embedder_naive_partitioned": naive})
    return 0


# ----------------------------------------------------------------------------------------------
# launching (used by the tests)


def free_port_block(n: int = 3) -> int:
    """A port p with p..p+n-1 free (MASTER_PORT, the trainers' group, the coordination store)."""
    import random
    import socket

    for _ in range(200):
        base = random.randint(20000, 60000)
        socks = []
        try:
            for k in range(n):
                s = socket.socket()
                s.bind(("127.0.0.1", base + k))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


class Job:
    """``world`` worker processes of one scenario, started like a launcher would (env vars)."""

    def __init__(self, scenario: str, args: dict, world: int, out: Path, env: dict | None = None):
        import subprocess

        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        port = free_port_block()
        self.port = port
        """MASTER_PORT of the job (its coordination store listens on ``port + roles.STORE_PORT_OFFSET``)."""
        self.procs = []
        self.logs = []
        for rank in range(world):
            e = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                 "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                 "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                 "PYTHONPATH": str(Path(__file__).resolve().parents[2]), **(env or {})}
            for k in ("DISTRAG_GLOBAL_RANK", "DISTRAG_GLOBAL_WORLD_SIZE", "DISTRAG_GLOBAL_MASTER_ADDR",
                      "DISTRAG_GLOBAL_MASTER_PORT"):
                e.pop(k, None)
            log = open(self.out / f"log_{rank}.txt", "w")  # noqa: SIM115 - closed in wait()
            self.logs.append(log)
            self.procs.append(subprocess.Popen([sys.executable, __file__, scenario, json.dumps(args)],
                                               env=e, stdout=log, stderr=subprocess.STDOUT))

    def wait(self, timeout: float) -> list[int]:
        """Exit codes; kills everything left when ``timeout`` runs out (then raises)."""
        import subprocess

        deadline = time.monotonic() + timeout
        codes = []
        try:
            for p in self.procs:
                codes.append(p.wait(timeout=max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"workers still running after {timeout}s:\n{self.output()}") from None
        finally:
            for log in self.logs:
                log.close()
        return codes

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def output(self) -> str:
        return "\n".join(f"--- rank {r} ---\n" + (self.out / f"log_{r}.txt").read_text()[-4000:]
                         for r in range(len(self.procs)))

    def result(self, rank: int) -> dict:
        return json.loads((self.out / f"result_{rank}.json").read_text())


SCENARIOS = {"refresh": refresh, "preempt": preempt_scenario, "ds": deepspeed_engine}

if __name__ == "__main__":
    scenario, raw = sys.argv[1], sys.argv[2]
    code = 1
    try:
        code = SCENARIOS[scenario](json.loads(raw))
    except BaseException:  # noqa: BLE001 - any failure: print it, exit through roles.finish
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        roles.finish(code)

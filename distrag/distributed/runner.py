"""Multi-process training: DeepSpeed ZeRO trainers plus a dedicated, asynchronous index rank.

``run(cfg)`` is what ``launch/train.py`` calls in every process of ``deepspeed launch/train.py`` or
``torchrun launch/train.py``:

* roles come from :mod:`distrag.distributed.roles` (the only module that reads RANK / WORLD_SIZE): with
  ``train.refresh_every > 0`` one rank is the **index rank** and never joins a trainer collective;
  DeepSpeed only ever sees the trainers (its default group is trainers-only);
* trainers run the same strategies, losses and ledger as the single-process path
  (:class:`distrag.training.trainer.Trainer`); :class:`DistributedTrainer` only swaps in its hooks: each
  trainer takes its slice of the global batch, the LoRA generator trains inside a DeepSpeed engine
  (ZeRO-2/3, torch AdamW), the question encoder is data-parallel (gradients all-reduced over the
  trainers), new index versions are adopted at the same step on every trainer, checkpoints are
  written atomically and preemption checkpoints then requeues;
* the index rank (:func:`serve_index`) waits for embedder weights, re-embeds the corpus shard by
  shard, rebuilds the sharded faiss index and publishes version v atomically;
* at the end the LoRA adapter is gathered (a collective, so ZeRO-3 adapters are never saved empty),
  trainer 0 evaluates with the gathered adapter and records quality and the merged ledger of all
  trainers in ONE MLflow run (resumed runs continue the same run id).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from distrag.config import ExperimentConfig
from distrag.costs.accountant import Accountant
from distrag.costs.ledger import CostLedger
from distrag.distributed import preemption, roles
from distrag.distributed.checkpoint import CheckpointManager
from distrag.retrieval.sharded_index import ShardedIndex, publish
from distrag.training.strategies import Phase, phases_for
from distrag.training.trainer import Trainer, TrainState, batch_indices

log = logging.getLogger(__name__)


def run_dir(cfg: ExperimentConfig) -> Path:
    """Checkpoints, published index versions and weight hand-offs of this run (shared filesystem)."""
    return Path(cfg.output_dir) / "distributed" / f"{cfg.train.strategy}-{cfg.config_hash()}"


def needs_index_rank(cfg: ExperimentConfig) -> bool:
    return cfg.train.refresh_every > 0 and any(p.train_embedder for p in phases_for(cfg))


class DistributedTrainer(Trainer):
    """:class:`Trainer` with DeepSpeed for the generator and all-reduce for the question encoder."""

    def __init__(self, *args, ctx: roles.DistContext, ckpt: CheckpointManager, client=None, tracker=None,
                 restored=None, **kw):
        super().__init__(*args, **kw)
        self.ctx, self.ckpt, self.client, self.tracker = ctx, ckpt, client, tracker
        self.restored = restored
        self.engine = None
        self.emb_opt = self.emb_sched = None
        self.gen_training = False
        self.stopped = False
        self.index_path: str | None = None
        self._refresh_flops: float | None = None

    # -- data: this trainer's slice of the global batch -------------------------------------------
    def step_questions(self, phase_index: int, step: int):
        t, info = self.cfg.train, self.ctx.info
        idx = batch_indices(len(self.questions), t.batch_size * info.n_trainers, t.seed + phase_index, step)
        mine = idx[info.trainer_rank * t.batch_size:(info.trainer_rank + 1) * t.batch_size]
        return [self.questions[i] for i in mine]

    # -- optimisation -------------------------------------------------------------------------------
    def make_optimizers(self, phase: Phase, total_steps: int) -> None:
        from transformers import get_linear_schedule_with_warmup

        from distrag.distributed.deepspeed_glue import build_ds_config, engine_kwargs
        from distrag.training.trainer import set_embedder_trainable, set_generator_trainable

        t = self.cfg.train
        warmup = int(t.warmup_ratio * total_steps)
        set_embedder_trainable(self.embedder, phase.train_embedder)
        self.emb_params = [p for p in self.embedder.parameters() if p.requires_grad]
        self.emb_opt = self.emb_sched = None
        if phase.train_embedder:
            self.emb_opt = torch.optim.AdamW(self.emb_params, lr=t.lr_embedder, weight_decay=t.weight_decay)
            self.emb_sched = get_linear_schedule_with_warmup(self.emb_opt, warmup, total_steps)
        set_generator_trainable(self.generator, phase.train_generator)
        self.gen_training = phase.train_generator
        if phase.train_generator and self.engine is None:
            import deepspeed

            bf16 = self.cfg.generator.dtype == "bfloat16" or (
                self.cfg.generator.dtype == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
            ds_cfg = build_ds_config(t, self.cfg.distributed, self.ctx.info.n_trainers, bf16=bf16)
            kw = engine_kwargs(self.generator.model, ds_cfg, t.lr_generator, t.weight_decay)
            sched = get_linear_schedule_with_warmup(kw["optimizer"], warmup, total_steps)
            self.engine, _, _, _ = deepspeed.initialize(**kw, lr_scheduler=sched)
        # Trainer.optimizer_step clips over self.params; the generator's clipping is DeepSpeed's.
        self.params = self.emb_params

    def after_optimizers(self, phase: Phase) -> None:
        """On a resume, restore optimizer/scheduler/engine state of the phase in progress."""
        if self.restored is None:
            return
        path, payload = self.restored
        self.restored = None
        if self.engine is not None and self.gen_training:
            self.ckpt.load(path, engine=self.engine)  # collective; also restores this rank's RNG
        else:
            self.ckpt.load(path)
        if self.emb_opt is not None and payload.get("emb_opt") is not None:
            self.emb_opt.load_state_dict(payload["emb_opt"])
            self.emb_sched.load_state_dict(payload["emb_sched"])

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine is not None and self.gen_training:
            # the caller already divided by the accumulation steps
            self.engine.backward(loss, scale_wrt_gas=False)
            self.engine.step()  # DeepSpeed steps the generator's optimizer at the accumulation boundary
        else:
            loss.backward()

    def optimizer_step(self) -> float:
        norm = 0.0
        if self.emb_opt is not None:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.emb_params]
            if self.ctx.has_group and self.ctx.info.n_trainers > 1:
                flat = torch._utils._flatten_dense_tensors(grads)
                torch.distributed.all_reduce(flat)
                flat /= self.ctx.info.n_trainers
                for g, f in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                    g.copy_(f)
                for p, g in zip(self.emb_params, grads):
                    p.grad = g
            norm = float(torch.nn.utils.clip_grad_norm_(self.emb_params, self.cfg.train.max_grad_norm))
            self.emb_opt.step()
            self.emb_sched.step()
            self.emb_opt.zero_grad(set_to_none=True)
        if self.engine is not None and self.gen_training:
            g = self.engine.get_global_grad_norm()
            norm = max(norm, float(g) if g is not None else 0.0)
        return norm

    # -- index versions ------------------------------------------------------------------------------
    def _load_index(self, path: str) -> None:
        self.index = ShardedIndex.load(path)
        self.index_path = path
        self.state.index_version += 1
        if self.ctx.info.is_rank0:  # the index rank re-embedded the corpus for this version
            if self._refresh_flops is None:
                probe = CostLedger()
                Accountant(probe).encode_texts(self.embedder, self.corpus.texts(), category="encode_passages")
                self._refresh_flops = probe.total_flops
            self.acc.ledger.add("encode_passages", self._refresh_flops, passages=len(self.corpus))

    def on_step_start(self, phase: Phase) -> None:
        if self.client is not None:
            d = self.client.poll(self.state.global_step, load_fn=self._load_index)
            if d is not None:
                self.state.index_version = d.version
                self.state.index_weights_step = d.weights_step

    def on_step_end(self, phase: Phase, n_steps: int) -> bool:
        t, dc = self.cfg.train, self.cfg.distributed
        if self.client is not None and phase.train_embedder and t.refresh_every \
                and self.state.step % t.refresh_every == 0:
            self.client.submit_weights(self.state.global_step, self.embedder.state_dict())
        gs = self.state.global_step
        stop_now = dc.stop_after is not None and gs >= dc.stop_after
        preempted = preemption.agreed(self.ctx)
        if (dc.checkpoint_every and gs % dc.checkpoint_every == 0) or preempted or stop_now:
            self.save_checkpoint()
        if preempted or stop_now:
            self.stopped = True
            return True
        return False

    # -- checkpoints -----------------------------------------------------------------------------------
    def lora_state(self) -> dict | None:
        """The LoRA adapter weights, gathered (collective under ZeRO-3: every trainer calls it)."""
        if not self.generator.is_peft:
            return None
        from distrag.distributed.deepspeed_glue import gathered_lora_state_dict

        return gathered_lora_state_dict(self.engine if self.engine is not None else self.generator.model)

    def save_checkpoint(self) -> Path:
        """Collective. Everything an exact resume needs; trainer 0 writes the shared parts."""
        payload = {
            "state": asdict(self.state),
            "embedder": {k: v.detach().cpu() for k, v in self.embedder.state_dict().items()},
            "emb_opt": self.emb_opt.state_dict() if self.emb_opt is not None else None,
            "emb_sched": self.emb_sched.state_dict() if self.emb_sched is not None else None,
            "lora": self.lora_state(),
            "index_client": self.client.state_dict() if self.client is not None else None,
            "index_path": self.index_path,
            "run_id": getattr(self.tracker, "run_id", None),
            "config_hash": self.cfg.config_hash(),
        }
        engine = self.engine if (self.engine is not None and self.gen_training) else None
        path = self.ckpt.save(self.state.global_step, payload, engine=engine,
                              rank_payload={"ledger": self.acc.ledger.state_dict()})
        if self.ctx.info.is_rank0:
            log.info("checkpoint at global step %d -> %s", self.state.global_step, path)
        return path


# ----------------------------------------------------------------------------------------------
# the index rank


class CorpusReencoder:
    """The index rank's re-embedding of a fixed corpus, shard by shard.

    Shards are cut from the corpus sorted by token length (measured once: the corpus never changes),
    so each shard's batches pad as little as one ``Embedder.encode`` of the whole corpus would; the
    server heartbeats (and can abandon a stale version) between shards. ``shards`` yields vectors in
    that sorted order; ``unsort`` puts them back at their corpus positions.
    """

    def __init__(self, embedder, texts: list[str], n_shards: int = 4):
        self.embedder = embedder
        ids = embedder.tokenizer(list(texts), truncation=True, max_length=embedder.max_length)["input_ids"]
        self.order = np.argsort([len(x) for x in ids], kind="stable")
        self.sorted_texts = [texts[i] for i in self.order]
        self.shard = max(1, -(-len(texts) // max(n_shards, 1)))

    def shards(self, state_dict: dict | None = None):
        if state_dict is not None:
            self.embedder.load_state_dict(state_dict)
        for i in range(0, len(self.sorted_texts), self.shard):
            yield self.embedder.encode(self.sorted_texts[i:i + self.shard], show_progress=False)

    def unsort(self, sorted_vectors: np.ndarray) -> np.ndarray:
        vectors = np.empty_like(sorted_vectors)
        vectors[self.order] = sorted_vectors
        return vectors

    def encode_all(self, state_dict: dict | None = None) -> np.ndarray:
        return self.unsort(np.concatenate(list(self.shards(state_dict))))


def serve_index(cfg: ExperimentConfig, ctx: roles.DistContext) -> int:
    """Index-rank loop: re-embed the corpus with each new weights hand-off, publish versions."""
    from distrag.data import load_data
    from distrag.distributed.index_refresh import IndexServer
    from distrag.models.embedder import Embedder

    data = load_data(cfg.data)
    corpus = data.corpus
    embedder = Embedder.from_config(cfg.embedder)
    embedder.eval()
    reencoder = CorpusReencoder(embedder, corpus.texts(), n_shards=max(cfg.index.n_shards, 4))
    root = run_dir(cfg)

    def build(sorted_vectors: np.ndarray) -> ShardedIndex:
        vectors = reencoder.unsort(sorted_vectors)
        return ShardedIndex.from_config(vectors.shape[1], cfg.index).build(vectors)

    def publish_fn(index: ShardedIndex, root_: Path, version: int, meta: dict) -> Path:
        return publish(index, root_, version, extra={**meta, "corpus": corpus.fingerprint()})

    server = IndexServer(ctx.store, reencoder.shards, build, root / "index", root / "weights", publish_fn=publish_fn)
    return server.run()


# ----------------------------------------------------------------------------------------------
# trainers


def train(cfg: ExperimentConfig, ctx: roles.DistContext) -> int:
    from peft.utils import set_peft_model_state_dict

    from distrag.distributed.deepspeed_glue import attach_deepspeed, outside_zero3_init
    from distrag.distributed.index_refresh import IndexClient
    from distrag.training.experiment import Experiment

    info = ctx.info
    rank0 = info.is_rank0
    attach_deepspeed(ctx)
    exp = Experiment(cfg, show_progress=rank0, is_rank0=rank0)
    with outside_zero3_init():
        # trainer 0 builds (or loads) the frozen index first; the others then load it from disk
        if rank0:
            exp.setup()
        ctx.barrier_trainers()
        if not rank0:
            exp.setup()
    root = run_dir(cfg)
    ckpt = CheckpointManager(root / "checkpoints", keep=cfg.distributed.keep_checkpoints, ctx=ctx)
    resume = ckpt.resolve(cfg.distributed.resume)
    payload = rank_payload = None
    if resume is not None:
        restored = ckpt.load(resume)
        payload, rank_payload = restored.payload, restored.rank_payload or {}
        if payload.get("config_hash") != cfg.config_hash():
            raise RuntimeError(f"checkpoint {resume} was written by another configuration "
                               f"({payload.get('config_hash')} vs {cfg.config_hash()})")
    tracker = exp.open_run(cfg, run_id=(payload or {}).get("run_id"))
    ledger = CostLedger()
    ledger.merge(exp.index_ledger)
    if rank_payload and rank_payload.get("ledger"):
        ledger = CostLedger.from_state_dict(rank_payload["ledger"])
    acc = Accountant(ledger)
    embedder = copy.deepcopy(exp.embedder)
    generator = copy.deepcopy(exp.generator)
    generator.tokens.reset()
    client = None
    if needs_index_rank(cfg):
        client = IndexClient(ctx, root / "weights", index_timeout_s=cfg.distributed.index_timeout_s,
                             on_index_failure=cfg.distributed.on_index_failure, log_fn=tracker.log_metrics)
    t0 = time.perf_counter()
    trainer = DistributedTrainer(cfg, exp.splits.corpus, exp.splits.train, embedder, generator, exp.index, acc,
                                 on_metrics=tracker.log_metrics, show_progress=rank0, ctx=ctx, ckpt=ckpt,
                                 client=client, tracker=tracker,
                                 restored=(resume, payload) if resume is not None else None)
    if payload is not None:
        trainer.state = TrainState(**payload["state"])
        embedder.load_state_dict(payload["embedder"])
        if payload.get("lora") is not None:
            set_peft_model_state_dict(generator.model, payload["lora"])
        if payload.get("index_client") is not None and client is not None:
            client.load_state_dict(payload["index_client"])
        if payload.get("index_path"):
            trainer.index = ShardedIndex.load(payload["index_path"])
            trainer.index_path = payload["index_path"]
        if rank0:
            log.info("resumed from %s at global step %d", resume, trainer.state.global_step)
    preemption.install()
    rc = 0
    with tracker:
        trainer.train()
        lora = trainer.lora_state()  # collective
        states = [None] * info.n_trainers if ctx.has_group else None
        if ctx.has_group:
            torch.distributed.all_gather_object(states, acc.ledger.state_dict())
        if trainer.stopped:
            if rank0:
                log.info("stopped at global step %d; resume with distributed.resume=auto",
                         trainer.state.global_step)
                if preemption.preemption_requested():
                    preemption.requeue(ctx)
            rc = preemption.EXIT_REQUEUED
        elif rank0:
            from distrag.atomic_io import atomic_write_json

            atomic_write_json(root / "history.json", trainer.state.history)
            total = CostLedger(n_devices=1)
            for st in states or [acc.ledger.state_dict()]:
                total.merge(CostLedger.from_state_dict(st), parallel=True)
            gen_eval = copy.deepcopy(exp.generator)
            if lora is not None:
                gen_eval.add_lora(cfg.generator.lora)
                set_peft_model_state_dict(gen_eval.model, lora)
            from distrag.training.trainer import set_embedder_trainable

            set_embedder_trainable(embedder, False)
            res = exp.evaluate_and_record(cfg, tracker, Accountant(total), embedder, gen_eval, trainer.index,
                                          split=cfg.eval_split, history=trainer.state.history, t0=t0)
            tracker.log_metrics({"dist/n_trainers": info.n_trainers,
                                 "dist/index_versions": trainer.state.index_version})
            from distrag.reporting.report import print_results

            print_results([res], title=f"{res.label} on {exp.splits.name}, {info.n_trainers} trainer(s)")
        if client is not None:
            from distrag.atomic_io import atomic_write_json

            # every trainer records the versions it adopted and when (they must agree)
            atomic_write_json(root / f"adoptions_trainer{info.trainer_rank}.json",
                              [asdict(d) for d in client.history])
            client.done()
        ctx.barrier_trainers()
    return rc


def run(cfg: ExperimentConfig) -> int:
    """Entry point of every process; returns the exit code (0 on success and after a requeue)."""
    ctx = roles.init_roles(cfg.distributed, with_index_rank=needs_index_rank(cfg))
    if ctx.info.is_index:
        try:
            n = serve_index(cfg, ctx)
        except Exception:
            # The error is already in the store, so the trainers follow distributed.on_index_failure.
            # Staying alive until they are done keeps launchers (torchrun, deepspeed) from tearing the
            # whole job down because one process exited.
            import traceback

            from distrag.distributed.index_refresh import K_DONE

            traceback.print_exc()
            deadline = time.monotonic() + 7 * 24 * 3600
            while time.monotonic() < deadline:
                try:
                    if ctx.store.add(K_DONE, 0) > 0:
                        break
                except (RuntimeError, OSError):  # trainer 0 (the store's host) is gone
                    break
                time.sleep(1.0)
            return 1
        log.info("index rank published %d version(s)", n)
        return 0
    return train(cfg, ctx)

"""The :class:`Trainer` of a multi-process run: DeepSpeed for the generator, all-reduce for the retriever.

:class:`DistributedTrainer` runs the same phases, losses and ledger as the single-process
:class:`distrag.training.trainer.Trainer` and only overrides its hooks:

* data: each trainer takes its slice of the global batch (``step_questions``);
* optimisation: the LoRA generator trains inside a DeepSpeed engine (ZeRO-2/3, torch AdamW); the
  question encoder is data-parallel, its gradients all-reduced over the trainers (``make_optimizers``,
  ``backward``, ``optimizer_step``);
* index versions: hands embedder weights to the index rank and adopts each published version at the
  same step on every trainer (``on_step_start``, ``on_step_end``);
* checkpoints: writes them (a collective), periodically, at ``distributed.stop_after`` and when a
  preemption is agreed, and restores the phase in progress on a resume (``after_optimizers``).

:mod:`distrag.distributed.runner` builds it, resumes it, runs it and records its results.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch

from distrag.distributed import preemption, roles
from distrag.distributed.checkpoint import CheckpointManager
from distrag.retrieval import index_store
from distrag.retrieval.corpus_encoding import CorpusEncoder
from distrag.strategies import Phase
from distrag.training.trainer import Trainer, batch_indices

log = logging.getLogger(__name__)


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
        # FLOPs of one corpus pass, charged to trainer 0 per adopted version. Counted here, before training:
        # it tokenizes the whole corpus (30 s for 20k passages on a loaded CPU), which inside an adoption
        # would block every trainer for that long.
        self._refresh_flops: float | None = (
            CorpusEncoder(self.embedder, self.corpus.texts()).cost.flops
            if client is not None and ctx.info.is_rank0 else None)

    # -- data: this trainer's slice of the global batch -------------------------------------------
    def step_questions(self, phase_index: int, step: int):
        t, info = self.cfg.train, self.ctx.info
        idx = batch_indices(len(self.questions), t.batch_size * info.n_trainers, t.seed + self.stream(phase_index),
                            step)
        mine = idx[info.trainer_rank * t.batch_size:(info.trainer_rank + 1) * t.batch_size]
        return [self.questions[i] for i in mine]

    # -- optimisation -------------------------------------------------------------------------------
    def make_optimizers(self, phase: Phase, total_steps: int) -> None:
        from transformers import get_linear_schedule_with_warmup

        from distrag.distributed.deepspeed_setup import build_ds_config, engine_kwargs, uses_bf16
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

            ds_cfg = build_ds_config(t, self.cfg.distributed, self.ctx.info.n_trainers,
                                     bf16=uses_bf16(self.generator.model))
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
        self.index = index_store.load(path)
        self.index_path = path
        self.state.index_version += 1
        if self.ctx.info.is_rank0:  # the index rank re-embedded the corpus for this version
            self.acc.ledger.add("encode_passages", self.corpus_pass_flops(), passages=len(self.corpus))

    def corpus_pass_flops(self) -> float:
        """FLOPs of one encoding pass over the corpus (counted once: counting tokenizes the whole corpus)."""
        if self._refresh_flops is None:
            self._refresh_flops = CorpusEncoder(self.embedder, self.corpus.texts()).cost.flops
        return self._refresh_flops

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
        from distrag.distributed.deepspeed_setup import gathered_lora_state_dict

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
        current = self.client.current if self.client is not None else None
        path = self.ckpt.save(self.state.global_step, payload, engine=engine,
                              rank_payload={"ledger": self.acc.ledger.state_dict()},
                              index_version=current.version if current is not None else None)
        if self.ctx.info.is_rank0:
            log.info("checkpoint at global step %d -> %s", self.state.global_step, path)
        return path

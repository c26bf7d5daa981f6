"""Multi-process training: DeepSpeed ZeRO trainers plus a dedicated, asynchronous index rank.

``run(cfg)`` is what ``launch/train.py`` calls in every process of ``deepspeed launch/train.py`` or
``torchrun launch/train.py``. Roles come from :mod:`distrag.distributed.roles` (the launcher's environment from
:mod:`distrag.distributed.world`): with ``train.refresh_every > 0`` one rank is the **index rank** and never
joins a trainer collective; DeepSpeed only ever sees the trainers (its default group is trainers-only).

* The index rank (:func:`run_index_rank`) supervises a child process (the index worker:
  :mod:`~distrag.distributed.index_supervisor`, so its death never makes the launcher end the trainers)
  that runs :func:`~distrag.distributed.refresh_server.serve_index`: it waits for embedder weights,
  re-embeds the corpus shard by shard, rebuilds the sharded faiss index, publishes version v atomically
  and prunes old versions.
* Each trainer runs a :class:`TrainerRun`, whose ``run()`` is these steps, in this order:

  1. ``setup``            DeepSpeed's process group; the experiment (data, models, frozen index), built
                          by trainer 0 first, then loaded from disk by the others.
  2. ``read_checkpoint``  the checkpoint ``distributed.resume`` names (resolved, loaded, checked to be
                          of this configuration), or None for a fresh start.
  3. ``build_trainer``    the MLflow run (a resumed run continues the same run id), the cost ledger,
                          this trainer's copies of the models, the index-refresh client and the
                          :class:`~distrag.distributed.deepspeed_trainer.DistributedTrainer`.
  4. ``resume``           the checkpoint's state into them: position, embedder, LoRA adapter, index
                          client, index version in use.
  5. ``train_loop``       the preemption handler, then the strategy's phases (index adoption and
                          checkpoints happen in the trainer's hooks).
  6. ``finalize``         the collectives every trainer calls (gathered LoRA adapter, so ZeRO-3
                          adapters are never saved empty; all trainers' ledgers and refresh stats); then
                          trainer 0 evaluates with the gathered adapter and records quality, the merged
                          ledger of all trainers and of the index rank (its device time, phase
                          ``index_rank``), and each trainer's time blocked on the index and staleness in
                          ONE MLflow run, or, when the run stopped early, requeues the job; every trainer
                          records the index versions it adopted.

  Every collective is called by every trainer, in the same order.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from distrag import metric_names as mn
from distrag.atomic_io import atomic_write_json
from distrag.config import ExperimentConfig
from distrag.costs.accountant import Accountant
from distrag.costs.ledger import CostLedger
from distrag.distributed import preemption, roles
from distrag.distributed.checkpoint import CheckpointManager, Restored
from distrag.distributed.deepspeed_trainer import DistributedTrainer
from distrag.distributed.index_supervisor import run_supervised_index_rank
from distrag.distributed.refresh_client import IndexClient
from distrag.errors import CheckpointError, DSConfigError, IndexRankFailed, user_error_exit
from distrag.logging_setup import progress_enabled
from distrag.retrieval import index_store
from distrag.run_lock import lock_output_dir
from distrag.strategies import needs_index_rank, strategy_of
from distrag.training import preflight as preflight_checks
from distrag.training.preflight import Problems
from distrag.training.trainer import TrainState, set_embedder_trainable

if TYPE_CHECKING:
    from distrag.models.generator import Generator

log = logging.getLogger(__name__)


def run_dir(cfg: ExperimentConfig) -> Path:
    """Checkpoints, published index versions and weight hand-offs of this run (shared filesystem)."""
    return Path(cfg.output_dir) / "distributed" / f"{cfg.train.strategy}-{cfg.config_hash()}"


# ----------------------------------------------------------------------------------------------
# checks before a launched run starts


def world_problems(cfg: ExperimentConfig, world_size: int) -> Problems:
    """``distributed.index_rank`` inside the world, an explicit ``distributed.resume`` that exists, a usable
    DeepSpeed configuration (``launch/train.py`` runs)."""
    from distrag.distributed.deepspeed_setup import build_ds_config

    problems: Problems = []
    d = cfg.distributed
    refresh = needs_index_rank(cfg) and world_size > 1
    if (refresh or cfg.train.refresh_every > 0) and not -world_size <= d.index_rank < world_size:
        problems.append(("distributed.index_rank",
                         f"{d.index_rank} is outside the world of {world_size} process(es) "
                         f"(ranks 0..{world_size - 1}); use -1 (the last rank) or a rank in 0..{world_size - 1}"))
    if d.resume not in (None, "", "none", "auto") and not Path(d.resume).exists():
        problems.append(("distributed.resume",
                         f"checkpoint {d.resume} does not exist; give a checkpoint folder (<output_dir>/distributed/"
                         "<strategy>-<hash>/checkpoints/step_N), auto (the newest, or a fresh start) or none"))
    if strategy_of(cfg).trains_generator:  # DeepSpeed wraps the generator only
        try:
            build_ds_config(cfg.train, d, max(world_size - 1 if refresh else world_size, 1), bf16=False)
        except DSConfigError as e:
            if "offload" in str(e):
                problems.append(("distributed.offload", "CPU offload needs ZeRO-3; set distributed.zero_stage=3 or "
                                                        "distributed.offload=false"))
            else:
                problems.append(("distributed.ds_config", f"{str(e).removeprefix('distributed.ds_config: ')}; give a "
                                 "DeepSpeed JSON object (e.g. ds_configs/zero2.json) or leave it unset for the "
                                 "built-in ZeRO settings"))
    return problems


def check_setup(cfg: ExperimentConfig, *, world_size: int | None = None, tracking: bool = True) -> Problems:
    """:func:`distrag.training.preflight.check_setup` and, with ``world_size`` (a launched run), the world's and
    DeepSpeed's problems (:func:`world_problems`)."""
    problems = (world_problems(cfg, world_size) if world_size is not None else [])
    return [*preflight_checks.check_setup(cfg, tracking=tracking), *problems]


def preflight(cfg: ExperimentConfig, splits=None, *, world_size: int | None = None, tracking: bool = True) -> None:
    """:func:`distrag.training.preflight.preflight` with the problems of the world (``world_size``) too: every
    problem in one :class:`~distrag.errors.ConfigError`, before any model loads."""
    world = world_problems(cfg, world_size) if world_size is not None else []
    preflight_checks.preflight(cfg, splits, tracking=tracking, problems=world)


# ----------------------------------------------------------------------------------------------
# the index rank


def run_index_rank(cfg: ExperimentConfig, ctx: roles.DistContext) -> int:
    """The index rank's process: a supervisor whose child process serves the index
    (:mod:`~distrag.distributed.index_supervisor`), so a dead or stopped index worker never makes the
    launcher end the trainers; returns 0, or 1 when the worker failed under ``on_index_failure=stop``."""
    info = ctx.info
    return run_supervised_index_rank(cfg, info, ctx.store, run_dir(cfg), info.master_port + roles.STORE_PORT_OFFSET,
                                     roles.STORE_TIMEOUT_S)


# ----------------------------------------------------------------------------------------------
# trainers


class TrainerRun:
    """One trainer process's run of ``cfg``: :meth:`run` is setup -> read_checkpoint -> build_trainer ->
    resume -> train_loop -> finalize (see the module's docstring). The steps fill in the attributes
    below; the checkpoint manager is ready from the start (it only names the folder)."""

    def __init__(self, cfg: ExperimentConfig, ctx: roles.DistContext):
        self.cfg, self.ctx = cfg, ctx
        self.rank0 = ctx.info.is_rank0
        self.root = run_dir(cfg)
        self.ckpt = CheckpointManager(self.root / "checkpoints", keep=cfg.distributed.keep_checkpoints, ctx=ctx)
        self.exp = None  # the Experiment: data, base models, frozen index (setup)
        self.tracker = None  # the MLflow run (build_trainer)
        self.acc: Accountant | None = None  # this trainer's ledger (build_trainer)
        self.client = None  # the index-refresh client, when there is an index rank (build_trainer)
        self.trainer: DistributedTrainer | None = None  # (build_trainer)
        self.t0 = 0.0  # when training started, for the recorded wall time (build_trainer)

    def run(self) -> int:
        """The whole run; returns the exit code (0, EXIT_REQUEUED when it stopped early, 1 when the index
        rank failed under ``on_index_failure=stop``). The MLflow run ends FINISHED only when training and
        the evaluation finished: KILLED when it stopped early, FAILED on an error (tag ``distrag.stopped``
        says why it stopped)."""
        self.setup()
        restored = self.read_checkpoint()
        self.build_trainer(restored)
        self.resume(restored)
        try:
            self.train_loop()
            rc = self.finalize()
        except IndexRankFailed as e:
            return self._index_failed(e)
        except BaseException:
            self.tracker.end("FAILED")
            raise
        if self.trainer.stopped:
            why = mn.STOP_PREEMPTED if preemption.preemption_requested() else mn.STOP_AFTER
            self.tracker.set_tags({mn.TAG_STOPPED: why})
        self.tracker.end("KILLED" if self.trainer.stopped else "FINISHED")
        return rc

    # -- 1. setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        """DeepSpeed's process group; the experiment, built by trainer 0 first (it may build the frozen
        index), then loaded from disk by the others."""
        from distrag.distributed.deepspeed_setup import attach_deepspeed, outside_zero3_init
        from distrag.training.experiment import Experiment

        if self.rank0:  # one run per output folder (distrag.run_lock), before anything loads
            lock_output_dir(self.cfg.output_dir)
        attach_deepspeed(self.ctx)
        self.exp = Experiment(self.cfg, show_progress=self.rank0 and progress_enabled(), is_rank0=self.rank0)
        with outside_zero3_init():
            if self.rank0:
                self.exp.setup()
            self.ctx.barrier_trainers()
            if not self.rank0:
                self.exp.setup()

    # -- 2. read_checkpoint --------------------------------------------------------------------------
    def read_checkpoint(self) -> Restored | None:
        """The checkpoint ``distributed.resume`` names, loaded (this trainer's RNG restored), or None for
        a fresh start. An explicit resume that names nothing complete, or a checkpoint written by
        another configuration, is a :class:`CheckpointError`."""
        found = self.ckpt.resolve(self.cfg.distributed.resume)
        if found is None:
            return None
        restored = self.ckpt.load(found)  # signature first, every file, paths inside the run folder
        saved_hash, this_hash = restored.payload.get("config_hash"), self.cfg.config_hash()
        if saved_hash != this_hash:
            raise CheckpointError(f"checkpoint {found} was written by another configuration ({saved_hash} vs "
                                  f"{this_hash}): resume it with the configuration that wrote it, or start "
                                  "fresh with distributed.resume=none")
        return restored

    # -- 3. build_trainer ----------------------------------------------------------------------------
    def build_trainer(self, restored: Restored | None) -> None:
        """The MLflow run, the ledger, this trainer's copies of the models, the index client, the trainer."""
        cfg, exp = self.cfg, self.exp
        payload = restored.payload if restored is not None else {}
        self.tracker = exp.open_run(cfg, run_id=payload.get("run_id"))
        self.acc = Accountant(self._start_ledger(restored))
        embedder = copy.deepcopy(exp.embedder)
        generator = copy.deepcopy(exp.generator)
        generator.tokens.reset()
        if needs_index_rank(cfg):
            self.client = IndexClient(self.ctx, self.root / "weights", index_timeout_s=cfg.distributed.index_timeout_s,
                                      on_index_failure=cfg.distributed.on_index_failure,
                                      log_fn=self.tracker.log_metrics)
        self.t0 = time.perf_counter()
        self.trainer = DistributedTrainer(
            cfg, exp.splits.corpus, exp.splits.train, embedder, generator, exp.index, self.acc,
            on_metrics=self.tracker.log_metrics, show_progress=self.exp.show_progress, ctx=self.ctx, ckpt=self.ckpt,
            client=self.client, tracker=self.tracker,
            restored=(restored.path, restored.payload) if restored is not None else None)

    def _start_ledger(self, restored: Restored | None) -> CostLedger:
        """This trainer's ledger as saved in the checkpoint, else a fresh one; trainer 0's holds the
        frozen index build (the others load the index trainer 0 built: the merged ledger charges it once)."""
        rank_payload = restored.rank_payload if restored is not None else None
        if rank_payload and rank_payload.get("ledger"):
            return CostLedger.from_state_dict(rank_payload["ledger"])
        ledger = CostLedger()
        if self.rank0:
            ledger.merge(self.exp.index_ledger)
        return ledger

    # -- 4. resume -----------------------------------------------------------------------------------
    def resume(self, restored: Restored | None) -> None:
        """Put the checkpoint's state into the trainer (the optimizers' and DeepSpeed engine's state
        follow once the phase in progress builds them: ``DistributedTrainer.after_optimizers``)."""
        if restored is None:
            return
        from peft.utils import set_peft_model_state_dict

        payload, trainer = restored.payload, self.trainer
        trainer.state = TrainState(**payload["state"])
        trainer.embedder.load_state_dict(payload["embedder"])
        if payload.get("lora") is not None:
            set_peft_model_state_dict(trainer.generator.model, payload["lora"])
        if payload.get("index_client") is not None and self.client is not None:
            self.client.load_state_dict(payload["index_client"])
        if payload.get("index_path"):
            trainer.index = index_store.load(payload["index_path"])
            trainer.index_path = payload["index_path"]
        if self.rank0:
            log.info("resumed from %s at global step %d", restored.path, trainer.state.global_step)

    # -- 5. train_loop -------------------------------------------------------------------------------
    def train_loop(self) -> None:
        """The strategy's phases; a preemption signal makes them checkpoint and stop at an agreed step."""
        preemption.install()
        self.trainer.train()

    def _index_failed(self, error: IndexRankFailed) -> int:
        """``on_index_failure=stop``: every trainer raised at the same step. Checkpoint there (unless a resumed
        phase has not restored its optimizers yet: the checkpoint resumed from is still the newest), tell the
        index rank to leave, say so once, end the MLflow run FAILED; exit code 1."""
        trainer, path = self.trainer, None
        if trainer.restored is None and trainer.state.global_step > 0:
            path = trainer.save_checkpoint()  # collective: every trainer is here at the same step
        self.client.done()
        self.tracker.set_tags({mn.TAG_STOPPED: mn.STOP_INDEX_FAILED})
        self.tracker.end("FAILED")
        if self.rank0:
            where = f"checkpoint {path}" if path is not None else "the previous checkpoint (if any)"
            log.error("%s; %s keeps the training so far: resume with distributed.resume=auto, or set "
                      "distributed.on_index_failure=continue to train on through index-rank failures", error, where)
        self.ctx.barrier_trainers()
        return 1

    # -- 6. finalize ---------------------------------------------------------------------------------
    def finalize(self) -> int:
        """Collectives first (every trainer), then trainer 0's records; returns the exit code."""
        lora = self.trainer.lora_state()  # collective (ZeRO-3 gathers the adapter)
        records = self._gather_records()  # collective
        rc = 0
        if self.trainer.stopped:
            rc = self._stopped_early()
        elif self.rank0:
            self._record_results(lora, records)
        if self.client is not None:
            self._record_adoptions()
            self.client.done()
        self.ctx.barrier_trainers()
        return rc

    def _gather_records(self) -> list[dict]:
        """Every trainer's ledger state and, with an index rank, its refresh stats (``index``: blocked
        time and share of its training wall-clock, staleness), in trainer order (an all_gather over the
        trainers; just this one without a group)."""
        mine = {"ledger": self.acc.ledger.state_dict(),
                "index": self.client.stats.summary(time.perf_counter() - self.t0) if self.client is not None else None}
        if not self.ctx.has_group:
            return [mine]
        records = [None] * self.ctx.info.n_trainers
        torch.distributed.all_gather_object(records, mine)
        return records

    def _stopped_early(self) -> int:
        """``distributed.stop_after`` or a preemption: the checkpoint is written; trainer 0 requeues a
        preempted job."""
        if self.rank0:
            log.info("stopped at global step %d; resume with distributed.resume=auto",
                     self.trainer.state.global_step)
            if preemption.preemption_requested():
                preemption.requeue(self.ctx)
        return preemption.EXIT_REQUEUED

    def _record_results(self, lora: dict | None, records: list[dict]) -> None:
        """Trainer 0: history.json; the evaluation with the gathered adapter, recorded with the merged
        ledger of all trainers (and of the index rank) in the MLflow run; the distributed and index-refresh
        metrics; the result table."""
        from distrag.reporting.report import print_results
        from distrag.training.experiment import PASSAGES_REEMBEDDED, Models

        trainer, n_trainers = self.trainer, self.ctx.info.n_trainers
        atomic_write_json(self.root / "history.json", trainer.state.history)
        total = _merged_ledger([r["ledger"] for r in records])
        if self.client is not None:  # the index rank held a device as long as the trainers did
            total.merge(self._index_rank_ledger(total.wall_s), parallel=True)
        generator = self._eval_generator(lora)
        set_embedder_trainable(trainer.embedder, False)
        models = Models(trainer.embedder, generator, trainer.index, total, CostLedger(), trainer.state.history)
        if self.cfg.index.reembed_after_training and any(p.train_embedder for p in trainer.phases):
            # the final encoder's corpus, as the trained pipeline is deployed (index versions lag behind)
            models.index = self.exp.reembed(self.cfg, trainer.embedder, total)
            models.passage_vectors = PASSAGES_REEMBEDDED
        res = self.exp.evaluate(self.cfg, models, self.tracker, split=self.cfg.eval_split, t0=self.t0)
        self.tracker.log_metrics({mn.DIST_N_TRAINERS: n_trainers,
                                  mn.DIST_INDEX_VERSIONS: trainer.state.index_version,
                                  **refresh_metrics([r["index"] for r in records if r["index"] is not None],
                                                    published=self._published())})
        print_results([res], title=f"{res.label} on {self.exp.splits.name}, {n_trainers} trainer(s)")

    def _published(self) -> int:
        """Index versions the index rank has published in this run so far (0 without an index rank)."""
        latest = index_store.latest_version(self.root / "index") if self.client is not None else None
        return latest[0] if latest else 0

    def _index_rank_ledger(self, seconds: float) -> CostLedger:
        """The index rank's costs, phase ``index_rank``: one device for ``seconds`` (the run's wall-clock),
        and one corpus pass per version it published (by now) that trainer 0 never adopted (trainer 0 is
        charged a pass per adopted version when it adopts it; a version abandoned half-way is not charged)."""
        latest = index_store.latest_version(self.root / "index")
        unadopted = max(0, (latest[0] if latest else 0) - self.client.stats.n_adopted)
        now = [0.0]
        ledger = CostLedger(clock=lambda: now[0])
        with ledger.phase(mn.PHASE_INDEX_RANK):
            if unadopted:
                ledger.add("encode_passages", unadopted * self.trainer.corpus_pass_flops(),
                           passages=unadopted * len(self.exp.splits.corpus))
            now[0] = seconds
        return ledger

    def _eval_generator(self, lora: dict | None) -> Generator:
        """A copy of the base generator carrying the gathered LoRA adapter (when one was trained)."""
        from peft.utils import set_peft_model_state_dict

        generator = copy.deepcopy(self.exp.generator)
        if lora is not None:
            generator.add_lora(self.cfg.generator.lora)
            set_peft_model_state_dict(generator.model, lora)
        return generator

    def _record_adoptions(self) -> None:
        """Every trainer records the index versions it adopted and when (they must agree)."""
        atomic_write_json(self.root / f"adoptions_trainer{self.ctx.info.trainer_rank}.json",
                          [asdict(d) for d in self.client.history])


def _merged_ledger(states: list[dict]) -> CostLedger:
    """All trainers' ledgers as one: the trainers ran in parallel (FLOPs and device-seconds add, the
    wall-clock is the longest)."""
    total = CostLedger(n_devices=1)
    for st in states:
        total.merge(CostLedger.from_state_dict(st), parallel=True)
    return total


def refresh_metrics(stats: list[dict], *, published: int = 0) -> dict[str, float]:
    """The index-refresh metrics of a run from every trainer's :meth:`RefreshStats.summary` (trainer
    order): per trainer ``index/trainer<i>/blocked_s`` and ``.../blocked_share``; overall the mean blocked
    time and share over the trainers, the staleness and versions adopted (agreed: trainer 0's), and the
    ``published`` versions."""
    if not stats:
        return {}
    out = {}
    for i, st in enumerate(stats):
        out[mn.trainer_metric(i, mn.INDEX_BLOCKED_S)] = st["blocked_s"]
        out[mn.trainer_metric(i, mn.INDEX_BLOCKED_SHARE)] = st["blocked_share"]
    out[mn.INDEX_BLOCKED_S] = sum(st["blocked_s"] for st in stats) / len(stats)
    out[mn.INDEX_BLOCKED_SHARE] = sum(st["blocked_share"] for st in stats) / len(stats)
    out[mn.INDEX_STALENESS_MEAN] = stats[0]["staleness_mean"]
    out[mn.INDEX_STALENESS_MAX] = stats[0]["staleness_max"]
    out[mn.INDEX_VERSIONS_ADOPTED] = stats[0]["n_adopted"]
    out[mn.INDEX_VERSIONS_PUBLISHED] = float(published)
    return out


def run(cfg: ExperimentConfig) -> int:
    """Entry point of every process; returns the exit code (0 on success and after a requeue)."""
    ctx = roles.init_roles(cfg.distributed, with_index_rank=needs_index_rank(cfg))
    if ctx.info.is_index:
        return user_error_exit(lambda: run_index_rank(cfg, ctx))  # its own error line: trainer 0 may be ended first
    if ctx.info.role == "single" and needs_index_rank(cfg):
        log.warning("train.refresh_every=%d needs an index rank, and this job has one process: the index stays "
                    "frozen during training (distributed.index_rank is unused). Start 2+ processes (torchrun "
                    "--nproc_per_node 2 ...) for asynchronous refreshes, or run `distrag train` to refresh it "
                    "in-process.", cfg.train.refresh_every)
    return TrainerRun(cfg, ctx).run()

"""The training loop every strategy runs: its phases (distrag.strategies), one after another.

``Trainer`` owns the loop (data order, accumulation, optimizers, schedulers, index refresh, cost
ledger, metrics). ``compute_loss`` runs the step registered for the phase's loss in
:mod:`distrag.training.losses` (no loss is named here); the distributed runner reuses it and only swaps
``backward`` / ``step`` for DeepSpeed's.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from distrag.config import ExperimentConfig
from distrag.costs.accountant import Accountant
from distrag.data.records import BaseCorpus, Question
from distrag.models.embedder import Embedder
from distrag.models.generator import Generator
from distrag.retrieval.corpus_encoding import build_index
from distrag.retrieval.sharded_index import SearchResult, ShardedIndex
from distrag.strategies import Phase, check_strategy_data, phases_for, strategy_of
from distrag.training.losses import loss_step

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where the loop is; saved in checkpoints so a resumed run continues exactly."""

    phase_index: int = 0
    step: int = 0          # optimizer steps done in the current phase
    global_step: int = 0   # optimizer steps done over all phases
    index_version: int = 0
    index_weights_step: int = 0
    history: list[dict] = field(default_factory=list)


def set_embedder_trainable(embedder: Embedder, on: bool) -> None:
    """Train the whole question encoder (BERT's [CLS] pooler head excepted: our pooling never uses it)."""
    for name, p in embedder.named_parameters():
        p.requires_grad_(on and ".pooler." not in f".{name}")
    embedder.train(on)


def set_generator_trainable(generator: Generator | None, on: bool) -> None:
    """Only LoRA adapters ever train; base weights stay frozen whatever the phase. While they train, the
    blocks are gradient-checkpointed when ``generator.gradient_checkpointing`` is on. None: a retriever-only run."""
    if generator is None:
        return
    for name, p in generator.model.named_parameters():
        p.requires_grad_(on and "lora_" in name)
    generator.model.train(on)
    generator.set_gradient_checkpointing(on and generator.cfg.gradient_checkpointing)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Deterministic shuffled order of ``n`` training questions for one epoch."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def batch_indices(n: int, batch: int, seed: int, step: int) -> list[int]:
    """The question indices of optimizer step ``step`` (0-based): epochs are concatenated orders,
    so any step's batch is computable without replaying the loop (exact resume)."""
    start = step * batch
    out: list[int] = []
    while len(out) < batch:
        epoch, pos = divmod(start + len(out), n)
        order = epoch_order(n, seed, epoch)
        take = min(batch - len(out), n - pos)
        out.extend(order[pos:pos + take])
    return out


class Trainer:
    """Runs the phases of one strategy over the training questions.

    The models are mutated in place (LoRA is added to the generator when a phase trains it); the
    index is the frozen corpus index unless ``train.refresh_every`` rebuilds it. ``generator`` may be None when
    no phase runs it (Ft-Embed alone: a retriever-only run need not load an LLM).
    """

    def __init__(self, cfg: ExperimentConfig, corpus: BaseCorpus, train_questions: list[Question], embedder: Embedder,
                 generator: Generator | None, index: ShardedIndex, accountant: Accountant, *,
                 on_metrics: Callable[[dict, int], None] | None = None, show_progress: bool = True,
                 phases: list[Phase] | None = None):
        self.cfg, self.corpus, self.questions = cfg, corpus, train_questions
        self.embedder, self.generator, self.index = embedder, generator, index
        self.acc = accountant
        self.on_metrics = on_metrics or (lambda m, s: None)
        self.show_progress = show_progress
        self.k = cfg.train.train_k or cfg.retrieval.top_k
        self.strategy = strategy_of(cfg)
        self.phases = phases_for(cfg) if phases is None else phases
        self.state = TrainState()
        check_strategy_data(cfg, train_questions, self.phases)
        if generator is None and any(p.train_generator or p.spec.generator_prompts != "none" for p in self.phases):
            raise ValueError("a phase runs the generator: pass one (None is for retriever-only phases, e.g. MNRL)")
        if any(p.train_generator for p in self.phases) and not self.generator.is_peft:
            # LoRA A matrices are initialised randomly: from the run's seed, not from whatever the
            # global RNG went through before (model loading, other runs in the same process)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.train.seed)
                self.generator.add_lora(cfg.generator.lora)

    # -- schedule ------------------------------------------------------------------------------
    def steps_per_phase(self) -> int:
        t = self.cfg.train
        if t.max_steps:
            return t.max_steps
        return max(1, math.ceil(t.epochs * len(self.questions) / t.batch_size))

    # -- losses --------------------------------------------------------------------------------
    def compute_loss(self, phase: Phase, questions: list[Question], rng: random.Random) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch under ``phase`` (averaged over its questions) and its statistics: the step
        registered for the phase's loss (:data:`distrag.training.losses.LOSS_STEPS`)."""
        return loss_step(phase.loss)(self, phase, questions, rng)

    def retrieve(self, vectors: torch.Tensor, k: int, *, return_vectors: bool = False) -> SearchResult:
        """The top ``k`` of the index in use for question vectors (``[B, d]``, any grad state)."""
        return self.index.search(vectors.detach().float().cpu().numpy(), k, return_vectors=return_vectors)

    def gather_candidates(self, candidates: torch.Tensor) -> tuple[torch.Tensor, int]:
        """MNRL's candidate passages (``[B, ...]``: this process's questions' rows) of the whole batch, and the row
        where this process's own start. One process holds the whole batch: unchanged, 0. The distributed trainer
        gathers every trainer's rows (with gradient back to each trainer's own), so a question's negatives are the
        global batch's (``train.gather_negatives``)."""
        return candidates, 0

    # -- optimisation hooks (the DeepSpeed runner overrides these) -------------------------------
    def make_optimizers(self, phase: Phase, total_steps: int) -> None:
        from transformers import get_linear_schedule_with_warmup

        t = self.cfg.train
        groups = []
        set_embedder_trainable(self.embedder, phase.train_embedder)
        if phase.train_embedder:
            groups.append({"params": [p for p in self.embedder.parameters() if p.requires_grad],
                           "lr": t.lr_embedder, "name": "embedder"})
        set_generator_trainable(self.generator, phase.train_generator)
        if phase.train_generator:
            groups.append({"params": self.generator.trainable_parameters(), "lr": t.lr_generator,
                           "name": "generator"})
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=t.weight_decay)
        warmup = int(t.warmup_ratio * total_steps)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, total_steps)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # -- index refresh ---------------------------------------------------------------------------
    def refresh_index(self) -> None:
        """Re-embed the corpus with the current encoder and rebuild the index (synchronous; a corpus read from disk
        chunk by chunk, as the frozen index was built)."""
        t0 = time.perf_counter()
        self.index = build_index(self.embedder, self.corpus, self.cfg.index, self.acc)  # charged: encode_passages
        self.state.index_version += 1
        self.state.index_weights_step = self.state.global_step
        log.info("index refreshed (v%d) in %.1fs", self.state.index_version, time.perf_counter() - t0)

    # -- hooks the distributed runner overrides ----------------------------------------------------
    def step_questions(self, phase_index: int, step: int) -> list[Question]:
        """The questions of optimizer step ``step`` of phase ``phase_index`` on this process."""
        t = self.cfg.train
        idx = batch_indices(len(self.questions), t.batch_size, t.seed + self.stream(phase_index), step)
        return [self.questions[i] for i in idx]

    def stream(self, phase_index: int) -> int:
        """The random stream phase ``phase_index`` draws from (data order, dropout, per-step choices)."""
        return self.strategy.phase_stream(phase_index)

    def on_step_start(self, phase: Phase) -> None:
        """Before each optimizer step (the distributed runner adopts new index versions here)."""

    def on_step_end(self, phase: Phase, n_steps: int) -> bool:
        """After each optimizer step; return True to stop the loop now (preemption)."""
        t = self.cfg.train
        if t.refresh_every and phase.train_embedder and self.state.step % t.refresh_every == 0 \
                and self.state.step < n_steps:
            self.refresh_index()
        return False

    def step_rng(self) -> random.Random:
        """Per-step randomness (gold passage choice, negative padding): a function of the position
        alone, so a resumed run draws exactly what the uninterrupted one drew."""
        t = self.cfg.train
        return random.Random(f"{t.seed}/{self.stream(self.state.phase_index)}/{self.state.step}")

    # -- the loop ----------------------------------------------------------------------------------
    def train(self) -> TrainState:
        """Run the remaining phases from ``self.state`` (fresh, or restored from a checkpoint)."""
        from tqdm.auto import tqdm

        t = self.cfg.train
        accum = t.batch_size // t.micro_batch_size
        n_steps = self.steps_per_phase()
        while self.state.phase_index < len(self.phases):
            phase = self.phases[self.state.phase_index]
            if self.state.step == 0:
                torch.manual_seed(t.seed + self.stream(self.state.phase_index))
            self.make_optimizers(phase, n_steps)
            self.after_optimizers(phase)
            with self.acc.phase(phase.name):
                bar = tqdm(total=n_steps, initial=self.state.step, desc=f"{t.strategy}:{phase.name}",
                           disable=not self.show_progress, leave=False)
                while self.state.step < n_steps:
                    self.on_step_start(phase)
                    questions = self.step_questions(self.state.phase_index, self.state.step)
                    rng = self.step_rng()
                    stats: dict[str, float] = {}
                    for m in range(accum):
                        mb = questions[m * t.micro_batch_size:(m + 1) * t.micro_batch_size]
                        loss, s = self.compute_loss(phase, mb, rng)
                        self.backward(loss / accum)
                        for key, v in s.items():
                            stats[key] = stats.get(key, 0.0) + v / accum
                    stats["grad_norm"] = self.optimizer_step()
                    self.state.step += 1
                    self.state.global_step += 1
                    self.state.history.append({"phase": phase.name, "step": self.state.step, **stats})
                    self.on_metrics({f"train/{phase.name}/{k}": v for k, v in stats.items()},
                                    self.state.global_step)
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats['loss']:.3f}")
                    if self.on_step_end(phase, n_steps):
                        bar.close()
                        return self.state
                bar.close()
            self.state.phase_index += 1
            self.state.step = 0
        set_embedder_trainable(self.embedder, False)
        set_generator_trainable(self.generator, False)
        return self.state

    def after_optimizers(self, phase: Phase) -> None:
        """Called once the phase's optimizers exist (a resume restores their state here)."""

"""One experiment: data, base models and the frozen index, set up once; strategies run on copies.

``Experiment.run(strategy_cfg)`` trains a strategy on fresh copies of the base models, evaluates it,
and records quality and cost in one MLflow run. ``distrag eval`` is ``run`` with strategy ``none``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from distrag.atomic_io import atomic_write_text
from distrag.config import ExperimentConfig
from distrag.costs.accountant import Accountant
from distrag.costs.ledger import CostLedger
from distrag.data import load_data
from distrag.data.records import Splits
from distrag.models.embedder import Embedder
from distrag.models.generator import Generator
from distrag.reporting.tracking import experiment_tags, open_tracker
from distrag.retrieval.pipeline import EvalResult, RAGPipeline
from distrag.retrieval.sharded_index import ShardedIndex
from distrag.training.strategies import Phase, check_strategy_data, phases_for
from distrag.training.trainer import Trainer

log = logging.getLogger(__name__)

STRATEGY_LABELS = {
    "none": "No-FT", "embed_ft": "Ft-Embed", "gen_ft": "Ft-Gen", "independent": "Independent",
    "two_phase": "Two-phase", "joint_sequence": "RAG-Seq", "joint_token": "RAG-Tok",
}


def strategy_key(cfg: ExperimentConfig) -> str:
    s = cfg.train.strategy
    return f"joint_{cfg.train.rag_loss}" if s == "joint" else s


@dataclass
class Models:
    """Trained (or base) models and the ledger of what producing them cost (evaluation excluded)."""

    embedder: Embedder
    generator: Generator
    index: ShardedIndex
    ledger: CostLedger
    """Everything these models cost, from the frozen index build on."""
    own: CostLedger
    """The training of the run that produced them, alone."""


@dataclass
class RunResult:
    key: str
    label: str
    metrics: dict[str, float]
    costs: dict[str, float]
    seconds: float
    run_id: str | None = None
    history: list[dict] = field(default_factory=list)
    cfg: ExperimentConfig | None = None
    models: Models | None = None
    search_flops: float | None = None
    own_flops: float = 0.0
    """FLOPs of this run's own training and evaluation (nothing carried from earlier runs)."""

    def row(self) -> dict:
        return {"strategy": self.label, **self.metrics, **self.costs, "run_id": self.run_id}


class Experiment:
    def __init__(self, cfg: ExperimentConfig, *, show_progress: bool = True, is_rank0: bool = True):
        self.cfg = cfg
        self.show_progress = show_progress
        self.is_rank0 = is_rank0
        self.out = Path(cfg.output_dir)
        self.splits: Splits | None = None
        self.embedder: Embedder | None = None
        self.generator: Generator | None = None
        self.index: ShardedIndex | None = None
        self.index_ledger = CostLedger()

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self) -> Experiment:
        cfg = self.cfg
        t0 = time.perf_counter()
        data = load_data(cfg.data)
        self.splits = data.split(cfg.data.dev_fraction, cfg.data.test_fraction, cfg.data.split_seed)
        log.info("data %s: %d passages, %d/%d/%d train/dev/test questions, context labels: %s",
                 data.name, len(data.corpus), len(self.splits.train), len(self.splits.dev),
                 len(self.splits.test), "yes" if data.has_context_labels else "no")
        self.embedder = Embedder.from_config(cfg.embedder)
        self.embedder.eval()
        self.generator = Generator.from_config(cfg.generator)
        log.info("models loaded in %.1fs", time.perf_counter() - t0)
        acc = Accountant(self.index_ledger)
        pipe = RAGPipeline(cfg, self.splits.corpus, self.embedder, self.generator, accountant=acc)
        with self.index_ledger.phase("index_build"):
            self.index = pipe.load_or_build_index(self.index_dir(), show_progress=self.show_progress)
        return self

    def index_dir(self) -> Path:
        sig = {"corpus": self.splits.corpus.fingerprint(), "embedder": self.cfg.embedder.model,
               "max_length": self.cfg.embedder.max_length, "pooling": self.cfg.embedder.pooling,
               "index": self.cfg.index.model_dump(mode="json")}
        h = hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:12]
        return self.out / "index" / h

    # -- one strategy --------------------------------------------------------------------------------
    def run(self, cfg: ExperimentConfig | None = None, *, parent=None, kind: str = "strategy",
            run_name: str | None = None, eval_split: str | None = None, phases: list[Phase] | None = None,
            start: Models | None = None, keep_models: bool = False, train: bool = True,
            prior_costs: list[CostLedger] = (), prior_history: list[dict] | None = None) -> RunResult:
        """Train ``cfg.train.strategy`` on copies of the base models, evaluate, record.

        ``phases`` runs a subset of the strategy's phases and ``start`` continues from models trained
        earlier (sweeps search one phase at a time); ``train=False`` only evaluates ``start``.
        ``prior_costs`` are ledgers of earlier work this result builds on (added to its costs), and
        ``prior_history`` the training curves of that work (recorded as this run's curves).
        ``keep_models`` returns the trained models in ``RunResult.models``.
        """
        cfg = cfg or self.cfg
        assert self.splits is not None, "call setup() first"
        if train and cfg.train.strategy != "none":  # fail before anything is trained or recorded
            check_strategy_data(cfg, self.splits.train, phases)
        split = eval_split or cfg.eval_split
        if parent is not None:
            key = strategy_key(cfg)
            tags = experiment_tags(cfg, kind=kind, strategy=key, dataset=self.splits.name)
            tags.update({"distrag.label": STRATEGY_LABELS.get(key, key), "distrag.eval_split": split})
            tracker = parent.child(run_name=run_name or f"{tags['distrag.label']} {self.splits.name}", tags=tags)
            tracker.log_params(_flat(cfg))
        else:
            tracker = self.open_run(cfg, kind=kind, run_name=run_name, split=split)
        own = CostLedger()  # the work of this run alone
        t0 = time.perf_counter()
        with tracker:
            src = start or Models(self.embedder, self.generator, self.index, self.index_ledger, CostLedger())
            embedder = copy.deepcopy(src.embedder)
            generator = copy.deepcopy(src.generator)
            generator.tokens.reset()
            index = src.index
            trainer = None
            if train and cfg.train.strategy != "none":
                trainer = Trainer(cfg, self.splits.corpus, self.splits.train, embedder, generator, index,
                                  Accountant(own), on_metrics=tracker.log_metrics, show_progress=self.show_progress,
                                  phases=phases)
                trainer.train()
                index = trainer.index
            history = trainer.state.history if trainer else prior_history
            if trainer is None and prior_history:
                for i, h in enumerate(prior_history, 1):
                    tracker.log_metrics({f"train/{h['phase']}/{k}": v for k, v in h.items()
                                         if isinstance(v, float)}, step=i)
            # The result's cost: what it continues (or the frozen index build every run needs), earlier
            # work it combines (prior_costs), and its own training.
            ledger = CostLedger()
            ledger.merge(src.ledger)
            for prior in prior_costs:
                ledger.merge(prior)
            ledger.merge(own)
            trained = Models(embedder, generator, index, copy.deepcopy(ledger), copy.deepcopy(own))
            before_eval = ledger.total_flops
            res = self.evaluate_and_record(cfg, tracker, Accountant(ledger), embedder, generator, index,
                                           split=split, history=history, t0=t0,
                                           own_flops=own.total_flops)
            res.own_flops = own.total_flops + (ledger.total_flops - before_eval)
        res.models = trained if keep_models else None
        return res

    def open_run(self, cfg: ExperimentConfig, *, kind: str = "strategy", run_name: str | None = None,
                 split: str | None = None, run_id: str | None = None, is_rank0: bool | None = None):
        """The MLflow run of one strategy (a null tracker off rank 0)."""
        key = strategy_key(cfg)
        label = STRATEGY_LABELS.get(key, key)
        tags = experiment_tags(cfg, kind=kind, strategy=key, dataset=self.splits.name)
        tags.update({"distrag.label": label, "distrag.eval_split": split or cfg.eval_split})
        name = run_name or cfg.tracking.run_name or f"{label} {self.splits.name}"
        return open_tracker(cfg, run_name=name, tags=tags, run_id=run_id,
                            is_rank0=self.is_rank0 if is_rank0 is None else is_rank0)

    def evaluate_and_record(self, cfg: ExperimentConfig, tracker, acc: Accountant, embedder: Embedder,
                            generator: Generator, index: ShardedIndex, *, split: str,
                            history: list[dict] | None, t0: float, own_flops: float | None = None) -> RunResult:
        """Score trained models on ``split`` and record quality, cost and artifacts in ``tracker``."""
        key = strategy_key(cfg)
        label = STRATEGY_LABELS.get(key, key)
        ledger = acc.ledger
        ledger.set_params(trainable=_trainable_count(cfg, embedder, generator),
                          total=embedder.num_parameters() + generator.num_parameters())
        questions = self.splits.get(split)
        if cfg.max_eval_questions:
            questions = questions[:cfg.max_eval_questions]
        pipe = RAGPipeline(cfg, self.splits.corpus, embedder, generator, index, accountant=acc)
        decoding = cfg.generator.decoding
        if decoding == "auto":
            decoding = "rag" if any(p.uses_rag for p in phases_for(cfg)) else "concat"
        with ledger.phase(f"eval_{split}"):
            res: EvalResult = pipe.evaluate(questions, show_progress=self.show_progress, decoding=decoding)
        seconds = time.perf_counter() - t0
        metrics = {f"{split}/{k}": v for k, v in res.metrics.items()}
        costs = ledger.to_metrics()
        if own_flops is not None:  # training of this run + its evaluation
            costs["cost/own_flops"] = own_flops + ledger.phase_totals(f"eval_{split}")["flops"]
        tracker.log_metrics({**metrics, **costs})
        tracker.set_tags({"distrag.decoding": decoding})
        if history is not None:
            tracker.log_dict(history, "train_history.json")
        tracker.log_text("\n".join(json.dumps(r) for r in res.rows(questions)) + "\n", f"predictions_{split}.jsonl")
        if self.is_rank0 and cfg.train.strategy != "none":
            self._save_models(cfg, key, embedder, generator)
        return RunResult(key, label, res.metrics, costs, seconds, getattr(tracker, "run_id", None),
                         history or [], cfg)

    def _save_models(self, cfg: ExperimentConfig, key: str, embedder: Embedder, generator: Generator) -> None:
        """Fine-tuned parts go under output_dir/models/<strategy>-<config hash>/ (small: encoder + adapter)."""
        d = self.out / "models" / f"{key}-{cfg.config_hash()}"
        phases = phases_for(cfg)
        if any(p.train_embedder for p in phases):
            embedder.save(d / "embedder")
        if any(p.train_generator for p in phases):
            generator.save_adapter(d / "adapter")
        atomic_write_text(d / "config.json", json.dumps(cfg.model_dump(mode="json"), indent=2))


def _flat(cfg: ExperimentConfig) -> dict:
    from distrag.reporting.tracking import flatten

    return flatten(cfg.model_dump(mode="json"))


def _trainable_count(cfg: ExperimentConfig, embedder: Embedder, generator: Generator) -> int:
    phases = phases_for(cfg)
    n = 0
    if any(p.train_embedder for p in phases):
        # the whole question encoder trains, except BERT's unused [CLS] pooler head
        n += sum(p.numel() for name, p in embedder.named_parameters() if ".pooler." not in f".{name}")
    if any(p.train_generator for p in phases):
        n += sum(p.numel() for name, p in generator.model.named_parameters() if "lora_" in name)
    return n

"""One experiment: data, base models and the frozen index, set up once; strategies run on copies.

* :meth:`Experiment.train` runs a strategy's phases (distrag/strategies.py) on copies of the
  base models, or of models trained earlier, and returns the trained :class:`Models` with what they cost;
* :meth:`Experiment.evaluate` scores models on a split and records quality, cost and artifacts in an
  MLflow run, returning the report's row (:class:`~distrag.reporting.results.StrategyResult`);
* :meth:`Experiment.run` is the two in one MLflow run (``distrag train``; ``distrag eval`` is strategy
  ``none``), and :meth:`Experiment.run_trained` records models trained earlier (the demo's Independent
  row, combined from Ft-Embed and Ft-Gen; a sweep's selected models).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from distrag import metric_names as mn
from distrag.atomic_io import atomic_write_text
from distrag.config import ExperimentConfig
from distrag.costs.accountant import Accountant
from distrag.costs.ledger import CostLedger
from distrag.data import load_data
from distrag.data.records import Splits
from distrag.models.embedder import Embedder
from distrag.models.generator import Generator
from distrag.models.quantization import base_weight_bytes
from distrag.process_watch import sigterm_as_interrupt
from distrag.redaction import mask_credentials, mask_tree
from distrag.reporting.comparison import comparison_hash, key_of
from distrag.reporting.paired import outcomes
from distrag.reporting.results import StrategyResult
from distrag.reporting.tracking import experiment_tags, flatten, open_tracker
from distrag.retrieval.corpus_encoding import build_index, load_or_build_index
from distrag.retrieval.pipeline import EvalResult, RAGPipeline, RetrievalEval
from distrag.retrieval.qa_metrics import RETRIEVAL_METRICS
from distrag.retrieval.sharded_index import ShardedIndex
from distrag.run_lock import lock_output_dir
from distrag.strategies import BASELINE, Phase, check_strategy_data, strategy_of
from distrag.training.preflight import preflight, require_output_dir
from distrag.training.trainer import Trainer

log = logging.getLogger(__name__)

PASSAGES_BASE = "base"
"""The index holds the base encoder's passage vectors."""
PASSAGES_REEMBEDDED = "re-embedded"
"""The index holds the passage vectors of the trained encoder (re-embedded after training)."""


@dataclass
class Models:
    """Trained (or base) models and what producing them cost (evaluation excluded)."""

    embedder: Embedder
    generator: Generator
    index: ShardedIndex
    ledger: CostLedger
    """Everything these models cost, from the frozen index build on."""
    own: CostLedger
    """The training that produced them, alone (what a search point adds)."""
    history: list[dict] = field(default_factory=list)
    """Their training curves, one record per optimizer step."""
    passage_vectors: str = PASSAGES_BASE
    """Which encoder embedded the index's passages: the base one, or the trained one (re-embedded)."""


def combine(encoder_from: Models, generator_from: Models) -> Models:
    """Independent fine-tuning: the question encoder (and its index) of one training and the generator of
    another, trained separately. Costs: both trainings on top of one index build; curves: both."""
    ledger = copy.deepcopy(generator_from.ledger).merge(encoder_from.own)
    own = copy.deepcopy(generator_from.own).merge(encoder_from.own)
    return Models(encoder_from.embedder, generator_from.generator, encoder_from.index, ledger, own,
                  generator_from.history + encoder_from.history, encoder_from.passage_vectors)


class Experiment:
    def __init__(self, cfg: ExperimentConfig, *, show_progress: bool = True, is_rank0: bool = True,
                 merge_generator: bool = False):
        """``merge_generator``: each bundle also holds the generator with its adapter merged (``--merge``)."""
        self.cfg = cfg
        self.show_progress = show_progress
        self.is_rank0 = is_rank0
        self.merge_generator = merge_generator
        self.out = Path(cfg.output_dir)
        self.splits: Splits | None = None
        self.embedder: Embedder | None = None
        self.generator: Generator | None = None
        self.index: ShardedIndex | None = None
        self.index_ledger = CostLedger()

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self, *, generator: bool = True) -> Experiment:
        """Lock ``output_dir`` (the writing process: :mod:`distrag.run_lock`), load the data and the base
        models (``generator=False``: the retriever alone, for a retrieval-only evaluation), and load or build the
        frozen index."""
        cfg = self.cfg
        if self.is_rank0:  # before anything loads: a second run on this folder stops at once
            require_output_dir(self.out)  # a file, or not writable: one clear error, not an OSError
            lock_output_dir(self.out)
        t0 = time.perf_counter()
        # a corpus read from disk keeps its side files in output_dir/corpus, written by this process on rank 0
        data = load_data(cfg.data, corpus_cache=self.out / "corpus", writer=self.is_rank0)
        self.splits = data.split(cfg.data.dev_fraction, cfg.data.test_fraction, cfg.data.split_seed)
        log.info("data %s: %d passages (%s), %d/%d/%d train/dev/test questions, context labels: %s",
                 data.name, len(data.corpus), "read from disk" if data.corpus.on_disk else "in memory",
                 len(self.splits.train), len(self.splits.dev), len(self.splits.test),
                 "yes" if data.has_context_labels else "no")
        preflight(cfg, self.splits, tracking=self.is_rank0, generator=generator)  # every problem, before any load
        self.embedder = Embedder.from_config(cfg.embedder)
        self.embedder.eval()
        self.generator = Generator.from_config(cfg.generator) if generator else None
        log.info("models loaded in %.1fs", time.perf_counter() - t0)
        with self.index_ledger.phase(mn.PHASE_INDEX_BUILD):  # cached under output_dir/index/<signature hash>
            self.index = load_or_build_index(self.out / "index", self.splits.corpus, self.embedder, cfg,
                                             Accountant(self.index_ledger), show_progress=self.show_progress)
        return self

    def base_models(self) -> Models:
        assert self.splits is not None, "call setup() first"
        return Models(self.embedder, self.generator, self.index, self.index_ledger, CostLedger())

    # -- train -------------------------------------------------------------------------------------
    def train(self, cfg: ExperimentConfig, *, start: Models | None = None, phases: list[Phase] | None = None,
              on_metrics=None) -> Models:
        """Train ``cfg``'s strategy (or only ``phases`` of it) on copies of ``start`` (default: the base
        models); ``start`` itself is left as it was."""
        src = start or self.base_models()
        embedder, generator = copy.deepcopy(src.embedder), copy.deepcopy(src.generator)
        generator.tokens.reset()
        own = CostLedger()
        index, history = src.index, []
        vectors = src.passage_vectors
        if strategy_of(cfg).trains:
            trainer = Trainer(cfg, self.splits.corpus, self.splits.train, embedder, generator, src.index,
                              Accountant(own), on_metrics=on_metrics, show_progress=self.show_progress,
                              phases=phases)
            try:
                with sigterm_as_interrupt():
                    trainer.train()
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep what was trained, then stop
                self._save_partial(cfg, trainer)
                raise
            index, history = trainer.index, trainer.state.history
            if cfg.index.reembed_after_training and any(p.train_embedder for p in trainer.phases):
                index = self.reembed(cfg, embedder, own)
                vectors = PASSAGES_REEMBEDDED
        ledger = copy.deepcopy(src.ledger).merge(own)
        return Models(embedder, generator, index, ledger, own, history, vectors)

    def reembed(self, cfg: ExperimentConfig, embedder: Embedder, ledger: CostLedger) -> ShardedIndex:
        """The corpus re-embedded with a trained ``embedder`` and indexed, as the trained pipeline is
        deployed; charged to ``ledger`` as phase ``index_rebuild``."""
        with ledger.phase(mn.PHASE_INDEX_REBUILD):
            return build_index(embedder, self.splits.corpus, cfg.index, Accountant(ledger))

    # -- evaluate ----------------------------------------------------------------------------------
    def evaluate(self, cfg: ExperimentConfig, models: Models, tracker, *, split: str, t0: float,
                 own_flops: float | None = None, kind: str = mn.KIND_STRATEGY) -> StrategyResult:
        """Score ``models`` on ``split``, record quality, cost and artifacts in ``tracker`` and save the pipeline
        as a bundle (:meth:`save_bundle`). ``own_flops``: this run's own training FLOPs (``cost/own_flops`` adds the
        evaluation to it); ``kind``: the run's kind (a sweep point's bundle is not logged as an MLflow model)."""
        strategy = strategy_of(cfg)
        ledger = copy.deepcopy(models.ledger)
        ledger.set_params(trainable=_trainable_count(cfg, models), total=models.embedder.num_parameters()
                          + models.generator.num_parameters(),
                          generator_weight_bytes=base_weight_bytes(models.generator.model).total)
        every = self.splits.get(split)
        questions = every[:cfg.max_eval_questions] if cfg.max_eval_questions else every  # generation is capped
        models.generator.tokens.reset()
        pipe = RAGPipeline(cfg, self.splits.corpus, models.embedder, models.generator, models.index,
                           accountant=Accountant(ledger))
        decoding = cfg.generator.decoding  # the same for every row: rows differ only in training
        with ledger.phase(f"eval_{split}"):
            res: EvalResult = pipe.evaluate(questions, show_progress=self.show_progress, decoding=decoding)
            # retrieval is scored on every question of the split, in a pass of its own when generation was capped
            retrieval = (pipe.evaluate_retrieval(every, show_progress=self.show_progress) if len(questions) < len(every)
                         else retrieval_of(res))
        costs = ledger.to_metrics()
        if own_flops is not None:
            costs[mn.COST_OWN_FLOPS] = own_flops + ledger.phase_totals(f"eval_{split}")["flops"]
        quality = with_retrieval(res.metrics, retrieval.metrics)
        quality.update(mn.k_free(quality))  # recall_at_5 and recall: MLflow lines k up
        tracker.log_metrics({**{mn.split_metric(split, k): v for k, v in quality.items()}, **costs})
        row = StrategyResult(strategy.key, strategy.label, quality, costs, 0.0, getattr(tracker, "run_id", None),
                             own_flops=costs.get(mn.COST_OWN_FLOPS, 0.0), history=list(models.history), cfg=cfg,
                             dataset=self.splits.name, decoding=decoding, k=cfg.retrieval.top_k,
                             passage_vectors=models.passage_vectors, embedder=cfg.embedder.model,
                             generator=cfg.generator.model, eval_split=split, comparison=comparison_hash(cfg),
                             per_question=outcomes(res.rows(questions), retrieval.rows(every)))
        tracker.set_tags({mn.TAG_DECODING: decoding, mn.TAG_EVAL_K: str(cfg.retrieval.top_k),
                          mn.TAG_GENERATOR_QUANTIZATION: cfg.generator.quantization,
                          mn.TAG_PASSAGE_VECTORS: models.passage_vectors, mn.TAG_GROUP: key_of(row).id})
        if models.history:
            tracker.log_dict(models.history, "train_history.json")
        tracker.log_text("\n".join(json.dumps(r) for r in res.rows(questions)) + "\n", f"predictions_{split}.jsonl")
        tracker.log_text("\n".join(json.dumps(r) for r in retrieval.rows(every)) + "\n", f"retrieval_{split}.jsonl")
        if self.is_rank0:
            row.bundle = str(self.save_bundle(cfg, models, res, row, tracker, kind=kind).resolve())
        row.seconds = time.perf_counter() - t0
        return row

    def run_retrieval(self, cfg: ExperimentConfig | None = None, *, split: str | None = None) -> StrategyResult:
        """``distrag eval --retrieval-only``: the base retriever scored on every question of ``split`` (Recall@k,
        Recall-all@k, answer recall@k, MRR@k, nDCG@k) without a generator, in one MLflow run of kind
        ``retrieval`` (not a row of the comparison tables, which need EM too)."""
        cfg = BASELINE.apply(cfg or self.cfg)
        split = split or cfg.eval_split
        questions = self.splits.get(split)
        with self.open_run(cfg, kind=mn.KIND_RETRIEVAL, split=split,
                           run_name=f"retrieval {self.splits.name}") as tracker:
            t0 = time.perf_counter()
            ledger = copy.deepcopy(self.index_ledger)
            pipe = RAGPipeline(cfg, self.splits.corpus, self.embedder, None, self.index, accountant=Accountant(ledger))
            with ledger.phase(f"eval_{split}"):
                ret = pipe.evaluate_retrieval(questions, show_progress=self.show_progress)
            costs = ledger.to_metrics()
            quality = with_retrieval({}, ret.metrics)
            quality.update(mn.k_free(quality))
            tracker.log_metrics({**{mn.split_metric(split, k): v for k, v in quality.items()}, **costs})
            tracker.set_tags({mn.TAG_EVAL_K: str(cfg.retrieval.top_k)})
            tracker.log_text("\n".join(json.dumps(r) for r in ret.rows(questions)) + "\n", f"retrieval_{split}.jsonl")
            return StrategyResult(BASELINE.key, BASELINE.label, quality, costs, time.perf_counter() - t0,
                                  getattr(tracker, "run_id", None), cfg=cfg, dataset=self.splits.name,
                                  k=cfg.retrieval.top_k, passage_vectors=PASSAGES_BASE, embedder=cfg.embedder.model,
                                  eval_split=split, per_question=outcomes((), ret.rows(questions)))

    # -- both, in one MLflow run -------------------------------------------------------------------
    def run(self, cfg: ExperimentConfig | None = None, *, start: Models | None = None,
            phases: list[Phase] | None = None, split: str | None = None, kind: str = mn.KIND_STRATEGY,
            parent=None, run_name: str | None = None) -> tuple[StrategyResult, Models]:
        """Train (:meth:`train`), evaluate on ``split`` (default ``cfg.eval_split``) and record, in one
        MLflow run of ``kind`` (a child of ``parent`` when given). Returns the row and the trained models."""
        cfg = cfg or self.cfg
        assert self.splits is not None, "call setup() first"
        if strategy_of(cfg).trains:  # fail before anything is trained or recorded
            check_strategy_data(cfg, self.splits.train, phases)
        split = split or cfg.eval_split
        with self.open_run(cfg, kind=kind, run_name=run_name, split=split, parent=parent) as tracker:
            t0 = time.perf_counter()
            try:
                models = self.train(cfg, start=start, phases=phases, on_metrics=tracker.log_metrics)
            except KeyboardInterrupt:  # the run ends KILLED (the tracker's exit), tagged why
                tracker.set_tags({mn.TAG_STOPPED: mn.STOP_INTERRUPTED})
                raise
            res = self.evaluate(cfg, models, tracker, split=split, t0=t0, own_flops=models.own.total_flops, kind=kind)
        return res, models

    def run_trained(self, cfg: ExperimentConfig, models: Models, *, split: str | None = None,
                    kind: str = mn.KIND_STRATEGY, parent=None, run_name: str | None = None) -> StrategyResult:
        """Record models trained earlier in a run of their own: their training curves and costs, and
        their evaluation on ``split`` (the run's own FLOPs are the evaluation's)."""
        split = split or cfg.eval_split
        with self.open_run(cfg, kind=kind, run_name=run_name, split=split, parent=parent) as tracker:
            t0 = time.perf_counter()
            for i, h in enumerate(models.history, 1):
                tracker.log_metrics({mn.train_metric(h["phase"], k): v for k, v in h.items()
                                     if isinstance(v, float)}, step=i)
            return self.evaluate(cfg, models, tracker, split=split, t0=t0, own_flops=0.0, kind=kind)

    def open_run(self, cfg: ExperimentConfig, *, kind: str = mn.KIND_STRATEGY, run_name: str | None = None,
                 split: str | None = None, parent=None, run_id: str | None = None, is_rank0: bool | None = None):
        """The MLflow run of one strategy: a child of ``parent`` when given; a null tracker off rank 0."""
        strategy = strategy_of(cfg)
        tags = experiment_tags(cfg, kind=kind, strategy=strategy.key, dataset=self.splits.name)
        tags.update({mn.TAG_LABEL: strategy.label, mn.TAG_EVAL_SPLIT: split or cfg.eval_split})
        if parent is not None:
            tracker = parent.child(run_name=run_name or f"{strategy.label} {self.splits.name}", tags=tags)
            tracker.log_params(flatten(cfg.model_dump(mode="json")))
            return tracker
        name = run_name or cfg.tracking.run_name or f"{strategy.label} {self.splits.name}"
        return open_tracker(cfg, run_name=name, tags=tags, run_id=run_id,
                            is_rank0=self.is_rank0 if is_rank0 is None else is_rank0)

    def _save_partial(self, cfg: ExperimentConfig, trainer: Trainer) -> Path | None:
        """An interrupted training's models as they were (the trained parts), with ``PARTIAL.json`` saying
        where it stopped, under ``output_dir/models/<strategy>-<config hash>-partial/``; said in the log."""
        strategy, state = strategy_of(cfg), trainer.state
        if not self.is_rank0 or state.global_step == 0:
            log.warning("interrupted before the first optimizer step: nothing trained to keep")
            return None
        d = self.out / "models" / f"{strategy.key}-{cfg.config_hash()}-partial"
        if strategy.trains_embedder:
            trainer.embedder.save(d / "embedder")
        if strategy.trains_generator:
            trainer.generator.save_adapter(d / "adapter")
        atomic_write_text(d / "PARTIAL.json", json.dumps({
            "interrupted_at_global_step": state.global_step, "phase_index": state.phase_index,
            "step_in_phase": state.step, "history": state.history,
            "config": mask_tree(cfg.model_dump(mode="json"))}, indent=2))
        log.warning("interrupted at optimizer step %d: the models trained so far are saved, not evaluated, in %s "
                    "(PARTIAL.json says where training stopped)", state.global_step, d)
        return d

    def save_bundle(self, cfg: ExperimentConfig, models: Models, res: EvalResult, row: StrategyResult, tracker, *,
                    kind: str = mn.KIND_STRATEGY) -> Path:
        """The evaluated pipeline as one folder, ``output_dir/models/<strategy>-<config hash>/``
        (:mod:`distrag.serving.bundle`: encoder, adapter, the index it was evaluated with, corpus, config, model
        card), tagged on the run (``distrag.bundle``); for runs of the report (not sweep points) also logged as the
        run's MLflow model ``pipeline`` (``tracking.log_model``) and registered (``tracking.register_model``)."""
        from distrag.serving.bundle import BundleSource, Evaluation, bundle_dir, write_bundle

        strategy = strategy_of(cfg)
        k_free = mn.k_free(row.metrics)  # the same values under a second name: kept once, at k
        quality = {k: v for k, v in row.metrics.items() if k not in k_free}
        evaluation = Evaluation.of(row.eval_split, quality, res.per_question, row.costs, run_id=row.run_id,
                                   experiment=cfg.tracking.experiment if row.run_id else None,
                                   tracking_uri=mask_credentials(getattr(tracker, "uri", None) or "") or None,
                                   group=key_of(row).id)
        source = BundleSource(cfg, strategy, self.splits.name, models.embedder, models.generator, models.index,
                              self.splits.corpus, strategy.trains_embedder or models.passage_vectors != PASSAGES_BASE,
                              models.passage_vectors)
        d = write_bundle(bundle_dir(self.out, cfg, strategy.key), source, evaluation, merge=self.merge_generator)
        tags = {mn.TAG_BUNDLE: str(d.resolve())}
        if tracker.run_id and cfg.tracking.log_model and kind != mn.KIND_SWEEP_POINT:
            from distrag.serving.loader import read_bundle_manifest
            from distrag.serving.mlflow_model import log_bundle_model, register

            tags[mn.TAG_MODEL_URI] = uri = log_bundle_model(tracker, d)
            if cfg.tracking.register_model:
                tags[mn.TAG_MODEL_VERSION] = register(tracker, uri, cfg.tracking.register_model,
                                                      read_bundle_manifest(d))
        tracker.set_tags(tags)
        return d

def retrieval_of(res: EvalResult) -> RetrievalEval:
    """The retrieval part of an evaluation that scored every question already (no second pass needed)."""
    keep = {k: v for k, v in res.metrics.items() if k.rpartition("_at_")[0] in RETRIEVAL_METRICS}
    outcomes = [{k: o[k] for k in RETRIEVAL_METRICS if k in o} for o in res.per_question]
    return RetrievalEval({**keep, "n_questions": res.metrics["n_questions"]}, outcomes, res.retrieved,
                         res.seconds.get("retrieve", 0.0))


def with_retrieval(generated: dict[str, float], retrieval: dict[str, float]) -> dict[str, float]:
    """The quality metrics of a row: EM / F1 and ``n_questions`` of the generated questions; every retrieval
    metric from the pass over the whole split (``n_retrieval_questions`` questions)."""
    out = {k: v for k, v in generated.items() if k.rpartition("_at_")[0] not in RETRIEVAL_METRICS}
    out.update({k: v for k, v in retrieval.items() if k != "n_questions"})
    out[mn.N_RETRIEVAL_QUESTIONS] = retrieval["n_questions"]
    return out


def _trainable_count(cfg: ExperimentConfig, models: Models) -> int:
    strategy = strategy_of(cfg)
    n = 0
    if strategy.trains_embedder:
        # the whole question encoder trains, except BERT's unused [CLS] pooler head
        n += sum(p.numel() for name, p in models.embedder.named_parameters() if ".pooler." not in f".{name}")
    if strategy.trains_generator:
        n += sum(p.numel() for name, p in models.generator.model.named_parameters() if "lora_" in name)
    return n

"""One strategy's result, the row every table, plot and recommendation is made of; plain data, no I/O.

A :class:`StrategyResult` comes either straight from a run (:meth:`distrag.training.experiment.Experiment.run`)
or back from MLflow (:func:`distrag.reporting.tracking.load_group`); the report and ``advise`` cannot tell
the difference. The report's columns read it (:mod:`distrag.reporting.columns`); rows read back are
grouped (:mod:`distrag.reporting.groups`): one comparison group at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distrag.config import ExperimentConfig
    from distrag.reporting.paired import PairedComparison


@dataclass
class StrategyResult:
    """One strategy's row: quality, costs and what names its comparison group
    (:func:`~distrag.reporting.comparison.key_of`)."""

    key: str
    """Strategy key (distrag/strategies.py)."""
    label: str
    """Its label in tables."""
    metrics: dict[str, float]
    """Quality on the evaluated split, without the split prefix: em, f1, recall, recall_at_k, n_questions, ..."""
    costs: dict[str, float]
    """The ledger's ``cost/*`` metrics."""
    seconds: float
    """Wall-clock of the run (training and evaluation)."""
    run_id: str | None = None
    """The MLflow run holding it (None with tracking off)."""
    search_flops: float | None = None
    """FLOPs of the learning-rate search that chose its settings (sweeps only)."""
    own_flops: float = 0.0
    """FLOPs of this run's own training and evaluation (nothing carried from earlier runs)."""
    history: list[dict] = field(default_factory=list)
    """Training curve: one record per optimizer step."""
    cfg: ExperimentConfig | None = None
    """The configuration that produced it (in-memory results only)."""
    dataset: str = ""
    """The dataset's name (``distrag.dataset`` tag)."""
    params: dict[str, str] = field(default_factory=dict)
    """The run's configuration as MLflow params (results read back from MLflow)."""
    decoding: str = ""
    """The decoder it was evaluated with."""
    k: int | None = None
    """The k it was evaluated at."""
    passage_vectors: str = ""
    """Which encoder embedded the passages it was evaluated against ("base" or "re-embedded")."""
    embedder: str = ""
    """The base question/passage encoder (``embedder.model``)."""
    generator: str = ""
    """The base generator (``generator.model``)."""
    eval_split: str = ""
    """The split it was scored on."""
    comparison: str = ""
    """Its comparison hash (:func:`distrag.reporting.comparison.comparison_hash`)."""
    started_ms: int = 0
    """When its run started (ms since the epoch; results read back from MLflow)."""
    bundle: str = ""
    """The folder of its pipeline bundle (tag ``distrag.bundle``), whose README.md is its model card."""
    extra: dict[str, float] = field(default_factory=dict)
    """Every other metric of the run, under its full name: the index refresh's (``index/*``) in distributed
    runs, the last training-curve values (``train/*``), metrics of other splits, and any metric a new
    report column reads (results read back from MLflow keep every metric their run logged)."""

    per_question: dict[str, dict[str, float | None]] = field(default_factory=dict)
    """Each question's outcomes by question id: ``em`` and ``f1`` of the generated answers, the retrieval outcomes
    (``recall``, ``recall_all``, ``answer_recall``, ``mrr``, ``ndcg`` at k) of every question of the split; what
    paired comparisons between rows are made of (:mod:`distrag.reporting.paired`)."""
    vs_baseline: PairedComparison | None = None
    """This row against the No-FT row of its table, question by question (set by
    :func:`distrag.reporting.paired.annotate`; None for the baseline itself or without per-question outcomes)."""
    vs_best: PairedComparison | None = None
    """This row against the best row of its table by EM (likewise; None for the best row itself)."""

    def metric(self, name: str, default: float = 0.0) -> float:
        return float(self.metrics.get(name, default))

    def cost(self, name: str, default: float | None = None) -> float | None:
        return self.costs.get(name, default)


@dataclass
class SearchRecord:
    """A sweep run: the learning-rate search cost of one strategy, with what its group key can be read."""

    key: str
    search_flops: float
    dataset: str = ""
    embedder: str = ""
    generator: str = ""
    eval_split: str = ""
    k: int | None = None
    comparison: str = ""

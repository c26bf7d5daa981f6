"""One strategy's result, the row every table, plot and recommendation is made of.

A :class:`StrategyResult` comes either straight from a run (:meth:`distrag.training.experiment.Experiment.run`)
or back from MLflow (:func:`load_runs`); the report and ``advise`` cannot tell the difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distrag import metric_names as mn
from distrag.redaction import mask_credentials

if TYPE_CHECKING:
    from distrag.config import ExperimentConfig, TrackingConfig


@dataclass
class StrategyResult:
    key: str
    """Strategy key (distrag/training/strategies.py)."""
    label: str
    """Its label in tables."""
    metrics: dict[str, float]
    """Quality on the evaluated split, without the split prefix: em, f1, recall_at_k, n_questions, ..."""
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

    def metric(self, name: str, default: float = 0.0) -> float:
        return float(self.metrics.get(name, default))

    def cost(self, name: str, default: float | None = None) -> float | None:
        return self.costs.get(name, default)


def load_runs(tracking_cfg: TrackingConfig, *, kinds: tuple[str, ...] = (mn.KIND_STRATEGY, mn.KIND_EVAL)
              ) -> list[StrategyResult]:
    """The newest finished run of each strategy in the experiment (split prefix stripped from metrics),
    with the LR-search cost of the newest sweep of that strategy when there is one, in table order."""
    from mlflow.tracking import MlflowClient

    from distrag.reporting.tracking import default_tracking_uri
    from distrag.training.strategies import BY_KEY, STRATEGIES

    uri = tracking_cfg.uri or default_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(tracking_cfg.experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment named {tracking_cfg.experiment!r} at {mask_credentials(uri)}")
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=5000)
    newest: dict[str, StrategyResult] = {}
    search: dict[str, float] = {}
    for run in runs:
        tags, m = run.data.tags, run.data.metrics
        kind, key = tags.get(mn.TAG_KIND), tags.get(mn.TAG_STRATEGY)
        if key is None:
            continue
        if kind == mn.KIND_SWEEP and key not in search and mn.SWEEP_SEARCH_FLOPS in m:
            search[key] = m[mn.SWEEP_SEARCH_FLOPS]
        if kind in kinds and key not in newest:
            newest[key] = _from_run(run, key)
    order = [s.key for s in STRATEGIES]
    out = sorted(newest.values(), key=lambda r: order.index(r.key) if r.key in order else len(order))
    for r in out:
        # sweeps are tagged with the swept train.strategy ("joint" for both joint rows)
        r.search_flops = search.get(r.key) or (search.get(BY_KEY[r.key].train_strategy) if r.key in BY_KEY else None)
    return out


def _from_run(run: Any, key: str) -> StrategyResult:
    tags, m = run.data.tags, run.data.metrics
    split = tags.get(mn.TAG_EVAL_SPLIT, "test")
    metrics = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith(f"{split}/")}
    costs = {k: v for k, v in m.items() if k.startswith(f"{mn.COST_PREFIX}/")}
    return StrategyResult(key, tags.get(mn.TAG_LABEL, key), metrics, costs, costs.get(mn.COST_WALL_S, 0.0),
                          run.info.run_id, own_flops=costs.get(mn.COST_OWN_FLOPS, 0.0),
                          dataset=tags.get(mn.TAG_DATASET, ""), params=dict(run.data.params),
                          decoding=tags.get(mn.TAG_DECODING, ""), k=int(tags[mn.TAG_EVAL_K]) if mn.TAG_EVAL_K in tags
                          else None, passage_vectors=tags.get(mn.TAG_PASSAGE_VECTORS, ""))

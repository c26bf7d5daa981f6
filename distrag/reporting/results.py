"""One strategy's result, the row every table, plot and recommendation is made of, and reading rows back.

A :class:`StrategyResult` comes either straight from a run (:meth:`distrag.training.experiment.Experiment.run`)
or back from MLflow (:func:`load_group`, :func:`load_runs`); the report and ``advise`` cannot tell the
difference. Rows read back are grouped (:mod:`distrag.reporting.groups`): one comparison group at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distrag import metric_names as mn
from distrag.errors import ConfigError
from distrag.redaction import mask_credentials
from distrag.reporting.comparison import comparison_from_params, key_of
from distrag.reporting.groups import Group, GroupSelection, choose, group_rows

if TYPE_CHECKING:
    from distrag.config import ExperimentConfig, TrackingConfig


@dataclass
class StrategyResult:
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
    extra: dict[str, float] = field(default_factory=dict)
    """Other metrics of the run: the index refresh's (``index/*``) in distributed runs."""

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


# ----------------------------------------------------------------------------------------------
# reading MLflow


def open_experiment(tracking_cfg: TrackingConfig) -> tuple[Any, Any]:
    """``(MlflowClient, experiment)`` of ``tracking_cfg``, without creating anything: a missing SQLite
    store or experiment is a :class:`ConfigError` (so ``distrag report`` in the wrong folder says so and
    leaves no empty store behind)."""
    from distrag.reporting.tracking import default_tracking_uri, sqlite_file

    uri = tracking_cfg.uri or default_tracking_uri()
    db = sqlite_file(uri)
    if db is not None and not db.is_file():
        where = "in this folder" if db.parent == Path.cwd().resolve() else f"at {db.parent}"
        raise ConfigError([("tracking.uri", f"no MLflow store {where} ({db} does not exist): nothing was recorded "
                                            "there. Run this in the folder where distrag demo/train/eval/sweep ran, or "
                                            "point tracking.uri at the store, e.g. "
                                            "tracking.uri=sqlite:////path/to/mlflow.db or http://host:5000")])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(tracking_cfg.experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        there = f"; experiments there: {', '.join(names)} (set tracking.experiment=NAME)" if names else ""
        raise ConfigError([("tracking.experiment", f"no MLflow experiment named {tracking_cfg.experiment!r} at "
                                                   f"{mask_credentials(uri)}{there}")])
    return client, exp


def read_recorded(tracking_cfg: TrackingConfig, *, kinds: tuple[str, ...] = (mn.KIND_STRATEGY, mn.KIND_EVAL)
                  ) -> tuple[list[StrategyResult], list[SearchRecord]]:
    """Every finished run of ``kinds`` as a row (newest first, split prefix stripped from its metrics) and
    every finished sweep run's search cost."""
    client, exp = open_experiment(tracking_cfg)
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=5000)
    rows, searches = [], []
    for run in runs:
        tags, m = run.data.tags, run.data.metrics
        kind, key = tags.get(mn.TAG_KIND), tags.get(mn.TAG_STRATEGY)
        if key is None:
            continue
        if kind == mn.KIND_SWEEP and mn.SWEEP_SEARCH_FLOPS in m:
            r = _from_run(run, key, default_split="")
            searches.append(SearchRecord(key, m[mn.SWEEP_SEARCH_FLOPS], r.dataset, r.embedder, r.generator,
                                         r.eval_split, r.k, r.comparison))
        elif kind in kinds:
            rows.append(_from_run(run, key))
    return rows, searches


def _eval_k(tags: dict, params: dict, metrics: dict) -> int | None:
    """The k a run was evaluated at: its tag, else its ``retrieval.top_k`` param, else its metric names."""
    for raw in (tags.get(mn.TAG_EVAL_K), params.get("retrieval.top_k")):
        if raw is not None and str(raw).isdigit():
            return int(raw)
    for name in metrics:
        tail = name.rpartition("_at_")[2]
        if "_at_" in name and tail.isdigit():
            return int(tail)
    return None


def _from_run(run: Any, key: str, *, default_split: str = "test") -> StrategyResult:
    tags, m, params = run.data.tags, run.data.metrics, dict(run.data.params)
    split = tags.get(mn.TAG_EVAL_SPLIT) or params.get("eval_split") or default_split
    metrics = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith(f"{split}/")}
    costs = {k: v for k, v in m.items() if k.startswith(f"{mn.COST_PREFIX}/")}
    extra = {k: v for k, v in m.items() if k.startswith("index/")}
    return StrategyResult(key, tags.get(mn.TAG_LABEL, key), metrics, costs, costs.get(mn.COST_WALL_S, 0.0),
                          run.info.run_id, own_flops=costs.get(mn.COST_OWN_FLOPS, 0.0),
                          dataset=tags.get(mn.TAG_DATASET, ""), params=params,
                          decoding=tags.get(mn.TAG_DECODING, ""), k=_eval_k(tags, params, m),
                          passage_vectors=tags.get(mn.TAG_PASSAGE_VECTORS, ""),
                          embedder=tags.get(mn.TAG_EMBEDDER, ""), generator=tags.get(mn.TAG_GENERATOR, ""),
                          eval_split=split,
                          comparison=tags.get(mn.TAG_COMPARISON) or comparison_from_params(params) or "",
                          started_ms=int(run.info.start_time or 0), extra=extra)


@dataclass
class Loaded:
    """The group chosen for a report or a recommendation, and every group recorded."""

    group: Group
    why: str
    """Why this group ("the newest complete group", "selected with --group", ...)."""
    groups: list[Group]


def load_groups(tracking_cfg: TrackingConfig) -> list[Group]:
    """Every comparison group recorded in the experiment, newest first, each with the newest finished run
    of each strategy (table order) and, where a sweep of the same group searched it, its search cost."""
    from distrag.strategies import BY_KEY

    rows, searches = read_recorded(tracking_cfg)
    groups = group_rows(rows)
    for g in groups:
        for r in g.rows:
            # sweeps are tagged with the swept train.strategy ("joint" for both joint rows); newest first
            swept = (r.key, BY_KEY[r.key].train_strategy if r.key in BY_KEY else r.key)
            r.search_flops = next((s.search_flops for s in searches
                                   if s.key in swept and g.key.covers(key_of(s))), None)
    return groups


def load_group(tracking_cfg: TrackingConfig, selection: GroupSelection | None = None) -> Loaded:
    """The group ``selection`` picks (by default the newest complete one; see :func:`choose`)."""
    groups = load_groups(tracking_cfg)
    group, why = choose(groups, selection)
    return Loaded(group, why, groups)


def load_runs(tracking_cfg: TrackingConfig, selection: GroupSelection | None = None) -> list[StrategyResult]:
    """The rows of the group ``selection`` picks: the newest finished run of each strategy, table order."""
    return load_group(tracking_cfg, selection).group.rows

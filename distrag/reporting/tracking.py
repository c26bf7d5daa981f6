"""MLflow, written and read in this one module: one run per experiment step (strategy, phase or sweep
point), logged by rank 0 only, and read back as the report's rows.

Writing: other ranks get a ``NullTracker`` with the same methods, so calling code never branches on the rank.
Everything goes through ``MlflowClient`` with explicit run ids (no global active-run state), which
lets a sweep hold a parent run open while its grid points log as children, and lets a resumed job
continue the same run id.

Credentials in the tracking URI (``http://user:token@host``) never leave through a run: params, tags and
texts are logged with :func:`distrag.redaction.mask_credentials` applied, and an error raised by MLflow
(whose messages quote the URI) is re-raised with its message masked. Better still, give a server's
credentials as ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (or ``MLFLOW_TRACKING_TOKEN``)
in the environment, where MLflow reads them, and keep them out of the URI.

Tags every distrag run carries (used by ``distrag report``; the names live in distrag/metric_names.py):
``distrag.kind`` (eval | strategy | sweep | sweep_point | report), ``distrag.strategy``, ``distrag.dataset``,
``distrag.embedder``, ``distrag.generator``, ``distrag.config_hash``, ``distrag.comparison``; strategy runs add
``distrag.label``, ``distrag.eval_split``, ``distrag.decoding``, ``distrag.eval_k``, ``distrag.passage_vectors``
and ``distrag.group``, sweep runs ``distrag.selected_run`` and ``distrag.notes``, report runs ``distrag.group``.

Reading (:func:`load_group`) creates nothing. Each finished strategy run becomes a ``StrategyResult`` that
keeps every metric the run logged, so a new report column (:mod:`distrag.reporting.columns`) can read a
new metric; the rows are then grouped (:mod:`distrag.reporting.groups`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from distrag import metric_names as mn
from distrag.config import ExperimentConfig, TrackingConfig
from distrag.errors import ConfigError
from distrag.redaction import mask_credentials, masked_exception
from distrag.reporting.comparison import GroupKey, comparison_from_params, comparison_hash, key_of
from distrag.reporting.groups import Group, GroupSelection, Loaded, choose, group_rows
from distrag.reporting.results import SearchRecord, StrategyResult

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
SUPPORTED_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")
"""The ``tracking.uri`` schemes MLflow stores exist for (a plain path is a file store)."""
PROBE_TIMEOUT_S = 3.0
"""Seconds the start-up probe waits for a tracking server to accept a connection."""


def default_tracking_uri(workdir: str | Path | None = None) -> str:
    workdir = Path(workdir or os.getcwd()).resolve()
    return f"sqlite:///{workdir / DEFAULT_DB}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (absolute, or relative to the working folder),
    else None (a server, or an in-memory database)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path).resolve() if path and path != ":memory:" else None


def tracking_problem(cfg: TrackingConfig, *, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why runs cannot be recorded at ``cfg.uri``, found in at most ``timeout_s`` seconds, or None: an
    unsupported scheme, a SQLite file whose folder is missing, or a server that accepts no connection
    (MLflow would retry for minutes before failing). Credentials are masked in the message."""
    from urllib.parse import urlsplit

    uri = cfg.uri or default_tracking_uri()
    shown = mask_credentials(uri)
    off = "or turn tracking off with tracking.enabled=false"
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0].lower()
    if len(scheme) > 1 and scheme not in SUPPORTED_SCHEMES:
        return (f"{shown}: scheme '{parts.scheme}' is not supported; use sqlite:///path/mlflow.db, "
                f"http(s)://host:port (an MLflow server), file:/path or a database URI ({off})")
    db = sqlite_file(uri)
    if db is not None and not db.parent.is_dir():
        return f"{shown}: the folder {db.parent} of the SQLite file does not exist; create it {off}"
    if scheme in ("http", "https"):
        try:
            port = parts.port or (443 if scheme == "https" else 80)
            with socket.create_connection((parts.hostname or "", port), timeout=timeout_s):
                pass
        except (OSError, ValueError) as e:
            reason = "timed out" if isinstance(e, TimeoutError) else (getattr(e, "strerror", None) or str(e))
            return (f"no MLflow server answers at {shown} ({reason} within {timeout_s:g}s); start one "
                    f"(mlflow server, or slurm/mlflow_server.sbatch), fix tracking.uri, {off}")
    return None


@contextlib.contextmanager
def sqlite_store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<db>.lock`` next to a ``sqlite:///`` store (nothing for other URIs):
    creating the schema and the experiment under it lets runs that start at once share a new store
    (without it, two migrations race and leave the file unreadable)."""
    db = sqlite_file(uri)
    if db is None:
        yield
        return
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _masks_errors(fn: Callable) -> Callable:
    """Re-raise what ``fn`` raises with credentials masked in its message (MLflow quotes the URI)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise masked_exception(e) from None

    return wrapper


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class NullTracker:
    """The tracker of non-zero ranks and of runs with tracking disabled: accepts and drops everything."""

    run_id: str | None = None
    uri: str | None = None
    experiment_id: str | None = None

    def start(self, *a, **k) -> NullTracker:
        return self

    def child(self, *a, **k) -> NullTracker:
        return NullTracker()

    def log_params(self, *a, **k) -> None: ...
    def log_metrics(self, *a, **k) -> None: ...
    def set_tags(self, *a, **k) -> None: ...
    def log_artifact(self, *a, **k) -> None: ...
    def log_dict(self, *a, **k) -> None: ...
    def log_text(self, *a, **k) -> None: ...
    def end(self, *a, **k) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Tracker(NullTracker):
    """One MLflow run. Create with ``Tracker.open(cfg, ...)``; use as a context manager."""

    def __init__(self, client, experiment_id: str, run_id: str, uri: str):
        self.client, self.experiment_id, self.run_id, self.uri = client, experiment_id, run_id, uri
        self._params_logged = False

    # -- lifecycle -----------------------------------------------------------------------------
    @classmethod
    @_masks_errors
    def open(cls, cfg: TrackingConfig, *, run_name: str, tags: Mapping[str, str] | None = None,
             run_id: str | None = None, parent_run_id: str | None = None,
             workdir: str | Path | None = None) -> Tracker:
        """Start a run (or resume ``run_id``) in ``cfg.experiment``, creating the experiment if needed."""
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        uri = cfg.uri or default_tracking_uri(workdir)
        with sqlite_store_lock(uri):  # schema creation and the experiment, one process at a time
            client = MlflowClient(tracking_uri=uri)
            exp = client.get_experiment_by_name(cfg.experiment)
            if exp is None:
                art = None
                if uri.startswith("sqlite:"):
                    art = (Path(workdir or os.getcwd()).resolve() / DEFAULT_ARTIFACTS).as_uri()
                exp_id = client.create_experiment(cfg.experiment, artifact_location=art)
            else:
                exp_id = exp.experiment_id
        if run_id is not None:
            run = client.get_run(run_id)  # raises if unknown: resuming a missing run is an error
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
        else:
            all_tags = {"mlflow.runName": run_name, **(tags or {})}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run_id = client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
        return cls(client, exp_id, run_id, uri)

    @_masks_errors
    def child(self, *, run_name: str, tags: Mapping[str, str] | None = None) -> Tracker:
        """A new run, a child of this one, through the same client."""
        all_tags = {"mlflow.runName": run_name, "mlflow.parentRunId": self.run_id, **(tags or {})}
        rid = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id
        return Tracker(self.client, self.experiment_id, rid, self.uri)

    @_masks_errors
    def end(self, status: str = "FINISHED") -> None:
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):  # MLflow prints the run's URL, credentials included
                self.client.set_terminated(self.run_id, status=status)
        finally:
            sys.stdout.write(mask_credentials(printed.getvalue()))

    def __exit__(self, exc_type, *exc):
        # Ctrl-C / SIGTERM: KILLED (the run did not finish; it did not fail either)
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.end("KILLED" if interrupted else "FAILED" if exc_type else "FINISHED")
        return False

    # -- logging -------------------------------------------------------------------------------
    @_masks_errors
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params are logged once per run (MLflow rejects changed values), credentials masked."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        batch = [Param(k, mask_credentials(str(v))[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(batch), 100):
            self.client.log_batch(self.run_id, params=batch[i:i + 100])

    @_masks_errors
    def log_metrics(self, metrics: Mapping[str, float | None], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 500])

    @_masks_errors
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, mask_credentials(str(v))) for k, v in tags.items()])

    @_masks_errors
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    @_masks_errors
    def log_dict(self, obj: Any, name: str) -> None:
        self.client.log_text(self.run_id, mask_credentials(json.dumps(obj, indent=2, default=str)), name)

    @_masks_errors
    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, mask_credentials(text), name)


def experiment_tags(cfg: ExperimentConfig, *, kind: str, strategy: str, dataset: str) -> dict[str, str]:
    return {
        mn.TAG_KIND: kind,
        mn.TAG_STRATEGY: strategy,
        mn.TAG_DATASET: dataset,
        mn.TAG_EMBEDDER: cfg.embedder.model,
        mn.TAG_GENERATOR: cfg.generator.model,
        mn.TAG_CONFIG_HASH: cfg.config_hash(),
        mn.TAG_COMPARISON: comparison_hash(cfg),
    }


def open_tracker(cfg: ExperimentConfig, *, run_name: str, tags: Mapping[str, str], is_rank0: bool = True,
                 run_id: str | None = None, parent_run_id: str | None = None) -> NullTracker:
    """The run for this process: a real MLflow run on rank 0 with tracking enabled, else a null one."""
    if not (is_rank0 and cfg.tracking.enabled):
        return NullTracker()
    tr = Tracker.open(cfg.tracking, run_name=run_name, tags=tags, run_id=run_id, parent_run_id=parent_run_id)
    tr.log_params(flatten(cfg.model_dump(mode="json")))
    return tr


def where_runs_are(tracking_cfg: TrackingConfig) -> str:
    """One line telling the user where their runs are and how to browse them (credentials masked)."""
    uri = mask_credentials(tracking_cfg.uri or default_tracking_uri())
    return (f"MLflow runs in {uri} (experiment '{tracking_cfg.experiment}'); "
            f"browse with: mlflow ui --backend-store-uri {uri}")


# ----------------------------------------------------------------------------------------------
# reading runs back


def open_experiment(tracking_cfg: TrackingConfig) -> tuple[Any, Any]:
    """``(MlflowClient, experiment)`` of ``tracking_cfg``, without creating anything: a missing SQLite
    store or experiment is a :class:`ConfigError` (so ``distrag report`` in the wrong folder says so and
    leaves no empty store behind)."""
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
    tails = [name.rpartition("_at_")[2] for name in metrics if "_at_" in name]
    return next((int(tail) for tail in tails if tail.isdigit()), None)


def _from_run(run: Any, key: str, *, default_split: str = "test") -> StrategyResult:
    """A run as a row. Every metric is kept, in exactly one place: the eval split's quality without its
    prefix (``metrics``), the ledger's ``cost/*`` (``costs``), every other under its full name (``extra``)."""
    tags, m, params = run.data.tags, run.data.metrics, dict(run.data.params)
    split = tags.get(mn.TAG_EVAL_SPLIT) or params.get("eval_split") or default_split
    quality, cost = f"{split}/", f"{mn.COST_PREFIX}/"
    metrics = {k[len(quality):]: v for k, v in m.items() if k.startswith(quality)}
    costs = {k: v for k, v in m.items() if k.startswith(cost)}
    extra = {k: v for k, v in m.items() if not k.startswith((quality, cost))}
    return StrategyResult(key, tags.get(mn.TAG_LABEL, key), metrics, costs, costs.get(mn.COST_WALL_S, 0.0),
                          run.info.run_id, own_flops=costs.get(mn.COST_OWN_FLOPS, 0.0),
                          dataset=tags.get(mn.TAG_DATASET, ""), params=params,
                          decoding=tags.get(mn.TAG_DECODING, ""), k=_eval_k(tags, params, m),
                          passage_vectors=tags.get(mn.TAG_PASSAGE_VECTORS, ""),
                          embedder=tags.get(mn.TAG_EMBEDDER, ""), generator=tags.get(mn.TAG_GENERATOR, ""),
                          eval_split=split,
                          comparison=tags.get(mn.TAG_COMPARISON) or comparison_from_params(params) or "",
                          started_ms=int(run.info.start_time or 0), bundle=tags.get(mn.TAG_BUNDLE, ""), extra=extra)


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
    """The group ``selection`` picks (by default the newest complete one; see
    :func:`distrag.reporting.groups.choose`), its rows with their per-question outcomes (:func:`read_outcomes`)."""
    groups = load_groups(tracking_cfg)
    group, why = choose(groups, selection)
    client, _ = open_experiment(tracking_cfg)
    for r in group.rows:
        r.per_question = read_outcomes(client, r)
    return Loaded(group, why, groups)


def _artifact_lines(client: Any, run_id: str, name: str) -> list[dict] | None:
    """The JSON lines of artifact ``name`` of a run, or None when the run has none."""
    import tempfile

    if name not in {f.path for f in client.list_artifacts(run_id)}:
        return None
    quiet = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no progress bar per file in a report's output
    try:
        with tempfile.TemporaryDirectory() as tmp:
            text = Path(client.download_artifacts(run_id, name, tmp)).read_text()
    finally:
        if quiet is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = quiet
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_outcomes(client: Any, row: StrategyResult) -> dict[str, dict[str, float | None]]:
    """A recorded row's per-question outcomes, from its run's ``predictions_<split>.jsonl`` and
    ``retrieval_<split>.jsonl``; runs recorded before the outcomes were kept get their EM / F1 scored again from
    the prediction and the gold answers (with the HotPotQA F1 rule when the run's data was HotPotQA); empty when
    the run has no predictions."""
    from distrag.reporting.paired import outcomes
    from distrag.retrieval.qa_metrics import question_scores

    if not row.run_id:
        return {}
    split = row.eval_split or "test"
    generated = _artifact_lines(client, row.run_id, f"predictions_{split}.jsonl") or []
    hotpotqa = row.params.get("data.format") == "hotpotqa"
    for g in generated:
        if "em" not in g and g.get("answers"):
            g.update(question_scores(str(g.get("prediction", "")), g["answers"], hotpotqa=hotpotqa))
    return outcomes(generated, _artifact_lines(client, row.run_id, f"retrieval_{split}.jsonl") or [])


def load_runs(tracking_cfg: TrackingConfig, selection: GroupSelection | None = None) -> list[StrategyResult]:
    """The rows of the group ``selection`` picks: the newest finished run of each strategy, table order."""
    return load_group(tracking_cfg, selection).group.rows


def open_report_run(tracking_cfg: TrackingConfig, key: GroupKey) -> Tracker:
    """The one report run of group ``key``: reopened when it exists (its ``distrag.group`` tag), else created."""
    client, exp = open_experiment(tracking_cfg)
    found = client.search_runs([exp.experiment_id], f"tags.`{mn.TAG_KIND}` = '{mn.KIND_REPORT}' and "
                               f"tags.`{mn.TAG_GROUP}` = '{key.id}'", order_by=["attributes.start_time DESC"],
                               max_results=1)
    return Tracker.open(tracking_cfg, run_name=f"report {key.id} {key.dataset or ''}".strip(),
                        tags={mn.TAG_KIND: mn.KIND_REPORT, **key.tags()},
                        run_id=found[0].info.run_id if found else None)

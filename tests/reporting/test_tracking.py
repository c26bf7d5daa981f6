"""MLflow tracking on a temporary SQLite store: runs, params logged once, metrics, child runs, run
status on exit, resume, and the null tracker of other ranks; reading strategy results back: grouped, the
newest finished run per strategy, in table order, every metric kept; a missing store or experiment is a
clear error that creates nothing."""

from __future__ import annotations

import json
import traceback

import pytest
from mlflow.exceptions import MlflowException

from distrag import metric_names as mn
from distrag.config import TrackingConfig, build_config
from distrag.errors import ConfigError, UserError
from distrag.reporting.comparison import comparison_hash
from distrag.reporting.groups import GroupSelection
from distrag.reporting.tracking import (
    NullTracker,
    Tracker,
    default_tracking_uri,
    experiment_tags,
    flatten,
    load_group,
    load_groups,
    load_runs,
    open_tracker,
    tracking_problem,
)


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its schema is the slow part); tests use their own
    experiment names."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _open(uri: str, experiment: str, **kw) -> Tracker:
    return Tracker.open(TrackingConfig(uri=uri, experiment=experiment), run_name=kw.pop("run_name", "r"), **kw)


def test_open_creates_the_experiment_and_a_tagged_run(uri, tmp_path):
    tr = _open(uri, "exp-open", run_name="first", tags={"distrag.kind": "eval"})
    exp = tr.client.get_experiment_by_name("exp-open")
    assert exp is not None and tr.experiment_id == exp.experiment_id and tr.uri == uri
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()  # next to the working directory
    run = tr.client.get_run(tr.run_id)
    assert run.info.status == "RUNNING" and run.info.experiment_id == exp.experiment_id
    assert run.data.tags["mlflow.runName"] == "first" and run.data.tags["distrag.kind"] == "eval"
    assert "mlflow.parentRunId" not in run.data.tags
    again = _open(uri, "exp-open")
    assert again.experiment_id == tr.experiment_id and again.run_id != tr.run_id


def test_params_are_logged_once_and_metrics_skip_none(uri):
    tr = _open(uri, "exp-log")
    tr.log_params({"train.lr_generator": 1e-4, "train.strategy": "joint"})
    tr.log_params({"train.lr_generator": 5e-4, "train.seed": 3})  # a changed value does not raise
    params = tr.client.get_run(tr.run_id).data.params
    assert params == {"train.lr_generator": "0.0001", "train.strategy": "joint", "train.seed": "3"}
    tr.log_metrics({"test/em": 0.5, "test/recall@5": None}, step=2)
    tr.log_metrics({"test/em": 0.75}, step=3)
    run = tr.client.get_run(tr.run_id)
    assert run.data.metrics == {"test/em": 0.75}
    assert [(m.step, m.value) for m in tr.client.get_metric_history(tr.run_id, "test/em")] == [(2, 0.5), (3, 0.75)]
    tr.set_tags({"note": True})
    assert tr.client.get_run(tr.run_id).data.tags["note"] == "True"


def test_child_runs_carry_their_parent(uri):
    parent = _open(uri, "exp-child", run_name="sweep")
    child = parent.child(run_name="point", tags={"distrag.kind": "sweep_point"})
    tags = child.client.get_run(child.run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent.run_id and tags["mlflow.runName"] == "point"
    assert tags["distrag.kind"] == "sweep_point" and child.experiment_id == parent.experiment_id
    opened_under = _open(uri, "exp-child", parent_run_id=parent.run_id)  # e.g. a sweep point in another process
    assert opened_under.client.get_run(opened_under.run_id).data.tags["mlflow.parentRunId"] == parent.run_id


def test_exit_marks_failed_on_exception_and_finished_otherwise(uri):
    with _open(uri, "exp-exit") as ok:
        pass
    assert ok.client.get_run(ok.run_id).info.status == "FINISHED"
    with pytest.raises(RuntimeError, match="boom"), _open(uri, "exp-exit") as bad:
        raise RuntimeError("boom")
    assert bad.client.get_run(bad.run_id).info.status == "FAILED"


def test_resume_by_run_id_reopens_the_same_run(uri):
    with _open(uri, "exp-resume") as first:
        first.log_params({"a": 1})
    resumed = _open(uri, "exp-resume", run_id=first.run_id)
    assert resumed.run_id == first.run_id
    run = resumed.client.get_run(first.run_id)
    assert run.info.status == "RUNNING" and run.data.params == {"a": "1"}
    resumed.end()
    assert resumed.client.get_run(first.run_id).info.status == "FINISHED"
    with pytest.raises(MlflowException):  # resuming a run that does not exist is an error
        _open(uri, "exp-resume", run_id="0" * 32)


def test_open_tracker_is_null_off_rank0_or_when_disabled(uri):
    cfg = build_config(overrides=[f"tracking.uri={uri}", "tracking.experiment=exp-open-tracker"])
    assert type(open_tracker(cfg, run_name="r", tags={}, is_rank0=False)) is NullTracker
    off = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": False})})
    null = open_tracker(off, run_name="r", tags={})
    assert type(null) is NullTracker and null.run_id is None
    with null as n, n.child(run_name="c") as c:  # accepts everything
        c.log_metrics({"x": 1.0})
        n.log_params({"a": 1})
    with open_tracker(cfg, run_name="real", tags={"distrag.kind": "strategy"}) as tr:
        assert isinstance(tr, Tracker)
        params = tr.client.get_run(tr.run_id).data.params
    assert params == {k: str(v) for k, v in flatten(cfg.model_dump(mode="json")).items()}


def test_flatten_joins_nested_keys_with_dots(tmp_path):
    assert flatten({"a": 1, "b": {"c": 2, "d": {"e": [3]}}, "f": {}}) == {"a": 1, "b.c": 2, "b.d.e": [3]}
    assert flatten({"x": {"y": 1}}, prefix="cfg.") == {"cfg.x.y": 1}
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"  # the working directory


# ----------------------------------------------------------------------------------------------
# credentials in the tracking URI never reach params, tags, texts or error messages

SECRET_URI = "http://alice:s3cr3t-token@127.0.0.1:9"


def test_params_tags_and_texts_are_logged_with_credentials_masked(uri):
    tr = _open(uri, "exp-mask")
    cfg = build_config(overrides=[f"tracking.uri={SECRET_URI}"])
    tr.log_params(flatten(cfg.model_dump(mode="json")))
    tr.set_tags({"note": f"server {SECRET_URI}"})
    tr.log_text(f"uri: {SECRET_URI}", "notes.txt")
    tr.log_dict({"tracking": {"uri": SECRET_URI}}, "cfg.json")
    run = tr.client.get_run(tr.run_id)
    assert run.data.params["tracking.uri"] == "http://***@127.0.0.1:9"
    assert run.data.tags["note"] == "server http://***@127.0.0.1:9"
    for name in ("notes.txt", "cfg.json"):
        text = (tr.client.download_artifacts(tr.run_id, name, dst_path=None))
        assert "s3cr3t" not in open(text).read() and "***@127.0.0.1:9" in open(text).read()
    assert "s3cr3t" not in json.dumps(run.to_dictionary())


def test_an_unreachable_server_error_does_not_quote_the_credentials(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(MlflowException) as err:
        Tracker.open(TrackingConfig(uri=SECRET_URI, experiment="e"), run_name="r")
    text = "".join(traceback.format_exception(err.value))
    assert "s3cr3t" not in text and "alice" not in text and "http://***@127.0.0.1:9" in str(err.value)


def test_the_run_url_mlflow_prints_at_the_end_is_masked(uri, capsys, monkeypatch):
    tr = _open(uri, "exp-url")
    tr.uri = SECRET_URI

    def set_terminated(run_id, status=None):  # what MLflow's client does for a server URI
        print(f"🏃 View run r at: {tr.uri}/#/experiments/1/runs/{run_id}")

    monkeypatch.setattr(tr.client, "set_terminated", set_terminated)
    tr.end()
    out = capsys.readouterr().out
    assert "s3cr3t" not in out and f"http://***@127.0.0.1:9/#/experiments/1/runs/{tr.run_id}" in out


# ----------------------------------------------------------------------------------------------
# start-up checks: the probe and a new SQLite store shared by runs that start at once


def test_tracking_problem_names_the_scheme_the_folder_and_a_silent_server(tmp_path):
    import socket

    assert "scheme 'ftp' is not supported" in tracking_problem(TrackingConfig(uri="ftp://host/x"))
    assert "does not exist" in tracking_problem(TrackingConfig(uri=f"sqlite:///{tmp_path}/nope/mlflow.db"))
    assert tracking_problem(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db")) is None
    assert tracking_problem(TrackingConfig(uri="postgresql+psycopg2://u@db/mlflow")) is None  # not probed
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        assert "no MLflow server answers" in tracking_problem(TrackingConfig(uri=f"http://127.0.0.1:{port}"))
        srv.listen()
        assert tracking_problem(TrackingConfig(uri=f"http://127.0.0.1:{port}")) is None


def _start_run(uri: str, name: str, barrier, results) -> None:
    """One process: wait for the other, then open a run on the shared store, log a metric, end it."""
    try:
        barrier.wait(60)
        tr = Tracker.open(TrackingConfig(uri=uri, experiment="together"), run_name=name)
        tr.log_metrics({"m": 1.0})
        tr.end()
        results.put((name, "ok"))
    except Exception as e:  # noqa: BLE001 - reported to the test
        results.put((name, f"{type(e).__name__}: {e}"))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_runs_starting_at_once_on_a_new_sqlite_store(tmp_path):
    import multiprocessing as mp

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_start_run, args=(uri, f"run{i}", barrier, results)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(150)
    outcome = dict(results.get(timeout=5) for _ in procs)
    assert outcome == {"run0": "ok", "run1": "ok"}
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run0", "run1"]
    assert {r.info.status for r in runs} == {"FINISHED"}


# ----------------------------------------------------------------------------------------------
# reading strategy results back


def _record(tcfg, key, label, em, *, kind=mn.KIND_STRATEGY, status="FINISHED", split="test", extra=None,
            tags=None, params=None):
    all_tags = {mn.TAG_KIND: kind, mn.TAG_STRATEGY: key, mn.TAG_LABEL: label, mn.TAG_EVAL_SPLIT: split,
                mn.TAG_DATASET: "synthetic:seed0", **(tags or {})}
    tr = Tracker.open(tcfg, run_name=label, tags=all_tags)
    tr.log_params(params or {"train.strategy": key})
    tr.log_metrics({f"{split}/em": em, mn.COST_TRAIN_FLOPS: 1e12, mn.COST_WALL_S: 5.0, **(extra or {})})
    tr.end(status)
    return tr.run_id


@pytest.fixture()
def tcfg(store_uri):
    return TrackingConfig(uri=store_uri, experiment="results-test")


def test_newest_finished_run_per_strategy_in_table_order_within_a_group(tcfg):
    _record(tcfg, "joint_token", "RAG-Tok", 0.1)
    newest_tok = _record(tcfg, "joint_token", "RAG-Tok", 0.2)
    _record(tcfg, "joint_token", "RAG-Tok", 0.9, status="FAILED")  # never shown
    _record(tcfg, "gen_ft", "Ft-Gen", 0.3)
    _record(tcfg, "none", "No-FT", 0.0, kind=mn.KIND_EVAL)
    _record(tcfg, "embed_ft", "Ft-Embed", 0.5, kind=mn.KIND_SWEEP_POINT)  # not a strategy row
    dev = _record(tcfg, "gen_ft", "Ft-Gen", 0.7, split="dev")  # scored on another split: another group
    runs = load_runs(tcfg)
    assert [r.key for r in runs] == ["none", "gen_ft", "joint_token"]
    tok = runs[-1]
    assert tok.run_id == newest_tok and tok.metrics == {"em": 0.2} and tok.label == "RAG-Tok"
    assert runs[1].metrics == {"em": 0.3}  # the split prefix of its own eval split is stripped
    assert tok.costs == {mn.COST_TRAIN_FLOPS: 1e12, mn.COST_WALL_S: 5.0} and tok.seconds == 5.0
    assert tok.dataset == "synthetic:seed0" and tok.params["train.strategy"] == "joint_token"
    groups = load_groups(tcfg)
    assert len(groups) == 2 and groups[0].key.eval_split == "dev"  # the newest group first
    assert [r.run_id for r in groups[0].rows] == [dev] and groups[0].rows[0].metrics == {"em": 0.7}
    assert load_runs(tcfg, GroupSelection(group=groups[0].id)) == groups[0].rows


def test_search_cost_attached_by_key_or_by_swept_train_strategy_within_the_group(tcfg):
    _record(tcfg, "two_phase", "Two-phase", 0.2)
    _record(tcfg, "joint_sequence", "RAG-Seq", 0.2)
    _record(tcfg, "two_phase", "sweep two_phase", 0.0, kind=mn.KIND_SWEEP, extra={mn.SWEEP_SEARCH_FLOPS: 7e14})
    _record(tcfg, "joint", "sweep joint", 0.0, kind=mn.KIND_SWEEP, extra={mn.SWEEP_SEARCH_FLOPS: 9e14})
    # a newer sweep of another dataset is not this group's search
    _record(tcfg, "joint", "sweep joint", 0.0, kind=mn.KIND_SWEEP, extra={mn.SWEEP_SEARCH_FLOPS: 1e20},
            tags={mn.TAG_DATASET: "popqa:tail"})
    by_key = {r.key: r for r in load_runs(tcfg)}
    assert by_key["two_phase"].search_flops == 7e14
    assert by_key["joint_sequence"].search_flops == 9e14  # swept as train.strategy=joint


def test_runs_recorded_without_the_newer_tags_are_grouped_from_their_params(tcfg):
    cfg = build_config(overrides=["retrieval.top_k=4", "train.max_steps=3"])
    new_tags = experiment_tags(cfg, kind=mn.KIND_STRATEGY, strategy="none", dataset="synthetic:seed0")
    _record(tcfg, "none", "No-FT", 0.1, tags=new_tags, params={k: str(v) for k, v in
                                                                flatten(cfg.model_dump(mode="json")).items()})
    old = build_config(overrides=["retrieval.top_k=4", "train.max_steps=3", "train.strategy=gen_ft",
                                  "train.lr_generator=1e-3"])
    # an older run: no distrag.comparison, distrag.eval_k or distrag.eval_split tag
    legacy = {k: v for k, v in experiment_tags(old, kind=mn.KIND_STRATEGY, strategy="gen_ft",
                                               dataset="synthetic:seed0").items() if k != mn.TAG_COMPARISON}
    rid = _record(tcfg, "gen_ft", "Ft-Gen", 0.2, tags=legacy, extra={"test/recall_at_4": 0.5},
                  params={k: str(v) for k, v in flatten(old.model_dump(mode="json")).items()})
    loaded = load_group(tcfg)
    assert len(loaded.groups) == 1
    g = loaded.group
    assert [r.key for r in g.rows] == ["none", "gen_ft"] and g.rows[1].run_id == rid
    assert g.key.comparison == comparison_hash(cfg) and g.key.k == 4 and g.rows[1].k == 4


def test_a_folder_without_a_store_is_a_clear_error_and_stays_empty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no MLflow store in this folder") as e:
        load_runs(TrackingConfig())
    assert isinstance(e.value, UserError) and "tracking.uri" in str(e.value)
    missing = tmp_path / "elsewhere" / "mlflow.db"
    with pytest.raises(ConfigError, match="does not exist"):
        load_groups(TrackingConfig(uri=f"sqlite:///{missing}"))
    assert list(tmp_path.iterdir()) == []  # no empty store, no artifact folder


def test_a_missing_experiment_is_a_clear_error_naming_those_there(tcfg):
    _record(tcfg, "none", "No-FT", 0.0)
    with pytest.raises(ConfigError, match="no MLflow experiment named 'nope'.*experiments there: .*results-test"):
        load_runs(TrackingConfig(uri=tcfg.uri, experiment="nope"))


def test_every_metric_of_a_run_is_read_back_in_exactly_one_place(tcfg):
    """A new report column can read any metric a run logs: none is dropped on the way back."""
    logged = {"test/recall_at_3": 0.5, "dev/em": 0.1, mn.INDEX_STALENESS_MEAN: 2.0, "train/gen_ft/loss": 1.5,
              "custom/new_metric": 7.0, "plain": 3.0}
    _record(tcfg, "gen_ft", "Ft-Gen", 0.3, extra=logged)
    (row,) = load_runs(tcfg)
    assert row.metrics == {"em": 0.3, "recall_at_3": 0.5}  # its eval split's quality, without the prefix
    assert row.costs == {mn.COST_TRAIN_FLOPS: 1e12, mn.COST_WALL_S: 5.0}
    assert row.extra == {"dev/em": 0.1, mn.INDEX_STALENESS_MEAN: 2.0, "train/gen_ft/loss": 1.5,
                         "custom/new_metric": 7.0, "plain": 3.0}


def test_a_group_read_back_carries_each_rows_per_question_outcomes(tmp_path):
    """load_group fills per_question from predictions_<split>.jsonl and retrieval_<split>.jsonl (retrieval of
    every question wins); a run recorded before the outcomes were kept is scored again from its predictions."""
    import json

    from distrag.config import TrackingConfig
    from distrag.reporting.tracking import Tracker, load_group

    tcfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/m.db", experiment="outcomes")
    for key, rows, retrieval in (
            ("none", [{"id": "q1", "prediction": "Paris", "answers": ["paris"]},
                      {"id": "q2", "prediction": "no", "answers": ["Rome"]}], None),
            ("gen_ft", [{"id": "q1", "prediction": "x", "answers": ["Paris"], "em": 0.0, "f1": 0.0, "recall": 0.0}],
             [{"id": "q1", "recall": 1.0, "mrr": 1.0}, {"id": "q2", "recall": 0.5, "mrr": 0.5}])):
        tags = {"distrag.kind": "strategy", "distrag.strategy": key, "distrag.eval_split": "test",
                "distrag.dataset": "d"}
        with Tracker.open(tcfg, run_name=key, tags=tags) as tr:
            tr.log_metrics({"test/em": 0.5, "test/n_questions": 2.0})
            tr.log_text("\n".join(json.dumps(r) for r in rows) + "\n", "predictions_test.jsonl")
            if retrieval:
                tr.log_text("\n".join(json.dumps(r) for r in retrieval) + "\n", "retrieval_test.jsonl")
    by_key = {r.key: r for r in load_group(tcfg).group.rows}
    assert by_key["none"].per_question == {"q1": {"em": 1.0, "f1": 1.0}, "q2": {"em": 0.0, "f1": 0.0}}
    assert by_key["gen_ft"].per_question == {"q1": {"em": 0.0, "f1": 0.0, "recall": 1.0, "mrr": 1.0},
                                             "q2": {"recall": 0.5, "mrr": 0.5}}

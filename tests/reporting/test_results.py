"""Reading strategy results back from MLflow: the newest finished run per strategy, in table order."""

from __future__ import annotations

import pytest

from distrag import metric_names as mn
from distrag.config import TrackingConfig
from distrag.reporting.results import load_runs
from distrag.reporting.tracking import Tracker


def _record(tcfg, key, label, em, *, kind=mn.KIND_STRATEGY, status="FINISHED", split="test", extra=None):
    tags = {mn.TAG_KIND: kind, mn.TAG_STRATEGY: key, mn.TAG_LABEL: label, mn.TAG_EVAL_SPLIT: split,
            mn.TAG_DATASET: "synthetic:seed0"}
    tr = Tracker.open(tcfg, run_name=label, tags=tags)
    tr.log_params({"train.strategy": key})
    tr.log_metrics({f"{split}/em": em, mn.COST_TRAIN_FLOPS: 1e12, mn.COST_WALL_S: 5.0, **(extra or {})})
    tr.end(status)
    return tr.run_id


@pytest.fixture()
def tcfg(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="results-test")


def test_newest_finished_run_per_strategy_in_table_order(tcfg):
    _record(tcfg, "joint_token", "RAG-Tok", 0.1)
    newest_tok = _record(tcfg, "joint_token", "RAG-Tok", 0.2)
    _record(tcfg, "joint_token", "RAG-Tok", 0.9, status="FAILED")  # never shown
    _record(tcfg, "gen_ft", "Ft-Gen", 0.3, split="dev")
    _record(tcfg, "none", "No-FT", 0.0, kind=mn.KIND_EVAL)
    _record(tcfg, "embed_ft", "Ft-Embed", 0.5, kind=mn.KIND_SWEEP_POINT)  # not a strategy row
    runs = load_runs(tcfg)
    assert [r.key for r in runs] == ["none", "gen_ft", "joint_token"]
    tok = runs[-1]
    assert tok.run_id == newest_tok and tok.metrics == {"em": 0.2} and tok.label == "RAG-Tok"
    assert runs[1].metrics == {"em": 0.3}  # the split prefix of its own eval split is stripped
    assert tok.costs == {mn.COST_TRAIN_FLOPS: 1e12, mn.COST_WALL_S: 5.0} and tok.seconds == 5.0
    assert tok.dataset == "synthetic:seed0" and tok.params["train.strategy"] == "joint_token"


def test_search_cost_attached_by_key_or_by_swept_train_strategy(tcfg):
    _record(tcfg, "two_phase", "Two-phase", 0.2)
    _record(tcfg, "joint_sequence", "RAG-Seq", 0.2)
    _record(tcfg, "two_phase", "sweep two_phase", 0.0, kind=mn.KIND_SWEEP, extra={mn.SWEEP_SEARCH_FLOPS: 7e14})
    _record(tcfg, "joint", "sweep joint", 0.0, kind=mn.KIND_SWEEP, extra={mn.SWEEP_SEARCH_FLOPS: 9e14})
    by_key = {r.key: r for r in load_runs(tcfg)}
    assert by_key["two_phase"].search_flops == 7e14
    assert by_key["joint_sequence"].search_flops == 9e14  # swept as train.strategy=joint


def test_a_missing_experiment_is_a_clear_error(tcfg):
    with pytest.raises(ValueError, match="no MLflow experiment named 'results-test'"):
        load_runs(tcfg)

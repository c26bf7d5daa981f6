"""Reading strategy results back from MLflow: grouped, the newest finished run per strategy, in table order;
a missing store or experiment is a clear error that creates nothing."""

from __future__ import annotations

import pytest

from distrag import metric_names as mn
from distrag.config import TrackingConfig, build_config
from distrag.errors import ConfigError, UserError
from distrag.reporting.comparison import comparison_hash
from distrag.reporting.groups import GroupSelection
from distrag.reporting.results import load_group, load_groups, load_runs
from distrag.reporting.tracking import Tracker, experiment_tags, flatten


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

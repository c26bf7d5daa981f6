"""MLflow names defined once (distrag/metric_names.py)."""

from __future__ import annotations

from distrag import metric_names as mn
from distrag.costs.ledger import validate_metric_name


def test_tags_are_namespaced_and_unique():
    tags = [v for k, v in vars(mn).items() if k.startswith("TAG_")]
    assert all(t.startswith("distrag.") for t in tags) and len(set(tags)) == len(tags)
    assert mn.RUN_KINDS == ("eval", "strategy", "sweep", "sweep_point", "report")


def test_metric_names_are_valid_mlflow_names_and_helpers_round_trip():
    names = [v for k, v in vars(mn).items() if k.isupper() and isinstance(v, str) and "/" in v and not v.endswith(".")]
    names += [mn.phase_metric("two_phase_generator", "wall_s"), mn.split_metric("dev", "em"),
              mn.train_metric("joint_token", "p_top1"), mn.sweep_selected("lr_embedder")]
    for n in names:
        assert validate_metric_name(n) == n
    costs = {mn.phase_metric("gen_ft"): 3.0, mn.phase_metric("gen_ft", "wall_s"): 2.0, mn.COST_TRAIN_FLOPS: 9.0}
    assert mn.phase_values(costs) == {"gen_ft": 3.0}
    assert mn.phase_values(costs, "wall_s") == {"gen_ft": 2.0}


def test_k_free_names_and_per_trainer_names():
    m = {"test/recall_at_5": 0.4, "test/recall_all_at_5": 0.2, "answer_recall_at_3": 0.9, "test/em": 0.3,
         "test/other_at_5": 1.0, "test/recall_at_x": 0.1}
    assert mn.k_free(m) == {"test/recall": 0.4, "test/recall_all": 0.2, "answer_recall": 0.9}
    assert set(mn.AT_K_METRICS) == {"recall", "recall_all", "answer_recall", "mrr", "ndcg"}
    assert mn.trainer_metric(1, mn.INDEX_BLOCKED_S) == "index/trainer1/blocked_s"
    assert validate_metric_name(mn.trainer_metric(12, mn.INDEX_BLOCKED_SHARE)) == "index/trainer12/blocked_share"

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

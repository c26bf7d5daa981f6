"""Learning-rate sweeps (grid sizes, MLflow parent/child layout, selection, search cost) and
``distrag report`` on the recorded runs."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import yaml

from distrag import cli
from distrag.config import build_config, load_config
from distrag.reporting.report import REPORT_FILES
from distrag.reporting.results import StrategyResult
from distrag.reporting.tracking import load_runs
from distrag.training.sweep import grid_size, run_sweep, select

LR_E = [1e-4, 1e-3]
LR_G = [1e-4, 1e-3]
M, N = len(LR_E), len(LR_G)


# ----------------------------------------------------------------------------------------------
# pure functions


@pytest.mark.parametrize("m, n", [(1, 1), (2, 3), (3, 2), (4, 4)])
def test_grid_size(m, n):
    cfg = build_config(overrides=[f"sweep.lr_embedder={[1e-5 * (i + 1) for i in range(m)]}",
                                  f"sweep.lr_generator={[1e-4 * (i + 1) for i in range(n)]}"])
    assert grid_size(cfg, "independent") == m + n
    assert grid_size(cfg, "two_phase") == m + n
    assert grid_size(cfg, "joint") == m * n
    assert grid_size(cfg, "embed_ft") == m and grid_size(cfg, "gen_ft") == n
    cfg.sweep.joint_reuse_two_phase = True
    assert grid_size(cfg, "joint") == 1
    assert grid_size(cfg, "two_phase") == m + n


def _rr(name: str, em: float, f1: float) -> StrategyResult:
    return StrategyResult(name, name, {"em": em, "f1": f1}, {}, 0.0)


def test_select_by_em_then_f1_then_first():
    pts = [_rr("a", 0.30, 0.90), _rr("b", 0.40, 0.50), _rr("c", 0.40, 0.60), _rr("d", 0.10, 0.99)]
    assert select(pts).key == "c"  # EM first, F1 breaks the tie
    assert select([_rr("a", 0.2, 0.1), _rr("b", 0.1, 0.9)]).key == "a"  # F1 never outweighs EM
    assert select([_rr("only", 0.0, 0.0)]).key == "only"
    with pytest.raises(ValueError):
        select([])


def test_select_full_tie_first_wins():
    assert select([_rr("a", 0.5, 0.7), _rr("b", 0.5, 0.7)]).key == "a"
    assert select([_rr("a", 0.0, 0.0), _rr("b", 0.0, 0.0), _rr("c", 0.0, 0.0)]).key == "a"


# ----------------------------------------------------------------------------------------------
# an actual sweep on tiny models


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_encoder_dir, tiny_lm_dir):
    tmp = tmp_path_factory.mktemp("sweep")
    tree = {
        "data": {"format": "synthetic", "synthetic": {"n_entities": 8, "n_single_hop": 12, "n_two_hop": 4},
                 "dev_fraction": 0.25, "test_fraction": 0.25},
        "embedder": {"model": str(tiny_encoder_dir), "max_length": 64},
        "generator": {"model": str(tiny_lm_dir), "max_new_tokens": 3, "max_passage_chars": 80},
        "retrieval": {"top_k": 2},
        "index": {"device": "cpu"},
        "train": {"max_steps": 1, "batch_size": 2, "micro_batch_size": 2, "train_k": 2},
        "sweep": {"lr_embedder": LR_E, "lr_generator": LR_G, "strategies": ["joint", "independent", "two_phase"]},
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "sweep-test"},
        "output_dir": str(tmp / "runs"),
    }
    cfg_file = tmp / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    cfg = load_config(cfg_file)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        results = run_sweep(cfg, show_progress=False)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    exp = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return {"tmp": tmp, "cfg": cfg, "cfg_file": cfg_file, "results": {r.strategy: r for r in results},
            "runs": runs, "client": client}


def _kind(runs, kind):
    return [r for r in runs if r.data.tags.get("distrag.kind") == kind]


def _children(runs, parent_id):
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sweep_creates_the_grid_as_child_runs(swept):
    runs = swept["runs"]
    assert all(r.info.status == "FINISHED" for r in runs)
    sweeps = {r.data.tags["distrag.strategy"]: r for r in _kind(runs, "sweep")}
    assert set(sweeps) == {"independent", "two_phase", "joint"}
    want = {"independent": M + N, "two_phase": M + N, "joint": M * N}
    for strategy, parent in sweeps.items():
        assert "mlflow.parentRunId" not in parent.data.tags
        kids = _children(runs, parent.info.run_id)
        points = [k for k in kids if k.data.tags["distrag.kind"] == "sweep_point"]
        finals = [k for k in kids if k.data.tags["distrag.kind"] == "strategy"]
        assert len(points) == want[strategy] == grid_size(swept["cfg"], strategy)
        assert len(finals) == 1, f"{strategy}: expected one selected strategy run"
        assert parent.data.metrics["sweep/n_points"] == want[strategy]
        assert parent.data.tags["distrag.selected_run"] == finals[0].info.run_id
        assert all(k.data.tags["distrag.eval_split"] == "dev" for k in points)  # selection on dev
        assert finals[0].data.tags["distrag.eval_split"] == "test"  # the selected models on eval_split
        assert all(p.data.params for p in points)  # each child carries its own config
    # every sweep_point has a sweep parent; no orphans
    parents = {r.info.run_id for r in _kind(runs, "sweep")}
    assert all(r.data.tags.get("mlflow.parentRunId") in parents for r in _kind(runs, "sweep_point"))
    assert len(_kind(runs, "sweep_point")) == 2 * (M + N) + M * N
    assert len(_kind(runs, "strategy")) == 3


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_grid_points_cover_the_rates(swept):
    runs, sweeps = swept["runs"], {r.data.tags["distrag.strategy"]: r for r in _kind(swept["runs"], "sweep")}

    def rates(strategy):
        pts = [k for k in _children(runs, sweeps[strategy].info.run_id)
               if k.data.tags["distrag.kind"] == "sweep_point"]
        return sorted((k.data.tags["distrag.strategy"], float(k.data.params["train.lr_embedder"]),
                       float(k.data.params["train.lr_generator"])) for k in pts)

    j = rates("joint")
    assert sorted((e, g) for _, e, g in j) == sorted((e, g) for e in LR_E for g in LR_G)
    ind = rates("independent")
    assert sorted(s for s, _, _ in ind) == ["embed_ft"] * M + ["gen_ft"] * N
    assert sorted(e for s, e, _ in ind if s == "embed_ft") == LR_E
    assert sorted(g for s, _, g in ind if s == "gen_ft") == LR_G
    tp = rates("two_phase")
    assert {s for s, _, _ in tp} == {"two_phase"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_search_cost_is_the_sum_of_the_grid_points(swept):
    runs = swept["runs"]
    for parent in _kind(runs, "sweep"):
        strategy = parent.data.tags["distrag.strategy"]
        points = [k for k in _children(runs, parent.info.run_id) if k.data.tags["distrag.kind"] == "sweep_point"]
        # the frozen index build once + each point's own training and dev evaluation
        index_build = min(p.data.metrics["cost/phase.index_build.flops"] for p in points)
        total = index_build + sum(p.data.metrics["cost/own_flops"] for p in points)
        assert parent.data.metrics["sweep/search_flops"] == pytest.approx(total, rel=1e-6)
        assert parent.data.metrics["sweep/search_flops"] == pytest.approx(swept["results"][strategy].search_flops)
        assert parent.data.metrics["sweep/search_wall_s"] > 0
        for k, v in swept["results"][strategy].selected.items():
            assert parent.data.metrics[f"sweep/selected_{k}"] == v


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_selected_run_uses_the_best_dev_point(swept):
    res = swept["results"]["joint"]
    best = select(res.points)
    assert res.selected == {"lr_embedder": best.cfg.train.lr_embedder, "lr_generator": best.cfg.train.lr_generator}
    assert res.final.cfg.train.lr_embedder == best.cfg.train.lr_embedder
    # the selected run is evaluated, not retrained: its training cost is the selected point's
    assert res.final.costs["cost/train_flops"] == pytest.approx(best.costs["cost/train_flops"])
    ind = swept["results"]["independent"]
    pe = [p for p in ind.points if p.cfg.train.strategy == "embed_ft"]
    pg = [p for p in ind.points if p.cfg.train.strategy == "gen_ft"]
    assert ind.selected == {"lr_embedder": select(pe).cfg.train.lr_embedder,
                            "lr_generator": select(pg).cfg.train.lr_generator}
    # independent = selected Ft-Embed + selected Ft-Gen: both trainings are paid for
    assert ind.final.costs["cost/train_flops"] == pytest.approx(
        select(pe).costs["cost/train_flops"] + select(pg).costs["cost/train_flops"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_independent_selected_run_pays_for_the_index_once(swept):
    ind = swept["results"]["independent"]
    one_build = ind.points[0].costs["cost/phase.index_build.flops"]
    assert all(p.costs["cost/phase.index_build.flops"] == one_build for p in ind.points)
    assert ind.final.costs["cost/phase.index_build.flops"] == pytest.approx(one_build)
    # ... plus the selected encoder's re-embedding of the corpus, once (the same corpus: the same FLOPs)
    assert ind.final.costs["cost/encode_passages_flops"] == pytest.approx(2 * one_build)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_phase_search_counts_phase_one_training_once(swept):
    res = swept["results"]["two_phase"]
    n1 = N if swept["cfg"].train.two_phase_order == "generator_first" else M
    p1, p2 = res.points[:n1], res.points[n1:]
    index_build = p1[0].costs["cost/encode_passages_flops"]
    carried = [p.costs.get("cost/phase.two_phase_generator.flops", 0.0) for p in p2]
    assert all(c > 0 for c in carried)  # each phase-2 point continues a trained phase-1 model ...
    own = index_build + sum(p.costs["cost/total_flops"] - index_build for p in p1) + sum(
        p.costs["cost/total_flops"] - c - index_build for p, c in zip(p2, carried))
    assert res.search_flops == pytest.approx(own)  # ... but the search pays for that training once


# ----------------------------------------------------------------------------------------------
# distrag report on the recorded runs


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_report_from_recorded_runs(swept, capsys):
    tmp, cfg_file = swept["tmp"], swept["cfg_file"]
    out = tmp / "report_out"
    rc = cli.main(["report", "--config", str(cfg_file), "--out", str(out), "--quiet"])
    assert rc == 0
    assert f"report written to {out}" in capsys.readouterr().out
    for name in REPORT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    rows = list(csv.DictReader(io.StringIO(Path(out / "table.csv").read_text())))
    assert [r["strategy"] for r in rows] == ["Independent", "Two-phase", "RAG-Tok"]  # one row per strategy
    searched = {r.data.tags["distrag.strategy"]: r.data.metrics["sweep/search_flops"]
                for r in _kind(swept["runs"], "sweep")}
    by_label = {r["strategy"]: r for r in rows}
    for label, key in (("Independent", "independent"), ("Two-phase", "two_phase"), ("RAG-Tok", "joint")):
        assert by_label[label]["search_flops"] not in ("", None)
        assert float(by_label[label]["search_flops"]) == pytest.approx(searched[key])
        assert float(by_label[label]["train_flops"]) > 0
    finals = {r.info.run_id for r in _kind(swept["runs"], "strategy")}
    assert {r["run_id"] for r in rows} == finals
    md = (out / "table.md").read_text()
    assert "LR-search FLOPs" in md and sum(line.startswith("|") for line in md.splitlines()) == 2 + 3
    assert "All rows evaluated with decoding=concat" in md
    # load_runs reads the same thing the report shows
    recorded = load_runs(swept["cfg"].tracking)
    assert [r.key for r in recorded] == ["independent", "two_phase", "joint_token"]
    assert all(r.search_flops and r.metrics.get("em") is not None for r in recorded)
    # the report itself is recorded as a run of kind report with the files attached; a second report of the
    # same group updates that run instead of adding one
    assert cli.main(["report", "--config", str(cfg_file), "--out", str(out), "--quiet"]) == 0
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=swept["cfg"].tracking.uri)
    exp = c.get_experiment_by_name("sweep-test")
    reports = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("distrag.kind") == "report"]
    assert len(reports) == 1
    assert {a.path for a in c.list_artifacts(reports[0].info.run_id, "report")} == {f"report/{f}" for f in REPORT_FILES}
    # the selected runs of every strategy (different learning rates) form one comparison group: the report's
    assert {r.data.tags["distrag.group"] for r in _kind(swept["runs"], "strategy")} == {
        reports[0].data.tags["distrag.group"]}

"""`distrag demo --quick` end to end: seven strategies on tiny random models, MLflow in a temporary SQLite
store, the report files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow_runs import all_runs, artifact_paths
from sample_data import write_popqa_selfrag

from distrag import cli
from distrag.config import load_config
from distrag.reporting.tracking import flatten
from distrag.training.demo import DEMO_CONFIG, QUICK_OVERRIDES

STRATEGIES = {  # distrag.strategy tag -> (distrag.label tag, train.strategy param, train.rag_loss or None)
    "none": ("No-FT", "none", None),
    "embed_ft": ("Ft-Embed", "embed_ft", None),
    "gen_ft": ("Ft-Gen", "gen_ft", None),
    "independent": ("Independent", "independent", None),
    "two_phase": ("Two-phase", "two_phase", None),
    "joint_sequence": ("RAG-Seq", "joint", "sequence"),
    "joint_token": ("RAG-Tok", "joint", "token"),
}
QUALITY = ("test/em", "test/f1", "test/recall_at_3", "test/recall_all_at_3", "test/answer_recall_at_3",
           "test/recall", "test/recall_all", "test/answer_recall", "test/n_questions")
COSTS = ("cost/train_flops", "cost/total_flops", "cost/wall_s", "cost/encode_passages_flops",
         "cost/generate_flops")


# ----------------------------------------------------------------------------------------------
# distrag demo --quick


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run the quick demo once from a temporary working directory; tests read what it left."""
    tmp = tmp_path_factory.mktemp("demo")
    uri = f"sqlite:///{tmp}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        rc = cli.main(["demo", "--quick", "--no-progress", f"output_dir={tmp}/runs", f"tracking.uri={uri}"])
    cfg = load_config(DEMO_CONFIG, QUICK_OVERRIDES + [f"output_dir={tmp}/runs", f"tracking.uri={uri}"])
    client, runs = all_runs(uri, cfg.tracking.experiment)
    return {"rc": rc, "tmp": tmp, "uri": uri, "cfg": cfg, "client": client, "runs": runs}


def strategy_runs(demo) -> dict:
    return {r.data.tags["distrag.strategy"]: r for r in demo["runs"]
            if r.data.tags.get("distrag.kind") == "strategy"}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_records_seven_finished_strategy_runs_and_a_report(demo):
    assert demo["rc"] == 0
    runs = demo["runs"]
    assert len(runs) == 8
    assert all(r.info.status == "FINISHED" for r in runs)
    kinds = sorted(r.data.tags.get("distrag.kind") for r in runs)
    assert kinds == ["report"] + ["strategy"] * 7
    by_key = strategy_runs(demo)
    assert set(by_key) == set(STRATEGIES)
    cfg = demo["cfg"]
    for key, r in by_key.items():
        t = r.data.tags
        assert t["distrag.label"] == STRATEGIES[key][0]
        assert t["distrag.dataset"] == "synthetic:seed0"
        assert t["distrag.eval_split"] == "test"
        assert t["distrag.embedder"].endswith("tiny_models/encoder")
        assert t["distrag.generator"].endswith("tiny_models/lm")
        assert len(t["distrag.config_hash"]) == 12
        assert t["mlflow.runName"] == f"{STRATEGIES[key][0]} synthetic:seed0"
        assert "mlflow.parentRunId" not in t
        # every row is evaluated the same way (rows differ only in training) ...
        assert (t["distrag.decoding"], t["distrag.eval_k"]) == ("concat", "3")
        # ... against the corpus embedded by the encoder it deploys
        trains_encoder = key not in ("none", "gen_ft")
        assert t["distrag.passage_vectors"] == ("re-embedded" if trains_encoder else "base")
    # seven different configurations, one comparison group (the report's)
    assert len({r.data.tags["distrag.config_hash"] for r in by_key.values()}) == 7
    assert len({r.data.tags["distrag.comparison"] for r in by_key.values()}) == 1
    (group,) = {r.data.tags["distrag.group"] for r in by_key.values()}
    report = next(r for r in runs if r.data.tags.get("distrag.kind") == "report")
    assert report.data.tags["distrag.group"] == group and report.data.tags["distrag.eval_k"] == "3"
    assert cfg.tracking.experiment == "distrag-demo"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_metrics_quality_and_cost(demo):
    by_key = strategy_runs(demo)
    n_test = None
    for key, r in by_key.items():
        m = r.data.metrics
        for name in QUALITY + COSTS:
            assert name in m, f"{key}: metric {name} missing"
        assert 0.0 <= m["test/em"] <= 1.0 and 0.0 <= m["test/f1"] <= 1.0
        assert m["test/f1"] >= m["test/em"] - 1e-9  # an exact match is an F1 of 1
        assert 0.0 <= m["test/recall_all_at_3"] <= m["test/recall_at_3"] <= 1.0
        assert m["test/recall"] == m["test/recall_at_3"] and m["test/answer_recall"] == m["test/answer_recall_at_3"]
        n_test = n_test or m["test/n_questions"]
        assert m["test/n_questions"] == n_test > 0  # every strategy scored on the same questions
        assert m["cost/total_flops"] > 0 and m["cost/wall_s"] > 0
        assert m["cost/encode_passages_flops"] > 0  # every run pays for (or reuses) the frozen index
        assert m["cost/total_flops"] >= m["cost/train_flops"]
        if key == "none":
            assert m["cost/train_flops"] == 0
            assert m.get("cost/trainable_params", 0) == 0
        else:
            assert m["cost/train_flops"] > 0, key
            assert m["cost/trainable_params"] > 0
            assert any(k.startswith("train/") for k in m), f"{key}: no training curves"
    m = {k: r.data.metrics for k, r in by_key.items()}
    # the frozen index build is charged identically to every row (cached or not); the rows that train the
    # encoder pay one more pass over the corpus, the re-embedding they are evaluated against
    one_pass = m["none"]["cost/encode_passages_flops"]
    assert len({v["cost/phase.index_build.flops"] for v in m.values()}) == 1
    for key, v in m.items():
        extra = v["cost/encode_passages_flops"] - one_pass
        assert extra == pytest.approx(0.0 if key in ("none", "gen_ft") else one_pass, rel=1e-9), key
        assert ("cost/phase.index_rebuild.flops" in v) == (key not in ("none", "gen_ft"))
    # training the generator (LoRA, through a causal LM) costs more than training the small encoder
    assert m["gen_ft"]["cost/train_flops"] > m["embed_ft"]["cost/train_flops"]
    # independent = both phases; the RAG losses run k prompts per question
    assert m["independent"]["cost/train_flops"] > m["gen_ft"]["cost/train_flops"]
    assert m["joint_sequence"]["cost/train_flops"] > m["embed_ft"]["cost/train_flops"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_params_logged_once_per_run(demo):
    c = demo["client"]
    expected_keys = set(flatten(demo["cfg"].model_dump(mode="json")))
    for key, r in strategy_runs(demo).items():
        params = r.data.params
        assert set(params) == expected_keys
        _, strategy, rag_loss = STRATEGIES[key]
        assert params["train.strategy"] == strategy
        if rag_loss:
            assert params["train.rag_loss"] == rag_loss
        # the SQLite store holds one row per (run, key): logged once, never rewritten
        history = c.get_run(r.info.run_id).data.params
        assert history == params
    report = next(r for r in demo["runs"] if r.data.tags.get("distrag.kind") == "report")
    assert report.data.params == {}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_artifacts_and_report_files(demo):
    c, tmp = demo["client"], demo["tmp"]
    by_key = strategy_runs(demo)
    for key, r in by_key.items():
        arts = artifact_paths(c, r.info.run_id)
        assert "predictions_test.jsonl" in arts
        if key == "none":
            assert "train_history.json" not in arts
        else:
            assert "train_history.json" in arts
    # artifacts land next to the store, in the working directory the demo ran from
    run = by_key["gen_ft"]
    assert run.info.artifact_uri.startswith((tmp / "mlartifacts").as_uri())
    local = Path(c.download_artifacts(run.info.run_id, "predictions_test.jsonl", str(tmp / "dl")))
    rows = [json.loads(x) for x in local.read_text().splitlines()]
    assert len(rows) == int(run.data.metrics["test/n_questions"])
    hist = json.loads(Path(c.download_artifacts(run.info.run_id, "train_history.json", str(tmp / "dl"))).read_text())
    assert [h["step"] for h in hist] == [1, 2] and all("loss" in h and "grad_norm" in h for h in hist)
    hist_i = json.loads(Path(c.download_artifacts(by_key["independent"].info.run_id, "train_history.json",
                                                  str(tmp / "dl_i"))).read_text())
    assert [h["phase"] for h in hist_i] == ["gen_ft", "gen_ft", "embed_ft", "embed_ft"]

    report = next(r for r in demo["runs"] if r.data.tags.get("distrag.kind") == "report")
    arts = artifact_paths(c, report.info.run_id)
    assert {"report/table.md", "report/table.csv", "report/report.html"} <= arts
    assert {a for a in arts if a.endswith(".png")} == {"report/em_vs_flops.png", "report/em_vs_device_hours.png",
                                                       "report/cost_by_phase.png"}
    out = tmp / "runs" / "report"
    for name in ("table.md", "table.csv", "em_vs_flops.png", "em_vs_device_hours.png", "cost_by_phase.png",
                 "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    html = (out / "report.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == 3 and "http://" not in html
    assert (out / "em_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    for label, _, _ in STRATEGIES.values():
        assert f"| {label} |" in table
    assert len((out / "table.csv").read_text().strip().splitlines()) == 1 + 7
    # every row's pipeline is saved as a bundle (the trained encoder and/or adapter in it) under output_dir/models
    saved = {p.name.rsplit("-", 1)[0] for p in (tmp / "runs" / "models").glob("*/bundle.json") for p in [p.parent]}
    assert saved == set(STRATEGIES)
    assert any((tmp / "runs" / "models").glob("gen_ft-*/adapter/adapter_config.json"))
    assert any((tmp / "runs" / "models").glob("embed_ft-*/embedder/config.json"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_on_data_without_context_labels_skips_the_rows_that_need_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = write_popqa_selfrag(tmp_path / "popqa.jsonl", n=16)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = cli.main(["demo", "--quick", "--no-progress", "--quiet", f"output_dir={tmp_path}/runs", f"tracking.uri={uri}",
                   "data.format=popqa", f"data.path={data}", "data.dev_fraction=0.2", "data.test_fraction=0.3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "skipped (the training questions have no context labels): Ft-Embed, Independent" in out
    _, runs = all_runs(uri, "distrag-demo")
    keys = {r.data.tags["distrag.strategy"] for r in runs if r.data.tags.get("distrag.kind") == "strategy"}
    assert keys == {"none", "gen_ft", "two_phase", "joint_sequence", "joint_token"}
    assert "EM 95% CI" in out

"""End to end through the command line, with MLflow in a temporary SQLite store.

``distrag demo --quick`` (seven strategies on tiny random models), ``distrag eval`` on a tiny config,
and the user-facing failures (bad config, Ft-Embed on data without context labels) with exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

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
QUALITY = ("test/em", "test/f1", "test/recall_at_3", "test/answer_recall_at_3", "test/n_questions")
COSTS = ("cost/train_flops", "cost/total_flops", "cost/wall_s", "cost/encode_passages_flops",
         "cost/generate_flops")


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def all_runs(uri: str, experiment: str):
    c = client_for(uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    return c, c.search_runs([exp.experiment_id], max_results=1000)


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, a.path) if a.is_dir else {a.path}
    return out


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
        # RAG-trained generators decode with the RAG marginal, the others with one concatenated prompt
        assert t["distrag.decoding"] == ("rag" if key in ("two_phase", "joint_sequence", "joint_token")
                                         else "concat")
    # seven different configurations
    assert len({r.data.tags["distrag.config_hash"] for r in by_key.values()}) == 7
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
        assert 0.0 <= m["test/recall_at_3"] <= 1.0
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
    # the index build is charged identically to every row (cached or not)
    assert len({v["cost/encode_passages_flops"] for v in m.values()}) == 1
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
    assert {"report/table.md", "report/table.csv"} <= arts
    assert {a for a in arts if a.endswith(".png")} == {"report/em_vs_flops.png", "report/cost_by_phase.png"}
    out = tmp / "runs" / "report"
    for name in ("table.md", "table.csv", "em_vs_flops.png", "cost_by_phase.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "em_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    for label, _, _ in STRATEGIES.values():
        assert f"| {label} |" in table
    assert len((out / "table.csv").read_text().strip().splitlines()) == 1 + 7
    # fine-tuned parts are saved (encoder and/or adapter) under output_dir/models
    saved = {p.name.rsplit("-", 1)[0] for p in (tmp / "runs" / "models").iterdir()}
    assert saved == set(STRATEGIES) - {"none"}
    assert any((tmp / "runs" / "models").glob("gen_ft-*/adapter/adapter_config.json"))
    assert any((tmp / "runs" / "models").glob("embed_ft-*/embedder/config.json"))


# ----------------------------------------------------------------------------------------------
# distrag eval and failures


def tiny_config(tmp: Path, enc: Path, lm: Path, **extra) -> Path:
    tree = {
        "data": {"format": "synthetic", "synthetic": {"n_entities": 8, "n_single_hop": 12, "n_two_hop": 4},
                 "dev_fraction": 0.2, "test_fraction": 0.3},
        "embedder": {"model": str(enc), "max_length": 64},
        "generator": {"model": str(lm), "max_new_tokens": 3, "max_passage_chars": 80},
        "retrieval": {"top_k": 3},
        "index": {"device": "cpu"},
        "train": {"max_steps": 1, "batch_size": 2, "micro_batch_size": 2, "train_k": 2},
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "tiny"},
        "output_dir": str(tmp / "runs"),
    }
    tree.update(extra)  # whole sections replaced
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.timeout(120)
def test_eval_prints_a_table_and_records_one_eval_run(tmp_path, monkeypatch, capsys, tiny_encoder_dir, tiny_lm_dir):
    monkeypatch.chdir(tmp_path)
    cfg_path = tiny_config(tmp_path, tiny_encoder_dir, tiny_lm_dir)
    rc = cli.main(["eval", "--config", str(cfg_path), "--no-progress", "--quiet", "train.strategy=joint"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "No-FT baseline on synthetic:seed0 (test split)" in out
    assert "No-FT" in out and "EM" in out and "Recall@3" in out
    assert f"sqlite:///{tmp_path}/mlflow.db" in out
    c, runs = all_runs(f"sqlite:///{tmp_path}/mlflow.db", "tiny")
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert r.data.tags["distrag.kind"] == "eval" and r.data.tags["distrag.strategy"] == "none"
    assert r.data.params["train.strategy"] == "none"  # eval forces the No-FT baseline
    assert r.data.metrics["cost/train_flops"] == 0 and r.data.metrics["cost/total_flops"] > 0
    assert {"test/em", "test/f1", "test/recall_at_3"} <= set(r.data.metrics)
    assert "predictions_test.jsonl" in artifact_paths(c, r.info.run_id)
    assert not (tmp_path / "runs" / "models").exists()  # nothing trained, nothing saved


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overrides, keys", [
    (["train.lr_generator=-1", "index.kind=bogus"], ["train.lr_generator", "index.kind"]),
    (["train.lr_generatr=1e-4"], ["train.lr_generatr", "unknown key"]),
    (["train.batch_size=6", "train.micro_batch_size=4"], ["train", "multiple of"]),
    (["retrieval.top_k"], ["retrieval.top_k", "key.sub=value"]),
])
def test_bad_config_exits_2_naming_every_key(tmp_path, monkeypatch, capsys, tiny_encoder_dir, tiny_lm_dir,
                                            overrides, keys):
    monkeypatch.chdir(tmp_path)
    cfg_path = tiny_config(tmp_path, tiny_encoder_dir, tiny_lm_dir)
    rc = cli.main(["train", "--config", str(cfg_path), "--no-progress", *overrides])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for k in keys:
        assert k in err
    assert not (tmp_path / "mlflow.db").exists()  # rejected before anything ran or was recorded


@pytest.mark.timeout(60)
def test_missing_config_file_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def write_popqa_selfrag(path: Path, n: int = 12) -> Path:
    """PopQA in the Self-RAG layout: answers and retrieved ctxs, no context labels."""
    people = ["Ana Brell", "Tom Vask", "Lia Quorn", "Sam Dretz", "Eli Moor", "Kai Sorn"]
    cities = ["Velmora", "Tarnholm", "Quilford", "Brask", "Ostrava", "Dunvik"]
    lines = []
    for i in range(n):
        p, c = people[i % 6], cities[(i * 5) % 6]
        ctxs = [{"id": f"c{i % 6}", "title": p, "text": f"{p} was born in {c} and works as a teacher."},
                {"id": f"d{(i + 1) % 6}", "title": cities[(i + 1) % 6],
                 "text": f"{cities[(i + 1) % 6]} is a city on the river."}]
        lines.append(json.dumps({"id": f"q{i}", "question": f"In what city was {p} born? ({i})",
                                 "answers": [c], "ctxs": ctxs, "s_pop": 10 + i}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.timeout(120)
def test_embed_ft_on_unlabelled_popqa_exits_2_with_the_suggestion(tmp_path, monkeypatch, capsys, tiny_encoder_dir,
                                                                  tiny_lm_dir):
    monkeypatch.chdir(tmp_path)
    data = write_popqa_selfrag(tmp_path / "popqa.jsonl")
    cfg_path = tiny_config(tmp_path, tiny_encoder_dir, tiny_lm_dir,
                           data={"format": "popqa", "path": str(data), "dev_fraction": 0.2,
                                 "test_fraction": 0.3})
    rc = cli.main(["train", "--config", str(cfg_path), "--no-progress", "--quiet", "train.strategy=embed_ft"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no gold passage ids" in err
    assert "train.strategy=joint" in err and "train.strategy=two_phase" in err
    # nothing was trained or saved, and no successful run was recorded
    assert not (tmp_path / "runs" / "models").exists()
    if (tmp_path / "mlflow.db").exists():
        _, runs = all_runs(f"sqlite:///{tmp_path}/mlflow.db", "tiny")
        assert not [r for r in runs if r.info.status == "FINISHED"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_phase_on_the_same_unlabelled_data_trains(tmp_path, monkeypatch, capsys, tiny_encoder_dir, tiny_lm_dir):
    """The suggested alternative really works on the data Ft-Embed refused."""
    monkeypatch.chdir(tmp_path)
    data = write_popqa_selfrag(tmp_path / "popqa.jsonl")
    cfg_path = tiny_config(tmp_path, tiny_encoder_dir, tiny_lm_dir,
                           data={"format": "popqa", "path": str(data), "dev_fraction": 0.2,
                                 "test_fraction": 0.3})
    rc = cli.main(["train", "--config", str(cfg_path), "--no-progress", "--quiet", "train.strategy=two_phase"])
    assert rc == 0
    _, runs = all_runs(f"sqlite:///{tmp_path}/mlflow.db", "tiny")
    assert [(r.info.status, r.data.tags["distrag.strategy"]) for r in runs] == [("FINISHED", "two_phase")]
    m = runs[0].data.metrics
    assert m["cost/train_flops"] > 0
    assert "test/recall_at_3" not in m  # no labels, no retrieval recall; answer recall still reported
    assert "test/answer_recall_at_3" in m

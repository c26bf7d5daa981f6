"""The command line end to end: `distrag eval` / `train` / `sweep` on tiny configs, the user-facing failures
(bad config, missing file, Ft-Embed on data without context labels) with exit code 2, the help texts,
``--version``, the progress a sweep logs, and the commands of trained pipelines (ask, predict, --merge)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow_runs import all_runs, artifact_paths
from sample_data import write_popqa_selfrag

import distrag
from distrag import cli
from distrag.cli import add_plan_args, add_selection_args, selection_from_args, target_from
from distrag.config import build_config
from distrag.reporting.groups import GroupSelection
from distrag.strategies import GEN, STRATEGIES, Strategy

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
    # the No-FT pipeline is saved as a bundle too, and logged as the run's MLflow model
    bundle = next((tmp_path / "runs" / "models").glob("none-*"))
    assert (bundle / "bundle.json").is_file() and not (bundle / "adapter").exists()
    assert r.data.tags["distrag.bundle"] == str(bundle.resolve())
    assert r.data.tags["distrag.model_uri"] == f"runs:/{r.info.run_id}/pipeline"


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


def _no_model_loads(monkeypatch) -> None:
    """Loading a model fails the test: these errors must come before any model loads."""
    from distrag.models.embedder import Embedder
    from distrag.models.generator import Generator

    def fail(*a, **k):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(Embedder, "from_config", fail)
    monkeypatch.setattr(Generator, "from_config", fail)


def _dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command, overrides, key, match", [
    ("eval", ["embedder.model=nope-model-xyz"], "embedder.model", "unknown model 'nope-model-xyz'"),
    ("eval", ["generator.model={tmp}/no/folder"], "generator.model", "not a local path"),
    ("eval", ["generator.gguf_file=nope.gguf"], "generator.gguf_file", "gguf_file 'nope.gguf' not found"),
    ("eval", ["output_dir={tmp}/afile"], "output_dir", "exists and is not a folder"),
    ("eval", ["output_dir=/sys/distrag-test/runs"], "output_dir", "not writable"),
    ("eval", ["index.kind=ivfpq", "index.pq_m=5"], "index.pq_m", "does not divide the embedder's dimension 32"),
    ("eval", ["index.n_shards=100"], "index.n_shards", "100 shards but the corpus"),
    ("eval", ["tracking.uri=ftp://host/x"], "tracking.uri", "scheme 'ftp' is not supported"),
    ("eval", ["tracking.uri=http://127.0.0.1:{port}"], "tracking.uri", "no MLflow server answers"),
    ("eval", ["data.test_fraction=0"], "eval_split", "test split of synthetic:seed0 holds no question"),
    ("eval", ["data.dev_fraction=0", "eval_split=dev"], "eval_split", "dev split"),
    ("train", ["train.strategy=embed_ft", "train.hard_negatives=1000"], "train.hard_negatives", "at most"),
    ("sweep", ["data.dev_fraction=0"], "data.dev_fraction", "selects its learning rates on dev"),
    ("report", ["tracking.uri=http://127.0.0.1:{port}"], "tracking.uri", "no MLflow server answers"),
])
def test_each_bad_input_is_one_line_exit_2_before_any_model_loads(tmp_path, monkeypatch, capsys, tiny_encoder_dir,
                                                                  tiny_lm_dir, command, overrides, key, match):
    monkeypatch.chdir(tmp_path)
    _no_model_loads(monkeypatch)
    (tmp_path / "afile").write_text("x")
    cfg_path = tiny_config(tmp_path, tiny_encoder_dir, tiny_lm_dir)
    overrides = [o.format(tmp=tmp_path, port=_dead_port()) for o in overrides]
    assert cli.main([command, "--config", str(cfg_path), "--no-progress", *overrides]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err  # one line, the last
    assert f": {key}: " in errors[0] and match in errors[0] and "Traceback" not in err, err
    if (tmp_path / "mlflow.db").exists():
        _, runs = all_runs(f"sqlite:///{tmp_path}/mlflow.db", "tiny")
        assert runs == []  # no FAILED run left behind


@pytest.mark.timeout(120)
def test_a_question_of_two_megabytes_is_cut_to_the_models_limits(tmp_path, monkeypatch, capsys, tiny_encoder_dir,
                                                                 tiny_lm_dir):
    """Every text path truncates: the embedder at embedder.max_length (questions and passages), the generator's
    prompt at the model's limit (its middle goes), so no attention over 400k tokens is ever asked for."""
    import json

    monkeypatch.chdir(tmp_path)
    big = "Who founded the company in the city " * (2_000_000 // 36) + "?"
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "question": big if i == 5 else "Who?",
                                                          "answers": ["x"], "gold_passage_ids": [f"p{i % 3}"]}) + "\n"
                                              for i in range(6)))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "text": big if i == 0 else f"passage {i}"})
                                              + "\n" for i in range(3)))
    cfg_path = tiny_config(tmp_path, tiny_encoder_dir, tiny_lm_dir,
                           data={"format": "jsonl", "path": str(tmp_path / "q.jsonl"),
                                 "corpus_path": str(tmp_path / "c.jsonl"), "dev_fraction": 0.0,
                                 "test_fraction": 0.5})
    rc = cli.main(["eval", "--config", str(cfg_path), "--no-progress", "eval_split=train"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "tokens was cut to the model's limit of 4093" in err  # 4096 positions less max_new_tokens


# ----------------------------------------------------------------------------------------------
# help, version, progress


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"distrag {distrag.__version__}"
    try:
        assert importlib.metadata.version("distrag") == distrag.__version__  # the installed package agrees
    except importlib.metadata.PackageNotFoundError:  # a source tree that was not installed
        pass


@pytest.mark.parametrize("command", [c.name for c in cli.COMMANDS])
def test_every_command_says_what_it_does_and_writes_with_examples_that_parse(command, capsys):
    spec = next(c for c in cli.COMMANDS if c.name == command)
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert spec.description.splitlines()[0] in out and "write" in spec.description.lower()
    assert f"example:\n  distrag {command}" in out
    for line in spec.example.splitlines():
        args = cli.build_parser().parse_args(shlex.split(line)[1:])  # every example is a valid command line
        assert args.command == command and args.fn is spec.handler
    if command in ("train", "demo", "advise"):
        for s in STRATEGIES:
            assert re.search(rf"^  {s.key} +{re.escape(s.label)} +{re.escape(s.summary)}$", out, re.M), s.key
        assert "select with: train.strategy=joint train.rag_loss=sequence" in out
    if command == "sweep":
        assert "m x n runs" in out and "m + n runs" in out
        for s in STRATEGIES:
            assert (s.train_strategy in out) == (s.search != "none")


def test_the_strategy_lists_are_read_from_the_table(monkeypatch):
    added = Strategy("retro", "Retro-FT", "retro", (GEN,), "separate", "a strategy added to the table")
    monkeypatch.setattr(cli, "STRATEGIES", (*STRATEGIES, added))
    assert "retro" in cli.strategy_list() and "a strategy added to the table" in cli.strategy_list()
    assert "  retro " in cli.sweep_strategy_list() and "Retro-FT: separate search, n runs" in cli.sweep_strategy_list()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sweep_logs_progress_over_its_grid_points_as_plain_lines(tmp_path, monkeypatch, capsys, tiny_encoder_dir,
                                                                tiny_lm_dir):
    """Off a terminal (a SLURM job): a progress line per grid point, no progress bar, no carriage return."""
    monkeypatch.chdir(tmp_path)
    cfg_path = tiny_config(tmp_path, tiny_encoder_dir, tiny_lm_dir)
    rc = cli.main(["sweep", "--config", str(cfg_path), "sweep.strategies=[gen_ft]", "sweep.lr_generator=[1e-4,1e-3]"])
    assert rc == 0
    err = capsys.readouterr().err
    progress = [line for line in err.splitlines() if "distrag.progress:" in line]
    assert [line.split("distrag.progress: ")[1].split(";")[0] for line in progress] == [
        "sweep: 1/2 grid points (50%), gen_ft lr_generator=0.0001 done",
        "sweep: 2/2 grid points (100%), gen_ft lr_generator=0.001 done"]
    assert "\r" not in err and "it/s" not in err


# ----------------------------------------------------------------------------------------------
# arguments the command line turns into plain values for the library


def test_command_line_selection():
    p = argparse.ArgumentParser()
    add_selection_args(p)
    sel = selection_from_args(p.parse_args(["--group", "ab12", "--dataset", "popqa", "--list-groups"]))
    assert sel == GroupSelection("ab12", "popqa", True)
    assert selection_from_args(p.parse_args([])) == GroupSelection()
    assert selection_from_args(argparse.Namespace()) == GroupSelection()  # a parser without the options


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_plan_args(p)
    return p.parse_args(list(argv))


def test_unset_flags_come_from_the_config():
    cfg = build_config({"retrieval": {"top_k": 4}, "train": {"batch_size": 16, "micro_batch_size": 8},
                        "sweep": {"lr_embedder": [1e-5, 2e-5, 3e-5]}, "generator": {"lora": {"r": 32}}})
    t = target_from(_args(), cfg)
    assert (t.k, t.batch_size, t.grid, t.lora_r) == (4, 16, (3, 2), 32)
    t = target_from(_args("--k", "2", "--grid", "1x5", "--lora-r", "4"), cfg)
    assert (t.k, t.grid, t.lora_r) == (2, (1, 5), 4)


def test_a_malformed_grid_is_a_config_error():
    from distrag.errors import ConfigError

    with pytest.raises(ConfigError, match="MxN"):
        target_from(_args("--grid", "3by3"), build_config({}))


@pytest.mark.timeout(300)
def test_eval_retrieval_only_scores_every_question_without_the_generator(tmp_path, tiny_encoder_dir, monkeypatch):
    """No generator is loaded (its model path does not even exist); every test question is scored, even past
    max_eval_questions; the run is recorded with its per-question outcomes, and is no row of the report's groups."""
    import json

    from distrag.reporting.tracking import read_recorded

    monkeypatch.chdir(tmp_path)
    rc = cli.main(["eval", "--retrieval-only", "--no-progress", f"embedder.model={tiny_encoder_dir}",
                   "generator.model=/no/such/generator", "data.synthetic.n_entities=8",
                   "data.synthetic.n_single_hop=20",
                   "data.synthetic.n_two_hop=4", "max_eval_questions=2", "retrieval.top_k=3", "index.device=cpu",
                   f"output_dir={tmp_path / 'runs'}"])
    assert rc == 0
    c, runs = all_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "distrag")
    (run,) = runs
    assert run.data.tags["distrag.kind"] == "retrieval"
    m = run.data.metrics
    assert m["test/n_retrieval_questions"] > 2 and "test/em" not in m
    assert {"test/recall_at_3", "test/mrr_at_3", "test/ndcg_at_3", "test/answer_recall_at_3"} <= set(m)
    local = c.download_artifacts(run.info.run_id, "retrieval_test.jsonl", str(tmp_path / "dl"))
    rows = [json.loads(x) for x in open(local).read().splitlines()]
    assert len(rows) == m["test/n_retrieval_questions"] and {"recall", "mrr", "ndcg"} <= set(rows[0])
    from distrag.config import TrackingConfig

    assert read_recorded(TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))[0] == []

# ----------------------------------------------------------------------------------------------
# trained pipelines, as people type it (issue 20): train with options and overrides in any order and --merge, then
# ask and predict on the bundle it wrote; one `error:` line (exit 2) for a folder that is not a bundle, a bundle
# whose index was altered, a questions file of an unknown format


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_encoder_dir, tiny_lm_dir):
    """`distrag train --config C a=b --no-progress c=d --merge`, run once from a temporary working folder."""
    tmp = tmp_path_factory.mktemp("cli_serving")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"synthetic": {"n_entities": 8, "n_single_hop": 12, "n_two_hop": 4}, "test_fraction": 0.3},
        "embedder": {"model": str(tiny_encoder_dir), "max_length": 64},
        "generator": {"model": str(tiny_lm_dir), "max_new_tokens": 3, "max_passage_chars": 80},
        "retrieval": {"top_k": 3}, "index": {"device": "cpu"},
        "train": {"max_steps": 1, "batch_size": 2, "micro_batch_size": 2, "train_k": 2},
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "cli"}, "output_dir": str(tmp / "runs")}))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        rc = cli.main(["train", "--config", str(cfg), "train.strategy=gen_ft", "--no-progress", "train.max_steps=2",
                       "--merge", "--quiet", "retrieval.top_k=2"])
    bundle = next((tmp / "runs" / "models").glob("gen_ft-*"))
    return {"rc": rc, "tmp": tmp, "bundle": bundle}


@pytest.mark.timeout(600)
def test_train_takes_options_and_overrides_in_any_order(trained):
    assert trained["rc"] == 0
    config = json.loads((trained["bundle"] / "config.json").read_text())
    assert config["train"]["max_steps"] == 2 and config["retrieval"]["top_k"] == 2  # overrides after an option
    manifest = json.loads((trained["bundle"] / "bundle.json").read_text())
    assert manifest["generator"]["merged"] == "generator"
    assert (trained["bundle"] / "generator" / "config.json").is_file()
    args = cli.build_parser().parse_args(["train", "a=b", "--config", "C", "c=d", "--no-progress", "e=f"])
    assert (args.config, args.overrides, args.no_progress) == ("C", ["a=b", "c=d", "e=f"], True)
    for bad in (["ask", "B", "q?", "--top-k", "0"], ["predict", "B", "--out", "o", "--batch-size", "x"]):
        with pytest.raises(SystemExit) as exit_:  # argparse's usage error, exit 2, before anything loads
            cli.build_parser().parse_args(bad)
        assert exit_.value.code == 2


@pytest.mark.timeout(600)
def test_ask_prints_the_answer_and_the_passages(trained, capsys):
    assert cli.main(["ask", str(trained["bundle"]), "Where", "was", "Vroustol", "born?", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("answer: ") and "top 2 passages (score, id, title: text):" in out
    assert len([line for line in out.splitlines() if line.startswith(("  1. ", "  2. "))]) == 2
    assert cli.main(["ask", "--json", str(trained["bundle"]), "Who founded it?", "--top-k", "3"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["question"] == "Who founded it?" and len(row["passages"]) == 3 and "text" in row["passages"][0]


@pytest.mark.timeout(600)
def test_predict_answers_a_file_and_scores_it(trained, tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "a", "question": "Who founded Quillon?", "answers": ["Velan"]}) + "\n"
                         + json.dumps({"question": "Where is Stezoxum?"}) + "\n")
    out = tmp_path / "answers.jsonl"
    assert cli.main(["predict", str(trained["bundle"]), "--questions", str(questions), "--out", str(out),
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "2"] and "em" in rows[0] and "em" not in rows[1]
    assert f"2 answers (Ft-Gen, top-2 passages each) written to {out}" in printed
    assert "on the 1 questions with answers; the bundle recorded test split" in printed
    split_out = tmp_path / "test.jsonl"
    assert cli.main(["predict", str(trained["bundle"]), "--split", "test", "--out", str(split_out)]) == 0
    recorded = json.loads((trained["bundle"] / "bundle.json").read_text())["evaluation"]
    assert f"EM {100 * recorded['quality']['em']:.1f} (95% CI" in capsys.readouterr().out
    assert len(split_out.read_text().splitlines()) == recorded["n_questions"]


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.timeout(600)
def test_bad_input_is_one_error_line(trained, tmp_path, capsys):
    assert cli.main(["ask", str(tmp_path), "q?"]) == 2
    assert "not a distrag pipeline bundle (no bundle.json)" in _one_error(capsys)
    broken = Path(shutil.copytree(trained["bundle"], tmp_path / "broken"))
    (broken / "index" / "shard_00000.faiss").write_bytes(b"not an index")
    assert cli.main(["ask", str(broken), "q?"]) == 2
    assert "index/shard_00000.faiss" in _one_error(capsys)
    (broken / "index" / "shard_00000.faiss").unlink()
    assert cli.main(["predict", str(broken), "--split", "test", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "shard_00000.faiss: missing" in _one_error(capsys)
    odd = tmp_path / "q.xml"
    odd.write_text("<q/>")
    assert cli.main(["predict", str(trained["bundle"]), "--questions", str(odd), "--out", str(tmp_path / "o")]) == 2
    assert "q.xml: unknown questions format" in _one_error(capsys)
    assert cli.main(["predict", str(trained["bundle"]), "--out", str(tmp_path / "o")]) == 2
    assert "--questions FILE" in _one_error(capsys)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.jsonl").exists()

"""The command line of trained pipelines, as people type it: `distrag train` with options and overrides in any order
and `--merge`, then `distrag ask` and `distrag predict` on the bundle it wrote; and one `error:` line (exit 2) for a
folder that is not a bundle, a bundle whose index was altered, a questions file of an unknown format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from distrag import cli

pytestmark = pytest.mark.timeout(600)


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


def test_train_takes_options_and_overrides_in_any_order(trained):
    assert trained["rc"] == 0
    config = json.loads((trained["bundle"] / "config.json").read_text())
    assert config["train"]["max_steps"] == 2 and config["retrieval"]["top_k"] == 2  # overrides after an option
    manifest = json.loads((trained["bundle"] / "bundle.json").read_text())
    assert manifest["generator"]["merged"] == "generator"
    assert (trained["bundle"] / "generator" / "config.json").is_file()
    args = cli.build_parser().parse_args(["train", "a=b", "--config", "C", "c=d", "--no-progress", "e=f"])
    assert (args.config, args.overrides, args.no_progress) == ("C", ["a=b", "c=d", "e=f"], True)


def test_ask_prints_the_answer_and_the_passages(trained, capsys):
    assert cli.main(["ask", str(trained["bundle"]), "Where", "was", "Vroustol", "born?", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("answer: ") and "top 2 passages (score, id, title: text):" in out
    assert len([line for line in out.splitlines() if line.startswith(("  1. ", "  2. "))]) == 2
    assert cli.main(["ask", "--json", str(trained["bundle"]), "Who founded it?", "--top-k", "3"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["question"] == "Who founded it?" and len(row["passages"]) == 3 and "text" in row["passages"][0]


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

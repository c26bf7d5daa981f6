"""Checks against the world, the data, the model files, output_dir and the tracker, before any model loads:
each problem of the issue's list is named with its key and a fix, and all of them come in one error."""

from __future__ import annotations

import json
import re
import socket

import pytest

from distrag.config import build_config
from distrag.data.records import Corpus, Passage, Question, Splits
from distrag.distributed.runner import check_setup, preflight
from distrag.errors import ConfigError
from distrag.training.preflight import check_data, embedder_dim, output_dir_problem


def _cfg(tmp_path, enc, lm, *overrides):
    return build_config({"embedder": {"model": str(enc)}, "generator": {"model": str(lm)},
                         "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}, "output_dir": str(tmp_path / "runs")},
                        list(overrides))


def _splits(n_passages: int = 6, *, n_test: int = 2, gold: int = 1) -> Splits:
    corpus = Corpus([Passage(f"p{i}", f"T{i}", f"text {i}") for i in range(n_passages)])
    qs = [Question(f"q{i}", f"question {i}?", ("a",), tuple(f"p{(i + j) % n_passages}" for j in range(gold)))
          for i in range(6 + n_test)]
    return Splits(corpus, qs[:4], qs[4:6], qs[6:], name="tiny")


def _keys(problems):
    return [k for k, _ in problems]


def test_a_good_setup_has_no_problem(tmp_path, tiny_encoder_dir, tiny_lm_dir):
    cfg = _cfg(tmp_path, tiny_encoder_dir, tiny_lm_dir, "train.strategy=embed_ft", "train.hard_negatives=2")
    assert check_setup(cfg, world_size=1) == []
    assert check_data(cfg, _splits()) == []
    preflight(cfg, _splits(), world_size=1)
    assert (tmp_path / "runs").is_dir() and not list((tmp_path / "runs").iterdir())  # the probe is gone


@pytest.mark.parametrize("override, key, match", [
    ("embedder.model=nope-model-xyz", "embedder.model", "unknown model 'nope-model-xyz'"),
    ("generator.model=/no/such/folder", "generator.model", "unknown model '/no/such/folder'"),
    ("generator.gguf_file=nope.gguf", "generator.gguf_file", "gguf_file 'nope.gguf' not found"),
    ("tracking.uri=ftp://host/x", "tracking.uri", "scheme 'ftp' is not supported"),
    ("tracking.uri=sqlite:////no/such/dir/mlflow.db", "tracking.uri", "folder /no/such/dir .* does not exist"),
])
def test_models_and_tracker_problems_name_their_key(tmp_path, tiny_encoder_dir, tiny_lm_dir, override, key, match):
    problems = check_setup(_cfg(tmp_path, tiny_encoder_dir, tiny_lm_dir, override))
    assert _keys(problems) == [key]
    assert re.search(match, problems[0][1]), problems


def test_max_new_tokens_must_leave_room_for_a_prompt_in_the_models_positions(tmp_path, tiny_encoder_dir, tiny_lm_dir):
    """Issue 19 item 9. Before: nothing checked it, and 100000 on a 4096-position model ran for minutes."""
    problems = check_setup(_cfg(tmp_path, tiny_encoder_dir, tiny_lm_dir, "generator.max_new_tokens=100000"))
    assert _keys(problems) == ["generator.max_new_tokens"]
    assert "4096 positions" in problems[0][1] and "at most 4032" in problems[0][1]
    assert check_setup(_cfg(tmp_path, tiny_encoder_dir, tiny_lm_dir, "generator.max_new_tokens=4032")) == []


def test_pq_m_must_divide_the_dimension_read_from_the_config_file(tmp_path, tiny_encoder_dir, tiny_lm_dir):
    cfg = _cfg(tmp_path, tiny_encoder_dir, tiny_lm_dir, "index.kind=ivfpq", "index.pq_m=5")
    assert embedder_dim(cfg) == 32
    (key, msg), = check_setup(cfg)
    assert key == "index.pq_m" and "5 does not divide the embedder's dimension 32" in msg
    assert "[1, 2, 4, 8, 16, 32]" in msg
    assert check_setup(_cfg(tmp_path, tiny_encoder_dir, tiny_lm_dir, "index.kind=ivfpq", "index.pq_m=8")) == []


def test_output_dir_must_be_a_writable_folder(tmp_path):
    (tmp_path / "afile").write_text("x")
    assert "exists and is not a folder" in output_dir_problem(tmp_path / "afile")
    assert "not writable" in output_dir_problem("/sys/distrag-test/runs")  # read-only for every user
    assert output_dir_problem(tmp_path / "new" / "runs") is None and (tmp_path / "new" / "runs").is_dir()


@pytest.mark.timeout(30)
def test_a_tracking_server_that_does_not_answer_fails_in_seconds(tmp_path, tiny_encoder_dir, tiny_lm_dir):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (key, msg), = check_setup(_cfg(tmp_path, tiny_encoder_dir, tiny_lm_dir,
                                   f"tracking.uri=http://user:secret@127.0.0.1:{port}"))
    assert key == "tracking.uri" and "no MLflow server answers" in msg and "tracking.enabled=false" in msg
    assert "secret" not in msg
    assert check_setup(_cfg(tmp_path, tiny_encoder_dir, tiny_lm_dir, f"tracking.uri=http://127.0.0.1:{port}",
                            "tracking.enabled=false")) == []


@pytest.mark.parametrize("overrides, world, key, match", [
    (["train.strategy=joint", "train.refresh_every=1", "distributed.index_rank=5"], 3, "distributed.index_rank",
     "5 is outside the world of 3"),
    (["train.strategy=joint", "train.refresh_every=1", "distributed.index_rank=-4"], 3, "distributed.index_rank",
     "outside the world"),
    (["train.strategy=joint", "train.refresh_every=1", "distributed.index_rank=5"], 1, "distributed.index_rank",
     "outside the world of 1"),
    (["train.strategy=gen_ft", "distributed.ds_config=/no/such.json"], 1, "distributed.ds_config", "file not found"),
    (["train.strategy=gen_ft", "distributed.offload=true", "distributed.zero_stage=2"], 2, "distributed.offload",
     "CPU offload needs ZeRO-3; set distributed.zero_stage=3"),
    (["train.strategy=gen_ft", "distributed.resume=/no/such/ckpt"], 1, "distributed.resume", "does not exist"),
])
def test_world_and_deepspeed_problems(tmp_path, tiny_encoder_dir, tiny_lm_dir, overrides, world, key, match):
    (k, msg), = check_setup(_cfg(tmp_path, tiny_encoder_dir, tiny_lm_dir, *overrides), world_size=world)
    assert k == key and match in msg


def test_an_invalid_ds_config_and_the_last_rank_as_index_rank(tmp_path, tiny_encoder_dir, tiny_lm_dir):
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    (k, msg), = check_setup(_cfg(tmp_path, tiny_encoder_dir, tiny_lm_dir, "train.strategy=gen_ft",
                                 f"distributed.ds_config={bad}"), world_size=2)
    assert k == "distributed.ds_config" and "not valid JSON" in msg
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    ok = _cfg(tmp_path, tiny_encoder_dir, tiny_lm_dir, "train.strategy=joint", "train.refresh_every=1",
              "distributed.index_rank=2", f"distributed.ds_config={bad}")
    assert check_setup(ok, world_size=3) == []


@pytest.mark.parametrize("overrides, splits, key, match", [
    (["eval_split=test"], _splits(n_test=0), "eval_split", "test split of tiny holds no question"),
    (["index.n_shards=7"], _splits(6), "index.n_shards", "7 shards but the corpus of tiny has 6 passage"),
    (["train.strategy=embed_ft", "train.hard_negatives=1000"], _splits(6), "train.hard_negatives",
     "at most 5 non-gold passages"),
    # the Ft-Embed hang: one passage, every question's gold, one hard negative asked for
    (["train.strategy=embed_ft", "train.hard_negatives=1"], _splits(1), "train.hard_negatives", "at most 0"),
    (["train.strategy=embed_ft", "train.hard_negatives=5"], _splits(6, gold=2), "train.hard_negatives",
     "at most 4 non-gold"),
])
def test_data_problems(tmp_path, tiny_encoder_dir, tiny_lm_dir, overrides, splits, key, match):
    problems = check_data(_cfg(tmp_path, tiny_encoder_dir, tiny_lm_dir, *overrides), splits)
    assert _keys(problems) == [key] and match in problems[0][1], problems


def test_every_problem_in_one_error(tmp_path, tiny_encoder_dir, tiny_lm_dir):
    (tmp_path / "afile").write_text("x")
    cfg = _cfg(tmp_path, tiny_encoder_dir, tiny_lm_dir, "generator.gguf_file=nope.gguf", f"output_dir={tmp_path}/afile",
               "index.n_shards=50", "eval_split=dev")
    with pytest.raises(ConfigError) as e:
        preflight(cfg, Splits(_splits(6).corpus, _splits().train, [], [], name="tiny"))
    assert _keys(e.value.problems) == ["generator.gguf_file", "output_dir", "eval_split", "index.n_shards"]
    assert str(e.value).startswith("4 problems in the configuration")


@pytest.mark.timeout(120)
def test_launch_train_reports_the_world_and_deepspeed_problems_at_once_before_loading(tmp_path, tiny_encoder_dir,
                                                                                       tiny_lm_dir):
    """The single-process path of launch/train.py: one error listing every problem, exit 2, no traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"embedder": {"model": str(tiny_encoder_dir)},
                                   "generator": {"model": str(tiny_lm_dir)},
                                   "tracking": {"enabled": False}, "output_dir": str(tmp_path / "runs")}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID",
                                                            "SLURM_NTASKS")}
    proc = subprocess.run([sys.executable, str(root / "launch" / "train.py"), "--config", str(cfg),
                           "train.strategy=joint", "train.refresh_every=1", "distributed.index_rank=5",
                           "distributed.resume=/no/such/ckpt", "distributed.ds_config=/no/such/ds.json"],
                          capture_output=True, text=True, env=env, timeout=110, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "error: 3 problems in the configuration:" in proc.stderr
    for key, match in [("distributed.index_rank", "outside the world of 1"), ("distributed.resume", "does not exist"),
                       ("distributed.ds_config", "file not found")]:
        assert f"  - {key}: " in proc.stderr and match in proc.stderr
    assert not (tmp_path / "runs" / "distributed").exists()  # nothing started

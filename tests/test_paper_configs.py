"""The paper's setting as launchable configs (launch/configs/paper/): they load and validate offline, pass the
checks of a run that need no download (unresolvable hub ids are warnings there, typos stay errors), and
``distrag plan --config`` projects them without any model file."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from distrag.cli import add_plan_args, target_from
from distrag.config import load_config
from distrag.costs.plan import KNOWN_MODELS, SIZES, model_shape, plan
from distrag.errors import ConfigError
from distrag.training.preflight import check_offline, check_setup

REPO = Path(__file__).resolve().parents[1]
PAPER = {name: REPO / "launch" / "configs" / "paper" / f"{name}.yaml" for name in ("hotpotqa", "popqa")}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _load(name, tmp_path, *overrides):
    return load_config(PAPER[name], [f"output_dir={tmp_path / 'runs'}", *overrides])


@pytest.mark.parametrize("name", sorted(PAPER))
def test_the_paper_configs_hold_the_papers_setting(name, tmp_path):
    cfg = _load(name, tmp_path)
    assert cfg.data.format == name and cfg.data.corpus_on_disk is True and cfg.data.corpus_path
    assert cfg.generator.quantization == "nf4" and cfg.generator.lora.r == 16 and cfg.retrieval.top_k == 5
    assert model_shape(cfg.generator.model).params == pytest.approx(8.03e9, rel=0.01)
    assert model_shape(cfg.embedder.model).params == pytest.approx(1.09e8, rel=0.02)
    assert cfg.index.kind == "ivfpq" and 768 % cfg.index.pq_m == 0 and cfg.index.n_shards >= cfg.distributed.index_ranks
    assert cfg.index.train_size >= 39 * cfg.index.nlist  # no cell is dropped by the sampling cap
    assert (len(cfg.sweep.lr_embedder), len(cfg.sweep.lr_generator)) == (3, 3)
    assert cfg.train.strategy == "joint" and cfg.train.refresh_every > 0 and cfg.distributed.zero_stage == 2
    assert cfg.plan.corpus == {"hotpotqa": 5_233_329, "popqa": 21_015_324}[name]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_the_offline_checks_warn_about_hub_ids_and_find_nothing_else(name, tmp_path, caplog):
    """Neither model is on this machine: each is a WARNING, not a problem, and pq_m is checked against the known
    768 dimensions. The run's own checks (check_setup) still refuse the missing models."""
    pytest.importorskip("bitsandbytes")  # generator.quantization=nf4 needs it, offline or not
    cfg = _load(name, tmp_path)
    with caplog.at_level(logging.WARNING, logger="distrag"):
        assert check_offline(cfg) == []
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("generator.model" in m and "Llama-3.1-8B-Instruct" in m for m in warned), warned
    assert any("embedder.model" in m and "bge-base-en-v1.5" in m for m in warned), warned
    assert {key for key, _ in check_setup(cfg, tracking=False)} == {"generator.model", "embedder.model"}
    problems = check_offline(_load(name, tmp_path, "index.pq_m=100"))
    assert [key for key, _ in problems] == ["index.pq_m"] and "768" in problems[0][1]


def test_a_typo_is_still_an_error_and_a_missing_local_model_too(tmp_path):
    with pytest.raises(ConfigError, match="train.refresh_evry: unknown key"):
        _load("hotpotqa", tmp_path, "train.refresh_evry=10")
    cfg = _load("hotpotqa", tmp_path, f"generator.model={tmp_path / 'no' / 'such' / 'model'}")
    assert "generator.model" in {key for key, _ in check_offline(cfg)}  # a path, not a hub id: still a problem


def _plan_args(*argv):
    p = argparse.ArgumentParser()
    add_plan_args(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("name", sorted(PAPER))
def test_plan_projects_the_paper_configs_offline_and_recommends_their_index_ranks(name, tmp_path):
    cfg = _load(name, tmp_path)
    t = target_from(_plan_args(), cfg)
    trainers = 8 - cfg.distributed.index_ranks
    assert (t.qlora, t.gpu, t.n_gpus, t.corpus, t.questions) == (True, "A10", 8, cfg.plan.corpus, cfg.plan.questions)
    assert t.batch_size == cfg.train.batch_size * trainers and t.grid == (3, 3) and t.k == 5
    p = plan(t)
    assert p.index_gpus == cfg.distributed.index_ranks
    assert all(row.fits for row in p.rows)  # every strategy fits a 24 GB A10 under ZeRO-2 (weights held whole)
    assert max(row.memory_gb for row in p.rows) < 24


def test_plan_knows_common_hub_ids_and_names_the_field_of_an_unknown_one(tmp_path):
    assert model_shape("meta-llama/Llama-3.1-8B").params == model_shape("8b").params
    assert model_shape("BAAI/bge-base-en-v1.5").params == model_shape("bge-base-en-v1.5").params  # org optional
    assert model_shape("Qwen/Qwen2.5-7B-Instruct").params == pytest.approx(7.62e9, rel=0.01)
    assert model_shape("mistralai/Mistral-7B-Instruct-v0.3").params == pytest.approx(7.25e9, rel=0.01)
    assert model_shape("sentence-transformers/all-MiniLM-L6-v2").params == model_shape("22m").params
    assert all(key == key.lower() for key in KNOWN_MODELS) and "8b" in SIZES
    cfg = _load("hotpotqa", tmp_path, "generator.model=some-org/unknown-llm")
    with pytest.raises(ConfigError, match=r"generator\.model: 'some-org/unknown-llm'.*--generator 8b"):
        plan(target_from(_plan_args(), cfg))
    assert plan(target_from(_plan_args("--generator", "8b"), cfg)).rows  # the size flag instead
    cfg = _load("hotpotqa", tmp_path, "embedder.model=some-org/unknown-encoder")
    with pytest.raises(ConfigError, match=r"embedder\.model: .*--embedder 110m"):
        plan(target_from(_plan_args(), cfg))

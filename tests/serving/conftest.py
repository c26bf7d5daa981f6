"""Fixtures of the serving tests: tiny runs recorded in MLflow, whose bundles the tests load, break and serve."""

from __future__ import annotations

import pytest
import torch

from distrag.config import build_config
from distrag.strategies import BY_KEY
from distrag.training.experiment import Experiment

STRATEGIES = ("none", "gen_ft", "joint_token")
"""No-FT (nothing trained: base encoder, the frozen index), Ft-Gen (an adapter), RAG-Tok (a
trained encoder, an adapter and the re-embedded index)."""


@pytest.fixture(scope="session")
def talkative_lm_dir(tmp_path_factory, tiny_lm_dir):
    """The tiny random LM with its own output head: the tied one always answers a newline first (an empty answer),
    which would make "the bundle answers as evaluation did" trivially true."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("talkative_lm")
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    model.config.tie_word_embeddings = False
    torch.manual_seed(1)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.model.embed_tokens.weight) * 2.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(out)
    return out


def tiny_cfg(tmp, encoder_dir, lm_dir, **extra):
    tree = {
        "data": {"synthetic": {"n_entities": 8, "n_single_hop": 12, "n_two_hop": 4}, "test_fraction": 0.3},
        "embedder": {"model": str(encoder_dir), "max_length": 64},
        "generator": {"model": str(lm_dir), "max_new_tokens": 3, "max_passage_chars": 80, "batch_size": 4},
        "retrieval": {"top_k": 3}, "index": {"device": "cpu"},
        "train": {"max_steps": 2, "batch_size": 2, "micro_batch_size": 2, "train_k": 2, "lr_generator": 1e-2},
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "serving", "register_model": "tiny-rag"},
        "output_dir": str(tmp / "runs"),
    }
    for key, value in extra.items():
        tree.setdefault(key, {}).update(value) if isinstance(value, dict) else tree.__setitem__(key, value)
    return build_config(tree)


@pytest.fixture(scope="session")
def runs(tmp_path_factory, tiny_encoder_dir, talkative_lm_dir):
    """Each of :data:`STRATEGIES` trained and evaluated in one experiment (MLflow on SQLite, models logged and
    registered); ``{key: (result, models)}`` plus the experiment, its config and the working folder."""
    tmp = tmp_path_factory.mktemp("serving_runs")
    cfg = tiny_cfg(tmp, tiny_encoder_dir, talkative_lm_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # MLflow's artifact store (mlartifacts/) goes to the working folder
        exp = Experiment(cfg, show_progress=False).setup()
        out = {key: exp.run(BY_KEY[key].apply(cfg)) for key in STRATEGIES}
    return {"tmp": tmp, "cfg": cfg, "exp": exp, "uri": cfg.tracking.uri, **out}


@pytest.fixture(scope="session")
def bundles(runs):
    """``{strategy key: its bundle folder}``, as the run's ``distrag.bundle`` tag names it."""
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    client = MlflowClient(runs["uri"])
    return {key: Path(client.get_run(runs[key][0].run_id).data.tags["distrag.bundle"]) for key in STRATEGIES}

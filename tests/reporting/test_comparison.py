"""Comparison identity: what rows must share (the comparison hash, the group key), computed the same way by
the writer and every reader; the module is the reporting package's leaf."""

from __future__ import annotations

import ast
from pathlib import Path

from distrag.config import ExperimentConfig, build_config
from distrag.reporting import comparison
from distrag.reporting.comparison import GroupKey, comparison_from_params, comparison_hash, key_of
from distrag.reporting.results import SearchRecord, StrategyResult
from distrag.reporting.tracking import flatten
from distrag.strategies import STRATEGIES


def _params(cfg: ExperimentConfig) -> dict[str, str]:
    """A configuration as MLflow params (what open_tracker logs)."""
    return {k: str(v) for k, v in flatten(cfg.model_dump(mode="json")).items()}


def test_the_comparison_hash_ignores_the_strategys_own_fields_only():
    base = build_config()
    h = comparison_hash(base)
    for s in STRATEGIES:
        assert comparison_hash(s.apply(base)) == h, s.key
    tuned = build_config(overrides=["train.lr_embedder=1e-3", "train.lr_generator=1e-5", "sweep.lr_embedder=[1e-6]",
                                    "train.two_phase_order=retriever_first", "tracking.experiment=other"])
    assert comparison_hash(tuned) == h
    for change in ("train.max_steps=7", "retrieval.top_k=9", "generator.decoding=rag", "data.split_seed=3",
                   "index.reembed_after_training=false", "generator.model=other-lm"):
        assert comparison_hash(build_config(overrides=[change])) != h, change
    assert base.config_hash() != tuned.config_hash()  # the whole-config hash still tells them apart


def test_the_comparison_hash_of_a_run_recorded_without_the_tag_is_rebuilt_from_its_params():
    cfg = build_config({"generator": {"system_prompt": "Answer: briefly, no sentence."}},
                       ["train.strategy=joint", "train.lr_generator=1e-3", "retrieval.top_k=3", "train.train_k=2"])
    assert comparison_from_params(_params(cfg)) == comparison_hash(cfg)
    assert comparison_from_params(_params(build_config(overrides=["train.max_steps=3"]))) != comparison_hash(cfg)
    # params that are not a whole configuration are hashed as they are, the strategy's fields left out
    partial = comparison_from_params({"train.strategy": "joint_token", "x.y": "1"})
    assert partial.startswith("params:") and partial == comparison_from_params({"train.strategy": "none", "x.y": "1"})
    assert comparison_from_params({}) is None


def test_a_sweep_that_did_not_record_k_matches_the_groups_of_every_k():
    key = GroupKey("d", "e", "g", "test", 3, "c")
    assert key.covers(GroupKey("d", "e", "g", "test", None, "c"))
    assert not key.covers(GroupKey("d", "e", "g", "test", 5, "c"))
    assert not key.covers(GroupKey("other", "e", "g", None, None, None))
    assert key.tags()["distrag.group"] == key.id and key.tags()["distrag.eval_k"] == "3"


def test_a_row_and_a_sweeps_search_record_of_the_same_settings_have_one_key():
    row = StrategyResult("gen_ft", "Ft-Gen", {}, {}, 0.0, dataset="d", embedder="e", generator="g",
                         eval_split="test", k=3, comparison="c")
    search = SearchRecord("gen_ft", 1e15, dataset="d", embedder="e", generator="g", eval_split="test", k=3,
                          comparison="c")
    assert key_of(row) == key_of(search) == GroupKey("d", "e", "g", "test", 3, "c")
    # what a run did not record is unknown (None), and an unknown field matches any group
    unknown = key_of(SearchRecord("gen_ft", 1e15, dataset="d"))
    assert unknown == GroupKey("d", None, None, None, None, None) and key_of(row).covers(unknown)


def test_the_identity_module_imports_no_other_reporting_module():
    """The leaf of the reporting package: the writer and every reader import it without a cycle."""
    tree = ast.parse(Path(comparison.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported and not {m for m in imported if m.startswith("distrag.reporting")}, imported

"""The strategy table: every strategy declared once, everything else derived from it."""

from __future__ import annotations

import typing

import pytest

from distrag.config import TrainConfig, build_config
from distrag.errors import StrategyError
from distrag.strategies import (
    BY_KEY,
    STRATEGIES,
    TRAIN_STRATEGIES,
    Phase,
    Strategy,
    get_strategy,
    phases_for,
    strategy_of,
)


def test_keys_and_labels_are_unique_and_in_the_papers_order():
    assert [s.key for s in STRATEGIES] == ["none", "embed_ft", "gen_ft", "independent", "two_phase",
                                           "joint_sequence", "joint_token"]
    assert [s.label for s in STRATEGIES] == ["No-FT", "Ft-Embed", "Ft-Gen", "Independent", "Two-phase", "RAG-Seq",
                                             "RAG-Tok"]
    assert len({s.label for s in STRATEGIES}) == len(STRATEGIES)


def test_the_config_accepts_exactly_the_tables_strategies():
    allowed = typing.get_args(TrainConfig.model_fields["strategy"].annotation)
    assert set(allowed) == set(TRAIN_STRATEGIES) == {s.train_strategy for s in STRATEGIES}
    with pytest.raises(ValueError, match="train.strategy"):
        build_config(overrides=["train.strategy=bogus"])


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.key)
def test_every_entry_round_trips_through_a_config(strategy):
    cfg = strategy.apply(build_config())
    assert strategy_of(cfg) is strategy
    assert get_strategy(strategy.key) is strategy
    assert phases_for(cfg) == strategy.phases(cfg.train)


def test_what_trains_and_what_needs_labels():
    trains = {s.key: (s.trains_embedder, s.trains_generator) for s in STRATEGIES}
    assert trains == {"none": (False, False), "embed_ft": (True, False), "gen_ft": (False, True),
                      "independent": (True, True), "two_phase": (True, True), "joint_sequence": (True, True),
                      "joint_token": (True, True)}
    assert {s.key for s in STRATEGIES if s.needs_labels} == {"embed_ft", "independent"}
    assert {s.key for s in STRATEGIES if s.uses_rag} == {"two_phase", "joint_sequence", "joint_token"}


def test_separately_trained_phases_draw_the_stream_of_a_run_of_their_own():
    assert [BY_KEY["independent"].phase_stream(i) for i in (0, 1)] == [0, 0]  # as Ft-Gen, then as Ft-Embed
    assert [BY_KEY["two_phase"].phase_stream(i) for i in (0, 1)] == [0, 1]


@pytest.mark.parametrize("m, n", [(1, 1), (2, 3), (4, 2)])
def test_grid_shapes(m, n):
    sizes = {s.key: s.grid_size(m, n) for s in STRATEGIES}
    assert sizes == {"none": 0, "embed_ft": m, "gen_ft": n, "independent": m + n, "two_phase": m + n,
                     "joint_sequence": m * n, "joint_token": m * n}


@pytest.mark.parametrize("rag_loss", ["sequence", "token"])
def test_rag_loss_and_two_phase_order_resolve_from_the_config(rag_loss):
    cfg = build_config(overrides=["train.strategy=two_phase", f"train.rag_loss={rag_loss}"])
    gen, ret = phases_for(cfg)
    assert (gen.name, gen.train_generator, gen.loss) == ("two_phase_generator", True, f"rag_{rag_loss}")
    assert (ret.name, ret.train_embedder, ret.loss) == ("two_phase_retriever", True, f"rag_{rag_loss}")
    cfg.train.two_phase_order = "retriever_first"
    assert [p.name for p in phases_for(cfg)] == ["two_phase_retriever", "two_phase_generator"]
    joint = build_config(overrides=["train.strategy=joint", f"train.rag_loss={rag_loss}"])
    assert strategy_of(joint).key == f"joint_{rag_loss}"
    assert [p.loss for p in phases_for(joint)] == [f"rag_{rag_loss}"]


def test_independent_runs_the_generator_phase_first_with_the_base_retriever():
    assert [p.name for p in BY_KEY["independent"].phases()] == ["gen_ft", "embed_ft"]


def test_unknown_or_ambiguous_keys_are_strategy_errors():
    with pytest.raises(StrategyError, match="choose from"):
        get_strategy("nope")
    with pytest.raises(StrategyError):
        get_strategy("joint")  # two entries: joint_sequence and joint_token


def test_a_new_strategy_is_one_entry():
    """Everything a strategy is asked derives from its phases and search shape."""
    s = Strategy("embed_then_gen", "E-then-G", "embed_then_gen",
                 (Phase("e", True, False, "mnrl"), Phase("g", False, True, "rag")), "sequential", "test entry")
    assert s.needs_labels and s.uses_rag and s.phase_stream(1) == 1
    assert s.trains_embedder and s.trains_generator and s.grid_size(3, 5) == 8
    assert [p.loss for p in s.phases(TrainConfig(rag_loss="sequence"))] == ["mnrl", "rag_sequence"]
    assert s.train_overrides() == {"strategy": "embed_then_gen"}


def test_the_rules_about_strategies_are_fields_of_the_table():
    """Which row is combined from which, whose phases follow train.two_phase_order, whose rates a sweep may
    reuse, what the paper's rule recommends, and which runs need an index rank: read from the table."""
    from distrag.strategies import BASELINE, advised, needs_index_rank

    ind = next(s for s in STRATEGIES if s.combine_from)
    encoder_from, generator_from = (BY_KEY[k] for k in ind.combine_from)
    assert (encoder_from.trains_embedder, encoder_from.trains_generator) == (True, False)
    assert (generator_from.trains_embedder, generator_from.trains_generator) == (False, True)
    assert {p.name for p in ind.table_phases} == {p.name for s in (encoder_from, generator_from)
                                                  for p in s.table_phases}
    assert [s.key for s in STRATEGIES if s.order_configurable] == ["two_phase"]
    for s in STRATEGIES:
        if s.rates_from is not None:
            assert BY_KEY[s.rates_from].trains_embedder and BY_KEY[s.rates_from].trains_generator
            assert s.search == "grid" and BY_KEY[s.rates_from].search != "grid"
    assert [s.key for s in advised("labels")] == ["independent"]
    assert [s.key for s in advised("no_labels_rates_searched")] == ["two_phase"]
    assert [s.key for s in advised("no_labels_rates_known")] == ["joint_sequence", "joint_token"]
    assert not BASELINE.trains and BASELINE is STRATEGIES[0]
    for s in STRATEGIES:
        cfg = s.apply(build_config(overrides=["train.refresh_every=2"]))
        assert needs_index_rank(cfg) is s.trains_embedder
        cfg.train.refresh_every = 0
        assert needs_index_rank(cfg) is False


def test_every_phase_names_a_declared_loss():
    from distrag.strategies import LOSSES, RAG_PLACEHOLDER

    for s in STRATEGIES:
        for p in s.table_phases:
            assert p.loss in LOSSES or p.loss == RAG_PLACEHOLDER, (s.key, p.loss)
        for rag in ("sequence", "token"):
            assert all(p.loss in LOSSES for p in s.phases(TrainConfig(rag_loss=rag)))
    assert {k for k, v in LOSSES.items() if v.needs_labels} == {"mnrl"}
    assert {k for k, v in LOSSES.items() if v.marginal} == {"rag_sequence", "rag_token"}

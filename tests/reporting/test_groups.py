"""Comparison groups: how runs are grouped, which group is shown."""

from __future__ import annotations

import pytest

from distrag.errors import ConfigError
from distrag.reporting.comparison import key_of
from distrag.reporting.groups import (
    Group,
    GroupSelection,
    choose,
    describe_groups,
    group_rows,
    other_groups_note,
)
from distrag.reporting.results import StrategyResult
from distrag.strategies import STRATEGIES

ALL = [s.key for s in STRATEGIES]
NO_LABELS = [s.key for s in STRATEGIES if not s.needs_labels]


def _row(key: str, *, dataset: str = "synthetic:seed0", k: int = 3, comparison: str = "c1", started: int = 1,
         recall: bool = True) -> StrategyResult:
    metrics = {"em": 0.2, "n_questions": 10.0, **({"recall": 0.5} if recall else {})}
    return StrategyResult(key, key, metrics, {}, 1.0, run_id=f"{key}-{started}", dataset=dataset, k=k,
                          embedder="enc", generator="lm", eval_split="test", comparison=comparison,
                          started_ms=started)


def test_rows_group_by_dataset_models_split_k_and_settings_newest_run_per_strategy():
    rows = [_row("joint_token", started=9), _row("joint_token", started=5), _row("none", started=4),
            _row("none", k=5, started=8), _row("gen_ft", comparison="c2", started=7),
            _row("gen_ft", dataset="hotpotqa:x", started=6)]
    rows.sort(key=lambda r: -r.started_ms)  # as read: newest first
    groups = group_rows(rows)
    assert len(groups) == 4
    main = next(g for g in groups if g.key == key_of(rows[0]))
    assert [r.run_id for r in main.rows] == ["none-4", "joint_token-9"]  # table order, newest per strategy
    assert main.n_runs == 3 and main.newest_ms == 9
    assert [g.newest_ms for g in groups] == [9, 8, 7, 6]  # newest group first
    assert len({g.id for g in groups}) == 4 and all(len(g.id) == 8 for g in groups)


def test_completeness_follows_the_data():
    labelled = Group(key_of(_row("none")), [_row(k) for k in NO_LABELS])
    assert not labelled.complete and labelled.missing == ["embed_ft", "independent"]  # recall: labels exist
    unlabelled = Group(key_of(_row("none")), [_row(k, recall=False) for k in NO_LABELS])
    assert unlabelled.complete and unlabelled.expected == NO_LABELS
    assert Group(key_of(_row("none")), [_row(k) for k in ALL]).complete


def _groups() -> list[Group]:
    complete_old = [_row(k, comparison="old", started=1) for k in ALL]
    partial_new = [_row("joint_token", comparison="new", started=9)]
    other_data = [_row(k, dataset="popqa:tail", recall=False, started=5) for k in NO_LABELS]
    rows = sorted(complete_old + partial_new + other_data, key=lambda r: -r.started_ms)
    return group_rows(rows)


def test_the_default_is_the_newest_complete_group_and_filters_pick_others():
    groups = _groups()
    newest, old, popqa = groups[0], next(g for g in groups if g.key.comparison == "old"), groups[1]
    assert newest.key.comparison == "new" and popqa.key.dataset == "popqa:tail"
    g, why = choose(groups)
    assert g is popqa and why == "the newest complete group"
    g, why = choose(groups, GroupSelection(dataset="synthetic"))  # the format before the colon is enough
    assert g is old and "among those matching --dataset 'synthetic'" in why
    g, why = choose(groups, GroupSelection(group=newest.id[:4]))
    assert g is newest and why == "selected with --group"
    g, why = choose([newest, old][:1])  # nothing complete: the one with the most strategies
    assert g is newest and why == "no group is complete: the one with the most strategies"


def test_a_selection_that_matches_nothing_names_the_recorded_groups():
    groups = _groups()
    with pytest.raises(ConfigError, match="--group: no recorded group matches --group 'zzzz'") as e:
        choose(groups, GroupSelection(group="zzzz"))
    assert all(g.id in str(e.value) for g in groups)
    with pytest.raises(ConfigError, match="--dataset: no recorded group matches --dataset 'hotpotqa'"):
        choose(groups, GroupSelection(dataset="hotpotqa"))
    with pytest.raises(ConfigError, match="no finished strategy runs"):
        choose([])


def test_an_id_prefix_that_names_several_groups_is_refused():
    with pytest.raises(ConfigError, match="'' names 3 groups; give more of the id"):
        choose(_groups(), GroupSelection(group=""))  # every id starts with the empty prefix


def test_group_listing_and_notes():
    groups = _groups()
    text = describe_groups(groups, groups[1])
    lines = text.splitlines()
    assert len(lines) == 3 and lines[1].lstrip().startswith("*") and not lines[0].lstrip().startswith("*")
    assert "1 strategy (missing No-FT, Ft-Embed" in lines[0] and "(complete)" in lines[1]
    assert "popqa:tail, test split, k=3, embedder enc, generator lm, settings c1" in lines[1]
    assert "2 other comparison groups" in other_groups_note(groups, groups[0])
    assert other_groups_note(groups[:1], groups[0]) == ""

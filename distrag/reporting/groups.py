"""Comparison groups: which recorded runs may share one table, one set of plots, one recommendation.

Rows are grouped by their :class:`~distrag.reporting.comparison.GroupKey` (dataset, models, eval split, k
and comparison hash: :mod:`distrag.reporting.comparison`), so rows of one group differ only in training.

The report and ``advise`` show one group at a time (:func:`choose`): the one named with ``--group`` (an
id or its prefix) or narrowed with ``--dataset``, else the **newest complete group**. A group is
*complete* when it holds a finished run of every strategy of the table its data allows: all seven when
context labels exist (a strategy that needs them was recorded, or retrieval recall was measured), else
the five that need none. When no group is complete, the one with the most strategies is shown (ties: the
newest) and the output says so. ``--list-groups`` lists them all.

Nothing here reads MLflow: :func:`distrag.reporting.tracking.load_groups` reads the runs and groups them
with :func:`group_rows`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from distrag.errors import ConfigError
from distrag.reporting.comparison import GroupKey, key_of
from distrag.strategies import BY_KEY, STRATEGIES

if TYPE_CHECKING:
    from distrag.reporting.results import StrategyResult


@dataclass
class Group:
    """The runs of one comparison group."""

    key: GroupKey
    rows: list[StrategyResult]
    """The newest finished run of each strategy, in table order."""
    newest_ms: int = 0
    """Start time of its newest run (ms since the epoch)."""
    n_runs: int = 0
    """Finished strategy runs recorded in it (older runs of a strategy included)."""

    @property
    def id(self) -> str:
        return self.key.id

    @property
    def has_labels(self) -> bool:
        """Context labels exist: a strategy that needs them ran, or retrieval recall was measured."""
        return any(r.key in BY_KEY and BY_KEY[r.key].needs_labels for r in self.rows) or any(
            name == "recall" or name.startswith("recall_at_") for r in self.rows for name in r.metrics)

    @property
    def expected(self) -> list[str]:
        """The strategies of the table its data allows (all, or those that need no context labels)."""
        return [s.key for s in STRATEGIES if self.has_labels or not s.needs_labels]

    @property
    def missing(self) -> list[str]:
        have = {r.key for r in self.rows}
        return [k for k in self.expected if k not in have]

    @property
    def complete(self) -> bool:
        return not self.missing

    def summary(self) -> str:
        """One line: id, size, completeness, date, what it shares."""
        when = datetime.fromtimestamp(self.newest_ms / 1000).strftime("%Y-%m-%d %H:%M") if self.newest_ms else "?"
        state = "complete" if self.complete else "missing " + ", ".join(BY_KEY[k].label for k in self.missing)
        return (f"{self.id}  {len(self.rows)} strateg{'y' if len(self.rows) == 1 else 'ies'} ({state}), newest "
                f"run {when}: {self.key.describe()}")


def group_rows(rows: Sequence[StrategyResult]) -> list[Group]:
    """``rows`` (finished strategy runs, newest first) as groups, newest group first; each group keeps
    the newest run of each strategy, in table order."""
    order = [s.key for s in STRATEGIES]
    groups: dict[GroupKey, Group] = {}
    for r in rows:
        key = key_of(r)
        g = groups.setdefault(key, Group(key, [], r.started_ms))
        g.n_runs += 1
        g.newest_ms = max(g.newest_ms, r.started_ms)
        if all(x.key != r.key for x in g.rows):
            g.rows.append(r)
    for g in groups.values():
        g.rows.sort(key=lambda r: order.index(r.key) if r.key in order else len(order))
    return sorted(groups.values(), key=lambda g: g.newest_ms, reverse=True)


# ----------------------------------------------------------------------------------------------
# choosing the group to show


@dataclass(frozen=True)
class GroupSelection:
    """Which group to show: ``group`` (an id or a prefix of one), ``dataset`` (a dataset name, or its
    format before the colon: ``synthetic`` matches ``synthetic:seed0``); by default the newest complete group."""

    group: str | None = None
    dataset: str | None = None
    list_groups: bool = False
    """List the groups instead of reporting one (``--list-groups``)."""

    def matches(self, g: Group) -> bool:
        ds = g.key.dataset or ""
        return ((self.group is None or g.id.startswith(self.group.lower()))
                and (self.dataset is None or self.dataset in (ds, ds.split(":", 1)[0])))


def choose(groups: Sequence[Group], selection: GroupSelection | None = None) -> tuple[Group, str]:
    """The group to show and why (the module's docstring); a :class:`ConfigError` naming the recorded
    groups when the selection matches none, or an id prefix matches several."""
    sel = selection or GroupSelection()
    if not groups:
        raise ConfigError([("tracking.experiment", "no finished strategy runs are recorded in this experiment yet")])
    found = [g for g in groups if sel.matches(g)]
    asked = ", ".join(f"{flag} {v!r}" for flag, v in (("--group", sel.group), ("--dataset", sel.dataset))
                      if v is not None)
    listing = "\n" + describe_groups(groups)
    if not found:
        flag = "--group" if sel.group is not None else "--dataset"
        raise ConfigError([(flag, f"no recorded group matches {asked}; recorded:{listing}")])
    if sel.group is not None:
        if len(found) > 1:
            raise ConfigError([("--group", f"{sel.group!r} names {len(found)} groups; give more of the id:{listing}")])
        return found[0], "selected with --group"
    narrowed = f" among those matching {asked}" if asked else ""
    complete = [g for g in found if g.complete]
    if complete:
        return complete[0], f"the newest complete group{narrowed}"
    best = max(found, key=lambda g: (len(g.rows), g.newest_ms))
    return best, f"no group is complete{narrowed}: the one with the most strategies"


def describe_groups(groups: Sequence[Group], chosen: Group | None = None) -> str:
    """The groups, one line each, newest first (``*`` marks ``chosen``)."""
    return "\n".join(f"  {'*' if g is chosen else ' '} {g.summary()}" for g in groups)


def other_groups_note(groups: Sequence[Group], chosen: Group) -> str:
    """A line saying that other groups exist and how to see them ('' when there are none)."""
    n = len(groups) - 1
    if n <= 0:
        return ""
    return (f"{n} other comparison group{'s' if n > 1 else ''} recorded in this experiment (other dataset, "
            f"models, split, k or settings): list them with --list-groups, pick one with --group ID")


@dataclass
class Loaded:
    """The group chosen for a report or a recommendation, and every group recorded."""

    group: Group
    why: str
    """Why this group ("the newest complete group", "selected with --group", ...)."""
    groups: list[Group]

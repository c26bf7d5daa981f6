"""Comparison identity: what a row of a table must share with the others, as a key and a hash.

Rows of a table must differ only in training. A :class:`GroupKey` says what they share:

* the dataset (``distrag.dataset``), the embedder and the generator (``distrag.embedder`` / ``.generator``),
* the split they are scored on (``distrag.eval_split``) and the k they are evaluated at (``distrag.eval_k``),
* the **comparison hash** (``distrag.comparison``, :func:`comparison_hash`): the configuration without the
  strategy's own fields (``train.strategy``, ``train.rag_loss``, ``train.two_phase_order``, the learning
  rates) and without the ``sweep`` section, so the seven rows of a demo, and a sweep's selected runs, land
  in one group, while a change of steps, batch size, decoder, index or data settings starts another.
  ``distrag.config_hash`` still hashes the whole configuration.

Runs recorded before these tags existed are grouped from what they carry: the comparison hash is computed
from the configuration rebuilt from their params (:func:`comparison_from_params`); their eval split and k
are read back with the run (:mod:`distrag.reporting.tracking`).

This module is the leaf of the reporting package (it imports no other reporting module): the writer of a
run (:mod:`distrag.training.experiment`, :mod:`distrag.reporting.tracking`) and every reader
(:mod:`distrag.reporting.groups`, the report, ``advise``) compute a row's identity the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING, Protocol

from distrag import metric_names as mn
from distrag.errors import UserError

if TYPE_CHECKING:
    from distrag.config import ExperimentConfig

STRATEGY_FIELDS = ("strategy", "rag_loss", "two_phase_order", "lr_embedder", "lr_generator")
"""The ``train`` fields that pick a strategy or are searched per strategy: left out of the comparison
hash (with the whole ``sweep`` section)."""


def comparison_hash(cfg: ExperimentConfig) -> str:
    """Hash of the settings every row of a comparison must share: :meth:`ExperimentConfig.config_hash` of
    ``cfg`` with the ``STRATEGY_FIELDS`` and the ``sweep`` section set to their defaults."""
    from distrag.config import SweepConfig, TrainConfig

    c = cfg.model_copy(deep=True)
    defaults = TrainConfig()
    for name in STRATEGY_FIELDS:
        setattr(c.train, name, getattr(defaults, name))
    c.sweep = SweepConfig()
    return c.config_hash()


def _param_value(raw: str):
    """A param as logged (``str(value)``) back to a value the configuration accepts."""
    import yaml

    if raw == "None":
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if raw[:1] in "[{" or isinstance(value, (bool, int, float)):
        return value
    return raw  # text stays text (a prompt with a colon is not a mapping)


def comparison_from_params(params: dict[str, str]) -> str | None:
    """The comparison hash of a run recorded without the ``distrag.comparison`` tag, from its params (the
    flattened configuration): the configuration rebuilt and hashed as :func:`comparison_hash` does; when
    the params do not form a valid configuration, a hash of them without the strategy's fields, sweep
    and tracking settings (``params:...``); None without params."""
    if not params:
        return None
    if {k.split(".", 1)[0] for k in params} >= _SECTIONS:  # a whole configuration was logged
        return _rebuilt_hash(params) or _params_hash(params)
    return _params_hash(params)


_SECTIONS = {"data", "embedder", "generator", "retrieval", "train"}


def _rebuilt_hash(params: dict[str, str]) -> str | None:
    from distrag.config import build_config

    tree: dict = {}
    for key, raw in params.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                break
        else:
            node[leaf] = _param_value(raw)
    try:
        return comparison_hash(build_config(tree))
    except (UserError, ValueError, TypeError):
        return None


def _params_hash(params: dict[str, str]) -> str:
    skip = {f"train.{f}" for f in STRATEGY_FIELDS}
    kept = {k: v for k, v in params.items()
            if k not in skip and k.split(".", 1)[0] not in ("sweep", "tracking", "output_dir")}
    return "params:" + hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class GroupKey:
    """What every row of one comparison shares (None: not recorded with the run)."""

    dataset: str | None
    embedder: str | None
    generator: str | None
    eval_split: str | None
    k: int | None
    comparison: str | None

    @property
    def id(self) -> str:
        """Short stable id (``distrag.group`` tag, ``--group``)."""
        return hashlib.sha256("\x1f".join(map(str, astuple(self))).encode()).hexdigest()[:8]

    def covers(self, other: GroupKey) -> bool:
        """Whether ``other`` may belong to this group: equal wherever ``other`` is known (a sweep run
        that did not record its k matches the groups of every k)."""
        return all(b is None or a == b for a, b in zip(astuple(self), astuple(other)))

    def describe(self) -> str:
        """One line: dataset, models, split, k and settings hash."""
        return (f"{self.dataset or '?'}, {self.eval_split or '?'} split, k={self.k if self.k is not None else '?'}, "
                f"embedder {self.embedder or '?'}, generator {self.generator or '?'}, "
                f"settings {self.comparison or '?'}")

    def tags(self) -> dict[str, str]:
        """The tags that name this group on a report run."""
        tags = {mn.TAG_GROUP: self.id, mn.TAG_DATASET: self.dataset, mn.TAG_EMBEDDER: self.embedder,
                mn.TAG_GENERATOR: self.generator, mn.TAG_EVAL_SPLIT: self.eval_split,
                mn.TAG_EVAL_K: None if self.k is None else str(self.k), mn.TAG_COMPARISON: self.comparison}
        return {k: v for k, v in tags.items() if v is not None}


class _Keyed(Protocol):
    dataset: str
    embedder: str
    generator: str
    eval_split: str
    k: int | None
    comparison: str


def key_of(row: _Keyed) -> GroupKey:
    """The group of a row (a :class:`~distrag.reporting.results.StrategyResult`) or of a sweep's search
    record (empty fields: unknown)."""
    return GroupKey(row.dataset or None, row.embedder or None, row.generator or None, row.eval_split or None,
                    row.k, row.comparison or None)

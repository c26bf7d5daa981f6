"""YAML a user gives (configuration files, command-line override values), read without surprises.

``yaml.safe_load`` builds no Python objects, but it keeps aliases as shared references: a document whose aliases
nest ("billion laughs": 9 levels of 9 aliases are 387 million values) is a few hundred bytes until something
walks it, and the configuration's deep copy walked it into minutes and a MemoryError (issue 19). So every tree
is copied by :func:`bounded_copy`, within :data:`MAX_VALUES` values with the aliases expanded, and one that
contains itself (a recursive alias) is refused; :func:`read_yaml` names the file for every way reading it fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from distrag.errors import ConfigError

MAX_VALUES = 10_000
"""Values (mappings, lists and scalars) a configuration may hold once aliases are expanded; a whole one has a
few hundred."""


def read_yaml(path: Path) -> Any:
    """``yaml.safe_load`` of the file at ``path``; a :class:`ConfigError` naming it when it is not YAML, not UTF-8
    text or nested too deeply for the parser (a RecursionError otherwise)."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError([("(yaml)", str(e))], str(path)) from None
    except RecursionError:
        raise ConfigError([("(yaml)", "nested too deeply to read")], str(path)) from None
    except UnicodeDecodeError as e:
        raise ConfigError([("(yaml)", f"not UTF-8 text ({e.reason} at byte {e.start})")], str(path)) from None


def parse_value(raw: str) -> Any:
    """An override's value as YAML (``""``: None); text that does not parse stays text."""
    try:
        return yaml.safe_load(raw) if raw != "" else None
    except (yaml.YAMLError, RecursionError):
        return raw


def bounded_copy(tree: Any, budget: list[int]) -> Any:
    """A copy of a YAML/JSON tree (dict keys as strings), each value counted against ``budget[0]``: ValueError
    when the budget runs out or a value contains itself."""

    def copy(node: Any, inside: set[int]) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise ValueError(f"it expands to more than {MAX_VALUES} values (nested YAML aliases, e.g. a 'billion "
                             "laughs' document); write the values out")
        if not isinstance(node, (dict, list, tuple)):
            return node
        if id(node) in inside:
            raise ValueError("a YAML alias refers to a value that contains it (a recursive structure)")
        inside.add(id(node))
        if isinstance(node, dict):
            out: Any = {k if isinstance(k, str) else str(k): copy(v, inside) for k, v in node.items()}
        else:
            out = [copy(v, inside) for v in node]
        inside.discard(id(node))
        return out

    return copy(tree, set())

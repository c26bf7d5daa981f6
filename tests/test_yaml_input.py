"""YAML input: files and override values read with safe_load, every way they can fail named, and trees copied
within a bound (issue 19 item 8: alias bombs, recursive aliases, nesting, values JSON cannot copy)."""

from __future__ import annotations

import pytest

from distrag.config import load_config
from distrag.errors import ConfigError
from distrag.yaml_input import MAX_VALUES, bounded_copy, parse_value

LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)) + "output_dir: *i\n"
"""Billion laughs: 9 values, each level 9 aliases of the one before: 9**9 = 387 million strings once expanded."""


@pytest.mark.timeout(30)
def test_an_alias_bomb_is_refused_at_once(tmp_path):
    """Before: the tree was deep-copied through JSON, 40-64 s to a MemoryError traceback."""
    import time

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(LAUGHS)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb\.yaml: \(top level\): it expands to more than 10000 values"):
        load_config(bomb)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ConfigError, match="expands to more than"):  # a command-line override too
        load_config(None, ["output_dir=" + "[" + ",".join(["&x [1,2,3,4,5,6,7,8,9,10]"] + ["*x"] * 2000) + "]"])


def test_a_self_referencing_alias_is_refused_and_ordinary_aliases_still_work(tmp_path):
    """Before: a recursive alias, a document nested too deep and a YAML date were tracebacks (ValueError
    "Circular reference", RecursionError, TypeError from the JSON copy); each is now one configuration error."""
    loop = tmp_path / "loop.yaml"
    loop.write_text("sweep: &s {strategies: *s}\n")
    with pytest.raises(ConfigError, match=r"loop\.yaml: \(top level\): a YAML alias refers to a value that contains"):
        load_config(loop)
    deep = tmp_path / "deep.yaml"
    deep.write_text("output_dir: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"deep\.yaml: \(yaml\): nested too deeply"):
        load_config(deep)
    dated = tmp_path / "dated.yaml"
    dated.write_text("output_dir: 2024-01-01\n")
    with pytest.raises(ConfigError, match=r"dated\.yaml: output_dir: Input should be a valid string"):
        load_config(dated)
    ok = tmp_path / "ok.yaml"
    ok.write_text("train: {lr_generator: &lr 0.0003, lr_embedder: *lr}\n")
    assert load_config(ok).train.lr_embedder == 0.0003


def test_bounded_copy_counts_every_value_and_override_values_parse_as_yaml():
    shared = [1, 2, 3]
    assert bounded_copy({"a": shared, "b": shared, 3: None}, [10]) == {"a": [1, 2, 3], "b": [1, 2, 3], "3": None}
    with pytest.raises(ValueError, match="expands to more than"):
        bounded_copy({"a": shared, "b": shared}, [8])
    assert MAX_VALUES == 10_000
    assert parse_value("[1, 2]") == [1, 2] and parse_value("a: [") == "a: [" and parse_value("") is None

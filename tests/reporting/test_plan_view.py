"""``distrag plan`` end to end: the command prints the projection table and the index line and writes the
plot; unset flags come from the experiment config; a bad grid is a configuration error."""

from __future__ import annotations

import argparse

import pytest

from distrag import cli
from distrag.config import build_config
from distrag.reporting.plan_view import HEADERS, add_plan_args, target_from
from distrag.strategies import STRATEGIES

PNG = b"\x89PNG\r\n\x1a\n"


def test_the_cli_prints_a_table_and_writes_the_plot(tmp_path, capsys):
    out = tmp_path / "plan.png"
    rc = cli.main(["plan", "--generator", "8b", "--embedder", "110m", "--qlora", "--lora-r", "16", "--gpu", "A10",
                   "--gpus", "8", "--corpus", "2000000", "--questions", "90000", "--k", "5", "--grid", "3x3",
                   "--refresh-every", "100", "--plot", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    for header in HEADERS[:3]:
        assert header in text
    for s in STRATEGIES:
        assert s.label in text
    assert "8 x A10" in text and "QLoRA r=16" in text and "index GPU(s)" in text
    assert out.read_bytes().startswith(PNG)


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_plan_args(p)
    return p.parse_args(list(argv))


def test_unset_flags_come_from_the_config():
    cfg = build_config({"retrieval": {"top_k": 4}, "train": {"batch_size": 16, "micro_batch_size": 8},
                        "sweep": {"lr_embedder": [1e-5, 2e-5, 3e-5]}, "generator": {"lora": {"r": 32}}})
    t = target_from(_args(), cfg)
    assert (t.k, t.batch_size, t.grid, t.lora_r) == (4, 16, (3, 2), 32)
    t = target_from(_args("--k", "2", "--grid", "1x5", "--lora-r", "4"), cfg)
    assert (t.k, t.grid, t.lora_r) == (2, (1, 5), 4)


def test_a_malformed_grid_is_a_config_error():
    from distrag.errors import ConfigError

    with pytest.raises(ConfigError, match="MxN"):
        target_from(_args("--grid", "3by3"), build_config({}))

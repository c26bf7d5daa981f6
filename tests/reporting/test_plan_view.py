"""``distrag plan`` end to end: the command prints the projection table and the index line and writes the
plot; the view takes a plain ``PlanTarget`` (the flags that make one are tests/test_cli.py's)."""

from __future__ import annotations

from distrag import cli
from distrag.reporting.plan_view import HEADERS
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


def test_run_plan_takes_plain_values(tmp_path, capsys):
    from distrag.costs.plan import PlanTarget
    from distrag.reporting.plan_view import run_plan

    out = run_plan(PlanTarget(generator="8b", embedder="110m", gpu="H100", n_gpus=4), tmp_path / "new" / "p.png")
    text = capsys.readouterr().out
    assert out == tmp_path / "new" / "p.png" and out.read_bytes().startswith(PNG)
    assert "4 x H100" in text and f"plot: {out}" in text

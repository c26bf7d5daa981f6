"""Report robustness (issue 19, item 10): any string can arrive from an MLflow run (a strategy label, a dataset,
a model name, a bundle path, a decoder), and every format of the report shows it as written, never as markup of
that format: the terminal table (rich markup and emoji codes), the plots (matplotlib mathtext, TeX, legend
labels), ``table.md`` (cell separators, HTML, line breaks, links), ``table.csv`` (spreadsheet formulas) and
``report.html`` (escaped already: tests/reporting/test_html_page.py)."""

from __future__ import annotations

import io

import pytest

from distrag import metric_names as mn
from distrag.reporting.report import print_results
from distrag.reporting.results import StrategyResult

RICH = ["[/bold]", "[red]x[/red]", "a [link=http://x]y[/link]", ":smile:", "[bold]open"]
MATH = ["$x$", "$x_$", "cost $5 and $6", "$$", r"$\bad$", r"a\$b", "50%_#&{}"]
MARKDOWN = ["a|b", "<script>alert(1)</script>", "two\nlines", "cr\r\nlf", "[link](http://x)", "back\\|slash",
            "a &lt; b"]
FORMULA = ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "=cmd|' /C calc'!A0"]
HOSTILE = "=[/bold] [red]x[/red] :smile: $x_$ $y$ a|b <script>alert(1)</script>\nline2 & more"
"""One string with every case: what the end-to-end report is run with."""


def _result(label: str, em: float = 0.25, **kw) -> StrategyResult:
    return StrategyResult("gen_ft", label, {"em": em, "f1": em, "n_questions": 20.0},
                          {mn.COST_TRAIN_FLOPS: 1e12, mn.COST_TOTAL_FLOPS: 2e12, mn.COST_DEVICE_HOURS: 0.1},
                          5.0, run_id="run-1", **kw)


# ----------------------------------------------------------------------------------------------
# the terminal (rich)


@pytest.mark.parametrize("text", RICH)
def test_terminal_table_shows_markup_like_text_as_written(text):
    from rich.console import Console

    console = Console(file=io.StringIO(), width=400, color_system=None)
    print_results([_result(text, decoding=f"dec {text}", passage_vectors=text)], title=f"title {text}",
                  console=console)
    out = console.file.getvalue()
    assert f"title {text}" in out  # the title
    assert f"│ {text} " in out  # the strategy cell
    assert f"dec {text}" in out  # the caption

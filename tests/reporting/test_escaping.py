"""Report robustness (issue 19, item 10): any string can arrive from an MLflow run (a strategy label, a dataset,
a model name, a bundle path, a decoder), and every format of the report shows it as written, never as markup of
that format: the terminal table (rich markup and emoji codes), the plots (matplotlib mathtext, TeX, legend
labels), ``table.md`` (cell separators, HTML, line breaks, links), ``table.csv`` (spreadsheet formulas) and
``report.html`` (escaped already: tests/reporting/test_html_page.py)."""

from __future__ import annotations

import csv
import html
import io
import re

import pytest

from distrag import cli
from distrag import metric_names as mn
from distrag.config import TrackingConfig
from distrag.reporting.columns import csv_text, markdown_table, result_rows
from distrag.reporting.plots import cost_by_phase_figure, em_vs_cost_figure, png_bytes
from distrag.reporting.report import REPORT_FILES, print_results, write_report_files
from distrag.reporting.results import StrategyResult
from distrag.reporting.tracking import Tracker

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


# ----------------------------------------------------------------------------------------------
# the plots (matplotlib)


def _shown(fig) -> list[tuple[str, bool]]:
    """Every text of the figure as matplotlib draws it: (text, drawn as mathtext)."""
    from matplotlib.text import Text

    return [t._preprocess_math(t.get_text()) for t in fig.findobj(Text) if t.get_text()]


def _rows(labels: list[str]) -> list[dict]:
    rows = result_rows([_result(label, em=0.1 + 0.1 * i) for i, label in enumerate(labels)])
    rows[0]["train_flops"] = 0.0  # the dashed band, named in the legend
    return rows


@pytest.mark.parametrize("text", MATH)
def test_plots_draw_dollars_and_tex_characters_as_written(text):
    labels = [f"_{text}", f"{text} B"]  # a leading underscore would hide a legend entry
    fig = em_vs_cost_figure(_rows(labels), "train_flops", xlabel="training FLOPs", title="t")
    shown = _shown(fig)
    assert (f"{text} B", False) in shown  # the point's label, as written, not mathtext
    assert (f"_{text} (no training FLOPs): EM 10.0, band: 95% interval", False) in shown
    assert png_bytes(fig)[:4] == b"\x89PNG"  # drawn without an error
    fig = cost_by_phase_figure([(text, {mn.COST_TOTAL_FLOPS: 1e12, mn.phase_metric(text): 1e12})])
    assert (f"{text}: {text}", False) in _shown(fig)
    assert png_bytes(fig)[:4] == b"\x89PNG"


def test_plots_are_drawn_without_tex_even_when_matplotlibrc_asks_for_it(tmp_path):
    """A user's matplotlibrc with ``text.usetex: True`` (TeX absent, or choking on ``%``, ``_``, ``$``) does not
    stop the report: its plots never go through TeX."""
    import matplotlib

    with matplotlib.rc_context({"text.usetex": True}):
        files = write_report_files([_result("No-FT 50%_#", em=0.0), _result("Ft-Gen $x$", em=0.3)], tmp_path)
    assert all(f.read_bytes()[:4] == b"\x89PNG" for f in files[2:5])


# ----------------------------------------------------------------------------------------------
# table.md


def _md_cells(line: str) -> list[str]:
    """The cells of a GFM table row: split at the pipes no backslash escapes."""
    cells, cell, escaped = [], "", False
    for ch in line.strip()[1:-1]:
        if ch == "|" and not escaped:
            cells.append(cell)
            cell = ""
        else:
            cell += ch
        escaped = ch == "\\" and not escaped
    return [*cells, cell]


def _md_plain(cell: str) -> str:
    """A cell's text as Markdown shows it: backslash escapes and HTML entities resolved."""
    return html.unescape(re.sub(r"\\(.)", r"\1", cell.strip()))


@pytest.mark.parametrize("text", MARKDOWN)
def test_markdown_cells_keep_the_columns_and_carry_no_html_or_line_break(text, tmp_path):
    bundle = tmp_path / f"models {text}" / "gen_ft-1"
    rows = result_rows([_result(text, passage_vectors=text, bundle=str(bundle)), _result("Ft-Gen", em=0.3)])
    md = markdown_table(rows)
    lines = md.splitlines()
    assert len(lines) == 4  # header, rule, two rows: no cell broke its row
    widths = {len(_md_cells(line)) for line in lines}
    assert widths == {len(_md_cells(lines[0]))}, md  # every row has the header's columns
    assert "<" not in md and ">" not in md and not re.search(r"(?<!\\)\]\(http", md)  # no HTML, no link made
    cells = _md_cells(lines[2])
    assert _md_plain(cells[0]) == re.sub(r"\r\n|\r|\n", " ", text)  # what a reader sees: the text as written
    link = next(c for c in cells if "gen_ft-1" in c).strip()
    assert link.startswith("[gen_ft-1](") and link.endswith("/gen_ft-1/README.md)")
    assert " " not in link.split("](", 1)[1]  # the destination is one URL (spaces and the rest %-encoded)


def test_markdown_lines_under_the_table_are_escaped_too(tmp_path):
    files = write_report_files([_result("No-FT", em=0.0, decoding="a|b <i>x</i>\nz")], tmp_path,
                               meta=["group <script>alert(1)</script>\n# heading | x"])
    md = files[0].read_text()
    assert "<script>" not in md and "<i>" not in md and "\n# heading" not in md and "\nz" not in md
    assert "&lt;script&gt;" in md and "\\| x" in md


# ----------------------------------------------------------------------------------------------
# table.csv


@pytest.mark.parametrize("text", FORMULA)
def test_csv_text_cells_never_start_a_formula_but_numbers_stay_numbers(text):
    rows = result_rows([_result(text, decoding=text, passage_vectors=text)])
    rows[0]["run_id"] = text
    rows[0]["dem_vs_base_mean"] = -0.5  # a negative number in a numeric column
    (row,) = csv.DictReader(io.StringIO(csv_text(rows)))
    for key in ("strategy", "decoding", "passage_vectors", "run_id"):
        assert row[key] == "'" + text, key  # OWASP: a quote before the formula character, the rest unchanged
    assert row["dem_vs_base_mean"] == "-0.5" and float(row["em"]) == 25.0


def test_csv_plain_text_is_left_alone():
    rows = result_rows([_result("Ft-Gen (lr=1e-4)", decoding="concat")])
    (row,) = csv.DictReader(io.StringIO(csv_text(rows)))
    assert row["strategy"] == "Ft-Gen (lr=1e-4)" and row["decoding"] == "concat"


# ----------------------------------------------------------------------------------------------
# end to end: `distrag report` of a run whose every name is hostile


def test_cli_report_writes_every_file_for_a_run_with_hostile_names(store_uri, tmp_path, capsys):
    tcfg = TrackingConfig(uri=store_uri, experiment="hostile")
    tags = {mn.TAG_KIND: mn.KIND_STRATEGY, mn.TAG_STRATEGY: "gen_ft", mn.TAG_LABEL: HOSTILE,
            mn.TAG_EVAL_SPLIT: "test", mn.TAG_DATASET: f"ds {HOSTILE}", mn.TAG_EMBEDDER: f"@emb {HOSTILE}",
            mn.TAG_GENERATOR: f"+gen {HOSTILE}", mn.TAG_EVAL_K: "3", mn.TAG_COMPARISON: "aaa",
            mn.TAG_DECODING: f"-dec {HOSTILE}", mn.TAG_BUNDLE: str(tmp_path / f"models {HOSTILE}" / "gen_ft-1")}
    with Tracker.open(tcfg, run_name="hostile", tags=tags) as tr:
        tr.log_metrics({"test/em": 0.3, "test/f1": 0.4, "test/n_questions": 20.0, "test/recall": 0.5,
                        mn.COST_TRAIN_FLOPS: 1e12, mn.COST_TOTAL_FLOPS: 2e12, mn.COST_DEVICE_HOURS: 0.1})
    out = tmp_path / "report"
    rc = cli.main(["report", f"tracking.uri={store_uri}", "tracking.experiment=hostile", "--out", str(out),
                   "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.err and "[/bold]" in captured.out and "[red]x[/red]" in captured.out
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)
    assert f"generator +gen {HOSTILE.splitlines()[0]}" in captured.out  # the title: the group's models as recorded
    md = (out / "table.md").read_text()
    lines = md.splitlines()
    assert len({len(_md_cells(line)) for line in lines[:3]}) == 1 and "<script>" not in md
    assert _md_plain(_md_cells(lines[2])[0]) == HOSTILE.replace("\n", " ")
    assert "[gen\\_ft-1](" not in md and "[gen_ft-1](" in md and "%7C" in md  # the model card's link, encoded
    (row,) = csv.DictReader(io.StringIO((out / "table.csv").read_text()))
    assert row["strategy"] == "'" + HOSTILE and row["decoding"] == "'-dec " + HOSTILE
    assert float(row["em"]) == pytest.approx(30.0)
    html = (out / "report.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html
    for png in REPORT_FILES[2:5]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

"""The report's columns: one list makes every table; a column shows only when some row has a value; adding a
column is one entry (proved end to end: a new metric logged to MLflow reaches the terminal, table.md,
table.csv and report.html through one appended entry); the number formats."""

from __future__ import annotations

import csv
import io

import pytest

from distrag import metric_names as mn
from distrag.config import TrackingConfig
from distrag.reporting import columns
from distrag.reporting.columns import (
    COLUMNS,
    Column,
    csv_text,
    em_interval,
    fmt_flops,
    markdown_table,
    result_rows,
    table_columns,
)
from distrag.reporting.report import write_report
from distrag.reporting.results import StrategyResult
from distrag.reporting.tracking import Tracker


def test_flops_are_written_with_a_unit_prefix():
    assert [fmt_flops(x) for x in (None, 950.0, 1.5e6, 9.27e10, 3.1e12, 4.4e15, -2e9)] == [
        "-", "950", "1.50 M", "92.70 G", "3.10 T", "4.40 P", "-2.00 G"]


def test_the_em_interval_is_wilsons():
    lo, hi = em_interval(0.0, 60)  # the README's No-FT row: 0.0-6.0
    assert lo == 0.0 and hi == pytest.approx(0.0602, abs=1e-4)
    lo, hi = em_interval(1 / 60, 60)  # Ft-Embed: 0.3-8.9
    assert (round(100 * lo, 1), round(100 * hi, 1)) == (0.3, 8.9)
    assert em_interval(1.0, 32)[1] == 1.0 and em_interval(0.5, 0) == (0.0, 1.0)  # nothing scored: no information


def test_every_column_has_one_key_and_goes_somewhere():
    keys = [c.key for c in COLUMNS]
    assert len(keys) == len(set(keys))
    assert all(c.table or c.csv for c in COLUMNS) and all(c.header for c in COLUMNS)
    # the interval is one cell in the tables and its two ends in the CSV
    by_key = {c.key: c for c in COLUMNS}
    assert not by_key["em_ci"].csv and not by_key["em_ci_low"].table and not by_key["em_ci_high"].table


def _result(label: str, **kw) -> StrategyResult:
    return StrategyResult(label.lower(), label, {"em": 0.5, "n_questions": 10.0}, {}, 1.0, **kw)


def test_a_column_is_shown_only_when_some_row_has_a_value():
    bare = result_rows([_result("A")])
    shown = [c.key for c, _ in table_columns(bare)]
    assert shown == ["strategy", "em", "em_ci", "f1", "train_flops", "total_flops", "wall_s", "n"]
    # an LR-search cost of 0 (no search recorded) is as good as none; a real one shows
    assert "search_flops" not in [c.key for c, _ in table_columns(result_rows([_result("A", search_flops=0.0)]))]
    rows = result_rows([_result("A"), _result("B", search_flops=2e15, k=4)])
    cols = dict((c.key, h) for c, h in table_columns(rows))
    assert cols["search_flops"] == "LR-search FLOPs"
    assert [c.cell(r, terminal=True) for r in rows for c in COLUMNS if c.key == "search_flops"] == ["-", "2.00 P"]
    assert [c.cell(r) for r in rows for c in COLUMNS if c.key == "search_flops"] == ["-", "2e+15"]
    # headers name the k the rows were evaluated at
    rows = result_rows([StrategyResult("a", "A", {"recall_at_5": 0.5}, {}, 1.0)])
    assert dict((c.key, h) for c, h in table_columns(rows))["recall"] == "Recall@5" and rows[0]["k"] == 5


def test_the_csv_holds_every_csv_column_with_raw_values():
    text = csv_text(result_rows([_result("A", run_id="r1", decoding="concat")]))
    (row,) = list(csv.DictReader(io.StringIO(text)))
    assert list(row) == [c.key for c in COLUMNS if c.csv]
    assert row["em"] == "50.0" and row["run_id"] == "r1" and row["decoding"] == "concat" and row["recall"] == ""


# ----------------------------------------------------------------------------------------------
# adding a column is one entry

TOKENS_PER_S = "generate/tokens_per_s"
"""A metric no column reads and outside the split, ``cost/`` and ``index/`` prefixes."""
NEW = Column("tokens_per_s", "Tokens/s", lambda r: r.extra.get(TOKENS_PER_S), lambda v: f"{v:.1f}")


def _record(tcfg: TrackingConfig, key: str, label: str, metrics: dict[str, float]) -> None:
    tags = {mn.TAG_KIND: mn.KIND_STRATEGY, mn.TAG_STRATEGY: key, mn.TAG_LABEL: label, mn.TAG_EVAL_SPLIT: "test",
            mn.TAG_DATASET: "synthetic:seed0", mn.TAG_EVAL_K: "3", mn.TAG_COMPARISON: "c"}
    with Tracker.open(tcfg, run_name=label, tags=tags) as tr:
        tr.log_metrics({"test/em": 0.25, "test/n_questions": 20.0, mn.COST_TRAIN_FLOPS: 1e12, **metrics})


def _report(tcfg: TrackingConfig, out, capsys) -> tuple[str, str, list[dict], str]:
    """The terminal table, table.md, table.csv's rows and report.html of the recorded group."""
    write_report(tcfg, out)
    return (capsys.readouterr().out, (out / "table.md").read_text(),
            list(csv.DictReader(io.StringIO((out / "table.csv").read_text()))), (out / "report.html").read_text())


def test_a_new_column_is_one_entry(store_uri, tmp_path, monkeypatch, capsys):
    tcfg = TrackingConfig(uri=store_uri, experiment="columns-test")
    _record(tcfg, "none", "No-FT", {})  # an older run: it did not write the metric
    _record(tcfg, "gen_ft", "Ft-Gen", {TOKENS_PER_S: 123.45})
    terminal, md, rows, html = _report(tcfg, tmp_path / "before", capsys)
    assert "Tokens/s" not in terminal + md + html and "tokens_per_s" not in rows[0]

    monkeypatch.setattr(columns, "COLUMNS", (*COLUMNS, NEW))  # the one entry
    terminal, md, rows, html = _report(tcfg, tmp_path / "after", capsys)
    head, _, no_ft, ft_gen = md.splitlines()[:4]
    assert head.endswith("| Questions | Tokens/s |")
    assert no_ft.startswith("| No-FT |") and no_ft.endswith("| 20 | - |")
    assert ft_gen.startswith("| Ft-Gen |") and ft_gen.endswith("| 20 | 123.5 |")
    assert [(r["strategy"], r["tokens_per_s"]) for r in rows] == [("No-FT", ""), ("Ft-Gen", "123.45")]
    assert "<th>Tokens/s</th>" in html and '<td class="num">123.5</td>' in html
    assert "Tokens/s" in terminal and "123.5" in terminal
    # the tables of runs that never wrote it do not show it
    assert "Tokens/s" not in markdown_table(result_rows([_result("A")]))


def test_paired_columns_compare_rows_question_by_question():
    """Known per-question outcomes: a row that fixes 10 of No-FT's 20 wrong answers is +50 EM points with a
    paired interval above 0 and McNemar p = 2 / 2**10; the best row against itself has no vs-best value."""
    from distrag.reporting.columns import csv_text, markdown_table, result_rows
    from distrag.reporting.results import StrategyResult

    def row(key, label, ems, recall):
        per_q = {f"q{i}": {"em": float(e), "f1": float(e), "recall": recall} for i, e in enumerate(ems)}
        return StrategyResult(key, label, {"em": sum(ems) / len(ems), "f1": sum(ems) / len(ems),
                                           "n_questions": float(len(ems)), "recall_at_3": recall}, {}, 1.0, k=3,
                              per_question=per_q)

    base = row("none", "No-FT", [0] * 20, 0.5)
    better = row("gen_ft", "Ft-Gen", [1] * 10 + [0] * 10, 0.5)
    rows = result_rows([base, better])
    assert rows[0]["dem_vs_base"] is None and rows[0]["dem_vs_best"] is not None
    mean, lo, hi = rows[1]["dem_vs_base"]
    assert mean == pytest.approx(50.0) and lo > 0 and hi <= 100
    assert rows[1]["mcnemar_p"] == pytest.approx(2 / 2 ** 10)
    assert rows[1]["dem_vs_best"] is None  # it is the best row
    assert rows[1]["drecall_vs_base"] == (0.0, 0.0, 0.0)
    md = markdown_table(rows)
    assert "dEM vs No-FT [95% CI]" in md and "| +50.0 [+" in md and "dRecall@3 vs No-FT [95% CI]" in md
    csv = csv_text(rows)
    assert "dem_vs_base_mean" in csv.splitlines()[0] and ",50.0," in csv
    # rows without per-question outcomes (older runs) show no paired column at all
    old = [StrategyResult("none", "No-FT", {"em": 0.1, "n_questions": 10.0}, {}, 1.0)]
    assert "dEM" not in markdown_table(result_rows(old))

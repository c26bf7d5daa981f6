"""The report: the table's columns come from the names the ledger writes, and the files are well formed."""

from __future__ import annotations

import csv
import io

import pytest

from distrag import metric_names as mn
from distrag.costs.ledger import CostLedger
from distrag.reporting.report import markdown_table, result_rows, write_report_files
from distrag.reporting.results import StrategyResult

PNG = b"\x89PNG\r\n\x1a\n"


def _ledger() -> CostLedger:
    led = CostLedger()
    with led.phase("index_build"):
        led.add("encode_passages", 2e9, tokens=100, passages=10)
    with led.phase("gen_ft"):
        led.add("train", 3e12, tokens=400)
    with led.phase("eval_test"):
        led.add("generate", 1e11, tokens=50)
    led.set_params(trainable=123_456, total=135_000_000)
    return led


def _result(key: str, label: str, costs: dict, em: float = 0.25) -> StrategyResult:
    return StrategyResult(key, label, {"em": em, "f1": em + 0.1, "recall_at_5": 0.5, "answer_recall_at_5": 0.75,
                                       "n_questions": 32.0}, costs, 12.0, run_id=f"run-{key}")


def test_every_cost_name_the_report_reads_is_one_the_ledger_writes():
    written = _ledger().to_metrics()
    names = [v for k, v in vars(mn).items() if k.startswith("COST_") and k not in ("COST_PREFIX", "COST_PHASE_PREFIX",
                                                                                    "COST_OWN_FLOPS")]
    assert names, "no COST_* names found"
    missing = [n for n in names if n not in written]
    assert not missing, f"the ledger does not write {missing}"
    assert mn.phase_metric("gen_ft") in written and mn.phase_metric("gen_ft", "wall_s") in written
    assert mn.phase_values(written) == {"index_build": 2e9, "gen_ft": 3e12, "eval_test": 1e11}


def test_the_report_shows_every_ledger_metric_it_names():
    costs = _ledger().to_metrics()
    row = result_rows([_result("gen_ft", "Ft-Gen", costs)])[0]
    # every cost column of the table is filled from the ledger's own metrics (none silently empty)
    assert row["train_flops"] == pytest.approx(3e12)
    assert row["total_flops"] == pytest.approx(3e12 + 2e9 + 1e11)
    assert row["wall_s"] == costs[mn.COST_WALL_S] and row["device_hours"] == costs[mn.COST_DEVICE_HOURS]
    assert row["trainable_params"] == 123_456
    md = markdown_table([row])
    head, _, cells = md.splitlines()
    assert "Trainable params" in head and "123,456" in cells
    for column in ("Train FLOPs", "Total FLOPs", "Wall-clock (s)", "Device-hours"):
        assert column in head


def test_report_files_are_well_formed(tmp_path):
    led = _ledger()
    results = [_result("none", "No-FT", CostLedger().to_metrics(), em=0.0),
               _result("gen_ft", "Ft-Gen", led.to_metrics(), em=0.3)]
    files = write_report_files(result_rows(results), [(r.label, r.costs) for r in results], tmp_path / "report")
    assert [f.name for f in files] == ["table.md", "table.csv", "em_vs_flops.png", "cost_by_phase.png"]
    rows = list(csv.DictReader(io.StringIO(files[1].read_text())))
    assert [r["strategy"] for r in rows] == ["No-FT", "Ft-Gen"]
    assert float(rows[1]["em"]) == pytest.approx(30.0) and rows[1]["run_id"] == "run-gen_ft"
    assert "| Recall@5 |" in files[0].read_text()
    for png in files[2:]:
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 1000
    assert not list((tmp_path / "report").glob(".*tmp"))  # written atomically, no leftovers

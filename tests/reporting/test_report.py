"""The report: the table's columns come from the names the ledger writes, the files (table, plots, HTML page)
are well formed, one report run per comparison group is updated in place, and groups are never mixed."""

from __future__ import annotations

import base64
import csv
import io
from html.parser import HTMLParser

import pytest

from distrag import cli
from distrag import metric_names as mn
from distrag.config import TrackingConfig
from distrag.costs.ledger import CostLedger
from distrag.costs.memory import PeakMemory, Watch
from distrag.reporting.columns import markdown_table, result_rows
from distrag.reporting.groups import GroupSelection
from distrag.reporting.report import (
    REPORT_FILES,
    write_report,
    write_report_files,
    write_report_for_results,
)
from distrag.reporting.results import StrategyResult
from distrag.reporting.tracking import Tracker, load_groups
from distrag.strategies import STRATEGIES

PNG = b"\x89PNG\r\n\x1a\n"


class _OnAGpu(PeakMemory):
    """Peaks as a GPU run records them: every phase 2 GB of host RSS and 1.5 GB of device memory."""

    def start(self) -> Watch:
        return Watch(rss=2_000_000_000, device=1_500_000_000)

    def stop(self, watch: Watch) -> Watch:
        return watch


def _ledger() -> CostLedger:
    led = CostLedger(memory=_OnAGpu())
    with led.phase("index_build"):
        led.add("encode_passages", 2e9, tokens=100, passages=10)
    with led.phase("gen_ft"):
        led.add("train", 3e12, tokens=400)
    with led.phase("eval_test"):
        led.add("generate", 1e11, tokens=50)
    led.set_params(trainable=123_456, total=135_000_000)
    led.set_params(generator_weight_bytes=111_691_896)
    return led


def _result(key: str, label: str, costs: dict, em: float = 0.25, **kw) -> StrategyResult:
    return StrategyResult(key, label, {"em": em, "f1": em + 0.1, "recall_at_5": 0.5, "answer_recall_at_5": 0.75,
                                       "n_questions": 32.0}, costs, 12.0, run_id=f"run-{key}", **kw)


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
    assert row["peak_rss_gb"] == pytest.approx(2.0) and row["peak_device_gb"] == pytest.approx(1.5)
    md = markdown_table([row])
    head, _, cells = md.splitlines()
    assert "Trainable params" in head and "123,456" in cells
    for column in ("Train FLOPs", "Total FLOPs", "Wall-clock (s)", "Device-hours", "Peak RSS (GB)",
                   "Peak device (GB)"):
        assert column in head
    assert "| 2.00 | 1.50 |" in cells
    # a CPU run records no device memory: its column is left out rather than shown empty
    cpu = {k: v for k, v in costs.items() if "peak_device" not in k}
    head = markdown_table(result_rows([_result("gen_ft", "Ft-Gen", cpu)])).splitlines()[0]
    assert "Peak RSS (GB)" in head and "Peak device (GB)" not in head


def test_k_free_recall_is_read_first_and_the_index_refresh_columns_appear_when_recorded():
    r = _result("joint_token", "RAG-Tok", {}, k=5)
    r.metrics.update({"recall": 0.25, "recall_at_5": 0.5})  # the k-free name wins (the same value in practice)
    r.extra = {mn.INDEX_STALENESS_MEAN: 1.5, mn.INDEX_BLOCKED_SHARE: 0.04, mn.INDEX_STALENESS_RECALL_GAP_MEAN: 0.025}
    row = result_rows([r])[0]
    assert row["recall"] == 25.0 and row["answer_recall"] == 75.0 and row["k"] == 5
    assert row["staleness"] == 1.5 and row["blocked_share"] == pytest.approx(4.0)
    assert row["staleness_gap"] == pytest.approx(2.5)  # points of recall
    head = markdown_table([row]).splitlines()[0]
    assert "Recall@5" in head and "Index staleness (steps)" in head and "Blocked on index (%)" in head
    assert "Staleness recall gap (pts)" in head
    plain = markdown_table(result_rows([_result("gen_ft", "Ft-Gen", {})]))
    assert "Index staleness" not in plain and "Staleness recall gap" not in plain


class _Page(HTMLParser):
    """Checks that tags nest and close, and collects images and every URL-like attribute."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.imgs, self.urls, self.tags = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v is not None]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def _check_page(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    assert text.startswith("<!DOCTYPE html>")
    assert not page.errors and not page.stack, (page.errors, page.stack)
    assert "http://" not in text and "https://" not in text  # self-contained: nothing fetched
    assert all(u.startswith("data:image/png;base64,") for u in page.urls)
    for img in page.imgs:
        assert img.get("alt")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == PNG
    return page


def test_report_files_are_well_formed(tmp_path):
    led = _ledger()
    same = {"decoding": "concat", "k": 5, "passage_vectors": "base"}
    results = [_result("none", "No-FT", CostLedger().to_metrics(), em=0.0, **same),
               _result("gen_ft", "Ft-Gen", led.to_metrics(), em=0.3, **same)]
    files = write_report_files(results, tmp_path / "report", title="a <report>", meta=["group x & y"])
    assert [f.name for f in files] == list(REPORT_FILES)
    rows = list(csv.DictReader(io.StringIO(files[1].read_text())))
    assert [r["strategy"] for r in rows] == ["No-FT", "Ft-Gen"]
    assert float(rows[1]["em"]) == pytest.approx(30.0) and rows[1]["run_id"] == "run-gen_ft"
    md = files[0].read_text()
    assert "| Recall@5 |" in md and "All rows evaluated with decoding=concat, k=5" in md and "group x & y" in md
    for png in files[2:5]:
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 1000
    html = files[5].read_text()
    page = _check_page(html)
    assert len(page.imgs) == 3 and "table" in page.tags and "caption" in page.tags
    assert "a &lt;report&gt;" in html and "group x &amp; y" in html  # texts escaped
    assert "decoding=concat, k=5" in html and "Passages: base" in html and "Ft-Gen" in html
    assert not list((tmp_path / "report").glob(".*tmp"))  # written atomically, no leftovers


# ----------------------------------------------------------------------------------------------
# reports of recorded runs: one group at a time, one report run per group


@pytest.fixture()
def store(store_uri):
    return TrackingConfig(uri=store_uri, experiment="report-test")


def _record_group(tcfg, *, k: int, comparison: str, em: float, keys=None) -> dict[str, str]:
    """One finished run per strategy of a group; returns {strategy: run id}."""
    ids = {}
    for s in STRATEGIES:
        if keys is not None and s.key not in keys:
            continue
        tags = {mn.TAG_KIND: mn.KIND_STRATEGY, mn.TAG_STRATEGY: s.key, mn.TAG_LABEL: s.label,
                mn.TAG_EVAL_SPLIT: "test", mn.TAG_DATASET: "synthetic:seed0", mn.TAG_EMBEDDER: "enc",
                mn.TAG_GENERATOR: "lm", mn.TAG_EVAL_K: str(k), mn.TAG_COMPARISON: comparison,
                mn.TAG_DECODING: "concat"}
        with Tracker.open(tcfg, run_name=s.label, tags=tags) as tr:
            tr.log_metrics({"test/em": em, "test/f1": em, "test/n_questions": 40.0, f"test/recall_at_{k}": 0.5,
                            "test/recall": 0.5, **_ledger().to_metrics()})
            ids[s.key] = tr.run_id
    return ids


def _report_runs(tcfg):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=tcfg.uri)
    exp = c.get_experiment_by_name(tcfg.experiment)
    return c, [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get(mn.TAG_KIND) == mn.KIND_REPORT]


def test_report_never_mixes_groups_and_keeps_one_report_run_per_group(store, tmp_path, capsys):
    at3 = _record_group(store, k=3, comparison="aaa", em=0.2)
    at5 = _record_group(store, k=5, comparison="aaa", em=0.4, keys={"none", "joint_token"})  # newer, incomplete
    out = tmp_path / "out"
    write_report(store, out)  # default: the newest complete group (k=3)
    printed = capsys.readouterr().out
    assert "the newest complete group" in printed and "1 other comparison group" in printed
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert {r["run_id"] for r in rows} == set(at3.values()) and {r["k"] for r in rows} == {"3"}
    assert "| Recall@3 |" in (out / "table.md").read_text()
    write_report(store, out)  # again: the same report run, updated in place
    c, reports = _report_runs(store)
    assert len(reports) == 1
    groups = load_groups(store)
    small = next(g for g in groups if g.key.k == 5)
    assert reports[0].data.tags[mn.TAG_GROUP] == next(g for g in groups if g.key.k == 3).id
    assert {a.path for a in c.list_artifacts(reports[0].info.run_id, "report")} == {
        f"report/{name}" for name in REPORT_FILES}
    # the other group, selected: its own rows only, its own report run
    write_report(store, out, GroupSelection(group=small.id))
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert {r["run_id"] for r in rows} == set(at5.values()) and {r["k"] for r in rows} == {"5"}
    assert "missing from this group: Ft-Embed" in capsys.readouterr().out
    _, reports = _report_runs(store)
    assert sorted(r.data.tags[mn.TAG_GROUP] for r in reports) == sorted(g.id for g in groups)
    assert all(r.info.status == "FINISHED" for r in reports)


def test_in_memory_results_of_two_groups_are_refused(tmp_path):
    a = _result("none", "No-FT", {}, k=3, dataset="d")
    b = _result("gen_ft", "Ft-Gen", {}, k=5, dataset="d")
    with pytest.raises(ValueError, match="one comparison group"):
        write_report_for_results([a, b], tmp_path)


def test_list_groups_and_cli_report_without_a_store(store, tmp_path, monkeypatch, capsys):
    _record_group(store, k=3, comparison="aaa", em=0.2, keys={"none"})
    _record_group(store, k=3, comparison="bbb", em=0.2, keys={"none"})
    assert write_report(store, tmp_path / "x", GroupSelection(list_groups=True)) is None
    listed = capsys.readouterr().out
    assert "Comparison groups in MLflow experiment 'report-test'" in listed
    assert "settings aaa" in listed and "settings bbb" in listed and not (tmp_path / "x").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    rc = cli.main(["report", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "no MLflow store in this folder" in err and "Traceback" not in err
    assert list(empty.iterdir()) == []  # no empty store left behind


def test_cli_report_filters(store, tmp_path, capsys):
    _record_group(store, k=3, comparison="aaa", em=0.2)
    _record_group(store, k=5, comparison="aaa", em=0.4, keys={"none"})
    base = ["report", f"tracking.uri={store.uri}", f"tracking.experiment={store.experiment}", "--quiet"]
    assert cli.main([*base, "--list-groups"]) == 0
    listed = capsys.readouterr().out
    small = next(g for g in load_groups(store) if g.key.k == 5)
    assert listed.count("strateg") >= 2 and small.id in listed
    out = tmp_path / "k5"
    assert cli.main([*base, "--group", small.id[:5], "--out", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert [r["strategy"] for r in rows] == ["No-FT"] and rows[0]["k"] == "5"
    assert cli.main([*base, "--group", "zzzz"]) == 2
    assert "no recorded group matches --group 'zzzz'" in capsys.readouterr().err


def test_each_row_links_its_model_card_from_the_report(store, tmp_path):
    """Issue 20: the report and the model cards link each other; a row read back from MLflow keeps its bundle."""
    bundle = tmp_path / "runs" / "models" / "gen_ft-0123abcd4567"
    results = [_result("none", "No-FT", CostLedger().to_metrics(), em=0.0),
               _result("gen_ft", "Ft-Gen", _ledger().to_metrics(), em=0.3, bundle=str(bundle))]
    files = write_report_files(results, tmp_path / "runs" / "report")
    md = files[0].read_text()
    assert "| Model card |" in md and "[gen_ft-0123abcd4567](../models/gen_ft-0123abcd4567/README.md)" in md
    assert "| - |" in md.splitlines()[2]  # the row without a bundle
    assert "<td>gen_ft-0123abcd4567</td>" in files[5].read_text()
    row = next(r for r in csv.DictReader(io.StringIO(files[1].read_text())) if r["strategy"] == "Ft-Gen")
    assert row["model_card"] == "../models/gen_ft-0123abcd4567/README.md"
    with Tracker.open(store, run_name="x", tags={mn.TAG_KIND: mn.KIND_STRATEGY, mn.TAG_STRATEGY: "gen_ft",
                                                   mn.TAG_EVAL_SPLIT: "test", mn.TAG_BUNDLE: str(bundle)}) as tr:
        tr.log_metrics({"test/em": 0.3, "test/n_questions": 4.0})
    read = [r for g in load_groups(store) for r in g.rows]
    assert [r.bundle for r in read] == [str(bundle)]

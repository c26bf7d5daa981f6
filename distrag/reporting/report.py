"""Result tables and the report: the paper-style comparison of strategies by quality and cost.

Rows are :class:`~distrag.reporting.results.StrategyResult` s of ONE comparison group
(:mod:`distrag.reporting.groups`), fresh from a run or read back from MLflow
(:mod:`distrag.reporting.tracking`). One column list (:data:`distrag.reporting.columns.COLUMNS`) makes the
terminal table, ``table.md``, ``table.csv`` and the table of ``report.html``; the report adds the plots
(:mod:`distrag.reporting.plots`: ``em_vs_flops.png``, ``em_vs_device_hours.png``, ``cost_by_phase.png``)
to ``report.html``, one self-contained page with the table and the plots (:mod:`distrag.reporting.html_page`).
Each group has one MLflow run of kind ``report`` (tag ``distrag.group``), found again and updated in place
by every later report of that group.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from distrag.reporting.columns import csv_text, markdown_table, result_rows, table_caption, table_columns
from distrag.reporting.comparison import GroupKey, key_of
from distrag.reporting.escaping import md_text, rich_text
from distrag.reporting.groups import GroupSelection, describe_groups, other_groups_note
from distrag.reporting.results import StrategyResult
from distrag.reporting.tracking import load_group, load_groups, open_report_run
from distrag.strategies import BY_KEY

if TYPE_CHECKING:
    from distrag.config import TrackingConfig


def print_results(results: Sequence[StrategyResult], *, title: str = "Results", console=None) -> None:
    """The table on the terminal (rich), caption included. Every text (``title`` too) is shown as written:
    rich markup or an emoji code in a label, a dataset or a model name is text (:func:`rich_text`)."""
    from rich.console import Console
    from rich.table import Table

    from distrag.logging_setup import is_interactive

    rows = result_rows(results)
    # a log file (every SLURM job) gets the table at its natural width: nothing cut to fit 80 columns
    console = console or Console(width=max(Console().width, 150) if is_interactive() else 1000)
    caption = table_caption(rows)
    t = Table(title=rich_text(title, "table.title"), title_justify="left",
              caption=rich_text(caption, "table.caption") if caption else None, caption_justify="left")
    cols = table_columns(rows)
    for column, header in cols:
        t.add_column(rich_text(header), justify=column.align)
    for r in rows:
        t.add_row(*[rich_text(column.cell(r, terminal=True)) for column, _ in cols])
    console.print(t)


# ----------------------------------------------------------------------------------------------
# report files: table.md, table.csv, the plots, report.html

REPORT_FILES = ("table.md", "table.csv", "em_vs_flops.png", "em_vs_device_hours.png", "cost_by_phase.png",
                "report.html")
"""What a report writes, in this order (and attaches to the group's report run under ``report/``)."""


def report_heading(key: GroupKey | None, results: Sequence[StrategyResult], why: str = "") -> tuple[str, list[str]]:
    """Title and lines under it: what the rows share (the group) and where they come from."""
    if key is None:
        return "distrag report", []
    title = f"distrag report: {key.dataset or '?'}, {key.eval_split or '?'} split, k={key.k}"
    meta = [f"Comparison group {key.id}" + (f" ({why})" if why else "") + f": {key.describe()}.",
            f"{len(results)} strategies; runs: " + ", ".join(f"{r.label} {r.run_id}" for r in results if r.run_id)]
    return title, meta


def write_report_files(results: Sequence[StrategyResult], out_dir: Path, *, title: str = "distrag report",
                       meta: Sequence[str] = ()) -> list[Path]:
    """``REPORT_FILES`` for ``results`` (one comparison group) under ``out_dir``; returns their paths."""
    from distrag.atomic_io import atomic_write_text
    from distrag.reporting.html_page import Plot, report_page
    from distrag.reporting.plots import cost_by_phase_figure, em_vs_cost_figure, save_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / name for name in REPORT_FILES]
    rows = result_rows(results)
    for r in rows:  # each row's model card, from the report's folder (the card links back: serving/model_card.py)
        if r.get("model_card"):
            r["model_card"] = os.path.relpath(r["model_card"], out_dir)
    caption = table_caption(rows)
    atomic_write_text(files[0], markdown_table(rows) + (f"\n{md_text(caption)}\n" if caption else "")
                      + "".join(f"\n{md_text(line)}\n" for line in meta))
    atomic_write_text(files[1], csv_text(rows))
    plots = [
        Plot("EM vs training FLOPs", save_png(em_vs_cost_figure(
            rows, "train_flops", xlabel="training FLOPs", title="Quality vs training compute"), files[2]),
            "EM with its 95% Wilson interval against the FLOPs spent training (a row that trains nothing is the "
            "dashed band)."),
        Plot("EM vs device-hours", save_png(em_vs_cost_figure(
            rows, "device_hours", xlabel="device-hours (whole run)", title="Quality vs device time"), files[3]),
            "EM with its 95% Wilson interval against the device-hours of the whole run (index, training, "
            "evaluation; every device of a distributed run, its index rank included)."),
        Plot("Cost by phase", save_png(cost_by_phase_figure([(r.label, r.costs) for r in results]), files[4]),
             "FLOPs and device-hours of each ledger phase of each strategy (log scales)."),
    ]
    cols = table_columns(rows)
    atomic_write_text(files[5], report_page(
        title=title, meta=meta, headers=[h for _, h in cols],
        cells=[[c.cell(r, terminal=True) for c, _ in cols] for r in rows],
        numeric=[c.align == "right" for c, _ in cols], caption=caption, figures=plots))
    return files


def _group_key(results: Sequence[StrategyResult]) -> GroupKey | None:
    keys = {key_of(r) for r in results}
    if len(keys) > 1:
        raise ValueError(f"a report shows one comparison group; these results span {len(keys)}: "
                         + "; ".join(k.describe() for k in keys))
    return next(iter(keys), None)


def write_report_for_results(results: Sequence[StrategyResult], out_dir: Path, *, tracking_cfg=None,
                             why: str = "") -> Path:
    """Report files for ``results`` (one comparison group) in ``out_dir``, attached (tracking on) to the
    group's report run in ``tracking_cfg``'s experiment: the same run every time, its files replaced."""
    key = _group_key(results)
    title, meta = report_heading(key, results, why)
    files = write_report_files(results, out_dir, title=title, meta=meta)
    if key is not None and tracking_cfg is not None and tracking_cfg.enabled:
        with open_report_run(tracking_cfg, key) as tr:
            for f in files:
                tr.log_artifact(f, "report")
    return Path(out_dir)


def groups_text(tracking_cfg: TrackingConfig) -> str:
    """``--list-groups``: every comparison group recorded, newest first."""
    groups = load_groups(tracking_cfg)
    if not groups:
        return f"no finished strategy runs in MLflow experiment '{tracking_cfg.experiment}'"
    return (f"Comparison groups in MLflow experiment '{tracking_cfg.experiment}' (id, strategies, newest run, "
            f"dataset, split, k, models, settings hash), newest first:\n{describe_groups(groups)}")


def write_report(tracking_cfg: TrackingConfig, out_dir: Path, selection: GroupSelection | None = None) -> Path | None:
    """`distrag report`: the table, plots and page of one comparison group recorded in MLflow (the one
    ``selection`` picks, by default the newest complete group); with ``selection.list_groups`` the groups
    are listed instead (returns None)."""
    if selection is not None and selection.list_groups:
        print(groups_text(tracking_cfg))
        return None
    loaded = load_group(tracking_cfg, selection)
    g = loaded.group
    print_results(g.rows, title=f"Comparison group {g.id} ({loaded.why}) in MLflow experiment "
                                f"'{tracking_cfg.experiment}': {g.key.describe()}")
    note = other_groups_note(loaded.groups, g)
    if note:
        print(note)
    if not g.complete:
        print("missing from this group: " + ", ".join(BY_KEY[k].label for k in g.missing))
    return write_report_for_results(g.rows, out_dir, tracking_cfg=tracking_cfg, why=loaded.why)

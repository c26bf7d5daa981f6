"""Result tables and the report: the paper-style comparison of strategies by quality and cost.

Rows are :class:`~distrag.reporting.results.StrategyResult` s of ONE comparison group
(:mod:`distrag.reporting.groups`), fresh from a run or read back from MLflow
(:mod:`distrag.reporting.tracking`). The same column list makes
the terminal table, ``table.md`` and ``table.csv``; the report adds the plots (:mod:`distrag.reporting.plots`:
``em_vs_flops.png``, ``em_vs_device_hours.png``, ``cost_by_phase.png``) and ``report.html``, one
self-contained page with the table and the plots (:mod:`distrag.reporting.html_page`). Each group has
one MLflow run of kind ``report`` (tag ``distrag.group``), found again and updated in place by every
later report of that group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from distrag import metric_names as mn
from distrag.reporting.comparison import GroupKey, key_of
from distrag.reporting.groups import GroupSelection, describe_groups, other_groups_note
from distrag.reporting.results import StrategyResult
from distrag.reporting.tracking import load_group, load_groups, open_report_run
from distrag.strategies import BY_KEY

if TYPE_CHECKING:
    from distrag.config import TrackingConfig


def fmt_flops(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def em_interval(em: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson 95 % interval of an exact-match rate ``em`` (a fraction) measured on ``n`` questions: whether
    two rows differ beyond noise. (0, 1) when nothing was scored."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    mid = (em + z * z / (2 * n)) / denom
    half = z * math.sqrt(em * (1 - em) / n + z * z / (4 * n * n)) / denom
    return max(0.0, mid - half), min(1.0, mid + half)


def _at_k(metrics: dict[str, float], name: str) -> tuple[float | None, int | None]:
    """(value, k) of an at-k metric: its k-free name (``recall``), else ``<name>_at_<k>`` (runs recorded
    before the k-free names); (None, None) when not measured."""
    for key, v in metrics.items():
        head, _, tail = key.rpartition("_at_")
        if head == name and tail.isdigit():
            return metrics.get(name, v), int(tail)
    return metrics.get(name), None


def result_rows(results: Sequence[StrategyResult]) -> list[dict]:
    """Flatten results into table rows with the columns people compare (quality in %)."""
    rows = []
    for r in results:
        m, c = r.metrics, r.costs
        pct, k = {}, r.k
        for name in mn.AT_K_METRICS:
            v, at = _at_k(m, name)
            pct[name] = None if v is None else 100 * v
            k = k or at
        n = int(m.get("n_questions", 0))
        lo, hi = em_interval(m.get("em", 0.0), n)
        blocked = r.extra.get(mn.INDEX_BLOCKED_SHARE)
        rows.append({
            "strategy": r.label, "em": 100 * m.get("em", 0.0), "em_ci_low": 100 * lo, "em_ci_high": 100 * hi,
            "f1": 100 * m.get("f1", 0.0), **pct, "k": k,
            "passage_vectors": r.passage_vectors or None, "decoding": r.decoding or None,
            "train_flops": c.get(mn.COST_TRAIN_FLOPS, 0.0),
            "total_flops": c.get(mn.COST_TOTAL_FLOPS, 0.0),
            "wall_s": c.get(mn.COST_WALL_S, r.seconds),
            "device_hours": c.get(mn.COST_DEVICE_HOURS),
            "trainable_params": c.get(mn.COST_TRAINABLE_PARAMS),
            "peak_rss_gb": c.get(mn.COST_PEAK_RSS_GB),
            "peak_device_gb": c.get(mn.COST_PEAK_DEVICE_GB),
            "staleness": r.extra.get(mn.INDEX_STALENESS_MEAN),
            "blocked_share": None if blocked is None else 100 * blocked,
            "search_flops": r.search_flops,
            "n": n,
            "run_id": r.run_id,
        })
    return rows


# One column list for the terminal table, table.md and table.csv: (row key, header; {k} is the eval k).
_COLUMNS = [("strategy", "Strategy"), ("em", "EM"), ("em_ci", "EM 95% CI"), ("f1", "F1"),
            ("recall", "Recall@{k}"), ("recall_all", "Recall-all@{k}"), ("answer_recall", "Answer recall@{k}"),
            ("passage_vectors", "Passages"), ("train_flops", "Train FLOPs"), ("total_flops", "Total FLOPs"),
            ("wall_s", "Wall-clock (s)"), ("device_hours", "Device-hours"), ("trainable_params", "Trainable params"),
            ("peak_rss_gb", "Peak RSS (GB)"), ("peak_device_gb", "Peak device (GB)"),
            ("staleness", "Index staleness (steps)"), ("blocked_share", "Blocked on index (%)"),
            ("search_flops", "LR-search FLOPs"), ("n", "Questions")]


def _cell(key: str, row: dict, *, terminal: bool) -> str:
    v = row.get(key) if key != "em_ci" else (row["em_ci_low"], row["em_ci_high"])
    if v is None:
        return "-"
    if key == "em_ci":
        return f"{v[0]:.1f}-{v[1]:.1f}"
    if key in ("em", "f1", *mn.AT_K_METRICS, "staleness", "blocked_share"):
        return f"{v:.1f}"
    if key.endswith("flops"):
        return fmt_flops(v) if terminal else f"{v:.3g}"
    if key == "wall_s":
        return f"{v:.0f}"
    if key == "device_hours":
        return f"{v:.4f}"
    if key.startswith("peak_"):
        return f"{v:.2f}"
    if key == "trainable_params":
        return f"{int(v):,}"
    return str(v)


def _columns(rows: list[dict]) -> list[tuple[str, str]]:
    """The columns with a value in some row, headers filled in."""
    k = next((r["k"] for r in rows if r.get("k")), "k")
    shown = [(key, h.format(k=k)) for key, h in _COLUMNS
             if key == "em_ci" or any(r.get(key) is not None for r in rows)]
    return [(key, h) for key, h in shown if key != "search_flops" or any(r.get(key) for r in rows)]


def table_caption(rows: list[dict]) -> str:
    """What every row shares, said once: the decoder and k (rows differ only in training)."""
    parts = []
    for key, what in (("decoding", "decoding"), ("k", "k")):
        values = sorted({str(r[key]) for r in rows if r.get(key) is not None})
        if values:
            parts.append(f"{what}={'/'.join(values)}" + (" (MIXED)" if len(values) > 1 else ""))
    text = "All rows evaluated with " + ", ".join(parts) if parts else ""
    if any(r.get("recall") is not None for r in rows):
        text += ("; Recall@k = mean share of each question's gold passages in the top k, Recall-all@k = share of "
                 "questions with all of them")
    if any(r.get("passage_vectors") for r in rows):
        text += "; Passages: base = the base encoder's vectors, re-embedded = the corpus re-encoded after training"
    return text + "." if text else ""


def print_results(results: Sequence[StrategyResult], *, title: str = "Results", console=None) -> None:
    """The table on the terminal (rich), caption included."""
    from rich.console import Console
    from rich.table import Table

    from distrag.logging_setup import is_interactive

    rows = result_rows(results)
    # a log file (every SLURM job) gets the table at its natural width: nothing cut to fit 80 columns
    console = console or Console(width=max(Console().width, 150) if is_interactive() else 1000)
    t = Table(title=title, title_justify="left", caption=table_caption(rows) or None, caption_justify="left")
    cols = _columns(rows)
    for key, header in cols:
        t.add_column(header, justify="left" if key in ("strategy", "passage_vectors") else "right")
    for r in rows:
        t.add_row(*[_cell(key, r, terminal=True) for key, _ in cols])
    console.print(t)


# ----------------------------------------------------------------------------------------------
# report files: table.md, table.csv, the plots, report.html

REPORT_FILES = ("table.md", "table.csv", "em_vs_flops.png", "em_vs_device_hours.png", "cost_by_phase.png",
                "report.html")
"""What a report writes, in this order (and attaches to the group's report run under ``report/``)."""


def markdown_table(rows: list[dict]) -> str:
    cols = _columns(rows)
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(k, r, terminal=False) for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    import csv
    import io

    from distrag.atomic_io import atomic_write_text

    keys = [k for k, _ in _COLUMNS if k != "em_ci"] + ["em_ci_low", "em_ci_high", "k", "decoding", "run_id"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in keys})
    atomic_write_text(path, buf.getvalue())


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
    caption = table_caption(rows)
    atomic_write_text(files[0], markdown_table(rows) + (f"\n{caption}\n" if caption else "")
                      + "".join(f"\n{line}\n" for line in meta))
    write_csv(rows, files[1])
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
    cols = _columns(rows)
    atomic_write_text(files[5], report_page(
        title=title, meta=meta, headers=[h for _, h in cols],
        cells=[[_cell(k, r, terminal=True) for k, _ in cols] for r in rows],
        numeric=[k not in ("strategy", "passage_vectors") for k, _ in cols], caption=caption, figures=plots))
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

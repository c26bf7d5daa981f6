"""Result tables: the paper-style comparison of strategies by quality and cost.

Rows are :class:`~distrag.reporting.results.StrategyResult` s, fresh from a run or read back from
MLflow; the same functions print the terminal table and write ``table.md``, ``table.csv``,
``em_vs_flops.png`` and ``cost_by_phase.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from distrag import metric_names as mn
from distrag.reporting.results import StrategyResult, load_runs


def fmt_flops(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def result_rows(results: Sequence[StrategyResult]) -> list[dict]:
    """Flatten results into table rows with the columns people compare."""
    rows = []
    for r in results:
        m, c = r.metrics, r.costs
        k_rec = next((k for k in m if k.startswith("recall_at_")), None)
        k_ans = next((k for k in m if k.startswith("answer_recall_at_")), None)
        rows.append({
            "strategy": r.label,
            "em": 100 * m.get("em", 0.0),
            "f1": 100 * m.get("f1", 0.0),
            "recall": 100 * m[k_rec] if k_rec else None,
            "recall_name": (k_rec or "recall_at_k").replace("_at_", "@"),
            "answer_recall": 100 * m[k_ans] if k_ans else None,
            "answer_recall_name": (k_ans or "answer_recall_at_k").replace("_at_", "@"),
            "train_flops": c.get(mn.COST_TRAIN_FLOPS, 0.0),
            "total_flops": c.get(mn.COST_TOTAL_FLOPS, 0.0),
            "wall_s": c.get(mn.COST_WALL_S, r.seconds),
            "device_hours": c.get(mn.COST_DEVICE_HOURS),
            "trainable_params": c.get(mn.COST_TRAINABLE_PARAMS),
            "search_flops": r.search_flops,
            "n": int(m.get("n_questions", 0)),
            "run_id": r.run_id,
        })
    return rows


def print_results(results: Sequence[StrategyResult], *, title: str = "Results", console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = result_rows(results)
    console = console or Console(width=max(Console().width, 150))
    t = Table(title=title, title_justify="left")
    rec_name = next((r["recall_name"] for r in rows if r["recall"] is not None), "recall@k")
    ans_name = next((r["answer_recall_name"] for r in rows if r["answer_recall"] is not None), "answer_recall@k")
    for col, just in (("Strategy", "left"), ("EM", "right"), ("F1", "right"), (rec_name.capitalize(), "right"),
                      (ans_name, "right"), ("Train FLOPs", "right"), ("Total FLOPs", "right"),
                      ("Wall-clock", "right"), ("Questions", "right")):
        t.add_column(col, justify=just)
    show_search = any(r["search_flops"] for r in rows)
    if show_search:
        t.add_column("Search FLOPs", justify="right")
    for r in rows:
        cells = [r["strategy"], f"{r['em']:.1f}", f"{r['f1']:.1f}",
                 "-" if r["recall"] is None else f"{r['recall']:.1f}",
                 "-" if r["answer_recall"] is None else f"{r['answer_recall']:.1f}",
                 fmt_flops(r["train_flops"]), fmt_flops(r["total_flops"]), f"{r['wall_s']:.0f} s", str(r["n"])]
        if show_search:
            cells.append(fmt_flops(r["search_flops"]))
        t.add_row(*cells)
    console.print(t)


# ----------------------------------------------------------------------------------------------
# report files: table.md, table.csv, em_vs_flops.png, cost_by_phase.png

_COLUMNS = [("strategy", "Strategy"), ("em", "EM"), ("f1", "F1"), ("recall", "Recall@k"),
            ("answer_recall", "Answer recall@k"), ("train_flops", "Train FLOPs"),
            ("total_flops", "Total FLOPs"), ("wall_s", "Wall-clock (s)"), ("device_hours", "Device-hours"),
            ("trainable_params", "Trainable params"), ("search_flops", "LR-search FLOPs"), ("n", "Questions")]


def _fmt_cell(key: str, v) -> str:
    if v is None:
        return "-"
    if key in ("em", "f1", "recall", "answer_recall"):
        return f"{v:.1f}"
    if key.endswith("flops"):
        return f"{v:.3g}"
    if key == "wall_s":
        return f"{v:.0f}"
    if key == "device_hours":
        return f"{v:.4f}"
    if key == "trainable_params":
        return f"{int(v):,}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    cols = [(k, h) for k, h in _COLUMNS if any(r.get(k) is not None for r in rows)]
    rec = next((r["recall_name"] for r in rows if r.get("recall") is not None), None)
    ans = next((r["answer_recall_name"] for r in rows if r.get("answer_recall") is not None), None)
    head = [h.replace("Recall@k", rec.capitalize() if rec else "Recall@k")
             .replace("Answer recall@k", ans or "Answer recall@k") for _, h in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt_cell(k, r.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    import csv
    import io

    from distrag.atomic_io import atomic_write_text

    keys = [k for k, _ in _COLUMNS] + ["run_id"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in keys})
    atomic_write_text(path, buf.getvalue())


def plot_em_vs_flops(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for i, r in enumerate(rows):
        x = max(r["train_flops"] or 0.0, 1.0)
        ax.scatter(x, r["em"], s=60, zorder=3)
        # staggered labels: strategies often land on the same spot
        ax.annotate(r["strategy"], (x, r["em"]), textcoords="offset points", xytext=(-8, 6 - 11 * (i % 3)),
                    ha="right", fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (log scale; No-FT drawn at 1)")
    ax.set_ylabel("EM (%)")
    ax.set_title("Quality vs training compute")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    _save_fig(fig, path)


def plot_cost_by_phase(results_costs: list[tuple[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases: list[str] = []
    for _, c in results_costs:
        for p in mn.phase_values(c):
            if p not in phases:
                phases.append(p)
    fig, ax = plt.subplots(figsize=(7.2, 4.2), dpi=120)
    bottom = [0.0] * len(results_costs)
    labels = [lab for lab, _ in results_costs]
    for p in phases:
        vals = [mn.phase_values(c).get(p, 0.0) for _, c in results_costs]
        ax.bar(labels, vals, bottom=bottom, label=p)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("FLOPs")
    ax.set_title("Cost per strategy, stacked by phase")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    from distrag.atomic_io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_report_files(rows: list[dict], results_costs: list[tuple[str, dict]], out_dir: Path) -> list[Path]:
    from distrag.atomic_io import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "table.md", out_dir / "table.csv", out_dir / "em_vs_flops.png", out_dir / "cost_by_phase.png"]
    atomic_write_text(files[0], markdown_table(rows))
    write_csv(rows, files[1])
    plot_em_vs_flops(rows, files[2])
    plot_cost_by_phase(results_costs, files[3])
    return files


def write_report_for_results(results: Sequence[StrategyResult], out_dir: Path, *, tracking_cfg=None,
                             tracker=None) -> Path:
    """Report files for ``results``, attached to ``tracker``'s run, or else (tracking on) to a new MLflow
    run of kind ``report`` in ``tracking_cfg``'s experiment."""
    files = write_report_files(result_rows(results), [(r.label, r.costs) for r in results], out_dir)
    if tracker is None and tracking_cfg is not None and tracking_cfg.enabled:
        from distrag.reporting.tracking import Tracker

        with Tracker.open(tracking_cfg, run_name="report", tags={mn.TAG_KIND: mn.KIND_REPORT}) as tr:
            for f in files:
                tr.log_artifact(f, "report")
    elif tracker is not None:
        for f in files:
            tracker.log_artifact(f, "report")
    return Path(out_dir)


def write_report(tracking_cfg, out_dir: Path) -> Path:
    """`distrag report`: the paper-style table and plots from the runs recorded in MLflow."""
    runs = load_runs(tracking_cfg)
    if not runs:
        raise ValueError(f"experiment {tracking_cfg.experiment!r} has no finished strategy runs yet")
    print_results(runs, title=f"Strategies recorded in MLflow experiment '{tracking_cfg.experiment}'")
    return write_report_for_results(runs, out_dir, tracking_cfg=tracking_cfg)

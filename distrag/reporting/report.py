"""Result tables: the paper-style comparison of strategies by quality and cost.

Rows are :class:`~distrag.reporting.results.StrategyResult` s, fresh from a run or read back from
MLflow; the same functions print the terminal table and write ``table.md``, ``table.csv``,
``em_vs_flops.png`` and ``cost_by_phase.png``.
"""

from __future__ import annotations

import math
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


def em_interval(em: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson 95 % interval of an exact-match rate ``em`` (a fraction) measured on ``n`` questions: whether
    two rows differ beyond noise. (0, 1) when nothing was scored."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    mid = (em + z * z / (2 * n)) / denom
    half = z * math.sqrt(em * (1 - em) / n + z * z / (4 * n * n)) / denom
    return max(0.0, mid - half), min(1.0, mid + half)


def _metric_at(metrics: dict[str, float], prefix: str) -> tuple[float | None, int | None]:
    """(value, k) of the metric named ``<prefix><k>`` (e.g. recall_at_5), or (None, None)."""
    for name, v in metrics.items():
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return v, int(name[len(prefix):])
    return None, None


def result_rows(results: Sequence[StrategyResult]) -> list[dict]:
    """Flatten results into table rows with the columns people compare (quality in %)."""
    rows = []
    for r in results:
        m, c = r.metrics, r.costs
        pct, k = {}, r.k
        for key, prefix in (("recall", "recall_at_"), ("recall_all", "recall_all_at_"),
                            ("answer_recall", "answer_recall_at_")):
            v, at = _metric_at(m, prefix)
            pct[key] = None if v is None else 100 * v
            k = k or at
        n = int(m.get("n_questions", 0))
        lo, hi = em_interval(m.get("em", 0.0), n)
        rows.append({
            "strategy": r.label, "em": 100 * m.get("em", 0.0), "em_ci_low": 100 * lo, "em_ci_high": 100 * hi,
            "f1": 100 * m.get("f1", 0.0), **pct, "k": k,
            "passage_vectors": r.passage_vectors or None, "decoding": r.decoding or None,
            "train_flops": c.get(mn.COST_TRAIN_FLOPS, 0.0),
            "total_flops": c.get(mn.COST_TOTAL_FLOPS, 0.0),
            "wall_s": c.get(mn.COST_WALL_S, r.seconds),
            "device_hours": c.get(mn.COST_DEVICE_HOURS),
            "trainable_params": c.get(mn.COST_TRAINABLE_PARAMS),
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
            ("search_flops", "LR-search FLOPs"), ("n", "Questions")]


def _cell(key: str, row: dict, *, terminal: bool) -> str:
    v = row.get(key) if key != "em_ci" else (row["em_ci_low"], row["em_ci_high"])
    if v is None:
        return "-"
    if key == "em_ci":
        return f"{v[0]:.1f}-{v[1]:.1f}"
    if key in ("em", "f1", "recall", "recall_all", "answer_recall"):
        return f"{v:.1f}"
    if key.endswith("flops"):
        return fmt_flops(v) if terminal else f"{v:.3g}"
    if key == "wall_s":
        return f"{v:.0f}"
    if key == "device_hours":
        return f"{v:.4f}"
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
    from rich.console import Console
    from rich.table import Table

    rows = result_rows(results)
    console = console or Console(width=max(Console().width, 150))
    t = Table(title=title, title_justify="left", caption=table_caption(rows) or None, caption_justify="left")
    cols = _columns(rows)
    for key, header in cols:
        t.add_column(header, justify="left" if key in ("strategy", "passage_vectors") else "right")
    for r in rows:
        t.add_row(*[_cell(key, r, terminal=True) for key, _ in cols])
    console.print(t)


# ----------------------------------------------------------------------------------------------
# report files: table.md, table.csv, em_vs_flops.png, cost_by_phase.png


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
    caption = table_caption(rows)
    atomic_write_text(files[0], markdown_table(rows) + (f"\n{caption}\n" if caption else ""))
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

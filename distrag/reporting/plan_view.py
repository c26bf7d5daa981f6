"""``distrag plan`` on the terminal and on disk: the projection table (rich) and the plot (search device-hours
and memory per device of every strategy), from a :class:`~distrag.costs.plan.Plan`. The command's flags,
and the :class:`~distrag.costs.plan.PlanTarget` they make, are :mod:`distrag.cli`'s."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from distrag.reporting.escaping import mpl_text, rich_text
from distrag.reporting.plots import _colors, _plain_text, _pyplot, save_png

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from distrag.costs.plan import Plan, PlanTarget


def plan_heading(p: Plan) -> str:
    """What was projected, in one paragraph."""
    t = p.target
    m, n = t.grid
    return (f"{t.generator} ({'QLoRA' if t.qlora else 'LoRA'} r={t.lora_r}) + {t.embedder}; corpus {t.corpus:,} "
            f"passages, {t.questions:,} questions x {t.epochs:g} epoch(s), k={t.k}, {t.batch_size} questions/step; "
            f"LR grid {m} x {n}; {t.n_gpus} x {p.gpu.name} ({p.gpu.peak_flops / 1e12:.0f} TFLOP/s bf16 each) at "
            f"MFU {t.mfu:.2f}; index refresh every {t.refresh_every or '-'} steps")


def plan_rows(p: Plan) -> list[list[str]]:
    """The table's cells, one row per strategy."""
    out = []
    for r in p.rows:
        out.append([r.label, str(r.runs), f"{r.train_flops:.3g}", f"{r.search_flops:.3g}",
                    f"{r.wall_h:,.1f}", f"{r.device_hours:,.1f}",
                    f"{r.memory_gb:.1f}" + ("" if r.fits else f" (> {p.gpu.memory_gb:g})")])
    return out


HEADERS = ["Strategy", "LR-search runs", "FLOPs / run", "Search FLOPs", "Search wall-clock (h)",
           "Search device-hours", "Memory / device (GB)"]


def index_line(p: Plan) -> str:
    """The index rank's sizing."""
    t = p.target
    staleness = t.staleness or t.refresh_every
    if not staleness:
        return (f"Index: {t.corpus:,} passages, {p.index_memory_gb:.1f} GB of flat float32 vectors; passage vectors "
                f"frozen (no refresh). One GPU encodes {p.passages_per_s_per_gpu:,.0f} passages/s.")
    fits = p.index_gpus < t.n_gpus
    pool = (f"recommended distributed.index_ranks: {p.index_gpus} (the other {t.n_gpus - p.index_gpus} GPU(s) "
            "train)" if fits else f"{p.index_gpus} index GPU(s) needed, more than this job's {t.n_gpus} leave for "
            "training: relax the staleness target or add GPUs")
    return (f"Index ranks: a joint step takes {p.step_s:.2f} s; a staleness of {staleness} steps needs the corpus "
            f"re-embedded in {staleness * p.step_s:,.0f} s = {p.passages_per_s_needed:,.0f} passages/s; one "
            f"{p.gpu.name} encodes {p.passages_per_s_per_gpu:,.0f}/s -> {pool}; {p.index_memory_gb:.1f} GB of flat "
            "float32 vectors. What staleness costs in recall: index/staleness_recall_gap of a run (README).")


def print_plan(p: Plan, console=None) -> None:
    """The projection as a rich table, with what was assumed and the index rank's sizing."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=150)
    t = Table(title="distrag plan", title_justify="left", caption=rich_text(plan_heading(p), "table.caption"),
              caption_justify="left")
    for h in HEADERS:
        t.add_column(h, justify="left" if h == "Strategy" else "right")
    for cells in plan_rows(p):
        t.add_row(*map(rich_text, cells))
    console.print(t)
    console.print(index_line(p))


@_plain_text
def plan_figure(p: Plan) -> Figure:
    """Two panels: each strategy's search device-hours (log scale) and its memory per device against the
    GPU's memory."""
    plt = _pyplot()
    rows = [r for r in p.rows if r.runs]
    colors = _colors(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [mpl_text(r.label) for r in rows]
    a.barh(labels, [max(r.device_hours, 1e-6) for r in rows], color=colors)
    a.set_xscale("log")
    a.set_xlabel(mpl_text(f"device-hours of the LR search ({p.target.n_gpus} x {p.gpu.name}, MFU {p.target.mfu:.2f})"))
    a.invert_yaxis()
    b.barh(labels, [r.memory_gb for r in rows], color=colors)
    b.axvline(p.gpu.memory_gb, color="black", linestyle="--", linewidth=1)
    b.text(p.gpu.memory_gb, -0.6, f" {p.gpu.name} {p.gpu.memory_gb:g} GB", fontsize=8, va="bottom")
    b.set_xlabel("memory per trainer device (GB)")
    b.invert_yaxis()
    fig.suptitle(mpl_text(f"distrag plan: {p.target.generator} + {p.target.embedder}"), fontsize=10)
    fig.tight_layout()
    return fig


def write_plan_plot(p: Plan, path: Path) -> Path:
    """:func:`plan_figure` as a PNG at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(plan_figure(p), path)
    return path


def run_plan(target: PlanTarget, plot: Path) -> Path:
    """``distrag plan``: project ``target``, print the projection and write its plot to ``plot``."""
    from distrag.costs.plan import plan

    p = plan(target)
    print_plan(p)
    out = write_plan_plot(p, plot)
    print(f"plot: {out}")
    return out

"""The report's plots: EM (with its 95 % interval) against a cost, and cost by phase per strategy.

Costs of a comparison span orders of magnitude (a No-FT evaluation next to a joint run on a real model),
so every cost axis is logarithmic. Strategies often land on the same spot, so point labels are placed by
:func:`place_labels`: each label takes the first of a ring of offsets around its point whose text box
stays inside the axes and overlaps no other label, point or legend (a thin leader line joins a label
placed away from its point). Rows come from :func:`distrag.reporting.columns.result_rows`.

Labels come from recorded runs, so any string can arrive: every data-derived text is drawn as written
(:func:`distrag.reporting.escaping.mpl_text`: no mathtext), legend entries are named explicitly (a label starting
with ``_`` is not dropped), and the figures are made and saved with ``text.usetex`` off (:func:`_plain_text`),
whatever a matplotlibrc says: no TeX run that a ``%`` or ``_`` would break, or that may not be installed.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from distrag import metric_names as mn
from distrag.reporting.columns import fmt_flops
from distrag.reporting.escaping import mpl_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.text import Annotation
    from matplotlib.transforms import Bbox

_RADII = (9, 16, 24, 34, 46, 60, 76, 94)
_ANGLES = (35, -35, 145, -145, 90, -90, 0, 180, 60, -60, 120, -120)
_CANDIDATES = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for r in _RADII for a in _ANGLES]
"""Label offsets tried around a point (points), nearest first."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def _no_tex() -> Iterator[None]:
    """matplotlib's settings while a plot is made or saved: text drawn by matplotlib itself, never by TeX."""
    import matplotlib

    with matplotlib.rc_context({"text.usetex": False}):
        yield


def _plain_text(fn: Callable) -> Callable:
    """``fn`` (a figure's maker or saver) run under :func:`_no_tex`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _no_tex():
            return fn(*args, **kwargs)

    return wrapper


def _colors(n: int) -> list:
    cmap = _pyplot().get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def place_labels(ax: Axes, points: Sequence[tuple[float, float]], labels: Sequence[str], *,
                 obstacles: Sequence[Bbox] = (), fontsize: float = 8.0) -> list[Annotation]:
    """Annotate each point with its label where the label's box (display coordinates) lies inside the
    axes and overlaps neither another label, nor a point, nor ``obstacles``. Call it once the axes'
    limits and the figure's layout are final. A label with no free spot takes its first candidate."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    area = ax.get_window_extent(renderer)
    r = 5 * fig.dpi / 72  # a marker's half-size, in pixels
    taken = list(obstacles)
    for x, y in points:
        px, py = ax.transData.transform((x, y))
        taken.append(Bbox.from_extents(px - r, py - r, px + r, py + r))
    placed = []
    for (x, y), text in zip(points, labels):
        for dx, dy in _CANDIDATES:
            far = math.hypot(dx, dy) > 15
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                              ha="left" if dx > 1 else "right" if dx < -1 else "center",
                              va="bottom" if dy > 1 else "top" if dy < -1 else "center",
                              arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 0,
                                          "shrinkB": 4} if far else None)
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer).padded(2)  # the text alone, not its leader line
            inside = area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0 and box.y1 <= area.y1
            if inside and not any(box.overlaps(t) for t in taken):
                break
            ann.remove()
        else:  # nowhere free: keep the nearest spot rather than drop the label
            ann = ax.annotate(text, (x, y), xytext=_CANDIDATES[0], textcoords="offset points", fontsize=fontsize)
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer)
        taken.append(box)
        placed.append(ann)
    return placed


@_plain_text
def em_vs_cost_figure(rows: Sequence[dict], x_key: str, *, xlabel: str, title: str) -> Figure:
    """EM (%) with its 95 % interval against ``row[x_key]`` on a log axis. Rows without that cost (No-FT's
    training FLOPs) are drawn as a horizontal band (EM and interval) named in the legend."""
    from matplotlib.ticker import NullFormatter

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=120)
    colors = dict(zip([r["strategy"] for r in rows], _colors(len(rows))))
    pts = [r for r in rows if (r.get(x_key) or 0.0) > 0.0]
    flat = [r for r in rows if r not in pts]
    for r in pts:
        ax.errorbar(r[x_key], r["em"], yerr=[[r["em"] - r["em_ci_low"]], [r["em_ci_high"] - r["em"]]], fmt="o",
                    ms=6, capsize=3, lw=1.2, color=colors[r["strategy"]], zorder=3)
    bands, names = [], []
    for r in flat:
        c = colors[r["strategy"]]
        bands.append(ax.axhline(r["em"], ls="--", lw=1.0, color=c))
        names.append(mpl_text(f"{r['strategy']} (no {xlabel}): EM {r['em']:.1f}, band: 95% interval"))
        ax.axhspan(r["em_ci_low"], r["em_ci_high"], color=c, alpha=0.12, lw=0)
    lows = [r["em_ci_low"] for r in rows] or [0.0]
    highs = [r["em_ci_high"] for r in rows] or [100.0]
    pad = max(4.0, 0.15 * (max(highs) - min(lows)))
    ax.set_ylim(max(-1.0, min(lows) - pad), min(101.0, max(highs) + pad))
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels collide on short ranges
    if pts:
        xs = [r[x_key] for r in pts]
        lo, hi = min(xs) / 5, max(xs) * 5
        widen = math.sqrt(max(1.0, 300 * lo / hi))  # at least 2.5 decades, so decade ticks show
        ax.set_xlim(lo / widen, hi * widen)
    else:
        ax.set_xlim(1e-1, 1e1)
        ax.text(0.5, 0.5, "no run recorded this cost", transform=ax.transAxes, ha="center", color="0.4")
    ax.set_xlabel(f"{xlabel} (log scale)")
    ax.set_ylabel("EM (%), 95% Wilson interval")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    # the entries named explicitly: matplotlib leaves out a line whose own label starts with "_"
    legend = ax.legend(bands, names, loc="upper left", fontsize=8, framealpha=0.9) if flat else None
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    obstacles = [legend.get_window_extent(renderer).padded(2)] if legend is not None else []
    place_labels(ax, [(r[x_key], r["em"]) for r in pts], [mpl_text(r["strategy"]) for r in pts], obstacles=obstacles)
    return fig


def _phase_kind(phase: str) -> str:
    if phase == mn.PHASE_INDEX_BUILD:
        return "index build"
    if phase == mn.PHASE_INDEX_REBUILD:
        return "corpus re-embedded"
    if phase == mn.PHASE_INDEX_RANK:
        return "index rank"
    return "evaluation" if phase.startswith("eval_") else "training"


_KIND_COLORS = {"index build": "#8c8c8c", "corpus re-embedded": "#b5b5b5", "index rank": "#6a51a3",
                "training": "#e6550d", "evaluation": "#3182bd"}


def _phase_bars(results_costs: Sequence[tuple[str, dict]]) -> list[tuple[str, str, float, float]]:
    """``(strategy, phase, FLOPs, device-hours)`` per recorded phase (the run's totals when it has none)."""
    bars = []
    for label, costs in results_costs:
        flops, hours = mn.phase_values(costs), mn.phase_values(costs, "device_hours")
        if not flops and not hours:
            flops = {"total": costs.get(mn.COST_TOTAL_FLOPS, 0.0)}
            hours = {"total": costs.get(mn.COST_DEVICE_HOURS, 0.0)}
        for phase in dict.fromkeys([*flops, *hours]):
            bars.append((label, phase, flops.get(phase, 0.0), hours.get(phase, 0.0)))
    return bars


@_plain_text
def cost_by_phase_figure(results_costs: Sequence[tuple[str, dict]]) -> Figure:
    """Per strategy, one bar per ledger phase: FLOPs (left) and device-hours (right), both on log axes,
    coloured by what the phase is (index build, training, re-embedding, index rank, evaluation)."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    bars = _phase_bars(results_costs)
    height = max(3.0, 0.28 * len(bars) + 1.6)  # inches
    fig, axes = plt.subplots(1, 2, figsize=(10.0, height), dpi=120, sharey=True)
    y, ys, prev = 0.0, [], None
    for label, *_ in bars:
        y += 0.6 if prev is not None and label != prev else 0.0  # a gap between strategies
        ys.append(y)
        y, prev = y + 1.0, label
    colors = [_KIND_COLORS[_phase_kind(phase)] for _, phase, _, _ in bars]
    for ax, col, unit, fmt in ((axes[0], 2, "FLOPs", fmt_flops), (axes[1], 3, "device-hours", lambda v: f"{v:.2g}")):
        vals = [b[col] for b in bars]
        shown = [(yy, v, c) for yy, v, c in zip(ys, vals, colors) if v > 0]
        if shown:
            ax.barh([s[0] for s in shown], [s[1] for s in shown], color=[s[2] for s in shown], height=0.8)
            for yy, v, _ in shown:
                ax.text(v * 1.15, yy, fmt(v), va="center", fontsize=7)
            ax.set_xscale("log")
            ax.set_xlim(min(s[1] for s in shown) / 3, max(s[1] for s in shown) * 40)
        ax.set_xlabel(f"{unit} (log scale)")
        ax.grid(True, axis="x", which="major", alpha=0.25)
    axes[0].set_yticks(ys, [mpl_text(f"{label}: {phase}") for label, phase, _, _ in bars], fontsize=8)
    axes[0].set_ylim(ys[-1] + 0.7 if ys else 1.0, -0.7)  # first strategy on top, no empty margin
    kinds = list(dict.fromkeys(_phase_kind(p) for _, p, _, _ in bars))
    fig.suptitle("Cost by phase, per strategy", x=0.5, y=1 - 0.1 / height, va="top", fontsize=11)
    fig.legend([Patch(color=_KIND_COLORS[k]) for k in kinds], kinds, loc="upper center", ncol=len(kinds) or 1,
               fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1 - 0.35 / height))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / height))  # the title and the legend above the panels
    return fig


@_plain_text
def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()


def save_png(fig: Figure, path: Path) -> bytes:
    """Write the figure to ``path`` as PNG (atomically); returns the bytes written."""
    from distrag.atomic_io import atomic_write_bytes

    data = png_bytes(fig)
    atomic_write_bytes(path, data)
    return data

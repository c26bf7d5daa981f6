"""The report's plots: log cost axes, EM intervals, labels that never overlap (measured with matplotlib's own
renderer), a cost-by-phase view per strategy."""

from __future__ import annotations

import itertools

import pytest

from distrag import metric_names as mn
from distrag.reporting.columns import em_interval
from distrag.reporting.plots import cost_by_phase_figure, em_vs_cost_figure, place_labels, png_bytes, save_png
from distrag.strategies import STRATEGIES


def _row(label: str, em: float, train: float, hours: float, n: int = 100) -> dict:
    lo, hi = em_interval(em / 100, n)
    return {"strategy": label, "em": em, "em_ci_low": 100 * lo, "em_ci_high": 100 * hi, "train_flops": train,
            "device_hours": hours}


def _text_boxes(fig):
    """Display-space boxes of every point label (the text alone, not its leader line)."""
    from matplotlib.text import Annotation, Text

    renderer = fig.canvas.get_renderer()
    anns = [c for c in fig.axes[0].get_children() if isinstance(c, Annotation)]
    for a in anns:
        a.update_positions(renderer)
    return anns, [Text.get_window_extent(a, renderer) for a in anns]


@pytest.mark.parametrize("spread", [False, True])
def test_labels_do_not_overlap_even_when_every_strategy_lands_on_one_spot(spread):
    import matplotlib.pyplot as plt

    labels = [s.label for s in STRATEGIES]
    rows = [_row("No-FT", 30.0, 0.0, 0.01)]  # trains nothing: the dashed band, named in the legend
    for i, label in enumerate(labels[1:]):
        train = 1e12 * (10 ** i if spread else 1.0)
        rows.append(_row(label, 30.0 + (i % 2 if spread else 0.0), train, 0.01))
    fig = em_vs_cost_figure(rows, "train_flops", xlabel="training FLOPs", title="t")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_legend() is not None
    anns, boxes = _text_boxes(fig)
    assert sorted(a.get_text() for a in anns) == sorted(labels[1:])
    area = ax.get_window_extent(fig.canvas.get_renderer())
    legend = ax.get_legend().get_window_extent(fig.canvas.get_renderer())
    for (a, ba), (b, bb) in itertools.combinations(zip(anns, boxes), 2):
        assert not ba.overlaps(bb), f"{a.get_text()!r} overlaps {b.get_text()!r}"
    for a, box in zip(anns, boxes):
        assert area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0 and box.y1 <= area.y1, a.get_text()
        assert not box.overlaps(legend), a.get_text()
    # every point carries its 95 % interval: one error bar per trained row
    assert len([c for c in ax.containers if c.has_yerr]) == len(labels) - 1
    plt.close(fig)


def test_device_hours_plot_draws_every_row_as_a_point_on_a_log_axis():
    import matplotlib.pyplot as plt

    rows = [_row("No-FT", 10.0, 0.0, 0.002), _row("RAG-Tok", 12.0, 1e17, 400.0)]
    fig = em_vs_cost_figure(rows, "device_hours", xlabel="device-hours", title="t")
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert ax.get_xscale() == "log" and lo < 0.002 and hi > 400.0 and ax.get_legend() is None
    assert sorted(a.get_text() for a in _text_boxes(fig)[0]) == ["No-FT", "RAG-Tok"]
    plt.close(fig)


def test_place_labels_avoids_obstacles():
    import matplotlib.pyplot as plt
    from matplotlib.transforms import Bbox

    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    fig.canvas.draw()
    px, py = ax.transData.transform((5, 5))
    wall = Bbox.from_extents(px - 200, py, px + 200, py + 200)  # everything above the point is taken
    (ann,) = place_labels(ax, [(5, 5)], ["label"], obstacles=[wall])
    _, (box,) = _text_boxes(fig)
    assert not box.overlaps(wall) and box.y1 <= py
    plt.close(fig)


def _costs(phases: dict[str, float]) -> dict[str, float]:
    out = {}
    for p, f in phases.items():
        out[mn.phase_metric(p)] = f
        out[mn.phase_metric(p, "device_hours")] = f / 1e15
    return out


def test_cost_by_phase_is_one_bar_per_phase_per_strategy_on_log_axes(tmp_path):
    small = _costs({"index_build": 1.5e11, "eval_test": 3e11})
    big = _costs({"index_build": 1.5e11, "joint_token": 2e17, mn.PHASE_INDEX_RANK: 0.0, "eval_test": 3e12})
    big[mn.phase_metric(mn.PHASE_INDEX_RANK, "device_hours")] = 0.5  # device time without FLOPs
    legacy = {mn.COST_TOTAL_FLOPS: 1e12, mn.COST_DEVICE_HOURS: 0.1}  # no phase breakdown recorded
    fig = cost_by_phase_figure([("No-FT", small), ("RAG-Tok", big), ("Old", legacy)])
    flops_ax, hours_ax = fig.axes
    assert flops_ax.get_xscale() == "log" and hours_ax.get_xscale() == "log"
    ticks = [t.get_text() for t in flops_ax.get_yticklabels()]
    assert ticks == ["No-FT: index_build", "No-FT: eval_test", "RAG-Tok: index_build", "RAG-Tok: joint_token",
                     "RAG-Tok: index_rank", "RAG-Tok: eval_test", "Old: total"]
    assert len(flops_ax.patches) == 6 and len(hours_ax.patches) == 7  # a zero has no bar on a log axis
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    boxes = [t.get_window_extent(renderer) for t in flops_ax.get_yticklabels()]
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    data = save_png(fig, tmp_path / "c.png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "c.png").read_bytes() == data


def test_png_bytes_closes_the_figure():
    import matplotlib.pyplot as plt

    fig = em_vs_cost_figure([_row("A", 5.0, 1e9, 1.0)], "train_flops", xlabel="x", title="t")
    n = len(plt.get_fignums())
    assert png_bytes(fig)[:4] == b"\x89PNG" and len(plt.get_fignums()) == n - 1

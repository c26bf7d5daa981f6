"""`distrag sweep`: learning-rate grids per strategy, selected on dev, with the cost of the search.

How a strategy searches comes from its entry in the strategy table (``Strategy.search``, see
distrag/strategies.py; m = len(sweep.lr_embedder), n = len(sweep.lr_generator)):

- ``separate`` (embed_ft: m runs, gen_ft: n, independent: m + n): each phase is searched on its own,
  from the base models, as the one-phase strategy that trains it (independent: Ft-Embed at each
  embedder rate and Ft-Gen at each generator rate); the selected parts are combined and evaluated.
- ``sequential`` (two_phase: n + m): phase 1 at each of its rates; the selected phase-1 models continue
  into phase 2 at each of its rates (order follows ``train.two_phase_order``).
- ``grid`` (joint: m x n): both models train at once, so the rates interact; or 1 run with the rates
  two-phase selected when ``sweep.joint_reuse_two_phase`` (as the paper did; the table's ``rates_from``).

Selection is by dev EM, ties broken by dev F1. Each grid point is an MLflow child run (kind
``sweep_point``) under the strategy's sweep run (kind ``sweep``), which records the search cost
(``sweep/search_flops`` = the index build once + every point's own training and dev evaluation,
``sweep/search_wall_s``, ``sweep/n_points``) and the selected rates; the selected models are then
scored on ``eval_split`` in a run of kind ``strategy`` that ``distrag report`` shows with its search cost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from distrag import metric_names as mn
from distrag.config import ExperimentConfig
from distrag.errors import StrategyError
from distrag.logging_setup import Progress, progress_enabled
from distrag.reporting.results import StrategyResult
from distrag.reporting.tracking import experiment_tags, open_tracker
from distrag.strategies import BY_KEY, STRATEGIES, Phase, Strategy, strategy_of
from distrag.training.experiment import Experiment, Models, combine

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    strategy: str
    points: list[StrategyResult]
    selected: dict[str, float]
    final: StrategyResult
    search_flops: float = 0.0
    search_wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def n_points(self) -> int:
        return len(self.points)


def select(points: list[StrategyResult]) -> StrategyResult:
    """Best grid point on dev: highest EM, ties broken by F1, then by order (first wins)."""
    if not points:
        raise ValueError("nothing to select from")
    return max(points, key=lambda r: (r.metrics.get("em", 0.0), r.metrics.get("f1", 0.0)))


def _with(cfg: ExperimentConfig, **train) -> ExperimentConfig:
    c = cfg.model_copy(deep=True)
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def _swept(cfg: ExperimentConfig, name: str) -> Strategy:
    strategy = strategy_of(_with(cfg, strategy=name))
    if strategy.search == "none":
        swept = ", ".join(dict.fromkeys(s.train_strategy for s in STRATEGIES if s.search != "none"))
        raise StrategyError(f"strategy {name!r} trains nothing, so it has no learning rate to sweep; "
                            f"choose from {swept}")
    return strategy


def grid_size(cfg: ExperimentConfig, strategy: str) -> int:
    """How many training runs the search of ``strategy`` (a ``train.strategy`` value) costs."""
    s = _swept(cfg, strategy)
    if s.rates_from and cfg.sweep.joint_reuse_two_phase:
        return 1
    return s.grid_size(len(cfg.sweep.lr_embedder), len(cfg.sweep.lr_generator))


def _train_strategy(key: str) -> str:
    """The ``train.strategy`` value of the table entry ``key`` (what ``sweep.strategies`` names)."""
    return BY_KEY[key].train_strategy


def _component(phase: Phase) -> Strategy:
    """The one-phase strategy that trains ``phase`` alone (Ft-Embed for independent's encoder phase)."""
    return next(s for s in STRATEGIES if s.table_phases == (phase,))


class Sweeper:
    def __init__(self, exp: Experiment, cfg: ExperimentConfig, progress: Progress | None = None):
        self.exp, self.cfg = exp, cfg
        self.progress = progress or Progress(0, "sweep", enabled=False)  # over every strategy's grid points
        self.selected_rates: dict[str, dict[str, float]] = {}

    def _points(self, cfgs: list[tuple[str, ExperimentConfig]], parent, **kw) -> list[tuple[StrategyResult, Models]]:
        out = []
        for name, cfg in self.progress.track(cfgs, lambda point: point[0]):
            log.info("sweep point %s", name)
            out.append(self.exp.run(cfg, parent=parent, kind=mn.KIND_SWEEP_POINT, run_name=name, split="dev", **kw))
        return out

    def _rates(self, key: str) -> list[float]:
        return self.cfg.sweep.lr_embedder if key == "lr_embedder" else self.cfg.sweep.lr_generator

    def _best(self, points: list[tuple[StrategyResult, Models]]) -> tuple[StrategyResult, Models]:
        best = select([r for r, _ in points])
        return next(p for p in points if p[0] is best)

    def _by_phase(self, name: str, strategy: Strategy, cfg: ExperimentConfig, parent, notes: list[str]):
        """``separate`` and ``sequential`` searches: one grid per phase."""
        phases = strategy.phases(cfg.train)
        points: list[StrategyResult] = []
        bests: list[tuple[StrategyResult, Models]] = []
        start: tuple[StrategyResult, Models] | None = None
        for phase in phases:
            key = phase.lr_key
            tag = name if len(phases) == 1 else f"{name} {phase.name}"
            if strategy.search == "separate":  # from the base models, as the strategy that trains it alone
                base, kw = _component(phase).apply(cfg), {}
            else:  # sequential: continue the previous phase's selected models
                base = start[0].cfg if start else cfg
                kw = {"phases": [phase], "start": start[1] if start else None}
            pts = self._points([(f"{tag} {key}={lr:g}", _with(base, **{key: lr})) for lr in self._rates(key)],
                               parent, **kw)
            points += [r for r, _ in pts]
            start = self._best(pts)
            bests.append(start)
        selected = {p.lr_key: getattr(b.cfg.train, p.lr_key) for p, (b, _) in zip(phases, bests)}
        if strategy.search == "sequential" or len(bests) == 1:
            return points, selected, start[0].cfg, start[1]
        enc = next(i for i, p in enumerate(phases) if p.train_embedder)
        gen = next(i for i, p in enumerate(phases) if p.train_generator)
        notes.append(f"{name} = selected {_component(phases[enc]).label} encoder + selected "
                     f"{_component(phases[gen]).label} generator")
        encoder, generator = bests[enc][1], bests[gen][1]
        return points, selected, _with(cfg, **selected), combine(encoder, generator)

    def _grid(self, name: str, strategy: Strategy, cfg: ExperimentConfig, parent, notes: list[str]):
        """``grid`` search: every (embedder rate, generator rate) pair; or the rates the strategy it may reuse
        them from (``Strategy.rates_from``) selected, with ``sweep.joint_reuse_two_phase``."""
        reuse = self.cfg.sweep.joint_reuse_two_phase and strategy.rates_from is not None
        source = _train_strategy(strategy.rates_from) if reuse else None
        if reuse and source in self.selected_rates:
            rates = self.selected_rates[source]
            pts = self._points([(f"{name} ({BY_KEY[strategy.rates_from].label} rates)", _with(cfg, **rates))], parent)
            notes.append(f"{name} reused the {source} rates {rates}")
        else:
            if reuse:
                notes.append(f"joint_reuse_two_phase is set but {source} was not swept first: full grid")
            pts = self._points([(f"{name} lr_embedder={le:g} lr_generator={lg:g}",
                                 _with(cfg, lr_embedder=le, lr_generator=lg))
                                for le in self.cfg.sweep.lr_embedder for lg in self.cfg.sweep.lr_generator], parent)
        best, models = self._best(pts)
        selected = {"lr_embedder": best.cfg.train.lr_embedder, "lr_generator": best.cfg.train.lr_generator}
        return [r for r, _ in pts], selected, best.cfg, models

    def sweep(self, name: str, parent) -> SweepResult:
        """Search ``name`` (a ``train.strategy`` value) as its table entry says; record the selected models."""
        strategy = _swept(self.cfg, name)
        cfg = strategy.apply(self.cfg)
        notes: list[str] = []
        if strategy.search == "grid":
            points, selected, final_cfg, models = self._grid(name, strategy, cfg, parent, notes)
        else:
            points, selected, final_cfg, models = self._by_phase(name, strategy, cfg, parent, notes)
        self.selected_rates[name] = selected
        # the frozen index build once, plus each grid point's own training and dev evaluation (a phase-2
        # point does not pay again for the phase-1 model it continues)
        flops = self.exp.index_ledger.total_flops + sum(p.own_flops for p in points)
        wall = sum(p.seconds for p in points)
        final = self.exp.run_trained(final_cfg, models, parent=parent, kind=mn.KIND_STRATEGY,
                                     run_name=f"{strategy.key} selected")
        final.search_flops = flops
        return SweepResult(name, points, selected, final, flops, wall, notes)


def run_sweep(cfg: ExperimentConfig, *, show_progress: bool = True, exp: Experiment | None = None) -> list[SweepResult]:
    """Run the grids of ``cfg.sweep.strategies`` (two_phase first when joint reuses its rates)."""
    from distrag.reporting.report import print_results

    exp = exp or Experiment(cfg, show_progress=progress_enabled(show_progress)).setup()
    order = list(dict.fromkeys(cfg.sweep.strategies))
    for name in order:
        _swept(cfg, name)  # every name is known and sweepable before anything runs
    if cfg.sweep.joint_reuse_two_phase:  # a strategy that reuses another's rates is swept after it
        for name in list(order):
            source = _swept(cfg, name).rates_from
            if source is not None and _train_strategy(source) in order:
                order.remove(_train_strategy(source))
                order.insert(order.index(name), _train_strategy(source))
    progress = Progress(sum(grid_size(cfg, name) for name in order), "sweep", enabled=show_progress,
                        unit="grid points")
    sweeper = Sweeper(exp, cfg, progress)
    results = []
    for name in order:
        tags = experiment_tags(cfg, kind=mn.KIND_SWEEP, strategy=name, dataset=exp.splits.name)
        with open_tracker(cfg, run_name=f"sweep {name}", tags=tags, is_rank0=exp.is_rank0) as tr:
            res = sweeper.sweep(name, tr)
            tr.log_metrics({mn.SWEEP_SEARCH_FLOPS: res.search_flops, mn.SWEEP_SEARCH_WALL_S: res.search_wall_s,
                            mn.SWEEP_N_POINTS: float(res.n_points),
                            **{mn.sweep_selected(k): v for k, v in res.selected.items()},
                            **{mn.split_metric(cfg.eval_split, k): v for k, v in res.final.metrics.items()}})
            tr.set_tags({mn.TAG_SELECTED_RUN: res.final.run_id or "", mn.TAG_NOTES: "; ".join(res.notes)})
        log.info("%s: %d grid points, selected %s", name, res.n_points, res.selected)
        results.append(res)
    progress.close()
    print_results([r.final for r in results], title=f"Selected settings per strategy ({cfg.eval_split} split)")
    _print_search(results)
    return results


def _print_search(results: list[SweepResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    from distrag.reporting.escaping import rich_text

    t = Table(title="Learning-rate search", title_justify="left")
    for c in ("strategy", "grid points", "selected", "search FLOPs", "search wall-clock"):
        t.add_column(c)
    for r in results:
        t.add_row(*map(rich_text, (r.strategy, str(r.n_points), ", ".join(f"{k}={v:g}" for k, v in r.selected.items()),
                                   f"{r.search_flops:.3g}", f"{r.search_wall_s:.0f} s")))
    Console(width=150).print(t)

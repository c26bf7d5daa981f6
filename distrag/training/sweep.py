"""`distrag sweep`: learning-rate grids per strategy, selected on dev, with the cost of the search.

How each strategy searches (m = len(sweep.lr_embedder), n = len(sweep.lr_generator)):

- independent: m + n runs. Ft-Embed at each embedder rate and Ft-Gen at each generator rate, each
  component selected on its own; the selected pair is combined and evaluated.
- two_phase:   n + m runs. Phase 1 (generator, RAG loss) at each generator rate; the selected
  phase-1 models continue into phase 2 (retriever, RAG loss) at each embedder rate (order follows
  ``train.two_phase_order``).
- joint:       m x n runs (both models train at once, so the rates interact), or 1 run with the
  rates two-phase selected when ``sweep.joint_reuse_two_phase`` (as the paper did).
- embed_ft / gen_ft: m or n runs.

Selection is by dev EM, ties broken by dev F1. Each grid point is an MLflow child run (kind
``sweep_point``) under the strategy's sweep run (kind ``sweep``), which records the search cost
(``sweep/search_flops`` = the index build once + every point's own training and dev evaluation,
``sweep/search_wall_s``, ``sweep/n_points``) and the selected rates; the
selected models are then scored on ``eval_split`` in a run of kind ``strategy`` that
``distrag report`` shows with its search cost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from distrag.config import ExperimentConfig
from distrag.reporting.tracking import experiment_tags, open_tracker
from distrag.training.experiment import Experiment, RunResult, strategy_key
from distrag.training.strategies import phases_for

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    strategy: str
    points: list[RunResult]
    selected: dict[str, float]
    final: RunResult
    search_flops: float = 0.0
    search_wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def n_points(self) -> int:
        return len(self.points)


def select(points: list[RunResult]) -> RunResult:
    """Best grid point on dev: highest EM, ties broken by F1, then by order (first wins)."""
    if not points:
        raise ValueError("nothing to select from")
    return max(points, key=lambda r: (r.metrics.get("em", 0.0), r.metrics.get("f1", 0.0)))


def grid_size(cfg: ExperimentConfig, strategy: str) -> int:
    """How many training runs the search of ``strategy`` costs (m + n or m x n, see the module doc)."""
    m, n = len(cfg.sweep.lr_embedder), len(cfg.sweep.lr_generator)
    return {"independent": m + n, "two_phase": m + n, "embed_ft": m, "gen_ft": n,
            "joint": 1 if cfg.sweep.joint_reuse_two_phase else m * n}[strategy]


def _with(cfg: ExperimentConfig, **train) -> ExperimentConfig:
    c = cfg.model_copy(deep=True)
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def _cost(points: list[RunResult], index_build_flops: float) -> tuple[float, float]:
    """Search cost: the frozen index build once, plus each grid point's own training and dev
    evaluation (a phase-2 point does not pay again for the phase-1 model it continues)."""
    return index_build_flops + sum(p.own_flops for p in points), sum(p.seconds for p in points)


class Sweeper:
    def __init__(self, exp: Experiment, cfg: ExperimentConfig):
        self.exp, self.cfg = exp, cfg
        self.selected_rates: dict[str, dict[str, float]] = {}

    def _point(self, cfg: ExperimentConfig, parent, name: str, **kw) -> RunResult:
        log.info("sweep point %s", name)
        return self.exp.run(cfg, parent=parent, kind="sweep_point", run_name=name, eval_split="dev",
                            keep_models=True, **kw)

    def sweep(self, strategy: str, parent) -> SweepResult:
        cfg = _with(self.cfg, strategy=strategy)
        E, G = self.cfg.sweep.lr_embedder, self.cfg.sweep.lr_generator
        points: list[RunResult] = []
        notes: list[str] = []
        if strategy in ("embed_ft", "gen_ft"):
            grid = E if strategy == "embed_ft" else G
            key = "lr_embedder" if strategy == "embed_ft" else "lr_generator"
            points = [self._point(_with(cfg, **{key: lr}), parent, f"{strategy} {key}={lr:g}") for lr in grid]
            best = select(points)
            selected = {key: getattr(best.cfg.train, key)}
            final_cfg, start, prior = best.cfg, best.models, []
        elif strategy == "independent":
            pe = [self._point(_with(cfg, strategy="embed_ft", lr_embedder=lr), parent, f"embed_ft lr_embedder={lr:g}")
                  for lr in E]
            pg = [self._point(_with(cfg, strategy="gen_ft", lr_generator=lr), parent, f"gen_ft lr_generator={lr:g}")
                  for lr in G]
            points = pe + pg
            be, bg = select(pe), select(pg)
            selected = {"lr_embedder": be.cfg.train.lr_embedder, "lr_generator": bg.cfg.train.lr_generator}
            final_cfg = _with(cfg, **selected)
            # combine: Ft-Gen's LoRA generator with Ft-Embed's question encoder
            start = type(bg.models)(be.models.embedder, bg.models.generator, be.models.index, bg.models.ledger,
                                    bg.models.own)
            prior = [be.models.own]  # Ft-Embed's training; the index build is already in Ft-Gen's ledger
            notes.append("independent = selected Ft-Embed encoder + selected Ft-Gen generator")
        elif strategy == "two_phase":
            first, second = phases_for(cfg)
            k1 = "lr_generator" if first.train_generator else "lr_embedder"
            k2 = "lr_embedder" if k1 == "lr_generator" else "lr_generator"
            g1, g2 = (G, E) if k1 == "lr_generator" else (E, G)
            p1 = [self._point(_with(cfg, **{k1: lr}), parent, f"two_phase {first.name} {k1}={lr:g}", phases=[first])
                  for lr in g1]
            b1 = select(p1)
            p2 = [self._point(_with(b1.cfg, **{k2: lr}), parent, f"two_phase {second.name} {k2}={lr:g}",
                              phases=[second], start=b1.models) for lr in g2]
            points = p1 + p2
            best = select(p2)
            selected = {k1: getattr(b1.cfg.train, k1), k2: getattr(best.cfg.train, k2)}
            final_cfg, start, prior = best.cfg, best.models, []
        elif strategy == "joint":
            if self.cfg.sweep.joint_reuse_two_phase and "two_phase" in self.selected_rates:
                rates = self.selected_rates["two_phase"]
                points = [self._point(_with(cfg, **rates), parent, "joint (two-phase rates)")]
                notes.append(f"joint reused the two-phase rates {rates}")
            else:
                if self.cfg.sweep.joint_reuse_two_phase:
                    notes.append("joint_reuse_two_phase is set but two_phase was not swept first: full grid")
                points = [self._point(_with(cfg, lr_embedder=le, lr_generator=lg), parent,
                                      f"joint lr_embedder={le:g} lr_generator={lg:g}") for le in E for lg in G]
            best = select(points)
            selected = {"lr_embedder": best.cfg.train.lr_embedder, "lr_generator": best.cfg.train.lr_generator}
            final_cfg, start, prior = best.cfg, best.models, []
        else:
            raise ValueError(f"strategy {strategy!r} cannot be swept; choose from embed_ft, gen_ft, independent, "
                             f"two_phase, joint")
        self.selected_rates[strategy] = selected
        flops, wall = _cost(points, self.exp.index_ledger.total_flops)
        final = self.exp.run(final_cfg, parent=parent, kind="strategy", train=False, start=start, prior_costs=prior,
                             run_name=f"{strategy_key(final_cfg)} selected")
        final.search_flops = flops
        for p in points:  # free the models of the grid points
            p.models = None
        return SweepResult(strategy, points, selected, final, flops, wall, notes)


def run_sweep(cfg: ExperimentConfig, *, show_progress: bool = True, exp: Experiment | None = None) -> list[SweepResult]:
    """Run the grids of ``cfg.sweep.strategies`` (two_phase first when joint reuses its rates)."""
    from distrag.reporting.report import print_results

    exp = exp or Experiment(cfg, show_progress=show_progress).setup()
    order = list(dict.fromkeys(cfg.sweep.strategies))
    if cfg.sweep.joint_reuse_two_phase and "joint" in order and "two_phase" in order:
        order.remove("two_phase")
        order.insert(order.index("joint"), "two_phase")
    sweeper = Sweeper(exp, cfg)
    results = []
    for strategy in order:
        tags = experiment_tags(cfg, kind="sweep", strategy=strategy, dataset=exp.splits.name)
        with open_tracker(cfg, run_name=f"sweep {strategy}", tags=tags, is_rank0=exp.is_rank0) as tr:
            res = sweeper.sweep(strategy, tr)
            tr.log_metrics({"sweep/search_flops": res.search_flops, "sweep/search_wall_s": res.search_wall_s,
                            "sweep/n_points": float(res.n_points),
                            **{f"sweep/selected_{k}": v for k, v in res.selected.items()},
                            **{f"{cfg.eval_split}/{k}": v for k, v in res.final.metrics.items()}})
            tr.set_tags({"distrag.selected_run": res.final.run_id or "", "distrag.notes": "; ".join(res.notes)})
        log.info("%s: %d grid points, selected %s", strategy, res.n_points, res.selected)
        results.append(res)
    print_results([r.final for r in results], title=f"Selected settings per strategy ({cfg.eval_split} split)")
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Learning-rate search", title_justify="left")
    for c in ("strategy", "grid points", "selected", "search FLOPs", "search wall-clock"):
        t.add_column(c)
    for r in results:
        t.add_row(r.strategy, str(r.n_points), ", ".join(f"{k}={v:g}" for k, v in r.selected.items()),
                  f"{r.search_flops:.3g}", f"{r.search_wall_s:.0f} s")
    Console(width=150).print(t)
    return results

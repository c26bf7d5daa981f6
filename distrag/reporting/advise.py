"""`distrag advise`: which fine-tuning strategy to use, from the paper's decision rule and measured costs.

Lawton et al. (EMNLP Findings 2025) find that the strategies reach about the same EM/F1 at very
different compute. Their rule:

- context labels available -> independent fine-tuning (Ft-Embed + Ft-Gen): cheapest, and its
  learning-rate search is m + n runs (each component searched on its own);
- no context labels, good learning rates known -> joint (RAG-Sequence / RAG-Token): one run;
- no context labels, learning rates to search -> two-phase: its search is m + n runs, joint's m x n.

``advise`` applies the rule to what one comparison group of this MLflow experiment measured
(:func:`distrag.reporting.tracking.load_group`: same dataset, models, eval split, k and settings; by
default the newest complete group, see :mod:`distrag.reporting.groups`):
EM/F1 of each recorded strategy, training FLOPs, wall-clock, the search cost projected from the
measured per-run (or per-phase) cost and the grid sizes (m = len(sweep.lr_embedder),
n = len(sweep.lr_generator); the search shape of each strategy comes from the strategy table), and
whether the EM differences exceed what the question count lets one resolve.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from distrag import metric_names as mn
from distrag.errors import ConfigError
from distrag.reporting.columns import fmt_flops
from distrag.reporting.groups import GroupSelection, Loaded, other_groups_note
from distrag.reporting.paired import annotate
from distrag.reporting.results import StrategyResult
from distrag.strategies import BY_KEY, STRATEGIES, Strategy, advised

__all__ = ["advise", "em_noise", "training_compute"]

_Z = 1.96  # two-sided 95%
# the paper's rule, as the strategy table states it (Strategy.advised_for)
(INDEPENDENT,), (TWO_PHASE,) = advised("labels"), advised("no_labels_rates_searched")
JOINT = tuple(advised("no_labels_rates_known"))


@dataclass
class _Grid:
    m: int
    n: int
    source: str


@dataclass
class _Projection:
    flops: float
    wall_s: float
    how: str


def training_compute(costs: dict[str, float]) -> float:
    """FLOPs spent while training: every recorded ledger phase except the index builds (the frozen one and
    the re-embedding after training) and evaluation (so a frozen generator's forward passes in two-phase's
    retriever phase count too); falls back to ``cost/train_flops`` when the run has no phase breakdown."""
    not_training = (mn.PHASE_INDEX_BUILD, mn.PHASE_INDEX_REBUILD)
    train = [v for p, v in mn.phase_values(costs).items() if p not in not_training and not p.startswith("eval_")]
    return float(sum(train)) if train else float(costs.get(mn.COST_TRAIN_FLOPS, 0.0))


def em_noise(p1: float, p2: float, n: int) -> float:
    """Half-width of a 95% interval on the difference of two EMs (fractions) measured on ``n`` questions
    each: ``1.96 * sqrt(2 p(1-p) / n)`` with the pooled ``p`` (two-proportion test); inf when ``n`` is 0."""
    if n <= 0:
        return math.inf
    p = (p1 + p2) / 2
    return _Z * math.sqrt(max(2 * p * (1 - p) / n, 0.0))


def _grid(grid, recorded_params: dict[str, str]) -> _Grid:
    from distrag.config import ExperimentConfig, SweepConfig

    if isinstance(grid, ExperimentConfig):
        grid = grid.sweep
    if isinstance(grid, SweepConfig):
        return _Grid(len(grid.lr_embedder), len(grid.lr_generator), "the configuration's sweep grid")
    if grid is not None:
        m, n = grid
        return _Grid(int(m), int(n), "the grid sizes given")
    try:
        m = len(json.loads(recorded_params["sweep.lr_embedder"]))
        n = len(json.loads(recorded_params["sweep.lr_generator"]))
        return _Grid(m, n, "the sweep grid recorded with the runs")
    except (KeyError, ValueError, TypeError):
        d = SweepConfig()
        return _Grid(len(d.lr_embedder), len(d.lr_generator), "the default sweep grid")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _secs(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


# ----------------------------------------------------------------------------------------------
# what was measured


def _measured(runs: list[StrategyResult], experiment: str, loaded: Loaded) -> list[str]:
    g = loaded.group
    lines = [f"Measured in MLflow experiment '{experiment}', comparison group {g.id} ({loaded.why}): "
             f"{g.key.describe()} ({len(runs)} strategies):"]
    width = max(len(r.label) for r in runs)
    for r in runs:
        search = f", LR search {fmt_flops(r.search_flops)} FLOPs (measured)" if r.search_flops else ""
        lines.append(f"  {r.label:<{width}}  EM {_pct(r.metric('em'))}  F1 {_pct(r.metric('f1'))}  "
                     f"train {fmt_flops(r.costs.get(mn.COST_TRAIN_FLOPS, 0.0))} "
                     f"FLOPs (training compute {fmt_flops(training_compute(r.costs))})  wall-clock "
                     f"{_secs(r.seconds)}  on {int(r.metric('n_questions'))} questions{search}")
    note = other_groups_note(loaded.groups, g)
    return lines + ([f"  ({note})"] if note else [])


def _paired_quality(runs: list[StrategyResult]) -> list[str] | None:
    """The trained rows against the best one by EM, question by question: each row's EM difference with its 95 %
    paired bootstrap interval and McNemar's p. Rows whose interval covers 0 are equal in quality to the best; of
    those the cheapest to train is the measured pick (the paper's conclusion). None when the rows carry no
    per-question outcomes (runs recorded before they were kept): then the unpaired reading below applies."""
    trained = [r for r in runs if (r.key not in BY_KEY or BY_KEY[r.key].trains) and r.per_question]
    if len(trained) < 2:
        return None
    annotate(trained)
    best = next(r for r in trained if r.vs_best is None)
    n = min(len(r.per_question) for r in trained)
    lines = ["", f"Quality, question by question (every row answered the same questions): each trained strategy "
                 f"minus the best by EM, {best.label} ({_pct(best.metric('em'))} EM), with the 95 % paired bootstrap "
                 f"interval of the difference and McNemar's exact p:"]
    width = max(len(r.label) for r in trained)
    equal = [best]
    for r in trained:
        if r is best:
            continue
        iv, test = r.vs_best.intervals.get("em"), r.vs_best.mcnemar.get("em")
        if iv is None:
            continue
        same = iv.covers_zero
        equal += [r] if same else []
        lines.append(f"  {r.label:<{width}}  dEM {100 * iv.mean:+.1f} [{100 * iv.low:+.1f}, {100 * iv.high:+.1f}] "
                     f"points on {iv.n} questions, McNemar p {test.p_value:.3g}: "
                     f"{'equal in quality (the interval covers 0)' if same else 'below the best'}")
    cheapest = min(equal, key=lambda r: training_compute(r.costs))
    lines.append(f"Equal in quality to the best: {', '.join(r.label for r in equal)}; the cheapest of them to train is "
                 f"{cheapest.label} ({fmt_flops(training_compute(cheapest.costs))} FLOPs)"
                 + (" - as in the paper, quality does not separate them; cost does." if len(equal) > 1 else "."))
    if n < 100:
        lines.append(f"  (on {n} questions an interval is wide: a difference it does not resolve may still exist)")
    return lines


def _noise(runs: list[StrategyResult]) -> list[str]:
    paired = _paired_quality(runs)
    if paired is not None:
        return paired
    trained = [r for r in runs if r.key not in BY_KEY or BY_KEY[r.key].trains]
    if len(trained) < 2:
        return []
    nq = min(int(r.metric("n_questions")) for r in trained)
    ems = sorted(trained, key=lambda r: r.metric("em"))
    lo, hi = ems[0], ems[-1]
    p_lo, p_hi = lo.metric("em"), hi.metric("em")
    half = em_noise(p_lo, p_hi, nq)
    se = math.sqrt(max(p_hi * (1 - p_hi), 0.0) / nq) if nq else math.inf
    spread = p_hi - p_lo
    if spread <= half:
        return ["", f"EM differences: the trained strategies span {_pct(spread)} EM points ({lo.label} "
                f"{_pct(p_lo)} to {hi.label} {_pct(p_hi)}), within the +/-{_pct(half)}-point noise expected on "
                f"{nq} questions (binomial standard error {_pct(se)} points): as in the paper, quality does not "
                f"separate them; cost does."]
    beyond = [r.label for r in trained if p_hi - r.metric("em") > em_noise(p_hi, r.metric("em"), nq)]
    return ["", f"EM differences: {hi.label} ({_pct(p_hi)}) vs {lo.label} ({_pct(p_lo)}) differ by "
            f"{_pct(spread)} points, MORE than the +/-{_pct(half)}-point noise expected on {nq} questions "
            f"(binomial standard error {_pct(se)} points per strategy): the strategies did not reach the same "
            f"quality here, so weigh quality as well as cost.",
            f"  below {hi.label} beyond noise: {', '.join(beyond)}"]


# ----------------------------------------------------------------------------------------------
# projected learning-rate searches, from the table's search shapes


def _component(strategy: Strategy, phase_name: str) -> Strategy | None:
    """The one-phase strategy that trains ``phase_name`` alone (Ft-Gen for independent's gen_ft)."""
    return next((s for s in STRATEGIES if len(s.table_phases) == 1 and s.table_phases[0].name == phase_name
                 and s is not strategy), None)


def _project(strategy: Strategy, by_key: dict[str, StrategyResult], m: int, n: int) -> _Projection | None:
    """Search cost of ``strategy``: each phase's measured cost times the rates its phase searches (m for
    an encoder phase, n for a generator phase), m x n runs for a grid; a phase's cost is its phase in the
    strategy's own run, or the run of the one-phase strategy that trains it alone."""
    run = by_key.get(strategy.key)
    if strategy.search == "grid":
        if run is None:
            return None
        c = training_compute(run.costs)
        return _Projection(m * n * c, m * n * run.seconds, f"{m * n} x one {strategy.label} run ({fmt_flops(c)})")
    parts, wall, how = 0.0, 0.0, []
    for phase in strategy.table_phases:
        k = m if phase.train_embedder else n
        comp = _component(strategy, phase.name)
        if comp is not None and comp.key in by_key:  # measured alone
            c, w, what = training_compute(by_key[comp.key].costs), by_key[comp.key].seconds, comp.label
        elif run is not None and mn.phase_metric(phase.name) in run.costs:  # measured as a phase of the run
            c, what = run.costs[mn.phase_metric(phase.name)], f"{phase.name} phase"
            w = run.costs.get(mn.phase_metric(phase.name, "wall_s"), run.seconds / len(strategy.table_phases))
        else:
            parts = -1.0
            break
        parts, wall = parts + k * c, wall + k * w
        how.append(f"{k} x {what} ({fmt_flops(c)})")
    if parts >= 0:
        return _Projection(parts, wall, " + ".join(how))
    if run is None:
        return None
    c, runs = training_compute(run.costs), strategy.grid_size(m, n) / len(strategy.table_phases)
    return _Projection(runs * c, runs * run.seconds, f"about {runs:g} x one {strategy.label} run ({fmt_flops(c)})")


def _projections(by_key: dict[str, StrategyResult], m: int, n: int) -> dict[str, _Projection]:
    out = {}
    for strategy in (INDEPENDENT, TWO_PHASE, *JOINT):
        p = _project(strategy, by_key, m, n)
        if p is not None:
            out[strategy.key] = p
    return out


def _projection_lines(proj: dict[str, _Projection], g: _Grid) -> list[str]:
    m, n = g.m, g.n
    lines = ["", f"Learning-rate search, from {g.source}: m = {m} embedder rates, n = {n} generator rates; "
                 f"independent and two-phase search m + n = {m + n} runs, joint m x n = {m * n}."]
    for key, p in proj.items():
        lines.append(f"  {BY_KEY[key].label:<11} projected search {fmt_flops(p.flops)} FLOPs, about "
                     f"{_secs(p.wall_s)} ({p.how})")
    if m * n <= m + n:
        lines.append(f"  (with m = {m} and n = {n}, m x n = {m * n} is not larger than m + n = {m + n}: the "
                     f"grid sizes alone do not favour two-phase; the per-run costs decide)")
    return lines


# ----------------------------------------------------------------------------------------------
# the rule


def _labels_from_runs(runs: list[StrategyResult]) -> tuple[bool | None, str]:
    have = [r.label for r in runs if r.key in BY_KEY and BY_KEY[r.key].needs_labels]
    if have:
        return True, (f"read from the runs: {', '.join(have)} trained, which needs gold passage ids for every "
                      f"training question")
    if any(k.startswith("recall_at_") for r in runs for k in r.metrics):
        return True, ("read from the runs: retrieval recall was measured, so the evaluation questions carry "
                      "gold passage ids")
    names = sorted({r.dataset for r in runs if r.dataset})
    if names and all(d.startswith("popqa") for d in names):
        return False, f"read from the runs: dataset {', '.join(names)} (PopQA has no context labels)"
    if runs:
        return None, "could not tell from the runs (no Ft-Embed run, no retrieval recall measured)"
    return None, "could not tell: no runs are recorded"


def _rec_labels(by_key: dict[str, StrategyResult], proj: dict[str, _Projection], g: _Grid,
                lrs_known: bool) -> list[str]:
    out = ["Recommendation: Independent fine-tuning (Ft-Embed + Ft-Gen)."]
    why = ("With context labels each component trains on its own signal: the retriever with MNRL on "
           "(question, gold passage) pairs, the generator on the answers; no RAG marginal over k "
           "passages through the generator, so it is the cheapest training")
    ind = by_key.get(INDEPENDENT.key)
    others = [by_key[s.key] for s in (TWO_PHASE, *JOINT) if s.key in by_key]
    if ind is not None and others:
        why += (f" (measured: {fmt_flops(training_compute(ind.costs))} FLOPs vs "
                + ", ".join(f"{o.label} {fmt_flops(training_compute(o.costs))}" for o in others) + ")")
        if any(training_compute(o.costs) <= training_compute(ind.costs) for o in others):
            out.append("Note: here Independent did not measure cheapest to train; check the runs' settings "
                       "(steps, batch sizes, train_k) are comparable.")
    out.insert(1, why + ".")
    if lrs_known:
        out.append("With known learning rates it is one Ft-Embed run plus one Ft-Gen run.")
    else:
        s = f"; projected {fmt_flops(proj[INDEPENDENT.key].flops)} FLOPs" if INDEPENDENT.key in proj else ""
        out.append(f"Its search is m + n = {g.m + g.n} runs (each component selected on its own){s}, "
                   f"against m x n = {g.m * g.n} for joint.")
    return out


def _rec_no_labels(by_key: dict[str, StrategyResult], proj: dict[str, _Projection], g: _Grid,
                   lrs_known: bool) -> list[str]:
    joint = [s.key for s in JOINT if s.key in proj]
    cheapest = min(joint, key=lambda k: proj[k].flops) if joint else None
    if lrs_known:
        out = ["Recommendation: joint training (RAG-Sequence or RAG-Token), one run.",
               ("Without context labels the retriever can only learn through the RAG marginal; with known "
                "learning rates joint needs a single run that trains both components at once, while "
                "two-phase needs two sequential phases.")]
        if cheapest is not None:
            jr = by_key[cheapest]
            msg = f"Measured: {jr.label} {fmt_flops(training_compute(jr.costs))} FLOPs, {_secs(jr.seconds)}"
            if TWO_PHASE.key in by_key:
                tp = by_key[TWO_PHASE.key]
                msg += f"; Two-phase {fmt_flops(training_compute(tp.costs))} FLOPs, {_secs(tp.seconds)}"
            out.append(msg + ".")
        return out
    out = [(f"Recommendation: two-phase training (generator, then retriever, both with the RAG loss), "
            f"searching m + n = {g.m + g.n} runs instead of joint's m x n = {g.m * g.n}."),
           ("Joint trains both components at once, so their learning rates interact and must be searched "
            "as a grid; two-phase searches one component at a time.")]
    if TWO_PHASE.key in proj and cheapest is not None:
        tpf, jf = proj[TWO_PHASE.key].flops, proj[cheapest].flops
        if tpf > 0:
            out.append(f"Projected search: Two-phase {fmt_flops(tpf)} FLOPs vs {BY_KEY[cheapest].label} "
                       f"{fmt_flops(jf)} FLOPs ({jf / tpf:.2f}x).")
        if tpf >= jf:
            out.append("Note: with these measured per-run costs and grid sizes the two-phase search is NOT "
                       "cheaper than joint's; prefer joint here unless the grids grow (m x n grows faster "
                       "than m + n).")
    return out


def advise(tracking_cfg, *, labels_available: bool | None, lrs_known: bool, grid=None,
           selection: GroupSelection | None = None) -> str:
    """The recommendation, explained with the numbers measured in one comparison group of
    ``tracking_cfg``'s experiment: the one ``selection`` picks, by default the newest complete group
    (:mod:`distrag.reporting.groups`); ``selection.list_groups`` lists the groups instead.

    ``labels_available=None`` reads it from the runs (an Ft-Embed / Independent run exists, retrieval
    recall was measured, or the dataset is PopQA) or says it could not tell. ``grid`` is an
    ``ExperimentConfig``, a ``SweepConfig`` or ``(m, n)``; by default the sweep grid recorded with the
    runs (else the default grid).
    """
    from distrag.reporting.report import groups_text
    from distrag.reporting.tracking import load_group

    if selection is not None and selection.list_groups:
        return groups_text(tracking_cfg) + "\n"
    lines: list[str] = []
    runs: list[StrategyResult] = []
    try:
        loaded = load_group(tracking_cfg, selection)
    except ConfigError as e:
        if selection is not None and (selection.group or selection.dataset):
            raise  # a group that was asked for and is not there is the user's error
        lines.append("No measurements: " + "; ".join(msg for _, msg in e.problems) + ".")
    else:
        runs = loaded.group.rows
        lines += _measured(runs, tracking_cfg.experiment, loaded)
    lines += _noise(runs)
    g = _grid(grid, runs[0].params if runs else {})
    by_key = {r.key: r for r in runs}
    proj = _projections(by_key, g.m, g.n)
    lines += _projection_lines(proj, g)

    labels, why = _labels_from_runs(runs) if labels_available is None else (labels_available, "as given")
    lines += ["", f"Context labels: {'yes' if labels else 'no' if labels is False else 'unknown'} ({why}).",
              f"Learning rates: {'known (no search needed)' if lrs_known else 'to be searched'}.", ""]
    if labels is True:
        lines += _rec_labels(by_key, proj, g, lrs_known)
    elif labels is False:
        lines += _rec_no_labels(by_key, proj, g, lrs_known)
    else:
        lines.append("Could not tell whether context labels are available (pass --labels or --no-labels).")
        lines.append("If they are:")
        lines += ["  " + x for x in _rec_labels(by_key, proj, g, lrs_known)]
        lines.append("If they are not:")
        lines += ["  " + x for x in _rec_no_labels(by_key, proj, g, lrs_known)]
    lines.append("")
    lines.append("Rule from Lawton et al., EMNLP Findings 2025: all strategies reach about the same EM/F1 at very "
                 "different compute.")
    return "\n".join(lines) + "\n"

"""`distrag advise`: which fine-tuning strategy to use, from the paper's decision rule and measured costs.

Lawton et al. (EMNLP Findings 2025) find that the strategies reach about the same EM/F1 at very
different compute. Their rule:

- context labels available -> independent fine-tuning (Ft-Embed + Ft-Gen): cheapest, and its
  learning-rate search is m + n runs (each component searched on its own);
- no context labels, good learning rates known -> joint (RAG-Sequence / RAG-Token): one run;
- no context labels, learning rates to search -> two-phase: its search is m + n runs, joint's m x n.

``advise`` applies the rule to what this MLflow experiment measured (``distrag.reporting.report.load_runs``):
EM/F1 of each recorded strategy, training FLOPs, wall-clock, the search cost projected from the
measured per-run cost and the grid sizes (m = len(sweep.lr_embedder), n = len(sweep.lr_generator)),
and whether the EM differences exceed what the question count lets one resolve.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from distrag.reporting.report import fmt_flops

__all__ = ["advise", "em_noise", "training_compute"]

# strategies whose runs only exist when the training questions carry context labels (Ft-Embed's MNRL)
_NEEDS_LABELS = ("embed_ft", "independent")
_Z = 1.96  # two-sided 95%


@dataclass
class _Grid:
    m: int
    n: int
    source: str


def training_compute(costs: dict[str, float]) -> float:
    """FLOPs spent while training: every recorded ledger phase except the index build and evaluation
    (so a frozen generator's forward passes in two-phase's retriever phase count too); falls back to
    ``cost/train_flops`` when the run has no phase breakdown."""
    phases = {k[len("cost/phase."):-len(".flops")]: v for k, v in costs.items()
              if k.startswith("cost/phase.") and k.endswith(".flops")}
    train = [v for p, v in phases.items() if p != "index_build" and not p.startswith("eval_")]
    return float(sum(train)) if train else float(costs.get("cost/train_flops", 0.0))


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


def _run_details(tracking_cfg, run_ids: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Params of the newest run and the dataset tag of each run (best effort: {} when unreadable)."""
    try:
        from mlflow.tracking import MlflowClient

        from distrag.reporting.tracking import default_tracking_uri

        client = MlflowClient(tracking_uri=tracking_cfg.uri or default_tracking_uri())
        params: dict[str, str] = {}
        datasets: dict[str, str] = {}
        for rid in run_ids:
            run = client.get_run(rid)
            if not params:
                params = dict(run.data.params)
            datasets[rid] = run.data.tags.get("distrag.dataset", "")
        return params, datasets
    except Exception:  # noqa: BLE001 - best effort: the numbers above do not depend on it
        return {}, {}


def _labels_from_runs(runs, datasets: dict[str, str]) -> tuple[bool | None, str]:
    have = [r.label for r in runs if r.key in _NEEDS_LABELS]
    if have:
        return True, (f"read from the runs: {', '.join(have)} trained, which needs gold passage ids for every "
                      f"training question")
    rec = [r for r in runs if any(k.startswith("recall_at_") for k in r.metrics)]
    if rec:
        return True, ("read from the runs: retrieval recall was measured, so the evaluation questions carry "
                      "gold passage ids")
    names = sorted({d for d in datasets.values() if d})
    if names and all(d.startswith("popqa") for d in names):
        return False, f"read from the runs: dataset {', '.join(names)} (PopQA has no context labels)"
    if runs:
        return None, "could not tell from the runs (no Ft-Embed run, no retrieval recall measured)"
    return None, "could not tell: no runs are recorded"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _secs(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


def advise(tracking_cfg, *, labels_available: bool | None, lrs_known: bool, grid=None) -> str:
    """The recommendation, explained with the numbers measured in ``tracking_cfg``'s experiment.

    ``labels_available=None`` reads it from the runs (an Ft-Embed / Independent run exists, retrieval
    recall was measured, or the dataset is PopQA) or says it could not tell. ``grid`` is an
    ``ExperimentConfig``, a ``SweepConfig`` or ``(m, n)``; by default the sweep grid recorded with the
    runs (else the default grid).
    """
    from distrag.reporting.report import load_runs

    lines: list[str] = []
    try:
        runs = load_runs(tracking_cfg)
    except ValueError as e:
        runs = []
        lines.append(f"No measurements: {e}.")
    params, datasets = _run_details(tracking_cfg, [r.run_id for r in runs]) if runs else ({}, {})
    g = _grid(grid, params)
    m, n = g.m, g.n
    by_key = {r.key: r for r in runs}

    # -- what was measured -----------------------------------------------------------------------
    if runs:
        lines.append(f"Measured in MLflow experiment '{tracking_cfg.experiment}' ({len(runs)} strategies):")
        width = max(len(r.label) for r in runs)
        for r in runs:
            nq = int(r.metrics.get("n_questions", 0))
            tc = training_compute(r.costs)
            search = f", LR search {fmt_flops(r.search_flops)} FLOPs (measured)" if r.search_flops else ""
            lines.append(f"  {r.label:<{width}}  EM {_pct(r.metrics.get('em', 0.0))}  "
                         f"F1 {_pct(r.metrics.get('f1', 0.0))}  "
                         f"train {fmt_flops(r.costs.get('cost/train_flops', 0.0))} "
                         f"FLOPs (training compute {fmt_flops(tc)})  wall-clock {_secs(r.seconds)}  "
                         f"on {nq} questions{search}")
    elif not lines:
        lines.append(f"No finished strategy runs in MLflow experiment '{tracking_cfg.experiment}'.")

    # -- noise -------------------------------------------------------------------------------------
    trained = [r for r in runs if r.key != "none"]
    if len(trained) >= 2:
        nq = min(int(r.metrics.get("n_questions", 0)) for r in trained)
        ems = sorted(trained, key=lambda r: r.metrics.get("em", 0.0))
        lo, hi = ems[0], ems[-1]
        p_lo, p_hi = lo.metrics.get("em", 0.0), hi.metrics.get("em", 0.0)
        half = em_noise(p_lo, p_hi, nq)
        se = math.sqrt(max(p_hi * (1 - p_hi), 0.0) / nq) if nq else math.inf
        spread = p_hi - p_lo
        lines.append("")
        if spread > half:
            lines.append(f"EM differences: {hi.label} ({_pct(p_hi)}) vs {lo.label} ({_pct(p_lo)}) differ by "
                         f"{_pct(spread)} points, MORE than the +/-{_pct(half)}-point noise expected on {nq} "
                         f"questions (binomial standard error {_pct(se)} points per strategy): the strategies "
                         f"did not reach the same quality here, so weigh quality as well as cost.")
            beyond = [r.label for r in trained if p_hi - r.metrics.get("em", 0.0) > em_noise(
                p_hi, r.metrics.get("em", 0.0), nq)]
            lines.append(f"  below {hi.label} beyond noise: {', '.join(beyond)}")
        else:
            lines.append(f"EM differences: the trained strategies span {_pct(spread)} EM points "
                         f"({lo.label} {_pct(p_lo)} to {hi.label} {_pct(p_hi)}), within the +/-{_pct(half)}-point "
                         f"noise expected on {nq} questions (binomial standard error {_pct(se)} points): "
                         f"as in the paper, quality does not separate them; cost does.")

    # -- projected search costs ------------------------------------------------------------------
    def tc(key: str) -> float | None:
        return training_compute(by_key[key].costs) if key in by_key else None

    def wall(key: str) -> float | None:
        return by_key[key].seconds if key in by_key else None

    proj: dict[str, tuple[float, float, str]] = {}  # strategy -> (flops, wall, how)
    ce, cg = tc("embed_ft"), tc("gen_ft")
    if ce is not None and cg is not None:
        proj["independent"] = (m * ce + n * cg, m * wall("embed_ft") + n * wall("gen_ft"),
                               f"{m} x Ft-Embed ({fmt_flops(ce)}) + {n} x Ft-Gen ({fmt_flops(cg)})")
    elif "independent" in by_key:
        c = tc("independent")
        proj["independent"] = ((m + n) / 2 * c, (m + n) / 2 * wall("independent"),
                               f"about (m + n) / 2 = {(m + n) / 2:g} x one Independent run ({fmt_flops(c)})")
    if "two_phase" in by_key:
        costs = by_key["two_phase"].costs
        p_gen = costs.get("cost/phase.two_phase_generator.flops")
        p_ret = costs.get("cost/phase.two_phase_retriever.flops")
        c, w = tc("two_phase"), wall("two_phase")
        if p_gen is not None and p_ret is not None:
            proj["two_phase"] = (n * p_gen + m * p_ret, (m + n) / 2 * w,
                                 (f"{n} x generator phase ({fmt_flops(p_gen)}) + {m} x retriever phase "
                                  f"({fmt_flops(p_ret)})"))
        else:
            proj["two_phase"] = ((m + n) / 2 * c, (m + n) / 2 * w,
                                 f"about (m + n) / 2 = {(m + n) / 2:g} x one two-phase run ({fmt_flops(c)})")
    for key in ("joint_sequence", "joint_token"):
        if key in by_key:
            c = tc(key)
            proj[key] = (m * n * c, m * n * wall(key), f"{m * n} x one {by_key[key].label} run ({fmt_flops(c)})")

    lines.append("")
    lines.append(f"Learning-rate search, from {g.source}: m = {m} embedder rates, n = {n} generator rates; "
                 f"independent and two-phase search m + n = {m + n} runs, joint m x n = {m * n}.")
    names = {"independent": "Independent", "two_phase": "Two-phase", "joint_sequence": "RAG-Seq",
             "joint_token": "RAG-Tok"}
    for key, (f, w, how) in proj.items():
        lines.append(f"  {names[key]:<11} projected search {fmt_flops(f)} FLOPs, about {_secs(w)} "
                     f"({how})")
    if m * n <= m + n:
        lines.append(f"  (with m = {m} and n = {n}, m x n = {m * n} is not larger than m + n = {m + n}: the "
                     f"grid sizes alone do not favour two-phase; the per-run costs decide)")

    # -- the rule ----------------------------------------------------------------------------------
    if labels_available is None:
        labels, why = _labels_from_runs(runs, datasets)
    else:
        labels, why = labels_available, "as given"
    lines.append("")
    lines.append(f"Context labels: {'yes' if labels else 'no' if labels is False else 'unknown'} ({why}).")
    lines.append(f"Learning rates: {'known (no search needed)' if lrs_known else 'to be searched'}.")
    lines.append("")

    def cheapest_joint() -> str | None:
        js = [k for k in ("joint_sequence", "joint_token") if k in proj]
        return min(js, key=lambda k: proj[k][0]) if js else None

    def rec_labels() -> list[str]:
        out = ["Recommendation: Independent fine-tuning (Ft-Embed + Ft-Gen)."]
        why_ = ("With context labels each component trains on its own signal: the retriever with MNRL on "
                "(question, gold passage) pairs, the generator on the answers; no RAG marginal over k "
                "passages through the generator, so it is the cheapest training")
        ind = by_key.get("independent")
        others = [by_key[k] for k in ("two_phase", "joint_sequence", "joint_token") if k in by_key]
        if ind is not None and others:
            cheaper = [o for o in others if training_compute(o.costs) > training_compute(ind.costs)]
            why_ += (f" (measured: {fmt_flops(training_compute(ind.costs))} FLOPs vs "
                     + ", ".join(f"{o.label} {fmt_flops(training_compute(o.costs))}" for o in others) + ")")
            if len(cheaper) < len(others):
                out.append("Note: here Independent did not measure cheapest to train; check the runs' settings "
                           "(steps, batch sizes, train_k) are comparable.")
        out.insert(1, why_ + ".")
        if lrs_known:
            out.append("With known learning rates it is one Ft-Embed run plus one Ft-Gen run.")
        else:
            s = (f"; projected {fmt_flops(proj['independent'][0])} FLOPs" if "independent" in proj else "")
            out.append(f"Its search is m + n = {m + n} runs (each component selected on its own){s}, "
                       f"against m x n = {m * n} for joint.")
        return out

    def rec_no_labels() -> list[str]:
        if lrs_known:
            j = cheapest_joint()
            out = ["Recommendation: joint training (RAG-Sequence or RAG-Token), one run.",
                   ("Without context labels the retriever can only learn through the RAG marginal; with known "
                    "learning rates joint needs a single run that trains both components at once, while "
                    "two-phase needs two sequential phases.")]
            if j is not None:
                jr = by_key[j]
                msg = f"Measured: {jr.label} {fmt_flops(training_compute(jr.costs))} FLOPs, {_secs(jr.seconds)}"
                if "two_phase" in by_key:
                    tp = by_key["two_phase"]
                    msg += f"; Two-phase {fmt_flops(training_compute(tp.costs))} FLOPs, {_secs(tp.seconds)}"
                out.append(msg + ".")
            return out
        out = [(f"Recommendation: two-phase training (generator, then retriever, both with the RAG loss), "
                f"searching m + n = {m + n} runs instead of joint's m x n = {m * n}."),
               ("Joint trains both components at once, so their learning rates interact and must be searched "
                "as a grid; two-phase searches one component at a time.")]
        j = cheapest_joint()
        if "two_phase" in proj and j is not None:
            tpf, jf = proj["two_phase"][0], proj[j][0]
            out.append(f"Projected search: Two-phase {fmt_flops(tpf)} FLOPs vs {by_key[j].label} {fmt_flops(jf)} "
                       f"FLOPs ({jf / tpf:.2f}x)." if tpf > 0 else "")
            if tpf >= jf:
                out.append("Note: with these measured per-run costs and grid sizes the two-phase search is NOT "
                           "cheaper than joint's; prefer joint here unless the grids grow (m x n grows faster "
                           "than m + n).")
        return [x for x in out if x]

    if labels is True:
        lines += rec_labels()
    elif labels is False:
        lines += rec_no_labels()
    else:
        lines.append("Could not tell whether context labels are available (pass --labels or --no-labels).")
        lines.append("If they are:")
        lines += ["  " + x for x in rec_labels()]
        lines.append("If they are not:")
        lines += ["  " + x for x in rec_no_labels()]
    lines.append("")
    lines.append("Rule from Lawton et al., EMNLP Findings 2025: all strategies reach about the same EM/F1 at very "
                 "different compute.")
    return "\n".join(lines) + "\n"

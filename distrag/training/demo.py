"""`make demo` / `distrag demo`: the paper's seven rows, each with its quality and its cost, on the synthetic
task or on any dataset the loaders read (``distrag demo data.format=hotpotqa data.path=...``).

Every strategy of the table (distrag/strategies.py: No-FT, Ft-Embed, Ft-Gen, Independent,
Two-phase, RAG-Seq and RAG-Tok) runs on the same data, the same base models and the same frozen index,
one MLflow run each (Independent combines the Ft-Embed and Ft-Gen rows' models instead of training them
again), then the report (table, CSV, plots, HTML page) is written and attached to MLflow. ``--quick`` swaps in tiny
random models and a tiny world (for tests and smoke runs: the numbers then mean nothing, the plumbing is
the same). On data without context labels (PopQA) the rows that need them (Ft-Embed, Independent) are
skipped, and the output says so.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from distrag.config import ExperimentConfig, load_config
from distrag.logging_setup import progress_enabled, track
from distrag.strategies import STRATEGIES

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"

QUICK_OVERRIDES = [
    "data.synthetic.n_entities=16", "data.synthetic.n_single_hop=24", "data.synthetic.n_two_hop=12",
    "train.max_steps=2", "train.batch_size=4", "train.micro_batch_size=2", "retrieval.top_k=3",
    "generator.max_new_tokens=4", "generator.max_passage_chars=120",
]


def quick_models(cfg: ExperimentConfig) -> ExperimentConfig:
    """Point the config at tiny random models written under output_dir (built once, then reused)."""
    from distrag.data.synthetic import make_synthetic
    from distrag.models.tiny import make_tiny_causal_lm, make_tiny_encoder

    root = Path(cfg.output_dir) / "tiny_models"
    texts = [p.as_text() for p in make_synthetic(cfg.data.synthetic).corpus][:200]
    if not (root / "encoder" / "config.json").exists():
        make_tiny_encoder(root / "encoder", texts)
    if not (root / "lm" / "config.json").exists():
        make_tiny_causal_lm(root / "lm", texts)
    cfg = cfg.model_copy(deep=True)
    cfg.embedder.model = str(root / "encoder")
    cfg.generator.model = str(root / "lm")
    return cfg


def run_demo(config: str | None = None, overrides: list[str] | None = None, *, quick: bool = False,
             show_progress: bool = True, merge: bool = False) -> int:
    """Every strategy's row, table and report; ``merge``: each row's bundle also holds its merged generator."""
    from distrag.reporting.report import print_results, write_report_for_results
    from distrag.training.experiment import Experiment, combine

    overrides = list(overrides or [])
    cfg = load_config(config or DEMO_CONFIG, (QUICK_OVERRIDES if quick else []) + overrides)
    if quick:
        cfg = quick_models(cfg)
    t0 = time.perf_counter()
    exp = Experiment(cfg, show_progress=progress_enabled(show_progress), merge_generator=merge).setup()
    labelled = all(q.has_labels for q in exp.splits.train)
    results, kept, skipped = [], {}, []
    combined = {key for s in STRATEGIES if s.combine_from for key in s.combine_from}  # rows other rows reuse
    for strategy in track(STRATEGIES, "demo", enabled=show_progress, unit="strategies", name=lambda s: s.label):
        c = strategy.apply(cfg)
        if strategy.needs_labels and not labelled:
            skipped.append(strategy.label)  # MNRL needs (question, gold passage) pairs
            continue
        log.info("== %s ==", strategy.label)
        if strategy.combine_from and set(strategy.combine_from) <= kept.keys():
            # Independent: Ft-Embed's encoder + Ft-Gen's generator, the two rows above, not trained a second time
            encoder_from, generator_from = strategy.combine_from
            results.append(exp.run_trained(c, combine(kept[encoder_from], kept[generator_from])))
            continue
        res, models = exp.run(c)
        results.append(res)
        if strategy.key in combined:
            kept[strategy.key] = models
    n = int(results[0].metrics["n_questions"])
    print_results(results, title=f"{len(results)} strategies on {exp.splits.name} ({cfg.eval_split} split, {n} "
                                 f"questions; EM 95% CI: Wilson interval)")
    if skipped:
        print(f"skipped (the training questions have no context labels): {', '.join(skipped)}")
    report_dir = write_report_for_results(results, Path(cfg.output_dir) / "report", tracking_cfg=cfg.tracking)
    base = results[0].metrics["em"]
    best = max(results[1:], key=lambda r: r.metrics["em"])
    print("\nEM gain over No-FT: " + ", ".join(f"{r.label} {100 * (r.metrics['em'] - base):+.1f}"
                                             for r in results[1:]))
    print(f"best: {best.label} ({100 * best.metrics['em']:.1f} EM); demo took {time.perf_counter() - t0:.0f} s")
    print(f"report (Markdown, CSV, plots; open report.html in a browser): {report_dir}")
    if cfg.tracking.enabled:
        from distrag.reporting.tracking import where_runs_are

        print(where_runs_are(cfg.tracking))
    return 0

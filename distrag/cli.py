"""The ``distrag`` command line: eval, train, demo, sweep, report, advise.

Every command takes ``--config FILE`` (YAML) plus dotted overrides, e.g.::

    distrag eval --config distrag/configs/synthetic_eval.yaml retrieval.top_k=3 data.max_questions=100
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from distrag.errors import user_error_exit  # noqa: E402
from distrag.logging_setup import setup_logging  # noqa: E402
from distrag.metric_names import KIND_EVAL  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="experiment YAML (see distrag/configs/ and launch/configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr_generator=1e-4")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and the result table")


def _load(args):
    from distrag.config import load_config

    return load_config(args.config, args.overrides)


def cmd_eval(args) -> int:
    from distrag.reporting.report import print_results
    from distrag.training.experiment import Experiment

    cfg = _load(args)
    cfg.train.strategy = "none"
    exp = Experiment(cfg, show_progress=not args.no_progress).setup()
    res, _ = exp.run(cfg, kind=KIND_EVAL)
    print_results([res], title=f"No-FT baseline on {exp.splits.name} ({cfg.eval_split} split)")
    _where(cfg)
    return 0


def cmd_train(args) -> int:
    from distrag.reporting.report import print_results
    from distrag.training.experiment import Experiment

    cfg = _load(args)
    exp = Experiment(cfg, show_progress=not args.no_progress).setup()
    res, _ = exp.run(cfg)
    print_results([res], title=f"{res.label} on {exp.splits.name} ({cfg.eval_split} split)")
    _where(cfg)
    return 0


def cmd_demo(args) -> int:
    from distrag.training.demo import run_demo

    return run_demo(config=args.config, overrides=args.overrides, quick=args.quick,
                    show_progress=not args.no_progress)


def cmd_sweep(args) -> int:
    from distrag.training.sweep import run_sweep

    cfg = _load(args)
    run_sweep(cfg, show_progress=not args.no_progress)
    _where(cfg)
    return 0


def cmd_report(args) -> int:
    from distrag.config import load_config
    from distrag.reporting.report import write_report

    cfg = load_config(args.config, args.overrides)
    out = write_report(cfg.tracking, Path(args.out or Path(cfg.output_dir) / "report"))
    print(f"report written to {out}")
    return 0


def cmd_advise(args) -> int:
    from distrag.config import load_config
    from distrag.reporting.advise import advise

    cfg = load_config(args.config, args.overrides)
    print(advise(cfg.tracking, labels_available=args.labels, lrs_known=args.lrs_known,
                 grid=cfg if args.config else None))
    return 0


def _where(cfg) -> None:
    from distrag.reporting.tracking import where_runs_are

    if cfg.tracking.enabled:
        print(where_runs_are(cfg.tracking))


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a much smaller setting (tests, smoke runs)")


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="output folder (default: <output_dir>/report)")


def _advise_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", action=argparse.BooleanOptionalAction, default=None,
                   help="context labels available (default: read from the recorded runs)")
    p.add_argument("--lrs-known", action=argparse.BooleanOptionalAction, default=False,
                   help="good learning rates are already known (no grid search needed)")


#: (command, one-line help, handler, extra arguments)
COMMANDS = [
    ("eval", "No-FT baseline: index, retrieve top-k, generate, score, record", cmd_eval, None),
    ("train", "train one strategy (train.strategy=...) and evaluate it", cmd_train, None),
    ("demo", "all seven strategies on the synthetic task, with costs", cmd_demo, _demo_args),
    ("sweep", "learning-rate grid per strategy, selected on dev by EM (ties: F1)", cmd_sweep, None),
    ("report", "paper-style table (Markdown, CSV) and plots from recorded runs", cmd_report, _report_args),
    ("advise", "which strategy to use, from the paper's decision rule and measured costs", cmd_advise,
     _advise_args),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distrag", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_, fn, extra in COMMANDS:
        p = sub.add_parser(name, help=help_)
        _common(p)
        if extra is not None:
            extra(p)
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    setup_logging(not getattr(args, "quiet", False))
    t0 = time.perf_counter()
    rc = user_error_exit(lambda: args.fn(args))
    if rc == 0:
        logging.getLogger("distrag").info("done in %.1fs", time.perf_counter() - t0)
    return rc


if __name__ == "__main__":
    sys.exit(main())

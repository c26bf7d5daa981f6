"""The ``distrag`` command line: eval, train, demo, sweep, report, advise, plan.

Every command takes ``--config FILE`` (YAML) plus dotted overrides, e.g.::

    distrag eval --config distrag/configs/synthetic_eval.yaml retrieval.top_k=3 data.max_questions=100

``distrag COMMAND --help`` says what a command does, what it writes, the strategies it runs (read from
the strategy table, distrag/strategies.py) and an example; ``distrag --version`` the version.

Every argument is parsed here: the library below takes plain values (a ``GroupSelection``, a ``PlanTarget``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from distrag import __version__  # noqa: E402
from distrag.errors import ConfigError, user_error_exit  # noqa: E402
from distrag.logging_setup import progress_enabled, setup_logging  # noqa: E402
from distrag.metric_names import KIND_EVAL  # noqa: E402
from distrag.reporting.groups import GroupSelection  # noqa: E402
from distrag.strategies import BASELINE, STRATEGIES, Strategy  # noqa: E402

if TYPE_CHECKING:
    from distrag.config import ExperimentConfig
    from distrag.costs.plan import PlanTarget

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="experiment YAML (see distrag/configs/ and launch/configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr_generator=1e-4")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars or progress lines (bars are drawn on a terminal only; "
                        "elsewhere, e.g. a SLURM job, progress is a log line every 10%%)")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and the result table")


def _load(args):
    from distrag.config import load_config

    return load_config(args.config, args.overrides)


def cmd_eval(args) -> int:
    from distrag.reporting.report import print_results
    from distrag.training.experiment import Experiment

    cfg = BASELINE.apply(_load(args))
    exp = Experiment(cfg, show_progress=progress_enabled(not args.no_progress),
                     merge_generator=args.merge).setup(generator=not args.retrieval_only)
    if args.retrieval_only:
        res = exp.run_retrieval(cfg)
        print_results([res], title=f"Base retriever on {exp.splits.name} ({cfg.eval_split} split, every question, "
                                   "no generator)")
    else:
        res, _ = exp.run(cfg, kind=KIND_EVAL)
        print_results([res], title=f"No-FT baseline on {exp.splits.name} ({cfg.eval_split} split)")
    _where(cfg)
    return 0


def cmd_train(args) -> int:
    from distrag.reporting.report import print_results
    from distrag.training.experiment import Experiment

    cfg = _load(args)
    exp = Experiment(cfg, show_progress=progress_enabled(not args.no_progress), merge_generator=args.merge).setup()
    res, _ = exp.run(cfg)
    print_results([res], title=f"{res.label} on {exp.splits.name} ({cfg.eval_split} split)")
    _where(cfg)
    return 0


def cmd_demo(args) -> int:
    from distrag.training.demo import run_demo

    return run_demo(config=args.config, overrides=args.overrides, quick=args.quick,
                    show_progress=not args.no_progress, merge=args.merge)


def cmd_sweep(args) -> int:
    from distrag.training.sweep import run_sweep

    cfg = _load(args)
    if cfg.data.dev_fraction == 0:  # the search selects on dev: fail before anything loads
        raise ConfigError([("data.dev_fraction", "0 leaves no dev split, and a sweep selects its learning rates "
                                                 "on dev; set data.dev_fraction above 0 (e.g. 0.2)")], args.config)
    run_sweep(cfg, show_progress=not args.no_progress)
    _where(cfg)
    return 0


def cmd_report(args) -> int:
    from distrag.config import load_config
    from distrag.reporting.report import write_report

    cfg = load_config(args.config, args.overrides)
    _check_tracker(cfg)
    out = write_report(cfg.tracking, Path(args.out or Path(cfg.output_dir) / "report"), selection_from_args(args))
    if out is not None:  # None: --list-groups
        print(f"report written to {out}")
    return 0


def cmd_advise(args) -> int:
    from distrag.config import load_config
    from distrag.reporting.advise import advise

    cfg = load_config(args.config, args.overrides)
    _check_tracker(cfg)
    print(advise(cfg.tracking, labels_available=args.labels, lrs_known=args.lrs_known,
                 grid=cfg if args.config else None, selection=selection_from_args(args)))
    return 0


def _check_tracker(cfg) -> None:
    """A tracking URI with an unsupported scheme or no server behind it is a user error, found in seconds."""
    from distrag.reporting.tracking import tracking_problem

    problem = tracking_problem(cfg.tracking)
    if problem:
        raise ConfigError([("tracking.uri", problem)])


def _where(cfg) -> None:
    from distrag.reporting.tracking import where_runs_are

    if cfg.tracking.enabled:
        print(where_runs_are(cfg.tracking))


def merge_arg(p: argparse.ArgumentParser) -> None:
    """``--merge``, for the commands that write bundles (train, eval, demo)."""
    p.add_argument("--merge", action="store_true", help="each bundle also holds the generator with the LoRA "
                   "adapter merged in: a plain transformers folder, <bundle>/generator/")


def cmd_ask(args) -> int:
    from distrag.serving.commands import ask

    return ask(args.bundle, " ".join(args.question), k=args.top_k, as_json=args.json, device=args.device,
               trust_remote_code=args.trust_remote_code, show_progress=progress_enabled(not args.no_progress))


def cmd_predict(args) -> int:
    from distrag.serving.commands import predict

    return predict(args.bundle, args.out, questions=args.questions, fmt=args.format, split=args.split,
                   batch_size=args.batch_size, device=args.device, trust_remote_code=args.trust_remote_code,
                   show_progress=progress_enabled(not args.no_progress))


def _positive(text: str) -> int:
    """A count given on the command line: a whole number of at least 1 (argparse's usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _bundle_args(p: argparse.ArgumentParser) -> None:
    """What ask and predict share: the bundle, where the models run, the flags every command has."""
    p.add_argument("bundle", help="a pipeline bundle: <output_dir>/models/<strategy>-<hash>/")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: a GPU when there is one)")
    p.add_argument("--trust-remote-code", action="store_true", help="let hub models run their own code (off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and the answers")


def ask_args(p: argparse.ArgumentParser) -> None:
    _bundle_args(p)
    p.add_argument("question", nargs="+", help="the question (words after the bundle are joined)")
    p.add_argument("--top-k", type=_positive, help="passages in the prompt (default: the k it was evaluated at)")
    p.add_argument("--json", action="store_true", help="one JSON object: answer, passages with text and scores")


def predict_args(p: argparse.ArgumentParser) -> None:
    from distrag.data.questions_file import QUESTION_FORMATS

    _bundle_args(p)
    p.add_argument("--questions", help="questions JSONL, HotPotQA JSON/JSONL or PopQA TSV/CSV/JSONL (answers optional)")
    p.add_argument("--split", choices=("train", "dev", "test"), help="instead: the bundle's own split of its data")
    p.add_argument("--format", default="auto", choices=QUESTION_FORMATS, help="format of --questions (auto: detected)")
    p.add_argument("--out", required=True, help="answers JSONL (one line per question: prediction, passages, scores)")
    p.add_argument("--batch-size", type=_positive, default=256, help="questions per batch (default 256)")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retrieval-only", action="store_true",
                   help="score retrieval only, on every question, without the generator")
    merge_arg(p)


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a much smaller setting (tests, smoke runs)")
    merge_arg(p)


def cmd_plan(args) -> int:
    from distrag.reporting.plan_view import run_plan

    cfg = _load(args)
    run_plan(target_from(args, cfg), Path(args.plot) if args.plot else Path(cfg.output_dir) / "plan.png")
    return 0


def add_plan_args(p: argparse.ArgumentParser) -> None:
    """``distrag plan``'s own flags (unset ones come from ``--config`` and its overrides)."""
    p.add_argument("--generator", help="model id / folder / .gguf, or a size: 135m, 1b, 3b, 8b, 70b "
                                       "(default: generator.model)")
    p.add_argument("--embedder", help="model id / folder, or a size: 22m, 110m, 335m (default: embedder.model)")
    p.add_argument("--lora-r", type=int, help="LoRA rank (default: generator.lora.r)")
    p.add_argument("--qlora", action="store_true", help="4-bit base weights (QLoRA; default: generator.quantization "
                                                          "is nf4)")
    p.add_argument("--corpus", type=int, help="passages in the corpus (default: plan.corpus, else 100,000)")
    p.add_argument("--questions", type=int, help="training questions (default: plan.questions, else 10,000)")
    p.add_argument("--epochs", type=float, help="passes over the questions per phase (default: train.epochs)")
    p.add_argument("--k", type=int, help="passages per question (default: train.train_k or retrieval.top_k)")
    p.add_argument("--batch-size", type=int, help="questions per optimizer step, all trainers together (default: "
                                                  "train.batch_size x the job's trainers)")
    p.add_argument("--grid", help="learning rates searched, MxN (default: len(sweep.lr_embedder) x "
                                  "len(sweep.lr_generator))")
    p.add_argument("--gpu", help="A10, L4, A100, H100 or H200 (default: plan.gpu, else A100)")
    p.add_argument("--gpus", type=int, help="GPUs of the job (default: plan.gpus, else 1)")
    p.add_argument("--mfu", type=float, help="model-FLOPs utilisation (default: plan.mfu, else calibrated, see README)")
    p.add_argument("--refresh-every", type=int, help="steps between index refreshes (default: train.refresh_every)")
    p.add_argument("--staleness", type=int, help="index staleness target in steps (default: plan.staleness, else the "
                                                 "refresh interval); sizes the pool of index ranks")
    p.add_argument("--index-ranks", type=int, help="index GPUs the projection assumes (default: "
                                                   "distributed.index_ranks)")
    p.add_argument("--passage-tokens", type=int, default=160, help="tokens per passage")
    p.add_argument("--plot", help="write the plot here (default: <output_dir>/plan.png)")


def target_from(args: argparse.Namespace, cfg: ExperimentConfig) -> PlanTarget:
    """The :class:`~distrag.costs.plan.PlanTarget` of ``distrag plan``'s flags, unset ones read from the
    experiment config."""
    from distrag.costs.plan import DEFAULT_MFU, PlanTarget

    grid = (len(cfg.sweep.lr_embedder), len(cfg.sweep.lr_generator))
    if args.grid:
        try:
            m, n = (int(x) for x in args.grid.lower().split("x"))
        except ValueError:
            raise ConfigError([("--grid", f"expected MxN, e.g. 3x3; got {args.grid!r}")]) from None
        grid = (m, n)

    def pick(value, *defaults):
        return next((v for v in (value, *defaults) if v is not None), None)

    scale = cfg.plan
    gpus = pick(args.gpus, scale.gpus, 1)
    refresh_every = pick(args.refresh_every, cfg.train.refresh_every)
    index_ranks = pick(args.index_ranks, cfg.distributed.index_ranks)
    # train.batch_size is one trainer's questions per step in a launched job (distributed/deepspeed_setup.py); the
    # plan's is the step's, all trainers together: the job's GPUs less the index ranks when the index refreshes
    trainers = gpus - index_ranks if refresh_every and gpus > index_ranks else gpus
    return PlanTarget(
        generator=args.generator or cfg.generator.model, embedder=args.embedder or cfg.embedder.model,
        lora_r=pick(args.lora_r, cfg.generator.lora.r), lora_targets=tuple(cfg.generator.lora.target_modules),
        qlora=args.qlora or cfg.generator.quantization == "nf4", corpus=pick(args.corpus, scale.corpus, 100_000),
        questions=pick(args.questions, scale.questions, 10_000), epochs=pick(args.epochs, cfg.train.epochs),
        k=pick(args.k, cfg.train.train_k or cfg.retrieval.top_k),
        batch_size=pick(args.batch_size, cfg.train.batch_size * trainers),
        grid=grid, gpu=pick(args.gpu, scale.gpu, "A100"), n_gpus=gpus,
        mfu=pick(args.mfu, scale.mfu, DEFAULT_MFU),
        refresh_every=refresh_every, staleness=pick(args.staleness, scale.staleness), index_ranks=index_ranks,
        passage_tokens=args.passage_tokens, gradient_checkpointing=cfg.generator.gradient_checkpointing,
        pair_micro_batch=cfg.train.pair_micro_batch, embed_sides=cfg.train.embed_sides,
        hard_negatives=cfg.train.hard_negatives, rag_passage_grad=cfg.train.rag_passage_grad)


def add_selection_args(p: argparse.ArgumentParser) -> None:
    """``--group``, ``--dataset`` and ``--list-groups`` (``distrag report`` and ``distrag advise``)."""
    p.add_argument("--group", help="comparison group to show: its id or a prefix (see --list-groups); default: "
                                   "the newest complete group")
    p.add_argument("--dataset", help="only groups of this dataset (e.g. synthetic, hotpotqa:dev.json)")
    p.add_argument("--list-groups", action="store_true",
                   help="list the comparison groups recorded (dataset, models, split, k, settings) and exit")


def selection_from_args(args: argparse.Namespace) -> GroupSelection:
    """The group ``--group`` / ``--dataset`` / ``--list-groups`` select (the default group without them)."""
    return GroupSelection(getattr(args, "group", None), getattr(args, "dataset", None),
                          bool(getattr(args, "list_groups", False)))


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="output folder (default: <output_dir>/report)")
    add_selection_args(p)


def _advise_args(p: argparse.ArgumentParser) -> None:
    add_selection_args(p)
    p.add_argument("--labels", action=argparse.BooleanOptionalAction, default=None,
                   help="context labels available (default: read from the recorded runs)")
    p.add_argument("--lrs-known", action=argparse.BooleanOptionalAction, default=False,
                   help="good learning rates are already known (no grid search needed)")


# ----------------------------------------------------------------------------------------------
# help texts: the strategy lists come from the strategy table


def _selector(s: Strategy) -> str:
    """The overrides that select ``s`` (``train.strategy=joint train.rag_loss=token``)."""
    return " ".join(f"train.{k}={v}" for k, v in s.train_overrides().items())


def strategy_list() -> str:
    """Every strategy of the table: key, label, what it trains, and how to select it."""
    width = max(len(s.key) for s in STRATEGIES)
    label_width = max(len(s.label) for s in STRATEGIES)
    lines = ["strategies (distrag/strategies.py; select with train.strategy=KEY):"]
    for s in STRATEGIES:
        lines.append(f"  {s.key:<{width}}  {s.label:<{label_width}}  {s.summary}")
        if _selector(s) != f"train.strategy={s.key}":
            lines.append(f"  {'':<{width}}  {'':<{label_width}}  select with: {_selector(s)}")
    return "\n".join(lines)


def _search_runs(s: Strategy) -> str:
    """How many training runs the search of ``s`` costs, as a formula in m and n."""
    if s.search == "grid":
        return "m x n"
    return " + ".join(sorted("m" if p.train_embedder else "n" for p in s.table_phases))


def sweep_strategy_list() -> str:
    """The ``sweep.strategies`` values and what each search costs (m = len(sweep.lr_embedder),
    n = len(sweep.lr_generator))."""
    seen: dict[str, list[Strategy]] = {}
    for s in STRATEGIES:
        if s.search != "none":
            seen.setdefault(s.train_strategy, []).append(s)
    width = max(len(k) for k in seen)
    lines = ["sweep.strategies values (m = len(sweep.lr_embedder), n = len(sweep.lr_generator) rates):"]
    for name, rows in seen.items():
        labels = " / ".join(s.label for s in rows)
        lines.append(f"  {name:<{width}}  {labels}: {rows[0].search} search, {_search_runs(rows[0])} runs")
    return "\n".join(lines)


@dataclass(frozen=True)
class Command:
    """One ``distrag`` subcommand: its handler, help texts and extra arguments."""

    name: str
    help: str
    """One line, in ``distrag --help``."""
    handler: Callable[[argparse.Namespace], int]
    description: str
    """What it does and what it writes (``distrag NAME --help``)."""
    example: str
    strategies: Callable[[], str] | None = None
    """The strategy list shown in its help, when it runs strategies."""
    extra: Callable[[argparse.ArgumentParser], None] | None = None
    config: bool = True
    """Takes --config and overrides (ask and predict read the bundle's own configuration)."""

    def epilog(self) -> str:
        parts = [self.strategies()] if self.strategies else []
        parts.append("example:\n" + "\n".join(f"  {line}" for line in self.example.splitlines()))
        return "\n\n".join(parts)


_WRITES_RUN = ("Writes one MLflow run (tracking.uri, default ./mlflow.db; experiment tracking.experiment)\n"
               "with the metrics, costs, parameters and predictions_<split>.jsonl.")

COMMANDS = [
    Command("eval", "No-FT baseline: index, retrieve top-k, generate, score, record", cmd_eval,
            "Evaluate the base retriever and generator without training (the No-FT row): build the\n"
            "index of the corpus (cached under <output_dir>/index/), retrieve the top-k passages for every\n"
            "question of eval_split, generate answers and score EM, F1 and recall@k.\n" + _WRITES_RUN +
            "\n--retrieval-only: no generator is loaded; Recall@k, Recall-all@k, answer recall@k, MRR@k and\n"
            "nDCG@k on every question of eval_split (max_eval_questions caps only generation), recorded in\n"
            "an MLflow run of kind 'retrieval' with retrieval_<split>.jsonl.",
            "distrag eval --config distrag/configs/synthetic_eval.yaml retrieval.top_k=3\n"
            "distrag eval --retrieval-only data.format=hotpotqa data.path=hotpot_dev.json retrieval.top_k=10",
            None, _eval_args),
    Command("train", "train one strategy (train.strategy=...) and evaluate it", cmd_train,
            "Train one strategy on the training split, then evaluate it on eval_split as `eval` does.\n"
            + _WRITES_RUN + "\nThe pipeline goes to <output_dir>/models/<strategy>-<config hash>/, a bundle for ask\n"
            "and predict (encoder, adapter, index, corpus, config, model card), and to the run as its MLflow model.",
            "distrag train --config distrag/configs/demo.yaml train.strategy=joint train.rag_loss=sequence",
            strategy_list, merge_arg),
    Command("demo", "every strategy of the table on the synthetic task (or any data), with costs", cmd_demo,
            "Run every strategy of the table on the same data, base models and index (the paper's rows),\n"
            "one MLflow run each, and print the comparison table with EM, its 95% interval, and costs.\n"
            "Writes the MLflow runs (experiment distrag-demo) and the report (table.md, table.csv, plots)\n"
            "to <output_dir>/report/ (runs/demo/report/). Rows that need context labels are skipped on\n"
            "data without them. --quick: tiny random models (the plumbing, not the numbers).",
            "distrag demo\ndistrag demo --quick\ndistrag demo data.format=hotpotqa data.path=hotpot_dev.json",
            strategy_list, _demo_args),
    Command("sweep", "learning-rate grid per strategy, selected on dev by EM (ties: F1)", cmd_sweep,
            "Search the learning rates of each strategy in sweep.strategies over the sweep.lr_embedder x\n"
            "sweep.lr_generator grids: every grid point is trained and scored on the dev split, the best\n"
            "(dev EM, ties: dev F1) is selected and only the selected models are evaluated on eval_split.\n"
            "Writes per strategy an MLflow run of kind 'sweep' (search FLOPs and wall-clock, selected\n"
            "rates) with one child run per grid point (dev metrics) and one for the selected models.",
            "distrag sweep --config distrag/configs/demo.yaml 'sweep.strategies=[two_phase,joint]' "
            "'sweep.lr_generator=[3e-4,1e-3]'",
            sweep_strategy_list),
    Command("report", "paper-style table, plots and an HTML page from recorded runs", cmd_report,
            "Read the strategy runs recorded in the MLflow experiment (tracking.uri, tracking.experiment),\n"
            "keep one comparison group (same dataset, models, eval split, k and settings; by default the\n"
            "newest complete group, else --group / --dataset; --list-groups lists them) and write its\n"
            "comparison table (table.md, table.csv), plots (EM against training FLOPs and device-hours,\n"
            "cost by phase) and report.html (table and plots in one page, for a browser) to --out\n"
            "(default <output_dir>/report/); the same files are attached to the group's report run in MLflow.",
            "distrag report --config distrag/configs/demo.yaml\n"
            "distrag report --config distrag/configs/demo.yaml --list-groups\n"
            "distrag report tracking.uri=http://mlflow-node:5000 tracking.experiment=distrag-sweep-1234 --out report",
            None, _report_args),
    Command("advise", "which strategy to use, from the paper's decision rule and measured costs", cmd_advise,
            "Apply the paper's decision rule (context labels -> independent; no labels and known learning\n"
            "rates -> joint; no labels, rates to search -> two-phase) to what one comparison group of the\n"
            "MLflow experiment measured (chosen as for `report`): EM/F1, training FLOPs, wall-clock and the\n"
            "projected cost of each strategy's learning-rate search (grid sizes from --config's sweep\n"
            "section). Prints the recommendation; writes nothing.",
            "distrag advise --config distrag/configs/demo.yaml --labels\n"
            "distrag advise --config distrag/configs/demo.yaml --no-labels --lrs-known",
            strategy_list, _advise_args),
    Command("plan", "project each strategy's FLOPs, hours and memory per device before training", cmd_plan,
            "Project every strategy of the table for a target (models by id or size, LoRA/QLoRA rank, corpus,\n"
            "questions, epochs, k, LR grid, GPU kind and count, MFU, index refresh): FLOPs of a run and of its\n"
            "learning-rate search (the ledger's formulas), wall-clock, device-hours and memory per device, and\n"
            "the index rank a staleness target needs. Prints the table; writes the plot (--plot). Unset flags\n"
            "come from --config and its overrides. Trains nothing.",
            "distrag plan --generator 8b --embedder 110m --qlora --lora-r 16 --gpu A10 --gpus 8 --corpus 5233329 "
            "--questions 90447 --k 5 --grid 3x3",
            strategy_list, add_plan_args),
    Command("ask", "answer a question with a trained pipeline (a bundle), showing the passages", cmd_ask,
            "Load a pipeline bundle (checked file by file first) and answer one question as evaluation did (same\n"
            "retrieval, prompt and decoding). Prints the answer and the top-k passages with scores; writes nothing.",
            'distrag ask runs/demo/models/gen_ft-0123abcd4567 "Who founded Quillon Dynamics?"', None, ask_args, False),
    Command("predict", "answer a file of questions with a bundle; scored when it has answers", cmd_predict,
            "Answer a file of questions (JSONL, HotPotQA, PopQA) or the bundle's own split, in batches; writes --out\n"
            "(JSONL: answer, passages, scores); questions with answers are scored (EM with its 95% CI, F1, Recall@k).",
            "distrag predict runs/demo/models/gen_ft-0123abcd4567 --questions q.jsonl --out answers.jsonl\n"
            "distrag predict runs/demo/models/gen_ft-0123abcd4567 --split test --out t.jsonl", None, predict_args,
            False),
]


class _IntermixedParser(argparse.ArgumentParser):
    """A command's parser: options and ``key=value`` overrides in any order (``train --config C a=b --no-progress
    c=d``; plain parsing stops collecting positionals at the first option after them)."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # the intermixed parse runs its two passes through this very method
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def build_parser() -> argparse.ArgumentParser:
    """The ``distrag`` argument parser, one subparser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="distrag", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="distrag: fine-tune retrieval-augmented generation pipelines (retriever, generator or both,\n"
                    "with the strategies of distrag/strategies.py) and account for what each costs.",
        epilog="examples:\n  distrag demo --quick\n  distrag train --help\n  distrag ask BUNDLE \"question\"\n\n"
               "Every command but ask and predict takes --config FILE.yaml plus dotted overrides\n"
               "(train.lr_generator=1e-4), in any order with its options.")
    parser.add_argument("--version", action="version", version=f"distrag {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_IntermixedParser)
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help, description=c.description, epilog=c.epilog(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if c.config:
            _common(p)
        if c.extra is not None:
            c.extra(p)
        p.set_defaults(fn=c.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(not getattr(args, "quiet", False), progress=not args.no_progress)
    t0 = time.perf_counter()
    rc = user_error_exit(lambda: args.fn(args))
    if rc == 0:
        logging.getLogger("distrag").info("done in %.1fs", time.perf_counter() - t0)
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""The command line of trained pipelines: ``distrag ask``, ``distrag predict`` (their arguments and handlers) and
the ``--merge`` option of the commands that write bundles; :mod:`distrag.cli` lists them with the other commands.

The work is :mod:`distrag.serving.commands`' (plain values); this module only turns arguments into them.
"""

from __future__ import annotations

import argparse

from distrag.logging_setup import progress_enabled


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
    p.add_argument("--top-k", type=int, help="passages in the prompt (default: the k it was evaluated at)")
    p.add_argument("--json", action="store_true", help="one JSON object: answer, passages with text and scores")


def predict_args(p: argparse.ArgumentParser) -> None:
    from distrag.data.questions_file import QUESTION_FORMATS

    _bundle_args(p)
    p.add_argument("--questions", help="questions JSONL, HotPotQA JSON/JSONL or PopQA TSV/CSV/JSONL (answers optional)")
    p.add_argument("--split", choices=("train", "dev", "test"), help="instead: the bundle's own split of its data")
    p.add_argument("--format", default="auto", choices=QUESTION_FORMATS, help="format of --questions (auto: detected)")
    p.add_argument("--out", required=True, help="answers JSONL (one line per question: prediction, passages, scores)")
    p.add_argument("--batch-size", type=int, default=256, help="questions per batch (default 256)")

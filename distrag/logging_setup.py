"""Logging for every entry point (``distrag ...`` and ``launch/train.py``): one call, one format.

``setup_logging(verbose)`` sends distrag's own messages through rich (INFO when verbose, else WARNING)
and turns the chatter of third-party libraries (transformers, mlflow, DeepSpeed, ...) down to errors.
``quiet_rank()`` is what a non-zero rank of a distributed job calls: only trainer 0 speaks.
"""

from __future__ import annotations

import logging
import os

NOISY_LOGGERS = ("transformers", "sentence_transformers", "mlflow", "alembic", "urllib3", "httpx",
                 "huggingface_hub", "faiss", "DeepSpeed")


def setup_logging(verbose: bool = True) -> None:
    from rich.logging import RichHandler

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(show_path=False, rich_tracebacks=False)], force=True)
    logging.getLogger("distrag").setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    # after the imports above: importing transformers resets huggingface_hub's level
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)


def quiet_rank() -> None:
    """Every rank but trainer 0: warnings and errors only."""
    logging.getLogger("distrag").setLevel(logging.WARNING)

"""Logging for every entry point (``distrag ...`` and ``launch/train.py``): one call, one format.

``setup_logging(verbose)`` sends distrag's own messages through rich (INFO when verbose, else WARNING)
and turns the chatter of third-party libraries (transformers, mlflow, DeepSpeed, ...) down to errors.
``quiet_rank()`` is what a non-zero rank of a distributed job calls: only trainer 0 speaks.
"""

from __future__ import annotations

import logging
import os

from distrag.redaction import CredentialFilter

NOISY_LOGGERS = ("transformers", "sentence_transformers", "mlflow", "alembic", "urllib3", "httpx",
                 "huggingface_hub", "faiss", "DeepSpeed")


def setup_logging(verbose: bool = True) -> None:
    from rich.logging import RichHandler

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handler = RichHandler(show_path=False, rich_tracebacks=False)
    handler.addFilter(CredentialFilter())  # a tracking URI's credentials never reach the log
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[handler], force=True)
    logging.getLogger("distrag").setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:  # mlflow installs its own stderr handler when imported: configure it first, then route it
        import mlflow  # noqa: F401
    except ImportError:  # pragma: no cover - mlflow is a dependency
        pass
    # after the imports above: importing transformers resets huggingface_hub's level
    for noisy in NOISY_LOGGERS:
        logger = logging.getLogger(noisy)
        logger.setLevel(logging.ERROR)
        # through our one (credential-masking) handler, never a library's own
        for own in list(logger.handlers):
            logger.removeHandler(own)
        logger.propagate = True


def quiet_rank() -> None:
    """Every rank but trainer 0: warnings and errors only."""
    logging.getLogger("distrag").setLevel(logging.WARNING)

"""The logging set-up shared by `distrag` and launch/train.py."""

from __future__ import annotations

import logging

from distrag.logging_setup import NOISY_LOGGERS, quiet_rank, setup_logging


def test_verbose_quiet_and_third_party_levels():
    setup_logging(verbose=True)
    assert logging.getLogger("distrag").level == logging.INFO
    assert all(logging.getLogger(n).level == logging.ERROR for n in NOISY_LOGGERS)
    setup_logging(verbose=False)
    assert logging.getLogger("distrag").level == logging.WARNING
    setup_logging(verbose=True)
    quiet_rank()
    assert logging.getLogger("distrag").level == logging.WARNING
    setup_logging(verbose=True)


def test_libraries_log_through_the_one_masking_handler():
    """mlflow installs its own stderr handler on import; after set-up its records reach only ours (which masks
    tracking credentials), whatever was imported first."""
    import mlflow  # noqa: F401

    setup_logging(verbose=True)
    try:
        for name in NOISY_LOGGERS:
            assert logging.getLogger(name).handlers == [] and logging.getLogger(name).propagate, name
        (root_handler,) = logging.getLogger().handlers
        assert root_handler.filters, "the root handler masks credentials"
    finally:
        setup_logging(verbose=True)

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

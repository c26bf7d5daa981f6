"""The logging set-up shared by `distrag` and launch/train.py: one masking handler, rich on a terminal and
plain unwrapped lines elsewhere, libraries and their warnings kept quiet, and overall progress."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
from rich.logging import RichHandler

from distrag import logging_setup
from distrag.logging_setup import NOISY_LOGGERS, Progress, progress_enabled, quiet_rank, setup_logging, track

URI = "http://bob:" + "hunter2" + "@mlflow.internal:5000"


@pytest.fixture
def restore_logging():
    """Whatever a test sets up, the next one starts from the usual verbose set-up."""
    with warnings.catch_warnings():
        yield
        setup_logging(verbose=True)


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


def test_a_library_that_installs_its_handler_after_the_set_up_still_goes_through_ours(capsys, restore_logging):
    """DeepSpeed's logger factory runs on its first import, after the set-up: its own stdout handler, propagate off,
    level WARNING. Its warnings stay hidden, its errors come out once, through the masking handler."""
    setup_logging(verbose=True, interactive=False)
    ds = logging.getLogger("DeepSpeed")
    own = logging.StreamHandler()  # what deepspeed.utils.logging.LoggerFactory.create_logger does
    ds.addHandler(own)
    ds.propagate, ds.level = False, logging.WARNING
    seen: list[logging.LogRecord] = []
    own.emit = seen.append  # type: ignore[method-assign]
    try:
        ds.warning("Setting accelerator to CPU")
        ds.error("cannot reach %s", URI)
    finally:
        ds.removeHandler(own)
    err = capsys.readouterr().err
    assert not seen  # the library's own handler never writes
    assert "Setting accelerator" not in err
    assert err.count("cannot reach http://***@mlflow.internal:5000") == 1 and "hunter2" not in err


def test_plain_lines_off_a_terminal(capsys, restore_logging):
    """A SLURM log: one line per record, time, level and logger name, never wrapped, credentials masked."""
    setup_logging(verbose=True, interactive=False)
    (handler,) = logging.getLogger().handlers
    assert not isinstance(handler, RichHandler)
    long = "x" * 300
    logging.getLogger("distrag.training.demo").info("== Ft-Gen == %s %s", long, URI)
    (line,) = capsys.readouterr().err.splitlines()
    date, clock, level, name, *_ = line.split()
    assert len(date) == 10 and len(clock) == 8 and level == "INFO" and name == "distrag.training.demo:"
    assert line.endswith(f"== Ft-Gen == {long} http://***@mlflow.internal:5000")


def test_rich_on_a_terminal(restore_logging):
    setup_logging(verbose=True, interactive=True)
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, RichHandler) and handler.filters


def test_library_progress_bars_are_off_unless_shown_on_a_terminal(monkeypatch, restore_logging):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    setup_logging(verbose=True, interactive=True)
    assert "TQDM_DISABLE" not in os.environ
    setup_logging(verbose=True, interactive=True, progress=False)  # --no-progress
    assert os.environ["TQDM_DISABLE"] == "1"
    monkeypatch.delenv("TQDM_DISABLE")
    setup_logging(verbose=True, interactive=False)  # a log file
    assert os.environ["TQDM_DISABLE"] == "1"
    monkeypatch.setattr(logging_setup, "is_interactive", lambda: False)
    assert not progress_enabled(True)
    monkeypatch.setattr(logging_setup, "is_interactive", lambda: True)
    assert progress_enabled(True) and not progress_enabled(False)


def _warn(category: type[Warning], module: str, text: str) -> None:
    warnings.warn_explicit(text, category, f"/site-packages/{module.replace('.', '/')}.py", 12, module=module,
                           registry={})


def test_third_party_warnings_are_filtered_and_distrags_are_one_line(monkeypatch, capsys, restore_logging):
    monkeypatch.delenv(logging_setup.SHOW_WARNINGS_ENV, raising=False)
    warnings.resetwarnings()  # the test runner's own filters aside: only the set-up's count
    setup_logging(verbose=True, interactive=False)
    _warn(FutureWarning, "transformers.modeling_utils", "`is_gradient_checkpointing` is deprecated")
    _warn(DeprecationWarning, "peft.tuners", "old peft api")
    _warn(UserWarning, "torch.storage", "TypedStorage is deprecated")
    _warn(UserWarning, "distrag.data.popqa", "skipped 3 retrieved contexts with empty text")
    _warn(RuntimeWarning, "distrag.distributed.refresh_client", f"ignoring a record from {URI}")
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert "WARNING py.warnings: UserWarning: skipped 3 retrieved contexts with empty text" in lines[0]
    assert lines[0].endswith("distrag/data/popqa.py:12)")
    assert "RuntimeWarning: ignoring a record from http://***@mlflow.internal:5000" in lines[1]


def test_every_warning_with_distrag_show_warnings(monkeypatch, capsys, restore_logging):
    monkeypatch.setenv(logging_setup.SHOW_WARNINGS_ENV, "1")
    with warnings.catch_warnings():
        warnings.resetwarnings()  # the test runner's own filters aside
        setup_logging(verbose=True, interactive=False)
        _warn(FutureWarning, "transformers.modeling_utils", "`is_gradient_checkpointing` is deprecated")
        _warn(UserWarning, "torch.storage", "TypedStorage is deprecated")
    err = capsys.readouterr().err
    assert "FutureWarning: `is_gradient_checkpointing` is deprecated" in err and "TypedStorage" in err


# ----------------------------------------------------------------------------------------------
# overall progress


def test_progress_off_a_terminal_is_a_log_line_every_ten_percent(caplog):
    caplog.set_level(logging.INFO, logger="distrag.progress")
    p = Progress(20, "sweep", unit="grid points", interactive=False)
    for i in range(20):
        p.advance(f"point {i}")
    p.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "distrag.progress"]
    assert len(lines) == 10  # 10 %, 20 %, ... 100 %
    assert lines[0].startswith("sweep: 2/20 grid points (10%), point 1 done; ") and "left" in lines[0]
    assert lines[-1].startswith("sweep: 20/20 grid points (100%), point 19 done; ") and "left" not in lines[-1]
    assert all("\r" not in line for line in lines)


def test_track_counts_skipped_steps_and_says_nothing_when_disabled(caplog):
    caplog.set_level(logging.INFO, logger="distrag.progress")
    done = []
    for s in track(["No-FT", "Ft-Embed", "Ft-Gen"], "demo", unit="strategies", interactive=False):
        if s == "Ft-Embed":
            continue  # skipped (no context labels): counted all the same
        done.append(s)
    lines = [r.getMessage() for r in caplog.records if r.name == "distrag.progress"]
    assert done == ["No-FT", "Ft-Gen"]
    assert [line.split(";")[0] for line in lines] == ["demo: 1/3 strategies (33%), No-FT done",
                                                      "demo: 2/3 strategies (67%), Ft-Embed done",
                                                      "demo: 3/3 strategies (100%), Ft-Gen done"]
    caplog.clear()
    assert list(track([1, 2], "demo", enabled=False, interactive=False)) == [1, 2]
    assert not [r for r in caplog.records if r.name == "distrag.progress"]


def test_progress_on_a_terminal_is_one_bar(capsys, caplog):
    caplog.set_level(logging.INFO, logger="distrag.progress")
    with pytest.raises(RuntimeError):
        for _ in track(range(4), "demo", unit="strategies", interactive=True):
            raise RuntimeError("a strategy failed")  # the bar is closed all the same
    assert not [r for r in caplog.records if r.name == "distrag.progress"]
    err = capsys.readouterr().err
    assert "demo:" in err and "0/4" in err
